//! Benchmark of boot-image tests on the test installer ISO (see `attest_image::installer`; run by
//! bench/boot_image.sh): (1) the time to a verdict on a broken ISO, `attest preflight` on the
//! variant without `console=ttyS0`, median of RUNS; (2) one boot of the good ISO by BIOS and one by
//! UEFI (one after the other), each phase timed: firmware and GRUB until "Linux version" on the
//! console, kernel and systemd until the login prompt, login, `sudo -i`, each condition; (3) on the
//! variant whose provisioning fails, the time from `provision.service` failing to the verdict on
//! its condition (`inactive` within 400 s: decided at once). Prints Markdown tables.
//!
//!   boot_image_bench ATTEST_BINARY [RUNS]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use attest_driver::conditions::{Condition, Kind, Outcome};
use attest_driver::{Driver, DriverOptions, FirmwareKind, Log, MachineConfig, TestConfig};
use attest_image::installer::{self, Variant};
use attest_machine::DiskFormat;

fn main() {
    let mut args = std::env::args().skip(1);
    let attest = args.next().expect("usage: boot_image_bench ATTEST_BINARY [RUNS]");
    let runs: usize = args.next().map_or(5, |r| r.parse().expect("RUNS is a number"));
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).expect("a guest kernel (scripts/setup)");
    let mut progress = |line: &str| eprintln!("{line}");
    let quiet = installer::ensure(&cache, &kernel, Variant::NoSerialConsole, &mut progress).expect("the ISO builds");
    let good = installer::ensure(&cache, &kernel, Variant::Good, &mut progress).expect("the ISO builds");
    let sda = installer::ensure(&cache, &kernel, Variant::ProvisionsSda, &mut progress).expect("the ISO builds");

    let dir = tempfile::tempdir().expect("a temporary directory");
    let test = dir.path().join("test.toml");
    let toml = format!(
        "[machines.installer]\niso = \"{}\"\nblank_disks = [{{ size = \"1G\" }}]\n\
         login = {{ user = \"tester\", password = \"tester\", sudo = true }}\n\
         [[machines.installer.conditions]]\nname = \"up\"\nconsole = \"login:\"\n",
        quiet.display()
    );
    std::fs::write(&test, toml).expect("writing the test");
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = Command::new(&attest).arg("preflight").arg(&test).stdin(Stdio::null()).output().expect("attest");
            let elapsed = started.elapsed();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.code() == Some(1) && stdout.contains("/boot/grub/grub.cfg line"), "{stdout}");
            elapsed
        })
        .collect();
    times.sort();
    println!("| broken ISO (no console=ttyS0) | time to verdict |\n|---|---|");
    println!(
        "| `attest preflight`, median of {runs} | {:.2} s (min {:.2} s, max {:.2} s) |\n",
        secs(times[runs / 2]),
        secs(times[0]),
        secs(times[runs - 1])
    );

    let bios = boot(&good, FirmwareKind::Bios);
    let uefi = boot(&good, FirmwareKind::Uefi);
    println!("| phase (good ISO, TCG, 1 vCPU) | BIOS (SeaBIOS) | UEFI (OVMF) |\n|---|---|---|");
    for ((phase, b), (_, u)) in bios.iter().zip(&uefi) {
        println!("| {phase} | {b:.1} s | {u:.1} s |");
    }

    let (latency, total) = failed_unit_verdict(&sda);
    println!("\n| broken ISO (provisions /dev/sda), BIOS | |\n|---|---|");
    println!("| `provision.service` failed → verdict on its condition (within 400 s) | {latency:.1} s |");
    println!("| start → that verdict | {total:.1} s |");
}

/// A machine booting `iso` as the boot-image tests do, logging in as the installer's sudo user.
fn installer(iso: &std::path::Path, firmware: FirmwareKind) -> Driver {
    let machine = MachineConfig::iso("installer", iso)
        .memory_mib(1024)
        .firmware(firmware)
        .blank_disk(1024, DiskFormat::Qcow2)
        .login(installer::USER, Some(installer::PASSWORD), true);
    let options = DriverOptions { log: Log::to(Box::new(std::io::sink())), ..DriverOptions::default() };
    Driver::new(TestConfig::new(vec![machine]), options).expect("driver")
}

