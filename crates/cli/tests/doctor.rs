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
        "memory",
        "sockets",
    ] {
        let line = out.lines().find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)));
        let line = line.unwrap_or_else(|| panic!("no {name} line in:\n{out}"));
        assert!(line.starts_with("ok  ") || line.starts_with("warn") || line.starts_with("FAIL"), "{line}");
    }
    for required in ["qemu", "kernel", "modules", "busybox", "file sharing"] {
        assert!(out.contains(&format!("ok    {required}")), "{required} should be ok here:\n{out}");
    }
    // On a PVM host the probe must see through /dev/kvm's existence.
    let kvm = out.lines().find(|l| l.contains(" kvm ")).unwrap();
    assert!(kvm.starts_with("ok    kvm          usable") || kvm.contains("unusable, attest will use TCG"), "{kvm}");
    assert!(out.lines().last().unwrap().contains("0 failed"), "{out}");
}

#[test]
fn doctor_fails_when_a_required_piece_is_missing() {
    let run =
        common::run_command(Command::new(common::attest_bin()).args(["doctor", "--kernel", "/nonexistent/vmlinuz"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout_text().contains("FAIL  kernel"), "{run:?}");
    assert!(run.stdout_text().contains("fix: "), "{run:?}");
}
