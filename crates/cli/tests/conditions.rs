//! Boot-image tests from the command line: `attest run TEST.toml` with conditions and no script,
//! and the same conditions from a Python script; on real VMs (QEMU, TCG here) with attest's
//! minimal guest and a blank disk.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{attest_bin, run_command};

const TEST: &str = r#"
[machines.image]
image = "minimal"
memory = 256
blank_disks = [{ size = 64 }]

[[machines.image.conditions]]
name = "a Linux"
command = "uname -s"
output = "^Linux$"

[[machines.image.conditions]]
name = "the blank disk"
block_device = "/dev/vda"
within = 30

[[machines.image.conditions]]
name = "provisioned"
file = "/run/provision/status"
matches = "STATE=applied"

[[machines.image.conditions]]
name = "console"
console = "connecting to host"
within = 30
"#;

fn skip() -> bool {
    let missing = attest_machine::Qemu::find_binary().is_none()
        || attest_image::kernel::locate(None, &attest_image::cache_dir()).is_err();
    if missing {
        eprintln!("SKIP: QEMU or the guest kernel is missing (scripts/setup)");
    }
    missing
}

#[test]
fn attest_run_checks_every_condition_and_reports_each() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test.toml"), TEST).unwrap();
    let (out, junit) = (dir.path().join("out"), dir.path().join("junit.xml"));
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.path().join("test.toml")).arg("-o").arg(&out).arg("--junit-xml").arg(&junit);
    let run = run_command(command.stdin(Stdio::null()));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, 1, "one condition fails: {stdout}\n{}", run.stderr);
    let table: Vec<&str> = stdout.lines().skip(2).take(4).collect();
    assert!(table[0].starts_with("a Linux") && table[0].contains("passed"), "{stdout}");
    assert!(table[1].starts_with("the blank disk") && table[1].contains("passed"), "{stdout}");
    assert!(table[2].starts_with("provisioned") && table[2].contains("FAILED"), "{stdout}");
    assert!(table[3].starts_with("console") && table[3].contains("passed"), "{stdout}");
    assert!(stdout.contains("$ ls -l /run/provision/status"), "the evidence is shown: {stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("conditions.json")).unwrap()).unwrap();
    assert_eq!(json[0]["results"].as_array().unwrap().len(), 4);
    assert_eq!(json[0]["results"][2]["outcome"], "failed");
    let xml = std::fs::read_to_string(junit).unwrap();
    assert_eq!(xml.matches("<testcase ").count(), 4, "{xml}");
    assert!(xml.contains("name=\"image: provisioned\""), "{xml}");
    assert!(Path::new(&out.join("image-console.log")).is_file());
}

const SCRIPT: &str = r#"
report = image.check_conditions(check=False)
assert [r["outcome"] for r in report["results"]] == ["passed", "passed", "failed", "passed"], report
image.check_conditions()
"#;

#[test]
fn a_script_checks_the_same_conditions() {
    if skip() || which::which("python3").is_err() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test.toml"), format!("script = \"test.py\"\n{TEST}")).unwrap();
    std::fs::write(dir.path().join("test.py"), SCRIPT).unwrap();
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.path().join("test.toml"));
    let run = run_command(command.stdin(Stdio::null()));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("test.py\", line 4"), "the failure points at the script's line: {}", run.stderr);
    assert!(run.stderr.contains("image: conditions failed") && run.stderr.contains("provisioned"), "{}", run.stderr);
}

/// QEMU refusing what preflight cannot judge (an option of the test's own `qemu_args`) is reported
/// in QEMU's words first, at once, not as conditions that could not be checked for want of a shell.
#[test]
fn a_machine_qemu_refuses_leads_with_qemus_message() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test = TEST.replace("memory = 256\n", "memory = 256\nqemu_args = [\"-attest-no-such-option\"]\n");
    std::fs::write(dir.path().join("test.toml"), test).unwrap();
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.path().join("test.toml")).arg("-o").arg(dir.path().join("out"));
    let started = std::time::Instant::now();
    let run = run_command(command.stdin(Stdio::null()));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, 2, "the conditions could not be checked: {stdout}\n{}", run.stderr);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "at once: {:?}", started.elapsed());
    let refusal = stdout.lines().position(|l| l.starts_with("QEMU refused to start: "));
    let refusal = refusal.unwrap_or_else(|| panic!("QEMU's refusal leads: {stdout}\n{}", run.stderr));
    assert!(stdout.lines().nth(refusal).unwrap().contains("-attest-no-such-option"), "{stdout}");
    assert!(stdout.contains("image: so its conditions could not be checked"), "{stdout}");
}
