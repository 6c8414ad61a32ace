//! Snapshots inside a test (attest's `snapshot`/`restore`) on a real systemd guest under TCG: one
//! boot, then rollbacks that must leave no trace of what ran after the snapshot, a shell that
//! works at once, the host's time and a fresh random state; and the clear errors of bad use.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attest_driver::{BuiltinImage, MachineConfig};

#[test]
fn a_machine_rolls_back_to_its_snapshot() {
    if let Some(why) = common::missing_debian_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let driver = common::driver(vec![MachineConfig::image("server", BuiltinImage::Debian)]).unwrap();
    let m = driver.machine("server").unwrap();

    let err = m.snapshot("early").unwrap_err().to_string();
    assert!(err.contains("cannot save snapshot \"early\": the machine is not running"), "{err}");
    m.wait_for_unit("multi-user.target", None, None).unwrap();
    for (bad, why) in [("../x", "starts with '.'"), ("a/b", "has '/' in it"), ("1st", "starts with '1'")] {
        let err = m.snapshot(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("snapshot name {bad:?} {why}: a name is an ASCII letter")), "{err}");
    }
    let err = m.restore("").unwrap_err().to_string();
    assert!(err.contains("the snapshot name is empty"), "{err}");
    let err = m.restore("never").unwrap_err().to_string();
    assert!(err.contains("there is no snapshot \"never\" to restore"), "{err}");

    driver
        .subtest("what ran after the snapshot is gone", || {
            m.succeed("echo A > /root/a && sync", None)?;
            m.snapshot("s")?;
            m.succeed("echo B > /root/b && sync", None)?;
            m.succeed("systemd-run --unit=after-snapshot sleep 600", None)?;
            m.wait_for_unit("after-snapshot.service", None, None)?;
            let asked = Instant::now();
            m.restore("s")?;
            assert_eq!(m.succeed("cat /root/a", None)?, "A\n");
            let took = asked.elapsed();
            assert!(took < Duration::from_secs(10), "restore and a command took {took:?}");
            assert_eq!(m.execute("test -e /root/b", None)?.0, 1, "B was written after the snapshot");
            let state = m.execute("systemctl is-active after-snapshot.service", None)?.1;
            assert_eq!(state.trim(), "inactive", "the service started after the snapshot is not running");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a restored guest has the host's time and its own randomness", || {
            // The snapshot is a few seconds old by now: its clock would be behind.
            let guest: u64 = m.succeed("date +%s", None)?.trim().parse().unwrap();
            let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
            let first = m.succeed("head -c 16 /dev/urandom | od -An -tx1", None)?;
            m.restore("s")?;
            let second = m.succeed("head -c 16 /dev/urandom | od -An -tx1", None)?;
            assert_ne!(first, second, "two restores of one snapshot draw different random bytes");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a snapshot of a restored machine, and the console log carries on", || {
            m.succeed("echo C > /root/c", None)?;
            m.snapshot("t")?;
            m.succeed("rm /root/c /root/a", None)?;
            m.restore("t")?;
            assert_eq!(m.succeed("cat /root/a /root/c", None)?, "A\nC\n");
            m.restore("s")?;
            assert_eq!(m.execute("test -e /root/c", None)?.0, 1);
            let log = m.get_console_log();
            assert_eq!(log.matches("[attest] restored snapshot").count(), 4, "{log}");
            assert!(log.contains("Linux version"), "the first boot is still in the log");
            Ok(())
        })
        .unwrap();
}

/// The cache of ready machines across runs: the first run boots and saves at the ready point, the
/// next restores it, with nothing of the first run's after-ready writes, the host's time and its
/// own randomness; a truncated entry is reported, booted past and replaced.
#[test]
fn a_ready_machine_is_cached_by_the_first_run_and_restored_by_the_next() {
    if let Some(why) = common::missing_debian_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("ATTEST_SNAPSHOT_CACHE", cache.path());
    let ready = attest_driver::Ready::Unit { unit: "multi-user.target".into() };
    let run = |check: &dyn Fn(&attest_driver::Machine) -> (String, String)| -> (Duration, String, String, String) {
        let config = MachineConfig::image("server", BuiltinImage::Debian).ready(ready.clone());
        let driver = common::driver(vec![config]).unwrap();
        let m = driver.machine("server").unwrap();
        let started = Instant::now();
        let random = m.succeed("head -c 16 /dev/urandom | od -An -tx1", None).unwrap();
        let took = started.elapsed();
        let (log, extra) = check(&m);
        (took, random, log, extra)
    };

    let (cold, random1, log1, _) = run(&|m| {
        m.succeed("echo first > /root/after-ready", None).unwrap();
        (m.get_console_log(), String::new())
    });
    assert!(log1.contains("Linux version") && log1.contains("[attest] restored the ready machine"), "{log1}");
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert_eq!(entries.len(), 1, "one entry: {entries:?}");
    let entry = entries[0].path();

    let (warm, random2, log2, clock) = run(&|m| {
        assert_eq!(m.execute("test -e /root/after-ready", None).unwrap().0, 1, "the first run's write is not here");
        assert_eq!(m.succeed("systemctl is-active multi-user.target", None).unwrap(), "active\n");
        let guest = m.succeed("date +%s", None).unwrap();
        let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        (m.get_console_log(), format!("{} {host}", guest.trim()))
    });
    assert!(!log2.contains("Linux version"), "the second run did not boot: {log2}");
    let (guest, host) = clock.split_once(' ').unwrap();
    let (guest, host): (u64, u64) = (guest.parse().unwrap(), host.parse().unwrap());
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
    assert_ne!(random1, random2, "two restores draw different random bytes");
    assert!(warm * 4 < cold, "a restore ({warm:?}) is much faster than the cold boot ({cold:?})");

    // A truncated state file: reported, a cold boot, and a whole entry again.
    let state = entry.join("state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len / 2).unwrap();
    let (_, _, log3, _) = run(&|m| (m.get_console_log(), String::new()));
    assert!(log3.contains("Linux version"), "booted cold: {log3}");
    assert_eq!(std::fs::metadata(&state).unwrap().len(), len, "the entry was made anew");
}

/// A snapshot that cannot fit where the run keeps its state is refused with the numbers, leaves
/// no file behind, and the machine runs on. (Its state directory is on a 64 MiB tmpfs here.)
#[test]
fn a_snapshot_without_room_is_refused_and_leaves_nothing() {
    if let Some(why) = common::missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let small = tempfile::tempdir().unwrap();
    let mounted =
        nix::mount::mount(Some("tmpfs"), small.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=64m"));
    if let Err(e) = mounted {
        return eprintln!("SKIP: cannot mount a small tmpfs here ({e})");
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH).ok();
        }
    }
    let _unmount = Unmount(small.path());
    std::env::set_var("XDG_RUNTIME_DIR", small.path());
    let machine = MachineConfig::image("small", BuiltinImage::Minimal).memory_mib(256);
    let driver = common::driver(vec![machine]).unwrap();
    let m = driver.machine("small").unwrap();
    m.succeed("true", None).unwrap();
    let err = m.snapshot("big").unwrap_err().to_string();
    assert!(err.contains("MiB free, and the snapshot may take up to 256 MiB"), "{err}");
    assert!(!driver.state_dir().join("00-small/snapshots/big/state").exists());
    assert_eq!(m.succeed("echo still running", None).unwrap(), "still running\n");
    let err = m.restore("big").unwrap_err().to_string();
    assert!(err.contains("there is no snapshot \"big\""), "{err}");
}
