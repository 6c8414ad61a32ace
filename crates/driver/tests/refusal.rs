//! A machine QEMU refuses to start (more memory than it can map), past preflight through the Rust
//! API: a command, and the conditions, fail at once with QEMU's own message, not with a wait for a
//! backdoor shell that was never coming. Real QEMU; nothing boots.

mod common;

use std::time::{Duration, Instant};

use attest_driver::conditions::{Condition, Kind};
use attest_driver::{BuiltinImage, MachineConfig};

const REFUSAL: &str = "QEMU refused to start: qemu-system-x86_64: cannot set up guest memory 'pc.ram'";

#[test]
fn a_machine_qemu_refuses_fails_with_qemus_message() {
    let huge = |name: &str| MachineConfig::image(name, BuiltinImage::Minimal).memory_mib(99_999_999);
    let Some(driver) = common::driver(vec![huge("huge"), huge("checked")]) else { return };
    let started = Instant::now();
    let err = driver.machine("huge").unwrap().succeed("true", None).unwrap_err().to_string();
    assert!(err.starts_with(REFUSAL), "{err}");
    assert!(err.contains("(machine huge: QEMU exited (exit status 1) before the guest connected"), "{err}");
    assert!(!err.contains("Spawning backdoor root shell"), "{err}");

    let condition = |name: &str, kind| Condition { name: name.into(), kind, within: Some(Duration::from_secs(5)) };
    let conditions = [
        condition("up", Kind::Console { regex: "login:".into() }),
        condition("runs", Kind::Command { command: "true".into(), status: 0, output: None }),
    ];
    let err = driver.machine("checked").unwrap().check_conditions(&conditions).unwrap_err().to_string();
    assert!(err.starts_with(REFUSAL), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}
