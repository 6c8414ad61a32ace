//! What the test installer's root filesystem is made of: the Debian packages, the provisioning
//! service and its script, networking, the users, the units masked, the kernel modules it carries,
//! and the steps run in the chroot. Everything here goes into the [`Recipe`] whose digest names the
//! cached root filesystem.

use crate::debian::{Content, Recipe};

/// Installed on top of debootstrap's minbase: systemd as init, udev, LVM, sudo, the tools the
/// conditions run (`ip`, `lvs`), and dbus for systemd's own services.
pub const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "lvm2", "sudo"];

/// The drivers the image carries under `/lib/modules/<release>` (with their dependencies), for udev
/// to load: QEMU's virtio devices, SCSI disks, device-mapper for LVM, ext4, efivarfs under UEFI, autofs4 for systemd.
pub const DRIVERS: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtio_scsi",
    "sd_mod",
    "dm_mod",
    "ext4",
    "efivarfs",
    // systemd loads it at start (automount units).
    "autofs4",
];

/// Without these the image cannot provision its disk: a failure, not a smaller image.
pub const REQUIRED_DRIVERS: &[&str] = &["virtio_pci", "virtio_blk", "dm_mod"];

/// The login the tests use: a sudo user with a password; root is locked.
pub const USER: &str = "tester";
pub const PASSWORD: &str = "tester";

/// The disk the provisioning service partitions, in `/etc/attest/provision.conf`.
pub const CONFIG_PATH: &str = "etc/attest/provision.conf";

/// Units masked: the first-boot wizard (it would prompt on the console), periodic maintenance, and
/// boot steps a short-lived test VM does not need.
const MASKED_UNITS: &[&str] = &[
    "systemd-firstboot.service",
    "systemd-hwdb-update.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "systemd-pstore.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
];

