//! attest machines: describing a VM ([`MachineSpec`]), choosing an accelerator, starting it through a
//! [`Backend`], and owning everything it runs on the host until it is gone.

pub mod accel;
pub mod backend;
pub mod console;
pub mod control;
pub mod disk;
pub mod error;
pub mod events;
pub mod helper;
pub mod machine;
pub mod network;
pub mod process;
pub mod share_fs;
pub mod snapshot;
pub mod spec;
pub mod state_dir;
pub mod transport;
pub mod vhost_vsock;
pub mod virtiofsd;
pub mod vm;

pub use accel::{Accel, AccelChoice, AccelRequest};
pub use backend::{Backend, Qemu};
pub use console::{Console, Echo};
pub use control::{PortForward, VmControl, VmmEvent};
pub use disk::{Disk, DiskBus, DiskFormat, Media};
pub use error::MachineError;
pub use events::{EventSink, MachineEvent, MachineEventSink, VmEvent};
pub use machine::Machine;
pub use network::{NetBackend, Nic};
pub use snapshot::{MemoryImage, RamBacking, Snapshot};
pub use spec::{Boot, Firmware, GuestChannel, KernelBoot, MachineSpec, Share, ShareFs, StartScript, Uefi};
pub use state_dir::{MachineDir, StateDir};
pub use transport::Transport;
pub use vm::Vm;
