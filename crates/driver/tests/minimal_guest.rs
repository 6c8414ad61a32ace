//! The machine API on real VMs (QEMU, TCG here) running attest's minimal backdoor guest (busybox,
//! bash, NixOS's backdoor script; no init system): one boot shared by many checks, and the failure
//! modes that must end in an error, not a hang.

mod common;

use std::time::{Duration, Instant};

use attest_driver::{BuiltinImage, DriverError, MachineConfig, TestConfig};

fn minimal(name: &str) -> MachineConfig {
    MachineConfig::image(name, BuiltinImage::Minimal).memory_mib(256)
}

#[test]
fn one_boot_many_checks() {
    let Some(driver) = common::driver(vec![minimal("machine")]) else { return };
    let m = driver.machine("machine").unwrap();
    let quick = Some(Duration::from_secs(60));

    driver
        .subtest("commands", || {
            assert_eq!(m.succeed("echo hello; echo err >&2", None)?, "hello\n");
            assert_eq!(m.execute("printf 'a\\nb'; exit 3", None)?, (3, "a\nb".to_string()));
            assert_eq!(m.fail("false", None)?, "");
            let failed = m.succeed("echo out; exit 4", None).unwrap_err();
            assert!(failed.is_assertion(), "{failed}");
            let text = failed.to_string();
            assert!(text.contains("command `echo out; exit 4` failed (exit code 4)") && text.contains("out"), "{text}");
            assert!(text.contains("minimal_guest.rs:"), "the error names the test's line: {text}");
            let unexpected = m.fail("true", None).unwrap_err().to_string();
            assert!(unexpected.contains("unexpectedly succeeded"), "{unexpected}");
            // Quotes, newlines and a here-document survive the trip byte for byte.
            let tricky = "printf '%s|' \"it's\" 'a \"b\"' $'x\\ny'";
            assert_eq!(m.succeed(tricky, None)?, "it's|a \"b\"|x\ny|");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a background process does not hold the command", || {
            let asked = Instant::now();
            assert_eq!(m.succeed("sleep 100 & echo started", None)?, "started\n");
            assert_eq!(m.succeed("(sleep 100; echo late) & echo subshell", None)?, "subshell\n");
            assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a command's timeout ends it in time", || {
            let asked = Instant::now();
            let err = m.succeed("sleep 30", Some(Duration::from_secs(2))).unwrap_err();
            assert!(err.is_assertion(), "{err}");
            assert!(asked.elapsed() < Duration::from_secs(3), "{:?}", asked.elapsed());
            assert_eq!(m.succeed("echo still usable", None)?, "still usable\n");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("waits return when the condition comes true", || {
            m.succeed("(sleep 1; touch /tmp/ready) >/dev/null 2>&1 &", None)?;
            m.wait_for_file("/tmp/ready", quick)?;
            assert_eq!(m.succeed("ls /tmp/ready", None)?, "/tmp/ready\n", "the file is there once the wait returns");
            m.succeed("mkdir -p /srv && echo served > /srv/index.html", None)?;
            m.succeed("(sleep 1; httpd -p 8080 -h /srv) >/dev/null 2>&1 &", None)?;
            m.wait_for_open_port(8080, None, quick)?;
            assert_eq!(m.succeed("wget -q -O - http://127.0.0.1:8080/", None)?, "served\n");
            m.succeed("kill $(ps -o pid,args | awk '/httpd -p 8080/ && !/awk/ {print $1}')", None)?;
            m.wait_for_closed_port(8080, None, quick)?;
            m.succeed("(sleep 1; echo on > /tmp/flag) >/dev/null 2>&1 &", None)?;
            assert_eq!(m.wait_until_succeeds("cat /tmp/flag", quick)?, "on\n");
            m.succeed("(sleep 1; rm /tmp/flag) >/dev/null 2>&1 &", None)?;
            m.wait_until_fails("test -e /tmp/flag", quick)?;
            let asked = Instant::now();
            let err = m.wait_for_file("/never", Some(Duration::from_secs(2))).unwrap_err();
            assert!(err.to_string().contains("timed out after 2s waiting for file /never to exist"), "{err}");
            assert!(asked.elapsed() < Duration::from_secs(4), "{:?}", asked.elapsed());
            Ok(())
        })
        .unwrap();

    driver
        .subtest("console text printed later", || {
            m.succeed("(sleep 1; echo 'late console line' > /dev/ttyS0) >/dev/null 2>&1 &", None)?;
            assert_eq!(m.wait_for_console_text("late console \\w+", quick)?, "late console line");
            let err = m.wait_for_console_text("never printed", Some(Duration::from_millis(300))).unwrap_err();
            assert!(err.to_string().contains("--- last lines of machine's console ---"), "{err}");
            assert!(m.get_console_log().contains("late console line"));
            Ok(())
        })
        .unwrap();

    driver
        .subtest("files round-trip byte for byte", || {
            let dir = tempfile::tempdir().unwrap();
            let source = dir.path().join("blob");
            let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            std::fs::write(&source, &bytes).unwrap();
            m.copy_from_host(&source, "/root/in/blob")?;
            let sum = m.succeed("sha256sum /root/in/blob | cut -c1-64", None);
            let sum = sum.or_else(|_| m.succeed("sha256sum /root/in/blob | awk '{print $1}'", None))?;
            assert_eq!(sum.len(), 65, "{sum}");
            let back = m.copy_from_vm("/root/in/blob", "copied")?;
            assert_eq!(back, driver.out_dir().join("copied/blob"));
            assert_eq!(std::fs::read(&back).unwrap(), bytes);
            m.succeed("mkdir -p /root/tree/sub && echo x > /root/tree/sub/f", None)?;
            let tree = m.copy_from_vm("/root/tree", "")?;
            assert_eq!(std::fs::read(tree.join("sub/f")).unwrap(), b"x\n");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("screen and keyboard", || {
            let png = m.screenshot("screen")?;
            assert_eq!(png, driver.out_dir().join("screen.png"));
            let image = image::open(&png).expect("a PNG the image crate reads");
            assert!(image.width() >= 640 && image.height() >= 400, "{}x{}", image.width(), image.height());
            // Something must hold tty1 open for the line discipline to echo what is typed.
            m.succeed("(sleep 600 < /dev/tty1) >/dev/null 2>&1 &", None)?;
            m.send_chars("Hello, World! ~|{}")?;
            let text = m.wait_until_tty_matches(1, "Hello, World! ~\\|\\{\\}", quick)?;
            assert!(text.contains("Hello, World! ~|{}"), "{text}");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("the monitor", || {
            assert!(m.send_monitor_command("info status")?.contains("running"));
            m.send_monitor_command("stop")?;
            let stop = m.wait_for_qmp_event(|e| e.name == "STOP", quick)?;
            assert_eq!(stop.name, "STOP");
            m.send_monitor_command("cont")?;
            assert_eq!(m.succeed("echo resumed", None)?, "resumed\n");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a crash during a command is an error, not a hang", || {
            let crasher = m.clone();
            let asked = Instant::now();
            let crash = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                // Neither waits for the running command.
                let asked = Instant::now();
                assert!(crasher.is_up());
                crasher.crash()?;
                assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
                Ok::<(), attest_driver::DriverError>(())
            });
            let err = m.succeed("sleep 60", None).unwrap_err();
            crash.join().unwrap()?;
            assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());
            assert!(matches!(err, DriverError::Broken(_)), "{err}");
            assert!(err.to_string().contains("the machine stopped while the command ran"), "{err}");
            assert!(!m.is_up());
            // As in NixOS, the next command boots the machine again.
            assert_eq!(m.succeed("echo back", None)?, "back\n");
            assert!(m.is_up());
            Ok(())
        })
        .unwrap();

    driver
        .subtest("shutdown", || {
            m.shutdown()?;
            assert!(!m.is_up());
            // The monitor of a machine that is down is an error; it does not boot the machine.
            let err = m.send_monitor_command("info status").unwrap_err();
            assert!(err.to_string().contains("it is not running"), "{err}");
            m.crash()?;
            assert!(!m.is_up());
            Ok(())
        })
        .unwrap();

    let junit = driver.out_dir().join("junit.xml");
    driver.write_junit(&junit, "minimal guest", None).unwrap();
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"tests="10""#) && xml.contains(r#"failures="0""#), "{xml}");
    let cases = common::junit_cases(&xml);
    assert_eq!(cases.len(), 10, "{cases:?}");
    assert!(cases.contains(&"screen and keyboard".to_string()), "{cases:?}");
}

#[test]
fn machines_boot_in_parallel_and_reboot() {
    let machines = vec![minimal("first"), minimal("second").allow_reboot(true)];
    let Some(driver) = common::driver(machines) else { return };
    let started = Instant::now();
    driver.start_all().unwrap();
    let (first, second) = (driver.machine("first").unwrap(), driver.machine("second").unwrap());
    let other = second.clone();
    let booting = std::thread::spawn(move || other.succeed("echo up", None).map(|_| Instant::now()));
    first.succeed("echo up", None).unwrap();
    let first_up = Instant::now();
    let second_up = booting.join().unwrap().unwrap();
    let both = first_up.max(second_up) - started;
    let one = first_up.min(second_up) - started;
    // Sequential boots would take twice as long as one.
    assert!(both < one * 2, "one boot {one:?}, both {both:?}");

    let boot_id = |m: &attest_driver::Machine| m.succeed("cat /proc/sys/kernel/random/boot_id", None).unwrap();
    let before = boot_id(&second);
    second.reboot().unwrap();
    assert_ne!(boot_id(&second), before, "a new boot, on the same channel");
    assert!(second.is_up());
    // Without allow_reboot, a reboot ends the VMM (-no-reboot); the next command boots afresh.
    first.reboot().unwrap();
    first.wait_for_shutdown().unwrap();
    assert_eq!(first.succeed("echo fresh", None).unwrap(), "fresh\n");
    first.shutdown().unwrap();
    assert!(second.is_up());

    // Teardown stops the machine that is still running and leaves nothing behind.
    let state = driver.state_dir().to_path_buf();
    let out = driver.out_dir().to_path_buf();
    assert!(state.exists());
    drop(driver);
    assert!(!state.exists(), "the state directory {} is removed", state.display());
    assert!(!out.exists(), "the temporary output directory {} is removed", out.display());
    // (Other tests in this process may have VMs of their own: only this driver's count.)
    let mine: Vec<String> = children().into_iter().filter(|c| c.contains(state.to_str().unwrap())).collect();
    assert_eq!(mine, Vec::<String>::new(), "no VMM or helper of this driver is left");
}

/// The commands of this test process's children that are still alive.
fn children() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    let pids: Vec<String> = tasks
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    pids.iter().filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()).collect()
}

#[test]
fn the_global_timeout_stops_everything_within_seconds() {
    let mut config = TestConfig::new(vec![minimal("slow")]);
    config.global_timeout = Duration::from_secs(20);
    let Some(driver) = common::driver_with(config) else { return };
    let m = driver.machine("slow").unwrap();
    m.succeed("true", None).unwrap();
    let err = m.succeed("sleep 600", None).unwrap_err();
    assert!(matches!(err, DriverError::GlobalTimeout(_)), "{err}");
    assert!(!m.is_up());
    // Nothing starts again after the global timeout.
    let err = m.succeed("true", None).unwrap_err();
    assert!(matches!(err, DriverError::GlobalTimeout(_)), "{err}");
    assert!(!m.is_up());
}

#[test]
fn a_retry_ends_when_its_machine_stops_and_does_not_boot_it_again() {
    let Some(driver) = common::driver(vec![minimal("stopping")]) else { return };
    let m = driver.machine("stopping").unwrap();
    m.succeed("(sleep 1; echo o > /proc/sysrq-trigger) >/dev/null 2>&1 &", None).unwrap();
    let asked = Instant::now();
    let err = m.wait_until_succeeds("false", Some(Duration::from_secs(120))).unwrap_err();
    // Between two attempts ("the machine stopped while it waited") or during one (its channel closed).
    assert!(matches!(err, DriverError::Broken(_)), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(30), "ended with the machine: {:?}", asked.elapsed());
    // The latest start is still the one that powered off: the wait did not boot the machine again.
    assert!(m.get_console_log().contains("reboot: Power down"), "{}", m.get_console_log());
    m.wait_for_shutdown().unwrap();
    assert!(!m.is_up());
}

#[test]
fn a_guest_that_never_announces_its_shell_fails_within_the_boot_timeout() {
    let Some(why) = common::missing_prerequisite() else {
        let kernel = attest_image::kernel::locate(None, &attest_image::cache_dir()).unwrap();
        // Boots, prints, and then idles forever without a backdoor.
        let busybox = attest_image::find_busybox().unwrap();
        let initramfs = attest_image::Initramfs::new()
            .dir("bin")
            .dir("dev")
            .char_device("dev/console", 5, 1)
            .file("bin/busybox", std::fs::read(busybox).unwrap(), 0o755)
            .symlink("bin/sh", "busybox")
            .file("init", b"#!/bin/sh\necho 'no backdoor here'\nexec /bin/busybox sleep 600\n".to_vec(), 0o755)
            .write_cached(&attest_image::cache_dir().join("initramfs"))
            .unwrap();
        let machine = MachineConfig::kernel("silent", &kernel.path, Some(initramfs), "console=ttyS0 rdinit=/init")
            .memory_mib(256)
            .boot_timeout(Duration::from_secs(15));
        let driver = common::driver(vec![machine]).unwrap();
        let asked = Instant::now();
        let err = driver.machine("silent").unwrap().succeed("true", None).unwrap_err().to_string();
        assert!(asked.elapsed() < Duration::from_secs(25), "{:?}", asked.elapsed());
        assert!(err.contains("expected the guest to print \"Spawning backdoor root shell...\""), "{err}");
        assert!(err.contains("no backdoor here"), "the console tail is shown: {err}");
        return;
    };
    eprintln!("SKIP: {why}");
}

#[test]
fn a_start_script_that_exits_at_once_fails_at_once() {
    if let Some(why) = common::missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("run-broken-vm");
    std::fs::write(&script, "#!/bin/sh\necho 'qemu: cannot find the disk image' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let driver = common::driver(vec![MachineConfig::start_script(&script).unwrap()]).unwrap();
    let asked = Instant::now();
    let err = driver.machine("broken").unwrap().succeed("true", None).unwrap_err().to_string();
    assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());
    assert!(err.starts_with("QEMU refused to start: qemu: cannot find the disk image"), "its own words lead: {err}");
    assert!(err.contains("(exit status 1) before the guest connected"), "{err}");
}

/// A stand-in for NixOS's `run-<name>-vm` (qemu-vm.nix), run by dash: it checks the driver's
/// environment contract, leaves a note of it, and ends by exec'ing QEMU with the driver's arguments.
const START_SCRIPT: &str = r#"#!/bin/sh
set -e
[ "$USE_TMPDIR" = 1 ] && [ -d "$TMPDIR" ] || { echo "start script: TMPDIR/USE_TMPDIR not set" >&2; exit 1; }
echo "$SHARED_DIR" > "$TMPDIR/shared-dir-was"
exec qemu-system-x86_64 -machine q35,accel=tcg -cpu max -name nixos -m 256 -nodefaults -display none \
  -net nic,netdev=user.0,model=virtio -netdev user,id=user.0 \
  -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 -netdev vde,id=vlan1,sock="$QEMU_VDE_SOCKET_1" \
  -kernel @KERNEL@ -initrd @INITRD@ -append "console=ttyS0 panic=-1 quiet rdinit=/init $QEMU_KERNEL_PARAMS" \
  $QEMU_OPTS "$@"
"#;

#[test]
fn a_nixos_start_script_runs_under_its_environment_contract() {
    if let Some(why) = common::missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).unwrap();
    let modules = kernel
        .module_tree()
        .unwrap()
        .resolve(&["virtio_pci", "virtio_console", "virtio_rng", "virtio_net"])
        .unwrap()
        .load;
    let (busybox, bash) = (attest_image::find_busybox().unwrap(), attest_image::backdoor::find_static_bash().unwrap());
    let initrd = attest_image::backdoor::backdoor_initramfs(&busybox, &bash, &modules)
        .unwrap()
        .write_cached(&cache.join("initramfs"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("run-nixos-vm");
    let text =
        START_SCRIPT.replace("@KERNEL@", kernel.path.to_str().unwrap()).replace("@INITRD@", initrd.to_str().unwrap());
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let mut machine = MachineConfig::start_script(&script).unwrap();
    machine.boot = attest_driver::BootConfig::StartScript {
        path: script.clone(),
        qemu_opts: Some("-smp 2".into()),
        kernel_params: Some("attest.test=kernel-params".into()),
    };
    if which::which("vde_switch").is_err() {
        return eprintln!("SKIP: vde_switch not found (Debian's vde2)");
    }
    let driver = common::driver_with(TestConfig::new(vec![machine]).vlans([1])).unwrap();
    let m = driver.machine("nixos").unwrap();
    assert!(m.succeed("cat /proc/cmdline", None).unwrap().contains("attest.test=kernel-params"), "QEMU_KERNEL_PARAMS");
    // QEMU_VDE_SOCKET_1 led the script's VLAN card to the switch; block() takes down the card
    // NixOS's block() names, its first VLAN card.
    let card = "for a in /sys/class/net/*/address; do grep -q 52:54:00:12:01:01 $a && c=${a%/address}; done";
    m.succeed(&format!("{card}; ip link set ${{c##*/}} up"), None).unwrap();
    m.wait_until_succeeds(&format!("{card}; grep 1 $c/carrier"), None).unwrap();
    m.block(None).unwrap();
    m.wait_until_succeeds(&format!("{card}; grep 0 $c/carrier"), None).unwrap();
    assert!(m.block(Some(1)).unwrap_err().to_string().contains("its start script chose"));
    assert_eq!(m.succeed("grep -c ^processor /proc/cpuinfo", None).unwrap(), "2\n", "QEMU_OPTS");
    // The script's QEMU is this process's own child: the script exec'd it, dash or not.
    assert!(children().iter().any(|c| c.starts_with("qemu-system-x86_64")), "{:?}", children());
    let note = driver.state_dir().join("00-nixos/shared-dir-was");
    let shared = std::fs::read_to_string(note).expect("the script ran in the machine's directory as TMPDIR");
    assert_eq!(shared.trim_end(), driver.state_dir().join("shared-xchg").to_str().unwrap(), "SHARED_DIR");

    // The script's QEMU, with attest's additions, can be saved and restored: the rollback holds,
    // and its card is still blocked in the fresh QEMU.
    m.succeed("echo before > /tmp/kept", None).unwrap();
    m.snapshot("scripted").unwrap();
    m.succeed("echo after > /tmp/gone", None).unwrap();
    m.restore("scripted").unwrap();
    assert_eq!(
        m.succeed("cat /tmp/kept; test ! -e /tmp/gone && echo rolled back", None).unwrap(),
        "before\nrolled back\n"
    );
    m.succeed(&format!("{card}; grep 0 $c/carrier"), None).unwrap();
    m.unblock(None).unwrap();
    m.wait_until_succeeds(&format!("{card}; grep 1 $c/carrier"), None).unwrap();
}

#[test]
fn a_missing_kernel_or_image_is_named_before_anything_boots() {
    if let Some(why) = common::missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let missing = |machine: MachineConfig| {
        let started = Instant::now();
        let err = attest_driver::Driver::new(TestConfig::new(vec![machine]), Default::default()).err().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        err.to_string()
    };
    let err = missing(MachineConfig::kernel("k", "/nonexistent/bzImage", None, ""));
    assert!(err.contains("machine k: kernel /nonexistent/bzImage cannot be read"), "{err}");
    let err = missing(MachineConfig::disk("d", "/nonexistent/disk.qcow2"));
    assert!(err.contains("machine d: disk /nonexistent/disk.qcow2 cannot be read"), "{err}");
    let err = missing(MachineConfig::iso("i", "/nonexistent/x.iso"));
    assert!(err.contains("machine i: iso /nonexistent/x.iso cannot be read"), "{err}");
    let err =
        missing(MachineConfig::image("f", BuiltinImage::Minimal).backend(attest_driver::BackendKind::Firecracker));
    assert!(err.contains("backend is not available yet"), "{err}");
    let twice = TestConfig::new(vec![minimal("same"), minimal("same")]);
    let err = attest_driver::Driver::new(twice, Default::default()).err().unwrap().to_string();
    assert!(err.contains("two machines are named \"same\""), "{err}");
}
