//! Cached ready machines: snapshots of machines booted to their ready point, kept across runs in
//! attest's cache and found again by a key over everything that decides the booted state. An entry
//! is a directory written under a temporary name and renamed into place when complete, so a
//! reader never sees half of one; one process builds an entry at a time (an exclusive `flock`), and
//! the others boot cold meanwhile. An entry that fails its check is reported and removed.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{MemoryImage, Snapshot};
use crate::error::{MachineError, Result};
use crate::spec::{Boot, MachineSpec};

/// The files of an entry, besides its frozen disks (`disk<N>.qcow2`).
const MANIFEST: &str = "manifest.json";
const STATE: &str = "state";
const MEMORY: &str = "memory";

/// The snapshot cache under attest's cache directory.
pub struct SnapshotCache {
    dir: PathBuf,
}

/// What an entry records about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub machine: String,
    pub key: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Every file of the entry and its length, checked before each use.
    pub files: Vec<(String, u64)>,
    /// For each disk of the machine, its frozen image's file name in the entry.
    pub disks: Vec<Option<String>>,
    /// Whether the memory is a file of its own (clones map it private) or in the state.
    pub memory_file: bool,
}

/// A complete entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What [`SnapshotCache::begin`] found.
pub enum Begin {
    Building(Builder),
    /// Another process builds this entry now.
    Busy,
    /// The cache's filesystem has less room than a snapshot of the machine may take.
    NoRoom {
        free: u64,
        needed: u64,
        dir: PathBuf,
    },
}

/// What a lookup found.
pub enum Lookup {
    Hit(Entry),
    Miss,
    /// An entry that cannot be used, and why; it has been removed.
    Unusable {
        dir: PathBuf,
        why: String,
    },
}

/// An entry being built, under the key's lock.
pub struct Builder {
    key: String,
    machine: String,
    staging: PathBuf,
    final_dir: PathBuf,
    _lock: Flock<File>,
}

