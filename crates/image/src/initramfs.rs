//! Writing newc initramfs archives, and the cached initramfs of `attest exec` guests.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::modules::{module_bytes, strip_signature, ModuleFile};
use crate::ImageError;
use attest_protocol::MODULE_LIST;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// An in-memory initramfs: entries are written in insertion order, so add parents before children.
#[derive(Default)]
pub struct Initramfs {
    entries: Vec<(String, Entry)>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(mut self, path: &str) -> Self {
        self.entries.push((path.into(), Entry::Dir));
        self
    }

    pub fn file(mut self, path: &str, data: Vec<u8>, mode: u32) -> Self {
        self.entries.push((path.into(), Entry::File { data, mode }));
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push((path.into(), Entry::Symlink(target.into())));
        self
    }

    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        self.entries.push((path.into(), Entry::CharDevice { major, minor }));
        self
    }

    /// A digest of everything the archive would contain, for content-addressed caching.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (path, entry) in &self.entries {
            h.update(path.as_bytes());
            h.update([0]);
            match entry {
                Entry::Dir => h.update(b"d"),
                Entry::File { data, mode } => {
                    h.update(format!("f{mode:o}:{}:", data.len()));
                    h.update(data);
                }
                Entry::Symlink(target) => h.update(format!("l{target}")),
                Entry::CharDevice { major, minor } => h.update(format!("c{major}:{minor}")),
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn write_to<W: Write>(&self, mut out: W) -> std::io::Result<W> {
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let builder = cpio::newc::Builder::new(path).ino(ino as u32 + 1).uid(0).gid(0);
            let (builder, data): (_, &[u8]) = match entry {
                Entry::Dir => (builder.mode(S_IFDIR | 0o755).nlink(2), &[]),
                Entry::File { data, mode } => (builder.mode(S_IFREG | mode).nlink(1), data),
                Entry::Symlink(target) => (builder.mode(S_IFLNK | 0o777).nlink(1), target.as_bytes()),
                Entry::CharDevice { major, minor } => {
                    (builder.mode(S_IFCHR | 0o600).nlink(1).rdev_major(*major).rdev_minor(*minor), &[])
                }
            };
            let mut writer = builder.write(out, data.len() as u32);
            writer.write_all(data)?;
            out = writer.finish()?;
        }
        cpio::newc::trailer(out)
    }

    /// Writes the archive to `dir/<digest>.cpio` unless it is already there; returns the path.
    /// The write goes through a temporary file and a rename, so concurrent builders never see a torn file.
    pub fn write_cached(&self, dir: &Path) -> Result<PathBuf, ImageError> {
        let io_err = |what: &str| ImageError::io(format!("{what} in {}", dir.display()));
        let path = dir.join(format!("{}.cpio", self.digest()));
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(dir).map_err(io_err("creating the initramfs cache"))?;
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("creating a temporary initramfs"))?;
        let file = self.write_to(std::io::BufWriter::new(tmp.as_file())).map_err(io_err("writing the initramfs"))?;
        file.into_inner().map_err(|e| e.into_error()).map_err(io_err("writing the initramfs"))?;
        tmp.persist(&path).map_err(|e| e.error).map_err(io_err("storing the initramfs"))?;
        Ok(path)
    }
}

/// The initramfs of an `attest exec` guest: the guest init as `/init`, busybox for debugging and
/// tooling, and the driver modules with the list the init loads them from. `unsigned_modules`
/// strips the modules' signatures, for kernels that do not enforce them (faster loading).
pub fn exec_initramfs(
    init: &[u8],
    busybox: &Path,
    modules: &[ModuleFile],
    unsigned_modules: bool,
) -> Result<Initramfs, ImageError> {
    with_modules(base_layout(busybox)?.file("init", init.to_vec(), 0o755), modules, unsigned_modules)
}

/// Adds `modules` under `/lib/modules/attest` and their paths, in load order, one per line, in
/// [`MODULE_LIST`].
pub(crate) fn with_modules(
    mut image: Initramfs,
    modules: &[ModuleFile],
    unsigned_modules: bool,
) -> Result<Initramfs, ImageError> {
    image = image.dir("lib").dir("lib/modules").dir("lib/modules/attest");
    let mut list = String::new();
    for (index, module) in modules.iter().enumerate() {
        let path = format!("lib/modules/attest/{index:02}-{}.ko", module.name);
        list.push_str(&format!("/{path}\n"));
        let bytes = module_bytes(&module.path)?;
        image = image.file(&path, if unsigned_modules { strip_signature(bytes) } else { bytes }, 0o644);
    }
    Ok(image.dir("etc/attest").file(&MODULE_LIST[1..], list.into_bytes(), 0o644))
}

/// The floor for benchmarks: the same busybox, and an init that powers off at once.
pub fn poweroff_initramfs(busybox: &Path) -> Result<Initramfs, ImageError> {
    Ok(base_layout(busybox)?.file("init", b"#!/bin/sh\n/bin/busybox poweroff -f\n".to_vec(), 0o755))
}

/// What every attest initramfs has: the top-level directories, a console node and busybox.
pub(crate) fn base_layout(busybox: &Path) -> Result<Initramfs, ImageError> {
    let busybox_bytes =
        std::fs::read(busybox).map_err(ImageError::io(format!("reading busybox {}", busybox.display())))?;
    let mut image = Initramfs::new();
    for dir in ["bin", "dev", "etc", "proc", "sys", "sysroot", "tmp", "root"] {
        image = image.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything could mount devtmpfs.
    Ok(image.char_device("dev/console", 5, 1).file("bin/busybox", busybox_bytes, 0o755).symlink("bin/sh", "busybox"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_round_trips_through_a_cpio_reader() {
        let image = Initramfs::new().dir("bin").file("bin/hello", b"hi\n".to_vec(), 0o755).symlink("sh", "bin/hello");
        let bytes = image.write_to(Vec::new()).unwrap();
        let mut names = Vec::new();
        let mut rest = bytes.as_slice();
        loop {
            let reader = cpio::newc::Reader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            names.push((reader.entry().name().to_string(), reader.entry().mode(), reader.entry().file_size()));
            rest = reader.finish().unwrap();
        }
        assert_eq!(
            names,
            [
                ("bin".into(), S_IFDIR | 0o755, 0),
                ("bin/hello".into(), S_IFREG | 0o755, 3),
                ("sh".into(), S_IFLNK | 0o777, 9)
            ]
        );
    }

    #[test]
    fn digest_follows_content_and_cache_reuses_it() {
        let a = Initramfs::new().file("init", b"one".to_vec(), 0o755);
        let b = Initramfs::new().file("init", b"two".to_vec(), 0o755);
        assert_ne!(a.digest(), b.digest());
        let dir = tempfile::tempdir().unwrap();
        let first = a.write_cached(dir.path()).unwrap();
        let modified = std::fs::metadata(&first).unwrap().modified().unwrap();
        assert_eq!(a.write_cached(dir.path()).unwrap(), first);
        assert_eq!(std::fs::metadata(&first).unwrap().modified().unwrap(), modified);
    }
}
