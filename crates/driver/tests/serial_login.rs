//! The serial-console API on real VMs (QEMU, TCG here): a guest with no backdoor whose only way
//! in is a getty on ttyS0 with password login (busybox getty and login, a static bash), as an
//! installer image has; and a guest that never prompts.

mod common;

use std::time::{Duration, Instant};

use attest_driver::conditions::{Condition, Kind, Outcome};
use attest_driver::MachineConfig;
use attest_machine::DiskFormat;

/// alice's password is "secret" (SHA-512 crypt, made with `busybox mkpasswd -m sha512`).
const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for module in $(cat /etc/attest/modules); do insmod "$module"; done
mkdir -p /etc /home/alice /tmp
(sleep 3; echo later > /tmp/later) &
echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd
echo 'alice:x:1000:1000:Alice:/home/alice:/bin/bash' >> /etc/passwd
echo 'root:*:19000:0:99999:7:::' > /etc/shadow
echo 'alice:$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG.:19000:0:99999:7:::' >> /etc/shadow
echo 'root:x:0:' > /etc/group; echo 'alice:x:1000:' >> /etc/group
chown 1000:1000 /home/alice
echo 'serial-login-guest ready'
while true; do setsid getty -L 115200 ttyS0 vt100; done
"#;

fn guest(name: &str, init: &str) -> Option<MachineConfig> {
    if let Some(why) = common::missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).unwrap();
    let (busybox, bash) = (attest_image::find_busybox().unwrap(), attest_image::backdoor::find_static_bash().unwrap());
    let modules = kernel.module_tree().unwrap().resolve(&["virtio_pci", "virtio_blk"]).unwrap().load;
    let mut image = attest_image::backdoor::backdoor_initramfs(&busybox, &bash, &modules).unwrap();
    for applet in ["getty", "login", "setsid", "chown", "id", "whoami"] {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    // A later entry replaces an earlier one of the same name when the kernel unpacks the archive.
    let initrd = image.file("init", init.as_bytes().to_vec(), 0o755).write_cached(&cache.join("initramfs")).unwrap();
    let cmdline = "console=ttyS0 panic=-1 rdinit=/init";
    Some(MachineConfig::kernel(name, &kernel.path, Some(initrd), cmdline).memory_mib(256))
}

#[test]
fn login_with_a_password_then_commands_over_the_serial_console() {
    let Some(machine) = guest("installer", INIT) else { return };
    let driver = common::driver(vec![machine]).unwrap();
    let m = driver.machine("installer").unwrap();

    let err = m.login("alice", Some("wrong"), Some(Duration::from_secs(60))).unwrap_err().to_string();
    assert!(err.contains("login (password): the guest refused the password of alice"), "{err}");
    assert!(err.contains("Login incorrect"), "the prompt is shown: {err}");

    m.login("alice", Some("secret"), Some(Duration::from_secs(60))).unwrap();
    assert_eq!(m.serial_succeed("id -un", None).unwrap(), "alice\n");
    assert_eq!(m.serial_execute("echo out; exit 3", None).unwrap(), (3, "out\n".to_string()));
    let tricky = "printf '%s|' \"it's\" 'a \"b\"' $'x\\ny'";
    assert_eq!(m.serial_succeed(tricky, None).unwrap(), "it's|a \"b\"|x\ny|");
    let failed = m.serial_succeed("ls /nonexistent", None).unwrap_err().to_string();
    assert!(failed.contains("command `ls /nonexistent` failed (exit code 1)"), "{failed}");
    assert!(failed.contains("serial_login.rs:"), "the error names the test's line: {failed}");
    let asked = Instant::now();
    let late = m.serial_execute("sleep 60", Some(Duration::from_secs(2))).unwrap_err().to_string();
    assert!(late.contains("did not finish") && asked.elapsed() < Duration::from_secs(5), "{late}");
    assert_eq!(m.serial_succeed("echo still here", None).unwrap(), "still here\n");
}