/// Run in the chroot after the files are in place (`$1` is the guest kernel's release).
const CHROOT_SCRIPT: &str = "set -eu
useradd --create-home --shell /bin/bash --groups sudo tester
echo tester:tester | chpasswd
passwd --lock root
systemctl enable systemd-networkd.service provision.service
depmod --all \"$1\"
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* \\
  /usr/lib/udev/hwdb.bin /var/cache/apt/* /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
";

/// The provisioning script: the target disk from its configuration, waited for through udev
/// (bounded), then LVM on all of it and the status file. Each failure says what and exits 1, so the
/// unit is `failed` and its journal says why.
const PROVISION_SCRIPT: &str = r#"#!/bin/sh
# Provisions the target disk with LVM: volume group main, logical volume slash on all of it.
set -u
fail() { echo "provision: $*" >&2; exit 1; }
. /etc/attest/provision.conf || fail "cannot read /etc/attest/provision.conf"
echo "provision: target disk $DISK"
udevadm wait --timeout=20 "$DISK" 2>/dev/null ||
  fail "no disk $DISK (waited 20 s for udev; block devices: $(ls /sys/class/block | tr '\n' ' '))"
modprobe dm_mod || fail "cannot load dm_mod (device-mapper), which LVM needs"
pvcreate --yes "$DISK" || fail "pvcreate $DISK failed"
vgcreate main "$DISK" || fail "vgcreate main $DISK failed"
lvcreate --yes --extents 100%FREE --name slash main || fail "lvcreate main/slash failed"
mkdir -p /run/provision
echo STATE=applied > /run/provision/status.new && mv /run/provision/status.new /run/provision/status ||
  fail "cannot write /run/provision/status"
echo "provision: applied (main/slash on $DISK)"
"#;

const PROVISION_UNIT: &str = "[Unit]
Description=Provision the target disk with LVM (attest test installer)
Wants=systemd-udev-trigger.service
After=systemd-udevd.service systemd-udev-trigger.service

[Service]
Type=oneshot
RemainAfterExit=no
TimeoutStartSec=180
ExecStart=/usr/local/sbin/provision

[Install]
WantedBy=multi-user.target
";

/// DHCP on eth0 (QEMU's user-mode network serves it; `net.ifnames=0` keeps the kernel's name).
const NETWORK: &str = "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n";

const SYSTEM_CONF: &str = "[Manager]\nDefaultTimeoutStartSec=300\nDefaultDeviceTimeoutSec=300\nShowStatus=false\n";

/// `/etc/attest/provision.conf` naming `disk` as the target.
pub fn provision_conf(disk: &str) -> String {
    format!("DISK={disk}\n")
}

/// The recipe of the installer's root filesystem for a kernel release, provisioning `/dev/vda`.
pub fn recipe(kernel_release: &str) -> Recipe {
    let file = |path: &str, text: &str, mode: u32| (path.to_string(), Content::File { text: text.into(), mode });
    let link = |path: &str, target: &str| (path.to_string(), Content::Symlink(target.into()));
    let units = "etc/systemd/system";
    let mut files = vec![
        // The kernel runs the initramfs's /init: systemd itself, no switch_root. No
        // /etc/initrd-release, so systemd boots as on a real root.
        link("init", "/sbin/init"),
        file("usr/local/sbin/provision", PROVISION_SCRIPT, 0o755),
        file(&format!("{units}/provision.service"), PROVISION_UNIT, 0o644),
        file(CONFIG_PATH, &provision_conf("/dev/vda"), 0o644),
        file("etc/systemd/network/20-eth0.network", NETWORK, 0o644),
        file("etc/systemd/system.conf.d/attest.conf", SYSTEM_CONF, 0o644),
        link(&format!("{units}/default.target"), "/lib/systemd/system/multi-user.target"),
        file("etc/fstab", "# the root filesystem is the initramfs\n", 0o644),
        file("etc/hostname", "installer\n", 0o644),
        file("etc/hosts", "127.0.0.1 localhost installer\n::1 localhost ip6-localhost ip6-loopback\n", 0o644),
        file("etc/resolv.conf", "", 0o644),
        // A fixed id, so no boot is a "first boot".
        file("etc/machine-id", "a77e57deb1a40001a77e57deb1a40001\n", 0o444),
        // The drivers it carries, for the cache key and for whoever looks inside.
        file("etc/attest/drivers", &format!("{}\n", DRIVERS.join("\n")), 0o644),
    ];
    files.extend(MASKED_UNITS.iter().map(|unit| link(&format!("{units}/{unit}"), "/dev/null")));
    Recipe::bookworm(PACKAGES, files, CHROOT_SCRIPT, kernel_release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installer_provisions_vda_with_lvm_and_has_a_sudo_user() {
        let recipe = recipe("6.1.0-56-cloud-amd64");
        let find = |path: &str| recipe.files.iter().find(|(p, _)| p == path).map(|(_, c)| c.clone());
        assert_eq!(find(CONFIG_PATH), Some(Content::File { text: "DISK=/dev/vda\n".into(), mode: 0o644 }));
        assert_eq!(find("init"), Some(Content::Symlink("/sbin/init".into())));
        assert!(find("etc/initrd-release").is_none(), "systemd must not think it runs in an initrd");
        assert!(find("etc/systemd/system/serial-getty@ttyS0.service").is_none(), "the serial getty stays");
        for step in ["vgcreate main", "--name slash main", "STATE=applied", "no disk $DISK"] {
            assert!(PROVISION_SCRIPT.contains(step), "{step}");
        }
        assert!(
            CHROOT_SCRIPT.contains(&format!("--groups sudo {USER}")) && CHROOT_SCRIPT.contains("passwd --lock root")
        );
        assert!(CHROOT_SCRIPT.contains(&format!("echo {USER}:{PASSWORD} | chpasswd")));
        assert_ne!(recipe.digest(), crate::debian::Recipe::new("6.1.0-56-cloud-amd64").digest());
    }
}
