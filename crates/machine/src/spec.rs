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
    /// Name of the virtio-serial port the guest agent speaks on, if the guest runs one.
    pub agent_port: Option<String>,
}

/// A host directory exported to the guest under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    pub fs: ShareFs,
}