#[test]
fn a_guest_that_never_prompts_names_how_far_it_got() {
    let silent = "#!/bin/sh\nmount -t proc proc /proc\necho 'booted, but no getty'\nwhile true; do sleep 100; done\n";
    let Some(machine) = guest("silent", silent) else { return };
    let driver = common::driver(vec![machine]).unwrap();
    let m = driver.machine("silent").unwrap();
    // The boot itself may take longer than the login's deadline on a loaded host: the deadline
    // is for the prompt that never comes, once the guest is as far as it will get.
    m.wait_for_console_text("booted, but no getty", None).unwrap();
    let asked = Instant::now();
    let err = m.login("root", None, Some(Duration::from_secs(8))).unwrap_err().to_string();
    assert!(asked.elapsed() < Duration::from_secs(12), "{:?}", asked.elapsed());
    assert!(err.contains("login: expected a login prompt"), "{err}");
    assert!(err.contains("never showed a login prompt: it got as far as the kernel or init"), "{err}");
    assert!(err.contains("booted, but no getty"), "the console's tail is shown: {err}");
}

fn condition(name: &str, kind: Kind, within: Option<u64>) -> Condition {
    Condition { name: name.into(), kind, within: within.map(Duration::from_secs) }
}

#[test]
fn conditions_are_all_checked_with_evidence_for_each_failure() {
    let Some(machine) = guest("image", INIT) else { return };
    let machine = machine.blank_disk(64, DiskFormat::Qcow2).login("alice", Some("secret"), false);
    let driver = common::driver(vec![machine]).unwrap();
    let m = driver.machine("image").unwrap();
    let conditions = [
        condition("users", Kind::File { path: "/etc/passwd".into(), matches: Some("(?m)^alice:".into()) }, None),
        condition("blank disk", Kind::BlockDevice { path: "/dev/vda".into() }, Some(30)),
        condition("disk on the wrong bus", Kind::BlockDevice { path: "/dev/sda".into() }, None),
        condition("status tool", Kind::Command { command: "provision-status".into(), status: 0, output: None }, None),
        condition("ready on the console", Kind::Console { regex: "serial-login-guest ready".into() }, None),
        condition("written later", Kind::File { path: "/tmp/later".into(), matches: Some("later".into()) }, Some(60)),
        condition("who", Kind::Command { command: "id -un".into(), status: 0, output: Some("^alice$".into()) }, None),
    ];
    let report = m.check_conditions(&conditions).unwrap();
    let outcomes: Vec<(&str, Outcome)> = report.results.iter().map(|r| (r.name.as_str(), r.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            ("users", Outcome::Passed),
            ("blank disk", Outcome::Passed),
            ("disk on the wrong bus", Outcome::Failed),
            ("status tool", Outcome::Failed),
            ("ready on the console", Outcome::Passed),
            ("written later", Outcome::Passed),
            ("who", Outcome::Passed),
        ],
        "{}",
        report.text()
    );
    assert!(!report.passed());
    let wrong_bus = &report.results[2];
    let evidence: Vec<&str> = wrong_bus.evidence.iter().map(|e| e.command.as_str()).collect();
    assert_eq!(evidence, ["lsblk", "vgs", "lvs", "(screenshot)"]);
    assert!(image::open(&wrong_bus.evidence[3].output).is_ok(), "a PNG of the screen");
    let missing = report.results[3].reason.as_deref().unwrap();
    assert!(missing.contains("exited 127") && missing.contains("not found"), "{missing}");
    let text = report.text();
    assert!(text.contains("disk on the wrong bus") && text.contains("FAILED"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    assert_eq!(json["results"][3]["outcome"], "failed");
    let junit = driver.out_dir().join("conditions.xml");
    report.write_junit(&junit).unwrap();
    assert_eq!(common::junit_cases(&std::fs::read_to_string(junit).unwrap()).len(), 7);
}