/// One boot of the ISO whose provisioning fails: seconds from the unit failing (or from the check
/// starting, if later) to its condition's verdict, and from the start to that verdict.
fn failed_unit_verdict(iso: &std::path::Path) -> (f64, f64) {
    let driver = installer(iso, FirmwareKind::Bios);
    let m = driver.machine("installer").expect("the machine");
    m.start().expect("start");
    let started = Instant::now();
    m.login(installer::USER, Some(installer::PASSWORD), None).expect("login");
    m.become_root(Some(installer::PASSWORD), None).expect("sudo -i");
    let unit = Kind::Unit { unit: "provision.service".into(), state: "inactive".into() };
    let condition =
        Condition { name: "provisioning finished".into(), kind: unit, within: Some(Duration::from_secs(400)) };
    let checking = Instant::now();
    let report = m.check_conditions(&[condition]).expect("conditions");
    assert_eq!(report.results[0].outcome, Outcome::Failed, "{}", report.text());
    let failed_at = m.unit_state_changed_at("provision.service").expect("the unit's failure time");
    let decided_at = started + Duration::from_secs_f64(report.results[0].after_seconds);
    m.crash().ok();
    (secs(decided_at.saturating_duration_since(failed_at.max(checking))), secs(decided_at - started))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// One boot of `iso`: the phases and their durations, then the totals.
fn boot(iso: &std::path::Path, firmware: FirmwareKind) -> Vec<(String, f64)> {
    let driver = installer(iso, firmware);
    let m = driver.machine("installer").expect("the machine");
    let within = Some(Duration::from_secs(300));
    let started = Instant::now();
    let mut last = started;
    let mut phases = Vec::new();
    let mut lap = |phase: &str| {
        let now = Instant::now();
        phases.push((phase.to_string(), (now - last).as_secs_f64()));
        last = now;
    };
    m.start().expect("start");
    m.wait_for_console_text("Linux version", within).expect("the kernel starts");
    lap("firmware + GRUB, until \"Linux version\"");
    m.wait_for_console_text("login:", within).expect("a login prompt");
    lap("kernel + systemd, until the login prompt");
    m.login(installer::USER, Some(installer::PASSWORD), None).expect("login");
    lap("login (tester, password)");
    m.become_root(Some(installer::PASSWORD), None).expect("sudo -i");
    lap("sudo -i (password)");
    let condition = |name: &str, kind| Condition { name: name.into(), kind, within: Some(Duration::from_secs(300)) };
    for c in [
        condition(
            "provision.service inactive",
            Kind::Unit { unit: "provision.service".into(), state: "inactive".into() },
        ),
        condition(
            "/run/provision/status",
            Kind::File { path: "/run/provision/status".into(), matches: Some("STATE=applied".into()) },
        ),
        condition("volume group main", Kind::VolumeGroup { name: "main".into() }),
        condition("logical volume main/slash", Kind::LogicalVolume { name: "main/slash".into() }),
        condition("block device /dev/vda", Kind::BlockDevice { path: "/dev/vda".into() }),
        condition("ipv4 eth0", Kind::Ipv4 { interface: "eth0".into() }),
        condition("console login:", Kind::Console { regex: "login:".into() }),
    ] {
        let report = m.check_conditions(std::slice::from_ref(&c)).expect("conditions");
        assert_eq!(report.results[0].outcome, Outcome::Passed, "{}", report.text());
        lap(&format!("condition: {}", c.name));
    }
    let total = started.elapsed().as_secs_f64();
    let to_prompt: f64 = phases[..2].iter().map(|(_, s)| s).sum();
    phases.push(("**total: start to login prompt**".into(), to_prompt));
    phases.push(("**total: start to last condition**".into(), total));
    m.crash().ok();
    phases
}
