//! Guest images for attest: finding a kernel, resolving the driver modules it needs, and building the
//! initramfs that carries attest's static guest init into the VM, guest images (a Debian systemd
//! guest) for system tests, and bootable ISOs (checked without mounting, or built with GRUB) for
//! boot-image tests.

pub mod backdoor;
pub mod debian;
pub mod initramfs;
pub mod installer;
pub mod iso;
pub mod kernel;
pub mod modules;
pub mod vmlinux;

use std::path::{Path, PathBuf};

pub use initramfs::{exec_initramfs, poweroff_initramfs, Initramfs};
pub use kernel::{Kernel, KernelSource};
pub use modules::{ModuleFile, ModuleTree, Resolution};

/// attest's guest init (crates/guest), statically linked, built by this crate's build script.
pub static GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attest-guest-init"));

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("kernel {path} is unusable: {why}")]
    BadKernel { path: PathBuf, why: String },
    #[error(
        "no guest kernel found: pass --kernel PATH or set ATTEST_KERNEL, run scripts/setup to fetch \
         Debian's cloud kernel into {cache_dir}, or install a kernel at /boot/vmlinuz-$(uname -r)"
    )]
    NoKernel { cache_dir: PathBuf },
    #[error("busybox not found: install Debian's busybox-static (a static build is needed inside the guest) or set ATTEST_BUSYBOX")]
    NoBusybox,
    #[error("{path} is dynamically linked; the guest needs a static busybox (Debian: busybox-static)")]
    DynamicBusybox { path: PathBuf },
    #[error("{path} is not a static bash: install Debian's bash-static, or set ATTEST_BASH")]
    NoStaticBash { path: PathBuf },
    #[error("building a Debian image: {step} {what}; full log: {}\n{tail}", log.display())]
    GuestBuild { step: String, what: String, log: PathBuf, tail: String },
    #[error("ISO image {} does not exist: check the path (relative paths start at the working directory)", path.display())]
    IsoMissing { path: PathBuf },
    #[error(
        "ISO image {} is {what}, not a regular file: give the .iso file itself (join a multi-part ISO into \
         one file first, e.g. `cat part1 part2 > image.iso`)", path.display()
    )]
    IsoNotAFile { path: PathBuf, what: &'static str },
    #[error(
        "{}: no CD001 volume descriptor at sector 16: not an ISO 9660 image, or a corrupt one ({why}); give \
         the .iso itself (not a compressed .iso.xz or a disk image), or download it again", path.display()
    )]
    NotIso9660 { path: PathBuf, why: String },
    #[error(
        "{}: not bootable from a CD: no El Torito boot catalog; use the distribution's installer or live ISO, \
         or rebuild it with boot images (grub-mkrescue, or xorriso -as mkisofs -b ... -e ...)", path.display()
    )]
    IsoNotBootable { path: PathBuf },
    #[error("{}: truncated or corrupt ISO: {why}; download or build it again (compare its size and checksum)", path.display())]
    CorruptIso { path: PathBuf, why: String },
    #[error("building a bootable ISO needs {missing}: install Debian's {packages} (scripts/setup does)")]
    IsoTool { missing: String, packages: &'static str },
    #[error("grub-mkrescue {what} building {}:\n{stderr}", output.display())]
    IsoBuild { what: String, output: PathBuf, stderr: String },
}

impl ImageError {
    /// Wraps an I/O error with what was being done, for `map_err`.
    pub fn io(what: impl Into<String>) -> impl Fn(std::io::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Io { what: what.clone(), source }
    }
}

/// attest's cache: `$ATTEST_CACHE_DIR`, else `$XDG_CACHE_HOME/attest`, else `~/.cache/attest`.
pub fn cache_dir() -> PathBuf {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("ATTEST_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("attest")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/attest")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/attest"))
}

/// A static busybox: `$ATTEST_BUSYBOX`, else the first `busybox` on PATH.
pub fn find_busybox() -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("ATTEST_BUSYBOX")
        .map(PathBuf::from)
        .or_else(|| which::which("busybox").ok())
        .filter(|p| p.is_file())
        .ok_or(ImageError::NoBusybox)?;
    if !is_static_elf(&path) {
        return Err(ImageError::DynamicBusybox { path });
    }
    Ok(path)
}

/// True for an ELF executable with no program interpreter (nothing to load from the host).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    let Ok(file) = object::File::parse(bytes.as_slice()) else { return false };
    match &file {
        object::File::Elf64(elf) => {
            use object::read::elf::ProgramHeader;
            let endian = elf.endian();
            elf.elf_program_headers().iter().all(|ph| ph.p_type(endian) != object::elf::PT_INTERP)
        }
        _ => file.format() == object::BinaryFormat::Elf,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_guest_init_is_a_static_executable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init");
        std::fs::write(&path, super::GUEST_INIT).unwrap();
        assert!(super::is_static_elf(&path), "the guest init must not need the host's libraries");
        assert!(!super::is_static_elf(std::path::Path::new("/bin/ls")), "/bin/ls is dynamic on Debian");
    }
}
