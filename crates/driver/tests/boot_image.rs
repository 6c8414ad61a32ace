//! Boot images on real VMs (QEMU, TCG here): a hybrid ISO made with grub-mkrescue from the Debian
//! kernel and attest's minimal backdoor initramfs, booted from the cdrom by SeaBIOS and by OVMF
//! (UEFI) with blank disks, and its conditions checked: all but one on a disk whose driver the
//! image lacks.

mod common;

use std::time::Duration;

use attest_driver::conditions::{Condition, Kind, Outcome};
use attest_driver::config::BlankDisk;
use attest_driver::{FirmwareKind, MachineConfig};
use attest_image::iso::GrubIso;
use attest_machine::{DiskBus, DiskFormat};

fn iso() -> Option<std::path::PathBuf> {
    if let Some(why) = common::missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return None;
    }
    if which::which("grub-mkrescue").is_err() || !std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() {
        eprintln!("SKIP: grub-mkrescue or OVMF missing (scripts/setup installs grub-pc-bin, grub-efi-amd64-bin, mtools, xorriso, ovmf)");
        return None;
    }
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).unwrap();
    let drivers = ["virtio_pci", "virtio_console", "virtio_rng", "virtio_blk", "ahci", "sr_mod"];
    let modules = kernel.module_tree().unwrap().resolve(&drivers).unwrap().load;
    let (busybox, bash) = (attest_image::find_busybox().unwrap(), attest_image::backdoor::find_static_bash().unwrap());
    let initrd = attest_image::backdoor::backdoor_initramfs(&busybox, &bash, &modules)
        .unwrap()
        .write_cached(&cache.join("initramfs"))
        .unwrap();
    let iso = GrubIso {
        kernel: kernel.path.clone(),
        initrd,
        cmdline: "console=ttyS0 panic=-1 rdinit=/init".into(),
        title: "attest test image".into(),
    };
    Some(iso.build_cached(&cache).unwrap())
}

fn condition(name: &str, kind: Kind, within: u64) -> Condition {
    Condition { name: name.into(), kind, within: Some(Duration::from_secs(within)) }
}

#[test]
fn an_iso_boots_by_bios_and_by_uefi_and_passes_its_conditions() {
    let Some(iso) = iso() else { return };
    let conditions = vec![
        condition("the kernel ran", Kind::Console { regex: "Linux version".into() }, 120),
        condition("the blank disk", Kind::BlockDevice { path: "/dev/vda".into() }, 30),
        condition(
            "serial console",
            Kind::File { path: "/proc/cmdline".into(), matches: Some("console=ttyS0".into()) },
            0,
        ),
        // A disk on virtio-scsi, whose driver the image lacks: the firmware sees it, Linux does not.
        condition("the SCSI disk", Kind::BlockDevice { path: "/dev/sda".into() }, 3),
    ];
    let machine = |name: &str, firmware| {
        let mut m = MachineConfig::iso(name, &iso).memory_mib(512).firmware(firmware).blank_disk(64, DiskFormat::Qcow2);
        m.blank_disks.push(BlankDisk { size_mib: 64, format: DiskFormat::Raw, bus: DiskBus::Scsi });
        m.conditions = conditions.clone();
        m
    };
    let driver =
        common::driver(vec![machine("bios", FirmwareKind::Bios), machine("uefi", FirmwareKind::Uefi)]).unwrap();
    driver.start_all().unwrap();
    let reports: Vec<_> = std::thread::scope(|scope| {
        let checks: Vec<_> = driver
            .machines()
            .into_iter()
            .map(|m| scope.spawn(move || m.check_conditions(&m.config().conditions)))
            .collect();
        checks.into_iter().map(|c| c.join().unwrap().unwrap()).collect()
    });
    for report in reports {
        let outcomes: Vec<Outcome> = report.results.iter().map(|r| r.outcome).collect();
        let expected = [Outcome::Passed, Outcome::Passed, Outcome::Passed, Outcome::Failed];
        assert_eq!(outcomes, expected, "{}:\n{}", report.machine, report.text());
        assert!(report.results[3].reason.as_deref().unwrap().contains("`test -b /dev/sda` exited 1"));
    }
    let uefi = driver.machine("uefi").unwrap();
    assert_eq!(uefi.succeed("test -d /sys/firmware/efi && echo efi", None).unwrap(), "efi\n");
    let bios = driver.machine("bios").unwrap();
    assert_eq!(bios.execute("test -d /sys/firmware/efi", None).unwrap().0, 1, "SeaBIOS boots without EFI");
}
