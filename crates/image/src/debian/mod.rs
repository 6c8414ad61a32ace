//! A Debian bookworm guest with systemd that speaks the NixOS test driver's backdoor protocol:
//! the recipe (packages, configuration files, the steps run in the chroot), the qcow2 built from it
//! with debootstrap and `mkfs.ext4 -d` (no loop mounts), cached under a hash of the recipe, and the
//! boot initramfs that loads the block driver and switches to the image's systemd.
//!
//! The guest is configured like NixOS's `test-instrumentation.nix`: `backdoor.service` runs NixOS's
//! script on hvc0 (stderr on ttyS0), no getty on ttyS0 or hvc0 (one on tty1), journald forwarded to
//! ttyS0, root without a password, systemd's start and device timeouts at 300 s.

mod build;
mod pack;
mod recipe;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::initramfs::{base_layout, with_modules};
use crate::{ImageError, Initramfs, Kernel, ModuleFile};
use attest_protocol::MODULE_LIST;
pub use pack::{build_cached, Output};
pub use recipe::*;

/// A bootable Debian guest: direct kernel boot of `kernel` with `initrd` and `cmdline`, root on
/// `disk` as the first virtio-blk device (`/dev/vda`).
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// The cached qcow2. Never boot it directly: give each VM an overlay
    /// (`qemu-img create -f qcow2 -b DISK -F qcow2 overlay.qcow2`), so the cache is never modified.
    pub disk: PathBuf,
    /// The bzImage whose modules the image carries.
    pub kernel: PathBuf,
    /// The boot initramfs: loads the drivers, mounts /dev/vda, switches root to systemd.
    pub initrd: PathBuf,
    /// The kernel command line, without a hostname (see [`DebianGuest::cmdline_for`]).
    pub cmdline: String,
}

/// The kernel command line of the Debian guest. ttyS0 is the serial log; tty0 comes last, so
/// it is `/dev/console`, as in NixOS's test VMs (a VGA console to type on, tty1 has a getty);
/// `net.ifnames=0` names NICs eth0, eth1… as NixOS tests expect.
pub const CMDLINE: &str = "console=ttyS0 console=tty0 root=/dev/vda rw panic=-1 net.ifnames=0";

impl DebianGuest {
    /// The command line for the machine `name`: its hostname and a machine id of its own (derived
    /// from the name, so the same machine keeps its id across restarts).
    pub fn cmdline_for(&self, name: &str) -> String {
        let id: String =
            Sha256::digest(format!("attest machine {name}")).iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{} systemd.hostname={name} systemd.machine_id={id}", self.cmdline)
    }
}