impl SnapshotCache {
    /// The cache in `$ATTEST_SNAPSHOT_CACHE`, else `<attest cache>/snapshots`.
    pub fn new(attest_cache: &Path) -> SnapshotCache {
        let dir = std::env::var_os("ATTEST_SNAPSHOT_CACHE").map(PathBuf::from);
        SnapshotCache { dir: dir.unwrap_or_else(|| attest_cache.join("snapshots")) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `spec` booted to its ready point: a hash over the VMM binary, this program, the
    /// boot files' identities (path, size, modification time, inode: a changed image is a new
    /// key), the base images under its overlays, memory, vCPUs, devices and command lines, and
    /// `extra` (the caller's part: the ready condition, the guest's network setup). Files under
    /// `run_dir` (blank disks made for this run) count by their size alone.
    pub fn key(spec: &MachineSpec, run_dir: &Path, vmm: &Path, extra: &Value) -> Result<String> {
        let boot = match &spec.boot {
            Boot::Kernel(k) => json!({
                "kernel": identity(&k.kernel)?,
                "initrd": k.initrd.as_deref().map(identity).transpose()?,
                "cmdline": k.cmdline,
            }),
            Boot::Firmware(firmware) => json!({ "firmware": format!("{firmware:?}") }),
            Boot::StartScript(script) => json!({
                "script": identity(&script.path)?,
                "text": String::from_utf8_lossy(&std::fs::read(&script.path).map_err(MachineError::io(format!("reading {}", script.path.display())))?),
                "qemu_opts": script.qemu_opts, "kernel_params": script.kernel_params,
            }),
        };
        let disks: Vec<Value> = spec
            .disks
            .iter()
            .map(|d| {
                let image = match &d.backing {
                    Some(base) => json!({ "overlay_of": identity(base)? }),
                    // A blank disk made for this run: only its size is the same next time.
                    None if d.path.starts_with(run_dir) => {
                        json!({ "blank": std::fs::metadata(&d.path).map(|m| m.len()).ok() })
                    }
                    None => json!({ "image": identity(&d.path)? }),
                };
                Ok(json!({ "image": image, "format": d.format.name(), "media": format!("{:?}", d.media),
                           "bus": format!("{:?}", d.bus), "read_only": d.read_only }))
            })
            .collect::<Result<_>>()?;
        let nics: Vec<Value> =
            spec.nics.iter().map(|n| json!({ "id": n.id, "mac": n.mac, "kind": n.backend.kind() })).collect();
        let program = std::env::current_exe().map_err(MachineError::io("finding this program"))?;
        let source = json!({
            "attest": env!("CARGO_PKG_VERSION"),
            "program": identity(&program)?,
            "vmm": identity(vmm)?,
            "name": spec.name, "boot": boot, "memory_mib": spec.memory_mib, "cpus": spec.cpus,
            "accel": format!("{:?}", spec.accel), "disks": disks, "nics": nics,
            "channel": format!("{:?}", spec.guest_channel), "display": spec.display, "rng": spec.rng,
            "allow_reboot": spec.allow_reboot, "extra_args": spec.extra_args,
            "shares": spec.shares.iter().map(|s| format!("{:?}", s)).collect::<Vec<_>>(),
            "extra": extra,
        });
        let digest = Sha256::digest(source.to_string());
        Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
    }

    /// The complete entry for `key`, if there is one and its files are whole.
    pub fn lookup(&self, key: &str) -> Lookup {
        let dir = self.dir.join(key);
        if !dir.exists() {
            return Lookup::Miss;
        }
        match read_entry(&dir) {
            Ok(entry) => Lookup::Hit(entry),
            Err(why) => {
                self.remove(&dir);
                Lookup::Unusable { dir, why }
            }
        }
    }

    /// Removes an entry (one that failed to load, say).
    pub fn remove(&self, dir: &Path) {
        std::fs::remove_dir_all(dir).ok();
    }

    /// Starts building the entry for `key`, unless another process is building it or the cache
    /// has not `needed` bytes free: a snapshot must never fill the disk halfway.
    pub fn begin(&self, key: &str, machine: &str, needed: u64) -> Result<Begin> {
        std::fs::create_dir_all(&self.dir).map_err(MachineError::io(format!("creating {}", self.dir.display())))?;
        if let Some((free, dir)) = crate::state_dir::free_space(&self.dir).filter(|(free, _)| *free < needed) {
            return Ok(Begin::NoRoom { free, needed, dir });
        }
        let lock_path = self.dir.join(format!("{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(MachineError::io(format!("opening {}", lock_path.display())))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Begin::Busy),
            Err((_, e)) => return Err(MachineError::io(format!("locking {}", lock_path.display()))(e.into())),
        };
        // Left by a build that was killed: never renamed into place, so never used; gone now.
        let staging = self.dir.join(format!("{key}.partial"));
        std::fs::remove_dir_all(&staging).ok();
        std::fs::create_dir_all(&staging).map_err(MachineError::io(format!("creating {}", staging.display())))?;
        Ok(Begin::Building(Builder {
            key: key.into(),
            machine: machine.into(),
            staging,
            final_dir: self.dir.join(key),
            _lock: lock,
        }))
    }

    /// Every complete entry, oldest first.
    pub fn list(&self) -> Vec<(Entry, u64)> {
        let mut entries: Vec<(Entry, u64)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir() && e.path().extension().is_none())
            .filter_map(|e| read_entry(&e.path()).ok())
            .map(|entry| {
                let size = disk_usage(&entry.dir);
                (entry, size)
            })
            .collect();
        entries.sort_by_key(|(e, _)| e.manifest.created);
        entries
    }

    /// Removes entries, oldest first, until they take at most `keep_bytes` (all of them without
    /// it), and any unfinished ones nobody is building; returns how many and their bytes.
    pub fn clear(&self, keep_bytes: Option<u64>) -> (usize, u64) {
        let entries = self.list();
        let mut total: u64 = entries.iter().map(|(_, size)| size).sum();
        let (mut removed, mut freed) = (0, 0);
        for (entry, size) in entries {
            if keep_bytes.is_some_and(|keep| total <= keep) {
                break;
            }
            self.remove(&entry.dir);
            (total, removed, freed) = (total - size, removed + 1, freed + size);
        }
        if keep_bytes.is_none() {
            for stale in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let path = stale.path();
                let lock = path.with_extension("lock");
                let building =
                    File::open(&lock).ok().and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).ok());
                if path.extension().is_some_and(|e| e == "partial") && building.is_some() {
                    std::fs::remove_dir_all(&path).ok();
                }
            }
        }
        (removed, freed)
    }
}

impl Builder {
    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// The file a template's RAM is mapped from while it boots.
    pub fn memory_file(&self) -> PathBuf {
        self.staging.join(MEMORY)
    }

    /// Completes the entry from `snapshot` (saved into [`Builder::dir`]): its frozen disks are
    /// copied in, the manifest written, and the directory renamed into place. Returns the entry.
    pub fn commit(self, snapshot: &Snapshot) -> Result<Entry> {
        let mut disks = Vec::new();
        for (index, frozen) in snapshot.disks.iter().enumerate() {
            disks.push(match frozen {
                Some(frozen) => {
                    let name = format!("disk{index}.qcow2");
                    let to = self.staging.join(&name);
                    std::fs::copy(frozen, &to)
                        .map_err(MachineError::io(format!("copying {} into the cache", frozen.display())))?;
                    Some(name)
                }
                None => None,
            });
        }
        let mut files: Vec<String> = vec![STATE.into()];
        files.extend(disks.iter().flatten().cloned());
        let memory_file = matches!(snapshot.memory, MemoryImage::File(_));
        if memory_file {
            files.push(MEMORY.into());
        }
        let files = files
            .into_iter()
            .map(|name| {
                let path = self.staging.join(&name);
                let len =
                    std::fs::metadata(&path).map_err(MachineError::io(format!("reading {}", path.display())))?.len();
                Ok((name, len))
            })
            .collect::<Result<Vec<_>>>()?;
        let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let manifest =
            Manifest { machine: self.machine.clone(), key: self.key.clone(), created, files, disks, memory_file };
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        let manifest_path = self.staging.join(MANIFEST);
        std::fs::write(&manifest_path, text)
            .map_err(MachineError::io(format!("writing {}", manifest_path.display())))?;
        // Durable before it becomes visible: a crash leaves either no entry or a whole one.
        File::open(&self.staging).and_then(|d| d.sync_all()).ok();
        if self.final_dir.exists() {
            std::fs::remove_dir_all(&self.final_dir).ok();
        }
        std::fs::rename(&self.staging, &self.final_dir)
            .map_err(MachineError::io(format!("moving {} into place", self.staging.display())))?;
        Ok(Entry { dir: self.final_dir.clone(), manifest })
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        // Not committed: nothing of it may be used.
        std::fs::remove_dir_all(&self.staging).ok();
    }
}

