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
    for bad in ["../x", "a/b", "", "1st"] {
        let err = m.snapshot(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("snapshot name {bad:?} is not an identifier")), "{err}");
    }
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
