//! What a running machine reports, from watcher threads: a leaf module, so the VMM, its backends and
//! its helper daemons can all report without depending on one another.

use std::sync::Arc;

use attest_protocol::ExitStatus;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The VMM process exited.
    VmmExited(ExitStatus),
    /// A helper daemon the VM depends on exited while the VM ran.
    HelperFailed(String),
}

/// Where a machine's watcher threads deliver its [`VmEvent`]s. Backends and helpers report here,
/// not knowing the machine's name; [`crate::Vm`] adds it.
pub type EventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// A [`VmEvent`] and the machine it happened to, as a [`crate::Vm`]'s owner hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineEvent {
    pub machine: String,
    pub event: VmEvent,
}

pub type MachineEventSink = Arc<dyn Fn(MachineEvent) + Send + Sync>;
