//! VM backends: the one place where QEMU, Firecracker and Cloud Hypervisor differ.
//!
//! A backend turns a [`MachineSpec`] into host-side plumbing (sockets, helper daemons) and the VMM
//! command line; [`crate::Vm`] then spawns, watches and tears down the result the same way for all.
//! After spawning, the driver acts on a VM only through the [`VmControl`](crate::control::VmControl)
//! the backend hands back ([`Prepared::control`]). To add a backend: implement [`Backend`] (and its
//! `VmControl`) in `backend/<name>/`, and select it where the driver and the CLI build machines.
//! Firecracker and Cloud Hypervisor, configured over a REST API after spawning, do that in
//! [`Prepared::after_spawn`].

pub mod qemu;

use std::process::Command;

use crate::error::{MachineError, Result};

use crate::control::PendingControl;
use crate::events::EventSink;
use crate::process::ManagedChild;
use crate::spec::MachineSpec;
use crate::state_dir::MachineDir;
use crate::transport::Transport;

pub use qemu::Qemu;

pub trait Backend {
    fn name(&self) -> &'static str;

    /// The VMM as users know it, for messages ("QEMU refused to start: …").
    fn vmm_name(&self) -> &'static str {
        self.name()
    }

    /// The VMM's program, whose identity is part of a cached snapshot's key (a snapshot loads
    /// only into the VMM version that saved it).
    fn vmm_binary(&self) -> &std::path::Path;

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