/// The Debian guest for `kernel`: builds the image unless it is cached (see [`image`]), and the boot
/// initramfs with `drivers` (the backend's, e.g. `virtio_console`, `virtio_net`) plus
/// [`BOOT_DRIVERS`], cached under `cache/initramfs`. `progress` hears about long steps.
pub fn ensure(
    cache: &Path,
    kernel: &Kernel,
    drivers: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<DebianGuest, ImageError> {
    let disk = image(cache, kernel, false, progress)?;
    let mut wanted: Vec<&str> = BOOT_DRIVERS.to_vec();
    wanted.extend(drivers.iter().filter(|d| !BOOT_DRIVERS.contains(d)));
    let resolution = kernel.module_tree()?.resolve(&wanted)?;
    if let Some(missing) = resolution.missing.iter().find(|m| BOOT_DRIVERS.contains(&m.as_str())) {
        return Err(ImageError::BadKernel {
            path: kernel.path.clone(),
            why: format!("the Debian guest needs driver {missing}, which is neither a module nor built in"),
        });
    }
    let busybox = crate::find_busybox()?;
    let initrd = boot_initramfs(&busybox, &resolution.load, kernel.accepts_unsigned_modules())?
        .write_cached(&cache.join("initramfs"))?;
    Ok(DebianGuest { disk, kernel: kernel.path.clone(), initrd, cmdline: CMDLINE.into() })
}

/// Seconds the boot initramfs waits for /dev/vda after loading the drivers.
const ROOT_WAIT_SECS: u32 = 10;

/// The boot initramfs's `/init`: load the modules, wait (bounded) for /dev/vda, mount it at
/// /sysroot and hand over to its systemd. Any failure is printed on the serial port and the console,
/// then the VM powers off (a clear message, not a kernel panic about a dying init).
fn boot_init() -> String {
    format!(
        r#"#!/bin/sh
fail() {{
  echo "attest boot initramfs: $*; powering off" > /dev/ttyS0
  echo "attest boot initramfs: $*; powering off" >&2
  poweroff -f
}}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for module in $(cat {MODULE_LIST}); do insmod "$module" || fail "cannot load $module"; done
tries=0
while [ ! -b /dev/vda ]; do
  tries=$((tries + 1))
  [ "$tries" -le {polls} ] || fail "no /dev/vda {ROOT_WAIT_SECS} s after loading virtio_blk (expected the root disk as the first virtio-blk device)"
  sleep 0.1
done
mount -t ext4 -o rw /dev/vda /sysroot || fail "cannot mount /dev/vda (ext4, label {LABEL}) at /sysroot"
# /sbin/init is an absolute symlink (to /lib/systemd/systemd): resolve it inside the new root.
[ -L /sysroot/sbin/init ] || [ -x /sysroot/sbin/init ] || fail "/dev/vda has no /sbin/init"
mount --move /dev /sysroot/dev || fail "cannot move /dev to /sysroot/dev"
umount /proc /sys
exec switch_root /sysroot /sbin/init
"#,
        polls = ROOT_WAIT_SECS * 10
    )
}

const BOOT_APPLETS: [&str; 9] = ["mount", "umount", "insmod", "sleep", "cat", "poweroff", "switch_root", "echo", "["];

/// The boot initramfs: busybox, `/init` ([`boot_init`]) and `modules` in load order.
pub fn boot_initramfs(busybox: &Path, modules: &[ModuleFile], unsigned_modules: bool) -> Result<Initramfs, ImageError> {
    let mut image = base_layout(busybox)?.file("init", boot_init().into_bytes(), 0o755);
    for applet in BOOT_APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    with_modules(image, modules, unsigned_modules)
}

/// The cached qcow2 for `kernel`: `cache/debian/<recipe file name>`, built when missing or when
/// `rebuild` is set. The build goes through a temporary name and a rename, so an interrupted build
/// never leaves a partial image under the final name; its log is kept beside the image
/// (`<name>.log`). Needs root or sudo (debootstrap, chroot, device nodes).
pub fn image(
    cache: &Path,
    kernel: &Kernel,
    rebuild: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let recipe = Recipe::new(&kernel.release);
    let modules = kernel.modules_dir.as_deref().ok_or_else(|| ImageError::BadKernel {
        path: kernel.path.clone(),
        why: format!("no lib/modules/{} beside it; the Debian guest's udev needs the kernel's modules", kernel.release),
    })?;
    pack::build_cached(&cache.join("debian"), &recipe.file_name(), &recipe, modules, Output::Qcow2, rebuild, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::BACKDOOR_SCRIPT;
    use std::io::Read;

    #[test]
    fn the_image_name_follows_every_part_of_the_recipe() {
        let base = Recipe::new("6.1.0-56-cloud-amd64");
        assert_eq!(base.digest(), Recipe::new("6.1.0-56-cloud-amd64").digest(), "the digest is deterministic");
        let mut changed = Vec::new();
        changed.push(Recipe::new("6.1.0-57-cloud-amd64"));
        let mut r = base.clone();
        r.packages.push("vim".into());
        changed.push(r);
        let mut r = base.clone();
        r.files[0].1 = Content::File { text: "echo changed".into(), mode: 0o755 };
        changed.push(r);
        let mut r = base.clone();
        r.files[0].1 = Content::File { text: BACKDOOR_SCRIPT.into(), mode: 0o644 };
        changed.push(r);
        let mut r = base.clone();
        r.chroot_script.push_str("true\n");
        changed.push(r);
        for recipe in changed {
            assert_ne!(recipe.file_name(), base.file_name(), "{recipe:?}");
        }
        assert!(base.file_name().starts_with("debian-bookworm-") && base.file_name().ends_with(".qcow2"));
    }

    #[test]
    fn the_guest_runs_the_nixos_backdoor_and_no_getty_on_its_consoles() {
        let recipe = Recipe::new("6.1.0-56-cloud-amd64");
        let find = |path: &str| recipe.files.iter().find(|(p, _)| p == path).map(|(_, c)| c.clone());
        assert_eq!(find("etc/attest/backdoor"), Some(Content::File { text: BACKDOOR_SCRIPT.into(), mode: 0o755 }));
        for masked in ["serial-getty@ttyS0.service", "serial-getty@hvc0.service"] {
            assert_eq!(find(&format!("etc/systemd/system/{masked}")), Some(Content::Symlink("/dev/null".into())));
        }
        let Some(Content::File { text: unit, .. }) = find("etc/systemd/system/backdoor.service") else { panic!() };
        assert!(unit.contains("Requires=dev-hvc0.device dev-ttyS0.device") && unit.contains("KillSignal=SIGHUP"));
    }

    #[test]
    fn boot_initramfs_has_the_init_its_applets_and_the_modules_in_order() {
        let Ok(busybox) = crate::find_busybox() else { return eprintln!("SKIP: no static busybox") };
        let dir = tempfile::tempdir().unwrap();
        let modules: Vec<ModuleFile> = ["virtio_pci", "virtio_blk"]
            .iter()
            .map(|name| {
                let path = dir.path().join(format!("{name}.ko"));
                std::fs::write(&path, format!("module {name}")).unwrap();
                ModuleFile { name: name.to_string(), path }
            })
            .collect();
        let bytes = boot_initramfs(&busybox, &modules, false).unwrap().write_to(Vec::new()).unwrap();
        let mut files = std::collections::HashMap::new();
        let mut rest = bytes.as_slice();
        loop {
            let mut reader = cpio::newc::Reader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_string();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            files.insert(name, String::from_utf8_lossy(&data).into_owned());
            rest = reader.finish().unwrap();
        }
        let init = &files["init"];
        assert!(init.contains("exec switch_root /sysroot /sbin/init") && init.contains("poweroff -f"), "{init}");
        for applet in BOOT_APPLETS {
            assert_eq!(files[&format!("bin/{applet}")], "busybox", "applet {applet}");
        }
        assert_eq!(
            files[&MODULE_LIST[1..]],
            "/lib/modules/attest/00-virtio_pci.ko\n/lib/modules/attest/01-virtio_blk.ko\n"
        );
    }
}
