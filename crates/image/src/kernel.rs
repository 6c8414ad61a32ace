//! Finding the guest kernel and reading what it is: its release from the bzImage header and where its
//! modules live; and whether a file QEMU is given as `-kernel` can boot at all ([`bootable`]).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::modules::ModuleTree;
use crate::ImageError;

/// Where the kernel came from, in search order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// `--kernel` on the command line.
    Flag,
    /// The `ATTEST_KERNEL` environment variable.
    Env,
    /// The kernel the setup script fetched into attest's cache.
    Cache,
    /// The host's own `/boot/vmlinuz-$(uname -r)`.
    HostBoot,
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelSource::Flag => "--kernel",
            KernelSource::Env => "ATTEST_KERNEL",
            KernelSource::Cache => "attest's kernel cache",
            KernelSource::HostBoot => "the host's /boot",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Kernel {
    pub path: PathBuf,
    pub source: KernelSource,
    /// The release string (`uname -r` inside the guest), read from the bzImage header.
    pub release: String,
    /// `lib/modules/<release>` for this kernel, if one was found; `None` means every driver must be built in.
    pub modules_dir: Option<PathBuf>,
}

impl Kernel {
    /// Whether the kernel loads unsigned modules: its build configuration (`config-<release>` beside
    /// it, as in /boot and Debian's packages) lacks `CONFIG_MODULE_SIG_FORCE=y`. Without a
    /// configuration to read, the answer is no.
    pub fn accepts_unsigned_modules(&self) -> bool {
        let Some(dir) = self.path.parent() else { return false };
        let Ok(config) = std::fs::read_to_string(dir.join(format!("config-{}", self.release))) else { return false };
        !config.lines().any(|line| line.trim() == "CONFIG_MODULE_SIG_FORCE=y")
    }
}

impl Kernel {
    /// Its modules directory, or an empty tree when it has none (every driver must be built in).
    pub fn module_tree(&self) -> Result<ModuleTree, ImageError> {
        match &self.modules_dir {
            Some(dir) => ModuleTree::open(dir),
            None => Ok(ModuleTree::none()),
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, from {})", self.path.display(), self.release, self.source)
    }
}

/// Finds the kernel: `--kernel`, then `ATTEST_KERNEL`, then the cache, then the host's running kernel.
/// An explicitly named kernel that is missing or unreadable is an error, never silently replaced.
pub fn locate(flag: Option<&Path>, cache_dir: &Path) -> Result<Kernel, ImageError> {
    let env = std::env::var_os("ATTEST_KERNEL").filter(|v| !v.is_empty()).map(PathBuf::from);
    let explicit = match (flag, env) {
        (Some(path), _) => Some((path.to_path_buf(), KernelSource::Flag)),
        (None, Some(path)) => Some((path, KernelSource::Env)),
        (None, None) => None,
    };
    let (path, source) = match explicit {
        Some(found) => found,
        None => match cached_kernel(cache_dir).map(|p| (p, KernelSource::Cache)).or_else(host_kernel) {
            Some(found) => found,
            None => return Err(ImageError::NoKernel { cache_dir: cache_dir.to_path_buf() }),
        },
    };
    inspect(&path, source)
}

/// Reads a kernel image's release and finds its modules.
pub fn inspect(path: &Path, source: KernelSource) -> Result<Kernel, ImageError> {
    let release = bzimage_release(path)?;
    let modules_dir = modules_dir_for(path, &release);
    Ok(Kernel { path: path.to_path_buf(), source, release, modules_dir })
}

/// The newest `kernels/*/boot/vmlinuz-*` under the cache.
fn cached_kernel(cache_dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache_dir.join("kernels"))
        .ok()?
        .flatten()
        .filter_map(|pkg| std::fs::read_dir(pkg.path().join("boot")).ok())
        .flat_map(|dir| dir.flatten().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    found.sort_by_cached_key(|path| version_key(&path.to_string_lossy()));
    found.pop()
}

/// Orders version strings numerically where they have numbers: 6.10 after 6.9.
fn version_key(text: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let text_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        key.push((number.parse().unwrap_or(0), after[..text_len].to_string()));
        rest = &after[text_len..];
    }
    key
}

fn host_kernel() -> Option<(PathBuf, KernelSource)> {
    let release = nix_uname_release()?;
    let path = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    path.exists().then_some((path, KernelSource::HostBoot))
}

fn nix_uname_release() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(text.trim().to_string())
}

/// Reads the release from an x86 bzImage's setup header (boot protocol ≥ 2.00: "HdrS" at 0x202,
/// the version string's offset minus 0x200 at 0x20E).
pub fn bzimage_release(path: &Path) -> Result<String, ImageError> {
    let io_err = ImageError::io(format!("reading kernel {}", path.display()));
    let mut head = Vec::with_capacity(64 * 1024);
    File::open(path).map_err(&io_err)?.take(64 * 1024).read_to_end(&mut head).map_err(&io_err)?;
    let not_bzimage = |why: &str| ImageError::BadKernel { path: path.to_path_buf(), why: why.to_string() };
    if head.len() < 0x210 || &head[0x202..0x206] != b"HdrS" {
        return Err(not_bzimage("no x86 boot header (\"HdrS\" at 0x202); expected a bzImage such as /boot/vmlinuz-*"));
    }
    let offset = u16::from_le_bytes([head[0x20E], head[0x20F]]) as usize + 0x200;
    let text = head.get(offset..).ok_or_else(|| not_bzimage("version string lies outside the setup code"))?;
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len()).min(256);
    let version = String::from_utf8_lossy(&text[..end]);
    version.split_whitespace().next().map(str::to_string).ok_or_else(|| not_bzimage("empty version string"))
}

