//! What a machine is: the backend-independent description every backend turns into a running VM.

use std::path::PathBuf;

pub use attest_protocol::ShareFs;

use crate::accel::Accel;
use crate::network::Nic;

#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub shares: Vec<Share>,
    pub nics: Vec<Nic>,
    /// How the host reaches the command channel in the guest, if the guest has one.
    pub guest_channel: Option<GuestChannel>,
}

/// The guest side of a command channel, independent of the VMM. Each backend offers what its
/// devices can carry: QEMU all but vsock today; Firecracker and Cloud Hypervisor only vsock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestChannel {
    /// A named virtio-serial port (attest's agent: [`attest_protocol::AGENT_PORT`]).
    VirtioSerialPort(String),
    /// A virtio console (`/dev/hvc0`), where a NixOS guest's backdoor shell listens.
    VirtConsole,
    /// A vsock port in the guest.
    Vsock { port: u32 },
}

/// A host directory exported to the guest under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    pub fs: ShareFs,
}
