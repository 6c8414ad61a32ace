//! `attest exec` as a cargo runner: `cargo test` on a fixture crate runs its test binaries in VMs.

mod common;

use std::path::Path;
use std::process::Command;

fn cargo_test(with_runner: bool, fail: bool) -> common::Run {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vm-crate");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-crate-target");
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(["test", "--quiet"]).current_dir(&fixture).env("CARGO_TARGET_DIR", &target);
    command.env_remove("RUSTFLAGS").env_remove("CARGO_ENCODED_RUSTFLAGS");
    if with_runner {
        let runner = format!("{} exec --", common::attest_bin().display());
        command.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", runner);
    }
    if fail {
        command.env("VM_CRATE_FAIL", "1");
    }
    common::run_command(&mut command)
}

#[test]
fn cargo_test_runs_inside_vms_and_reports_failures() {
    let passing = cargo_test(true, false);
    assert_eq!(passing.code, 0, "{passing:?}");
    let out = passing.stdout_text();
    assert!(out.contains("2 passed") || out.contains("test result: ok. 2 passed"), "{passing:?}");
    assert!(!passing.stderr.contains("attest"), "attest printed into cargo test's output: {passing:?}");

    let failing = cargo_test(true, true);
    assert_ne!(failing.code, 0, "a failing test inside the VM must fail cargo test: {failing:?}");
    let all = format!("{}{}", failing.stdout_text(), failing.stderr);
    assert!(all.contains("failing on purpose inside the VM"), "{failing:?}");
    assert!(all.contains("fails_when_asked"), "{failing:?}");

    // The in-VM check is real: on the host the same test fails.
    let on_host = cargo_test(false, false);
    assert_ne!(on_host.code, 0, "{on_host:?}");
    assert!(format!("{}{}", on_host.stdout_text(), on_host.stderr).contains("not inside an attest VM"), "{on_host:?}");
}
