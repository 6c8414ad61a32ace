//! What the Debian guest is made of: the suite and mirror, the packages, the configuration files
//! (NixOS-style backdoor unit, journald to ttyS0, systemd timeouts), the units masked, the steps run
//! in the chroot, and the hash of all of it that names the cached image.

use sha2::{Digest, Sha256};

use crate::backdoor::BACKDOOR_SCRIPT;

pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// Installed on top of debootstrap's minbase (Priority: required).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "bash",
    "kmod",
    "procps",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "curl",
    "ca-certificates",
    "python3",
    "less",
];
/// Units masked in the guest: the consoles the backdoor owns (no getty on ttyS0 or hvc0), the
/// first-boot wizard (it would prompt on the console), periodic maintenance useless in a
/// short-lived test VM, and boot steps nothing in a test uses.
pub const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "serial-getty@hvc0.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-timesyncd.service",
    // Boot work a test VM does not need (about 1 s of a 12 s boot under TCG).
    "modprobe@drm.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "systemd-pstore.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
];
/// The image's virtual size: free space for tests (qcow2 stores only what is written).
pub const DISK_SIZE: &str = "2G";
/// The ext4 label of the root filesystem.
pub const LABEL: &str = "attest-root";

/// Run in the chroot after the files are in place (`$1` is the guest kernel's release).
const CHROOT_SCRIPT: &str = "set -eu
passwd --delete root
depmod --all \"$1\"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
";

/// The drivers the boot initramfs always loads: the disk and its filesystem.
pub const BOOT_DRIVERS: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// What a guest file is in the recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    File { text: String, mode: u32 },
    Symlink(String),
}

/// Everything that determines the image. Its [`Recipe::digest`] names the cached qcow2.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    /// Files and symlinks written over debootstrap's tree, paths relative to the guest's root.
    pub files: Vec<(String, Content)>,
    pub chroot_script: String,
    /// The guest kernel's release: its `/lib/modules/<release>` is copied into the image.
    pub kernel_release: String,
}

impl Recipe {
    /// The recipe of the attest Debian guest for a kernel release.
    pub fn new(kernel_release: &str) -> Recipe {
        let file = |path: &str, text: &str, mode: u32| (path.to_string(), Content::File { text: text.into(), mode });
        let link = |path: &str, target: &str| (path.to_string(), Content::Symlink(target.into()));
        let units = "etc/systemd/system";
        let mut files = vec![
            file("etc/attest/backdoor", BACKDOOR_SCRIPT, 0o755),
            file(&format!("{units}/backdoor.service"), BACKDOOR_UNIT, 0o644),
            link(&format!("{units}/multi-user.target.wants/backdoor.service"), "/etc/systemd/system/backdoor.service"),
            link(&format!("{units}/default.target"), "/lib/systemd/system/multi-user.target"),
            file("etc/systemd/journald.conf.d/attest.conf", JOURNALD_CONF, 0o644),
            file("etc/systemd/system.conf.d/attest.conf", SYSTEM_CONF, 0o644),
            file("etc/fstab", "/dev/vda / ext4 rw,relatime 0 0\n", 0o644),
            // The driver names each machine with `systemd.hostname=` on the kernel command line.
            file("etc/hostname", "debian\n", 0o644),
            // debootstrap writes none: without it `localhost` does not resolve (`nc -z localhost`).
            file("etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n", 0o644),
            // Not the build host's resolver; a test that wants DNS configures it.
            file("etc/resolv.conf", "", 0o644),
            // A fixed id, so no boot is a "first boot"; the driver passes `systemd.machine_id=`
            // per machine (see [`DebianGuest::cmdline_for`]).
            file("etc/machine-id", "a77e57deb1a40000a77e57deb1a40000\n", 0o444),
        ];
        files.extend(MASKED_UNITS.iter().map(|unit| link(&format!("{units}/{unit}"), "/dev/null")));
        Recipe::bookworm(PACKAGES, files, CHROOT_SCRIPT, kernel_release)
    }

    /// A Debian bookworm root from [`MIRROR`] with `packages` on top of minbase, `files`, and the
    /// chroot script run with `kernel_release` as `$1`.
    pub fn bookworm(
        packages: &[&str],
        files: Vec<(String, Content)>,
        chroot_script: &str,
        kernel_release: &str,
    ) -> Recipe {
        Recipe {
            suite: SUITE.into(),
            mirror: MIRROR.into(),
            packages: packages.iter().map(|p| p.to_string()).collect(),
            files,
            chroot_script: chroot_script.into(),
            kernel_release: kernel_release.into(),
        }
    }

    /// A digest of everything in the recipe (and of the build steps' version).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(BUILD_STEPS_VERSION.as_bytes());
        field(self.suite.as_bytes());
        field(self.mirror.as_bytes());
        for package in &self.packages {
            field(package.as_bytes());
        }
        for (path, content) in &self.files {
            field(path.as_bytes());
            match content {
                Content::File { text, mode } => {
                    field(format!("file {mode:o}").as_bytes());
                    field(text.as_bytes());
                }
                Content::Symlink(target) => field(format!("symlink {target}").as_bytes()),
            }
        }
        field(self.chroot_script.as_bytes());
        field(self.kernel_release.as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cached image's file name: `debian-<suite>-<digest prefix>.qcow2`.
    pub fn file_name(&self) -> String {
        format!("debian-{}-{}.qcow2", self.suite, &self.digest()[..16])
    }
}

/// Bumped when the build steps in this file change in a way the recipe's data does not show.
const BUILD_STEPS_VERSION: &str = "1: debootstrap minbase, files, modules, chroot script, mkfs.ext4 -d, qcow2";

/// NixOS's `systemd.services.backdoor` (test-instrumentation.nix).
const BACKDOOR_UNIT: &str = "[Unit]
Description=attest backdoor shell (NixOS test driver protocol)
Requires=dev-hvc0.device dev-ttyS0.device
After=dev-hvc0.device dev-ttyS0.device

[Service]
ExecStart=/bin/bash /etc/attest/backdoor
KillSignal=SIGHUP

[Install]
WantedBy=multi-user.target
";

const JOURNALD_CONF: &str = "[Journal]
ForwardToConsole=yes
TTYPath=/dev/ttyS0
MaxLevelConsole=debug
";

const SYSTEM_CONF: &str = "[Manager]
DefaultTimeoutStartSec=300
DefaultDeviceTimeoutSec=300
ShowStatus=false
";