/// How a kernel file boots under QEMU's `-kernel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelFormat {
    /// An x86 bzImage, with its release.
    BzImage(String),
    /// An uncompressed ELF `vmlinux` with the PVH entry note.
    PvhElf,
}

/// What `-kernel` boots: a bzImage (its setup header) or an ELF vmlinux with the PVH entry note;
/// anything else (a script, a compressed vmlinux without the note) is [`ImageError::BadKernel`]
/// naming both.
pub fn bootable(path: &Path) -> Result<KernelFormat, ImageError> {
    let bzimage = match bzimage_release(path) {
        Ok(release) => return Ok(KernelFormat::BzImage(release)),
        Err(ImageError::BadKernel { why, .. }) => why,
        Err(e) => return Err(e),
    };
    let mut magic = [0u8; 4];
    let io_err = ImageError::io(format!("reading kernel {}", path.display()));
    let is_elf = File::open(path).map_err(&io_err)?.read(&mut magic).map_err(&io_err)? == 4 && magic == *b"\x7fELF";
    if is_elf {
        let elf = std::fs::read(path).map_err(&io_err)?;
        if crate::vmlinux::has_pvh_entry(&elf) {
            return Ok(KernelFormat::PvhElf);
        }
        let why = "an ELF without the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), which QEMU needs to boot it; \
                   give the kernel's bzImage (such as /boot/vmlinuz-*) instead";
        return Err(ImageError::BadKernel { path: path.to_path_buf(), why: why.into() });
    }
    let why = format!("{bzimage}, or an ELF vmlinux with the PVH entry note");
    Err(ImageError::BadKernel { path: path.to_path_buf(), why })
}

/// `lib/modules/<release>` beside the kernel (an unpacked package: `X/boot/vmlinuz`, `X/lib/modules`),
/// else the host's own.
fn modules_dir_for(kernel: &Path, release: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(root) = kernel.parent().and_then(Path::parent) {
        candidates.push(root.join("lib/modules").join(release));
        candidates.push(root.join("usr/lib/modules").join(release));
    }
    candidates.push(Path::new("/lib/modules").join(release));
    candidates.into_iter().find(|dir| dir.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: &str) -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let offset: u16 = 0x400 - 0x200;
        image[0x20E..0x210].copy_from_slice(&offset.to_le_bytes());
        image[0x400..0x400 + version.len()].copy_from_slice(version.as_bytes());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), image).unwrap();
        file
    }

    #[test]
    fn reads_release_from_setup_header() {
        let k = fake_bzimage("6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP");
        assert_eq!(bzimage_release(k.path()).unwrap(), "6.1.0-56-cloud-amd64");
    }

    #[test]
    fn newer_kernels_sort_last_numerically() {
        let mut versions = ["vmlinuz-6.10.0-1-amd64", "vmlinuz-6.9.0-3-amd64", "vmlinuz-6.9.0-12-amd64"];
        versions.sort_by_cached_key(|v| version_key(v));
        assert_eq!(versions, ["vmlinuz-6.9.0-3-amd64", "vmlinuz-6.9.0-12-amd64", "vmlinuz-6.10.0-1-amd64"]);
    }

    #[test]
    fn a_bootable_kernel_is_a_bzimage_or_a_pvh_elf() {
        let image = fake_bzimage("6.1.0-test");
        assert_eq!(bootable(image.path()).unwrap(), KernelFormat::BzImage("6.1.0-test".into()));
        let passwd = bootable(Path::new("/etc/passwd")).unwrap_err().to_string();
        assert!(passwd.contains("no x86 boot header") && passwd.contains("or an ELF vmlinux"), "{passwd}");
        let elf = std::env::current_exe().unwrap();
        let err = bootable(&elf).unwrap_err().to_string();
        assert!(err.contains("without the PVH entry note"), "{err}");
        assert!(bootable(Path::new("/nope/vmlinuz")).unwrap_err().to_string().contains("/nope/vmlinuz"));
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"#!/bin/sh\necho not a kernel\n").unwrap();
        let err = bzimage_release(file.path()).unwrap_err().to_string();
        assert!(err.contains("no x86 boot header"), "{err}");
        let err = inspect(Path::new("/nonexistent/vmlinuz"), KernelSource::Flag).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinuz"), "{err}");
    }

    #[test]
    fn unsigned_modules_only_with_a_config_that_does_not_force_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz-9.9.9-test");
        std::fs::copy(fake_bzimage("9.9.9-test #1").path(), &kernel).unwrap();
        let k = inspect(&kernel, KernelSource::Flag).unwrap();
        assert!(!k.accepts_unsigned_modules(), "no config: assume signatures are enforced");
        let config = dir.path().join("config-9.9.9-test");
        std::fs::write(&config, "CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n").unwrap();
        assert!(k.accepts_unsigned_modules());
        std::fs::write(&config, "CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n").unwrap();
        assert!(!k.accepts_unsigned_modules());
    }

    #[test]
    fn finds_modules_beside_an_unpacked_package() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("boot")).unwrap();
        std::fs::create_dir_all(root.path().join("lib/modules/9.9.9-test")).unwrap();
        let kernel = root.path().join("boot/vmlinuz-9.9.9-test");
        std::fs::copy(fake_bzimage("9.9.9-test #1").path(), &kernel).unwrap();
        let k = inspect(&kernel, KernelSource::Cache).unwrap();
        assert_eq!(k.modules_dir.unwrap(), root.path().join("lib/modules/9.9.9-test"));
    }
}
