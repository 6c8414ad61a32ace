//! Boot images on real VMs (QEMU, TCG here): a hybrid ISO made with grub-mkrescue from the Debian
//! kernel and attest's minimal backdoor initramfs, booted from the cdrom by SeaBIOS and by OVMF
//! (UEFI) with blank disks, and its conditions checked: all but one on a disk whose driver the
//! image lacks. Then the test installer ISO (a Debian systemd root in its initrd, serial login,
//! LVM provisioning; see `attest_image::installer`): the good one by BIOS and UEFI, all conditions
//! holding; the one that provisions `/dev/sda`, exactly its provisioning conditions failing, with
//! the unit's journal as evidence, after a wrong password is refused at the login prompt.

mod common;

use std::time::{Duration, Instant};

use attest_driver::conditions::{Condition, Kind, Outcome, Report};
use attest_driver::config::BlankDisk;
use attest_driver::{Driver, FirmwareKind, MachineConfig};
use attest_image::installer::{self, Variant};
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
    for report in check_all(&driver) {
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

/// The installer ISO of `variant`, built unless cached; `None` after printing why it cannot be here.
fn installer_iso(variant: Variant) -> Option<std::path::PathBuf> {
    let missing = common::missing_prerequisite().or_else(|| {
        let tools = ["debootstrap", "grub-mkrescue", "cpio"].into_iter().find(|t| which::which(t).is_err());
        let ovmf = std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists();
        tools.map(|t| format!("{t} not found")).or((!ovmf).then(|| "OVMF not found".into()))
    });
    if let Some(why) = missing {
        eprintln!("SKIP: {why} (scripts/setup installs what the installer ISO needs)");
        return None;
    }
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).unwrap();
    let mut progress = |line: &str| eprintln!("{line}");
    Some(installer::ensure(&cache, &kernel, variant, &mut progress).unwrap())
}

/// What a provisioned installer machine must have, each within `within` seconds of its start.
fn installer_conditions(within: u64) -> Vec<Condition> {
    let unit = Kind::Unit { unit: "provision.service".into(), state: "inactive".into() };
    let status = Kind::File { path: "/run/provision/status".into(), matches: Some("STATE=applied".into()) };
    vec![
        condition("provisioning finished", unit, within),
        condition("provisioning applied", status, within),
        condition("volume group", Kind::VolumeGroup { name: "main".into() }, within),
        condition("logical volume", Kind::LogicalVolume { name: "main/slash".into() }, within),
        condition("target disk", Kind::BlockDevice { path: "/dev/vda".into() }, within),
        condition("network", Kind::Ipv4 { interface: "eth0".into() }, within),
        condition("serial login prompt", Kind::Console { regex: "login:".into() }, within),
    ]
}

/// A machine booting `iso` with a blank 1 GiB virtio disk, logging in as the installer's sudo user.
fn installer_machine(name: &str, iso: &std::path::Path, firmware: FirmwareKind, within: u64) -> MachineConfig {
    let mut machine = MachineConfig::iso(name, iso)
        .memory_mib(1024)
        .firmware(firmware)
        .blank_disk(1024, DiskFormat::Qcow2)
        .login(installer::USER, Some(installer::PASSWORD), true);
    machine.conditions = installer_conditions(within);
    machine
}

/// Checks every machine's conditions at once (one thread each) and prints the reports.
fn check_all(driver: &Driver) -> Vec<Report> {
    driver.start_all().unwrap();
    let reports: Vec<Report> = driver.check_conditions().into_iter().map(|(_, report)| report.unwrap()).collect();
    for report in &reports {
        println!("{}:\n{}", report.machine, report.text());
    }
    reports
}

#[test]
fn the_installer_iso_provisions_lvm_by_bios_and_by_uefi() {
    let Some(iso) = installer_iso(Variant::Good) else { return };
    let machines = vec![
        installer_machine("bios", &iso, FirmwareKind::Bios, 300),
        installer_machine("uefi", &iso, FirmwareKind::Uefi, 300),
    ];
    let Some(driver) = common::driver(machines) else { return };
    for report in check_all(&driver) {
        let failed: Vec<&str> =
            report.results.iter().filter(|r| r.outcome != Outcome::Passed).map(|r| r.name.as_str()).collect();
        assert!(failed.is_empty(), "{}: {failed:?} did not hold:\n{}", report.machine, report.text());
    }
    let uefi = driver.machine("uefi").unwrap();
    assert_eq!(uefi.serial_succeed("test -d /sys/firmware/efi && echo efi", None).unwrap(), "efi\n");
    let bios = driver.machine("bios").unwrap();
    assert_eq!(bios.serial_execute("test -d /sys/firmware/efi", None).unwrap().0, 1, "SeaBIOS boots without EFI");
}

