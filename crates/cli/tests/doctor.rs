//! `attest doctor` on this machine: real checks, a KVM probe included.

mod common;

use std::process::Command;

#[test]
fn doctor_reports_every_prerequisite_and_passes_after_setup() {
    let run = common::run_command(Command::new(common::attest_bin()).arg("doctor"));
    let out = run.stdout_text();
    assert_eq!(run.code, 0, "setup has run on this machine, so nothing required is missing: {out}");
    for name in [
        "qemu",
        "kvm",
        "kernel",
        "modules",
        "file sharing",
        "busybox",
        "tun",
        "vhost-vsock",
        "vde_switch",
        "tesseract",
        "disk",
        "snapshot cache",
        "memory",
        "sockets",
    ] {
        let line = out.lines().find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)));
        let line = line.unwrap_or_else(|| panic!("no {name} line in:\n{out}"));
        assert!(line.starts_with("ok  ") || line.starts_with("warn") || line.starts_with("FAIL"), "{line}");
    }
    let qemu = out.lines().find(|l| l.starts_with("ok    qemu")).unwrap_or_else(|| panic!("qemu not ok:\n{out}"));
    let version = Command::new("qemu-system-x86_64").arg("--version").output().expect("qemu --version").stdout;
    let version = String::from_utf8_lossy(&version).lines().next().unwrap().replace("QEMU emulator version ", "");
    let number = version.split_whitespace().next().unwrap();
    assert!(qemu.contains(&format!("QEMU {number} (")), "doctor names the version {number}: {qemu}");
    for required in ["qemu", "kernel", "modules", "busybox", "file sharing"] {
        assert!(out.contains(&format!("ok    {required}")), "{required} should be ok here:\n{out}");
    }
    assert!(out.lines().last().unwrap().contains("0 failed"), "{out}");
}

/// The verdict must match what really happens when the guest kernel boots under KVM with the CPU
/// model attest uses: on a PVM host `/dev/kvm` exists, yet such a guest aborts.
#[test]
fn doctors_kvm_verdict_matches_booting_a_real_kernel_under_kvm() {
    let run = common::run_command(Command::new(common::attest_bin()).args(["doctor", "--json"]));
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&run.stdout).expect("doctor --json");
    let check = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} check"));
    let kernel = check("kernel")["path"].as_str().expect("the kernel's path").to_string();
    let initramfs = common::run_command(Command::new(common::attest_bin()).arg("bench-floor-initramfs"));
    let initramfs = initramfs.stdout_text().trim().to_string();
    let qemu = check("qemu")["path"].as_str().expect("QEMU's path").to_string();

    let boot = common::run_command(
        Command::new("timeout")
            .args(["120", &qemu, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults"])
            .args(["-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", &kernel])
            .args(["-initrd", &initramfs, "-append", "console=ttyS0 panic=-1 rdinit=/init"]),
    );
    let kvm_runs_a_guest = boot.code == 0 && boot.stdout_text().contains("Run /init as init process");
    let verdict = check("kvm");
    assert_eq!(
        verdict["status"] == "ok",
        kvm_runs_a_guest,
        "doctor says {verdict}, but booting under KVM gave {boot:?}"
    );
}

#[test]
fn doctor_fails_when_a_required_piece_is_missing() {
    let run =
        common::run_command(Command::new(common::attest_bin()).args(["doctor", "--kernel", "/nonexistent/vmlinuz"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout_text().contains("FAIL  kernel"), "{run:?}");
    assert!(run.stdout_text().contains("fix: "), "{run:?}");
}

/// A QEMU older than the one attest is tested with still runs, but doctor says so and how to fix it.
#[test]
fn doctor_warns_about_a_qemu_older_than_the_tested_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("qemu-7.2");
    std::fs::write(
        &old,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)'; exit 0; }\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = common::run_command(Command::new(common::attest_bin()).arg("doctor").env("ATTEST_QEMU", &old));
    let out = run.stdout_text();
    let line = out.lines().find(|l| l.starts_with("warn  qemu")).unwrap_or_else(|| panic!("no qemu warning:\n{out}"));
    assert!(
        line.contains("QEMU 7.2.19") && line.contains("older than QEMU 10.0.0, which attest is tested with"),
        "{line}"
    );
    assert!(out.contains("fix: run scripts/setup"), "{out}");
    assert_eq!(run.code, 0, "an old QEMU is a warning, not a failure: {out}");
}

/// A snapshot cache attest cannot write is a warning that says what it costs and how to fix it.
#[test]
fn an_unwritable_snapshot_cache_is_a_warning_with_its_fix() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(common::attest_bin());
    command.arg("doctor").env("ATTEST_SNAPSHOT_CACHE", file.path().join("snapshots"));
    let out = common::run_command(&mut command).stdout_text();
    let line = out.lines().find(|l| l.starts_with("warn  snapshot cache")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("is not writable") && line.contains("boot cold every run"), "{line}");
    assert!(out.contains("set ATTEST_SNAPSHOT_CACHE to a directory that is"), "{out}");
}
