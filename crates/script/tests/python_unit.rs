//! The Python module's own unit tests (`src/python/test_attest_driver.py`: the machine API's
//! signatures against NixOS's, retry, polling conditions, the failure report), run by `cargo test`.

use std::process::Command;

#[test]
fn the_python_modules_unit_tests_pass() {
    let Ok(python) = which::which("python3") else { return eprintln!("SKIP: python3 not found") };
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/python");
    let output = Command::new(python)
        .args(["-m", "unittest", "-v", "test_attest_driver"])
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("MachineApi.test_every_nixos_method_exists_with_its_parameters_and_defaults) ... ok"),
        "{report}"
    );
}