impl Entry {
    /// The snapshot, with the entry's paths.
    pub fn snapshot(&self) -> Snapshot {
        let memory = match self.manifest.memory_file {
            true => MemoryImage::File(self.dir.join(MEMORY)),
            false => MemoryImage::InState,
        };
        let disks = self.manifest.disks.iter().map(|d| d.as_ref().map(|name| self.dir.join(name))).collect();
        Snapshot { state: self.dir.join(STATE), memory, disks }
    }
}

fn read_entry(dir: &Path) -> std::result::Result<Entry, String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for (name, len) in &manifest.files {
        let file = dir.join(name);
        let actual = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
        if actual != *len {
            return Err(format!(
                "{} is {actual} bytes, but was saved with {len}: truncated or changed",
                file.display()
            ));
        }
    }
    Ok(Entry { dir: dir.into(), manifest })
}

/// What identifies a file's contents without reading them all.
fn identity(path: &Path) -> Result<Value> {
    let meta = std::fs::metadata(path).map_err(MachineError::io(format!("reading {}", path.display())))?;
    Ok(
        json!({ "path": path, "len": meta.len(), "mtime": meta.mtime(), "mtime_ns": meta.mtime_nsec(), "inode": meta.ino() }),
    )
}

/// The bytes the files under `dir` take on disk (sparse memory files count what they hold).
fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk;

    #[test]
    fn a_changed_image_or_kernel_is_a_new_key_and_a_new_run_dir_is_not() {
        let Ok(_) = disk::qemu_img() else { return eprintln!("SKIP: qemu-img not found (Debian: qemu-utils)") };
        let files = tempfile::tempdir().unwrap();
        let (kernel, base) = (files.path().join("kernel"), files.path().join("base.raw"));
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let key = |run: &Path| {
            let mut spec = MachineSpec::new("m", Boot::kernel(&kernel, None, "console=ttyS0"));
            spec.disks.push(disk::overlay(&base, &run.join("overlay.qcow2")).unwrap());
            SnapshotCache::key(&spec, run, "/bin/sh".as_ref(), &json!({ "ready": "shell" })).unwrap()
        };
        let (run1, run2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = key(run1.path());
        assert_eq!(key(run2.path()), first, "another run of the same definition");
        std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
        let changed = key(tempfile::tempdir().unwrap().path());
        assert_ne!(changed, first, "the image under the overlay changed");
        std::fs::write(&kernel, b"another kernel").unwrap();
        assert_ne!(key(tempfile::tempdir().unwrap().path()), changed, "the kernel changed");
    }

    #[test]
    fn an_entry_appears_whole_or_not_at_all_and_a_truncated_one_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let cache = SnapshotCache { dir: root.path().join("snapshots") };
        assert!(matches!(cache.lookup("k"), Lookup::Miss));
        let Begin::Building(builder) = cache.begin("k", "m", 0).unwrap() else { panic!("nobody else builds it") };
        assert!(matches!(cache.begin("k", "m", 0).unwrap(), Begin::Busy), "one builder per key at a time");
        let Begin::NoRoom { needed, .. } = cache.begin("big", "m", u64::MAX).unwrap() else { panic!("no room") };
        assert_eq!(needed, u64::MAX);
        std::fs::write(builder.dir().join(STATE), b"device state").unwrap();
        assert!(matches!(cache.lookup("k"), Lookup::Miss), "nothing is visible before the commit");
        let snapshot = Snapshot { state: builder.dir().join(STATE), memory: MemoryImage::InState, disks: vec![None] };
        let entry = builder.commit(&snapshot).unwrap();
        assert!(matches!(cache.lookup("k"), Lookup::Hit(_)));
        assert_eq!(entry.snapshot().state, root.path().join("snapshots/k/state"));
        assert_eq!(cache.list().len(), 1);

        // A build that never commits (killed, or failed) leaves nothing behind to use.
        drop(cache.begin("other", "m", 0).unwrap());
        assert!(matches!(cache.lookup("other"), Lookup::Miss));

        std::fs::write(entry.dir.join(STATE), b"short").unwrap();
        let Lookup::Unusable { why, .. } = cache.lookup("k") else { panic!("a truncated entry is unusable") };
        assert!(why.contains("is 5 bytes, but was saved with 12"), "{why}");
        assert!(!entry.dir.exists(), "and removed");
        assert_eq!(cache.clear(None), (0, 0));
    }
}