/// How long the failing unit's condition may wait: far longer than the unit takes to fail.
const UNIT_WITHIN: u64 = 400;

/// One boot: first a wrong password, refused at the login prompt well within its deadline; then
/// the conditions, of which exactly the provisioning ones fail. The unit's condition, given 400 s,
/// is decided within 10 s of the unit failing (or of the check starting, if it failed before),
/// since a failed oneshot nothing will start again cannot become inactive.
#[test]
fn an_installer_provisioning_sda_fails_its_lvm_conditions_and_says_why() {
    let Some(iso) = installer_iso(Variant::ProvisionsSda) else { return };
    let mut config = installer_machine("sda", &iso, FirmwareKind::Bios, 60);
    config.conditions[0].within = Some(Duration::from_secs(UNIT_WITHIN));
    let Some(driver) = common::driver(vec![config]) else { return };
    let machine = driver.machine("sda").unwrap();
    machine.start().unwrap();
    let (started, deadline) = (Instant::now(), Duration::from_secs(240));
    let refused = machine.login(installer::USER, Some("wrong"), Some(deadline)).unwrap_err().to_string();
    println!("wrong password after {:.1?}: {refused}", started.elapsed());
    assert!(started.elapsed() < deadline, "refused before the deadline");
    assert!(refused.contains("login (password)") && refused.contains("Login incorrect"), "{refused}");
    assert!(refused.contains("login:"), "the error shows the console's login prompt: {refused}");
    // Logged in before the clock starts, so the latency measured is the conditions' own.
    machine.login(installer::USER, Some(installer::PASSWORD), None).unwrap();
    machine.become_root(Some(installer::PASSWORD), None).unwrap();

    let checking = Instant::now();
    let report = check_all(&driver).remove(0);
    let table = checking.elapsed();
    let outcomes: Vec<(&str, Outcome)> = report.results.iter().map(|r| (r.name.as_str(), r.outcome)).collect();
    use Outcome::{Failed, Passed};
    let expected = [
        ("provisioning finished", Failed), // `failed`, not `inactive`
        ("provisioning applied", Failed),
        ("volume group", Failed),
        ("logical volume", Failed),
        ("target disk", Passed),
        ("network", Passed),
        ("serial login prompt", Passed),
    ];
    assert_eq!(outcomes, expected, "{}", report.text());
    let unit = &report.results[0];
    let reason = unit.reason.as_deref().unwrap();
    assert!(reason.contains("ActiveState=failed"), "{unit:?}");
    assert!(reason.ends_with("cannot become inactive without someone acting"), "{unit:?}");
    let journal = unit.evidence.iter().find(|e| e.command.starts_with("journalctl")).expect("the unit's journal");
    assert!(journal.output.contains("no disk /dev/sda"), "{}", journal.output);

    let failed_at = machine.unit_state_changed_at("provision.service").unwrap();
    // `started` is taken after the machine's own start, so this verdict time is if anything late.
    let decided_at = started + Duration::from_secs_f64(unit.after_seconds);
    let latency = decided_at.saturating_duration_since(failed_at.max(checking));
    println!(
        "unit failed {:.1} s after the start, {:.1} s {} the check began; decided after {latency:.1?}; table in {table:.1?}",
        (failed_at.saturating_duration_since(started)).as_secs_f64(),
        if failed_at > checking { failed_at - checking } else { checking - failed_at }.as_secs_f64(),
        if failed_at > checking { "after" } else { "before" },
    );
    assert!(latency < Duration::from_secs(10), "decided {latency:?} after the unit failed:\n{}", report.text());
    assert!(table < Duration::from_secs(UNIT_WITHIN / 2), "the table took {table:?}:\n{}", report.text());
}
