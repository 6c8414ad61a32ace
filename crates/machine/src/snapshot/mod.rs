//! What a snapshot of a VM is made of, whatever the backend: the device state, the guest's memory
//! (in the state file, or a file the VM's RAM was mapped from) and each writable disk frozen at
//! that instant. Saving and loading are the backend's ([`crate::control::VmControl`]); starting a
//! VMM that receives a snapshot is [`crate::Machine::restore`].

pub mod cache;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a snapshot keeps the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryImage {
    /// In the state file, with the device state: what a running test's snapshot uses, since its
    /// VM goes on running (and changing its memory) after the save.
    InState,
    /// In this file, which the VM's RAM was mapped from (shared) while it ran, and which the VM
    /// never touches again after the save. A restore maps it private: clones read the template's
    /// pages from the page cache and copy only those they write.
    File(PathBuf),
}

/// A saved VM, ready to be loaded into a fresh VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The device state (and the memory, with [`MemoryImage::InState`]).
    pub state: PathBuf,
    pub memory: MemoryImage,
    /// For each of the machine's disks, in its spec's order: the frozen image a restored VM
    /// continues on (through an overlay of its own), or `None` for a disk that is never written.
    pub disks: Vec<Option<PathBuf>>,
}

/// How to save a paused VM.
#[derive(Debug, Clone)]
pub struct SavePlan {
    /// The snapshot the save produces; its `disks` are the images frozen by `continue_on`.
    pub snapshot: Snapshot,
    /// For each writable disk (its index in the spec), the new overlay it continues on once the
    /// image it had is frozen.
    pub continue_on: Vec<(usize, PathBuf)>,
}

/// How a VM's RAM is backed, chosen per start: what makes a VM a template or a clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// Anonymous memory of the VMM's own.
    #[default]
    Anonymous,
    /// Mapped from `path`: `shared` (writes reach the file) for a VM to be saved as a template,
    /// private (copy-on-write) for a clone restored from one.
    File { path: PathBuf, shared: bool },
}
