//! Conditions on a guest that dies while they are checked (a kernel panic in the middle): the ones
//! decided before stand, the rest are "not reached" with the reason, and console conditions are
//! still decided from the console's log. Real VM (QEMU, TCG here), attest's minimal guest.

mod common;

use std::time::Duration;

use attest_driver::conditions::{Condition, Kind, Outcome};
use attest_driver::{BuiltinImage, MachineConfig};

fn condition(name: &str, kind: Kind) -> Condition {
    Condition { name: name.into(), kind, within: Some(Duration::from_secs(10)) }
}

#[test]
fn a_guest_that_dies_mid_check_leaves_the_rest_not_reached() {
    let machine = MachineConfig::image("doomed", BuiltinImage::Minimal).memory_mib(256);
    let Some(driver) = common::driver(vec![machine]) else { return };
    let m = driver.machine("doomed").unwrap();
    let command = |command: &str| Kind::Command { command: command.into(), status: 0, output: None };
    let conditions = [
        condition("before", command("true")),
        condition("the crash", command("echo c > /proc/sysrq-trigger")),
        condition("after", command("true")),
        condition("the panic on the console", Kind::Console { regex: "Kernel panic".into() }),
    ];
    let report = m.check_conditions(&conditions).unwrap();
    let outcomes: Vec<Outcome> = report.results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Passed, Outcome::NotReached, Outcome::NotReached, Outcome::Passed],
        "{}",
        report.text()
    );
    let why = report.results[2].reason.as_deref().unwrap();
    assert!(why.starts_with("the machine could not be reached"), "{why}");
    assert!(report.results.iter().all(|r| r.after_seconds < 60.0), "{}", report.text());
}
