//! A test image built here from Debian packages only, standing in for a NixOS installer ISO: a
//! hybrid (BIOS and UEFI) GRUB ISO whose initrd is a whole Debian systemd root filesystem (no cdrom
//! driver or live-boot needed: the kernel runs the initramfs's systemd), with a serial getty, a sudo
//! user and a oneshot `provision.service` that puts LVM (VG `main`, LV `slash`) on the blank virtio
//! disk and writes `/run/provision/status`. Variants for tests: one without `console=ttyS0` on its
//! kernel line, one whose provisioning looks for `/dev/sda`. Everything is cached by content.

mod recipe;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::debian::{build_cached, Output};
use crate::iso::GrubIso;
use crate::{ImageError, Initramfs, Kernel};
pub use recipe::{provision_conf, recipe, DRIVERS, PACKAGES, PASSWORD, REQUIRED_DRIVERS, USER};

/// Which installer image: the good one, or one with a deliberate defect for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Serial console, provisions `/dev/vda`.
    Good,
    /// No `console=ttyS0` on the kernel line: no serial getty (preflight rejects it).
    NoSerialConsole,
    /// Provisions `/dev/sda`, which a virtio disk is not: `provision.service` fails.
    ProvisionsSda,
}

/// The kernel command line of the good image: ttyS0 last, so it is `/dev/console`.
pub const CMDLINE: &str = "console=tty0 console=ttyS0 net.ifnames=0 panic=-1";

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Good, Variant::NoSerialConsole, Variant::ProvisionsSda];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Good => "good",
            Variant::NoSerialConsole => "no-serial-console",
            Variant::ProvisionsSda => "provisions-sda",
        }
    }

    /// The kernel command line in the ISO's boot entry.
    pub fn cmdline(self) -> &'static str {
        match self {
            Variant::NoSerialConsole => "console=tty0 net.ifnames=0 panic=-1",
            Variant::Good | Variant::ProvisionsSda => CMDLINE,
        }
    }

    /// The disk its provisioning service partitions.
    pub fn target_disk(self) -> &'static str {
        match self {
            Variant::ProvisionsSda => "/dev/sda",
            Variant::Good | Variant::NoSerialConsole => "/dev/vda",
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(text: &str) -> Result<Variant, String> {
        Variant::ALL.into_iter().find(|v| v.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            format!("unknown installer variant {text:?}; one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The installer ISO of `variant` for `kernel`: built unless cached (the root filesystem under
/// `cache/installer`, keyed by the recipe's digest; the variant's initrd beside it; the ISO under
/// `cache/iso`, keyed by the kernel's, the initrd's and grub.cfg's contents). The first build needs
/// root or sudo and the Debian mirror (about two minutes); `progress` hears about long steps.
pub fn ensure(
    cache: &Path,
    kernel: &Kernel,
    variant: Variant,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let root = rootfs(cache, kernel, false, progress)?;
    let initrd = variant_initrd(&root, variant)?;
    grub_iso(kernel, initrd, variant).build_cached(cache)
}

/// The GRUB ISO description of `variant` with `initrd`.
pub fn grub_iso(kernel: &Kernel, initrd: PathBuf, variant: Variant) -> GrubIso {
    GrubIso {
        kernel: kernel.path.clone(),
        initrd,
        cmdline: variant.cmdline().into(),
        title: format!("attest test installer ({variant})"),
    }
}

/// The root filesystem as a zstd-compressed cpio, `cache/installer/installer-<suite>-<digest>.cpio.zst`,
/// built when missing or when `rebuild` is set.
pub fn rootfs(
    cache: &Path,
    kernel: &Kernel,
    rebuild: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let recipe = recipe(&kernel.release);
    let dir = cache.join("installer");
    let name = format!("installer-{}-{}.cpio.zst", recipe.suite, &recipe.digest()[..16]);
    if dir.join(&name).exists() && !rebuild {
        return Ok(dir.join(name));
    }
    std::fs::create_dir_all(&dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
    let staged = tempfile::Builder::new()
        .prefix(".modules-")
        .tempdir_in(&dir)
        .map_err(ImageError::io(format!("creating a directory in {}", dir.display())))?;
    let modules = stage_modules(kernel, staged.path())?;
    build_cached(&dir, &name, &recipe, &modules, Output::CpioZstd, rebuild, progress)
}

/// Copies [`DRIVERS`] and their dependencies, with the kernel's `modules.builtin*` and
/// `modules.order`, into `into/<release>` (depmod runs in the chroot); returns that directory.
fn stage_modules(kernel: &Kernel, into: &Path) -> Result<PathBuf, ImageError> {
    let bad = |why: String| ImageError::BadKernel { path: kernel.path.clone(), why };
    let source = kernel.modules_dir.as_deref().ok_or_else(|| {
        bad(format!("no lib/modules/{} beside it; the installer image needs the kernel's modules", kernel.release))
    })?;
    let resolution = kernel.module_tree()?.resolve(DRIVERS)?;
    if let Some(missing) = resolution.missing.iter().find(|m| REQUIRED_DRIVERS.contains(&m.as_str())) {
        return Err(bad(format!("the installer image needs driver {missing}, which is neither a module nor built in")));
    }
    let target = into.join(&kernel.release);
    let copy = |from: &Path, relative: &Path| -> Result<(), ImageError> {
        let to = target.join(relative);
        let io = ImageError::io(format!("copying {} to {}", from.display(), to.display()));
        std::fs::create_dir_all(to.parent().unwrap_or(&target)).map_err(&io)?;
        std::fs::copy(from, &to).map(drop).map_err(io)
    };
    for module in &resolution.load {
        let relative = module
            .path
            .strip_prefix(source)
            .map_err(|_| bad(format!("module {} lies outside {}", module.path.display(), source.display())))?;
        copy(&module.path, relative)?;
    }
    for index in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        if source.join(index).exists() {
            copy(&source.join(index), Path::new(index))?;
        }
    }
    Ok(target)
}

/// The initrd of `variant`: the root filesystem itself, or (for a variant that provisions another
/// disk) the root filesystem followed by a small compressed cpio that replaces its
/// `provision.conf` (Linux unpacks concatenated archives in order, later files replacing earlier).
/// Cached beside the root filesystem as `<rootfs>.<variant>.initrd`.
fn variant_initrd(root: &Path, variant: Variant) -> Result<PathBuf, ImageError> {
    if variant.target_disk() == "/dev/vda" {
        return Ok(root.to_path_buf());
    }
    let overlay = Initramfs::new().dir("etc").dir("etc/attest").file(
        recipe::CONFIG_PATH,
        provision_conf(variant.target_disk()).into_bytes(),
        0o644,
    );
    let key: String = Sha256::digest(overlay.digest()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = root.with_extension(format!("{variant}-{key}.initrd"));
    if path.exists() {
        return Ok(path);
    }
    let dir = root.parent().unwrap_or(Path::new("."));
    let io = |what: &str| ImageError::io(format!("{what} {}", path.display()));
    let mut out = tempfile::NamedTempFile::new_in(dir).map_err(io("creating a temporary file for"))?;
    let mut rootfs = std::fs::File::open(root).map_err(io("reading the root filesystem for"))?;
    let len = std::io::copy(&mut rootfs, &mut out).map_err(io("writing"))?;
    // Zero padding to a 4-byte boundary: Linux skips zeros between archives.
    out.write_all(&vec![0; (4 - len % 4) as usize % 4]).map_err(io("writing"))?;
    let compressed = zstd::encode_all(overlay.write_to(Vec::new()).map_err(io("writing"))?.as_slice(), 3)
        .map_err(io("compressing the overlay of"))?;
    out.write_all(&compressed).map_err(io("writing"))?;
    out.persist(&path).map_err(|e| e.error).map_err(io("storing"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_differ_only_where_they_should() {
        assert!(Variant::Good.cmdline().contains("console=ttyS0"));
        assert!(!Variant::NoSerialConsole.cmdline().contains("ttyS0"));
        assert_eq!(Variant::ProvisionsSda.cmdline(), Variant::Good.cmdline());
        assert_eq!(Variant::NoSerialConsole.target_disk(), "/dev/vda");
        assert_eq!(Variant::ProvisionsSda.target_disk(), "/dev/sda");
        for variant in Variant::ALL {
            assert_eq!(variant.name().parse::<Variant>(), Ok(variant));
        }
        assert!("sda".parse::<Variant>().unwrap_err().contains("good, no-serial-console, provisions-sda"));
    }

    #[test]
    fn the_sda_initrd_is_the_root_filesystem_then_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("installer-bookworm-0123.cpio.zst");
        std::fs::write(&root, b"rootfs").unwrap();
        assert_eq!(variant_initrd(&root, Variant::Good).unwrap(), root);
        let initrd = variant_initrd(&root, Variant::ProvisionsSda).unwrap();
        let bytes = std::fs::read(&initrd).unwrap();
        assert_eq!(&bytes[..8], b"rootfs\0\0", "padded to 4 bytes");
        let overlay = zstd::decode_all(&bytes[8..]).unwrap();
        assert!(String::from_utf8_lossy(&overlay).contains("DISK=/dev/sda"));
        assert_eq!(variant_initrd(&root, Variant::ProvisionsSda).unwrap(), initrd, "cached");
    }
}
