//! VM backends: the one place where QEMU, Firecracker and Cloud Hypervisor differ.
//!
//! A backend turns a [`MachineSpec`] into host-side plumbing (sockets, helper daemons) and the VMM
//! command line; [`crate::Vm`] then spawns, watches and tears down the result the same way for all.
//! To add a backend: implement this trait in `backend/<name>.rs` and select it where the CLI builds
//! machines. Firecracker and Cloud Hypervisor, which are configured over a REST API after spawning,
//! will add a post-spawn step here.

pub mod qemu;

use std::os::fd::BorrowedFd;
use std::process::Command;
use std::time::Instant;

use crate::error::{MachineError, Result};

use crate::events::EventSink;
use crate::process::ManagedChild;
use crate::qmp::Qmp;
use crate::spec::MachineSpec;
use crate::state_dir::MachineDir;
use crate::transport::ListeningSocket;
use crate::transport::Transport;

pub use qemu::Qemu;

pub trait Backend {
    fn name(&self) -> &'static str;

    /// The VMM as users know it, for messages ("QEMU refused to start: …").
    fn vmm_name(&self) -> &'static str {
        self.name()
    }

    /// Whether this backend's machines can do `capability`; see [`require`].
    fn supports(&self, capability: Capability) -> bool;

    /// Guest kernel drivers (module names) that the devices this backend gives `spec` need.
    /// Image builders pack and load exactly these, so a guest pays only for the hardware it has.
    fn guest_drivers(&self, spec: &MachineSpec) -> Vec<&'static str>;

    /// Sets up what the VM needs on the host and returns the VMM command. Helper daemons started
    /// here are [`ManagedChild`]s, so they die with attest, and report an unexpected exit to
    /// `events`.
    fn prepare(&self, spec: &MachineSpec, dir: &MachineDir, events: &EventSink) -> Result<Prepared>;
}

/// What a machine can do beyond running a guest, which not every VMM offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Screenshot,
    SendKeys,
    Snapshots,
    PortForwarding,
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::Screenshot => "screenshots",
            Capability::SendKeys => "sending keys",
            Capability::Snapshots => "snapshots",
            Capability::PortForwarding => "port forwarding",
        })
    }
}

/// Ok if `backend` can do `capability`, else an error that says which backend cannot do what.
pub fn require(backend: &dyn Backend, capability: Capability) -> Result<()> {
    match backend.supports(capability) {
        true => Ok(()),
        false => Err(MachineError::Unsupported { backend: backend.name(), what: capability.to_string() }),
    }
}

pub struct Prepared {
    pub command: Command,
    /// Daemons the VM depends on (e.g. virtiofsd), killed after the VMM.
    pub helpers: Vec<ManagedChild>,
    /// The channel to the guest agent, when the spec asked for one.
    pub agent: Option<Box<dyn Transport>>,
    /// The VMM's control channel, bound before the VMM starts and connected on first use.
    pub control: Option<PendingControl>,
    /// Runs once the VMM process exists, before the machine counts as started: how VMMs that are
    /// configured over a REST API after spawning (Firecracker, Cloud Hypervisor) get their machine
    /// and boot it. QEMU, configured by its command line, has none. Given the VMM's pid.
    pub after_spawn: Option<AfterSpawn>,
}

pub type AfterSpawn = Box<dyn FnOnce(u32) -> Result<()> + Send>;

/// A control channel the VMM connects to once it runs.
pub enum PendingControl {
    /// QEMU's QMP: QEMU connects to this socket as a client.
    Qmp(ListeningSocket),
}

impl PendingControl {
    /// Waits, at most until `deadline`, for the VMM to connect and completes the handshake; gives up
    /// at once when `unless` (the VMM's exit watch) fires.
    pub fn connect(self, deadline: Instant, unless: Option<BorrowedFd<'_>>) -> Result<Control> {
        match self {
            PendingControl::Qmp(mut socket) => {
                let stream =
                    socket.connect(deadline, unless).map_err(MachineError::io("waiting for QEMU's QMP connection"))?;
                Ok(Control::Qmp(std::sync::Arc::new(Qmp::handshake(stream, deadline)?)))
            }
        }
    }
}

/// How attest drives a running VMM beyond its process: QEMU's QMP today; the REST APIs of
/// Firecracker and Cloud Hypervisor join as variants. Cheap to clone and usable from any thread, so
/// a long wait on it (for an event) never holds the machine.
#[derive(Clone)]
pub enum Control {
    Qmp(std::sync::Arc<Qmp>),
}
