//! The machine API on a real systemd guest (`attest image debian`, booted under TCG here): one boot
//! shared by the unit, wait, console, keyboard and lifecycle checks, since a boot costs seconds.

mod common;

use std::time::{Duration, Instant};

use attest_driver::{BuiltinImage, MachineConfig};

/// A unit file written into the guest.
fn unit(name: &str, service: &str) -> String {
    format!("printf '[Service]\\n{service}\\n' > /etc/systemd/system/{name}")
}

#[test]
fn a_systemd_guest_one_boot_many_checks() {
    if let Some(why) = common::missing_debian_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let machine = MachineConfig::image("server", BuiltinImage::Debian).allow_reboot(true);
    let driver = common::driver(vec![machine]).expect("prerequisites checked above");
    let m = driver.machine("server").unwrap();
    let quick = Some(Duration::from_secs(60));

    driver
        .subtest("boots to multi-user.target", || {
            m.wait_for_unit("multi-user.target", None, None)?;
            assert_eq!(m.succeed("hostname", None)?, "server\n");
            assert!(m.succeed("getent hosts localhost", None)?.contains("localhost"), "localhost resolves");
            assert_eq!(m.get_unit_property("multi-user.target", "ActiveState", None)?, "active");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("a service started with start_job opens its port", || {
            m.succeed("mkdir -p /srv && echo 'from the guest' > /srv/index.html", None)?;
            m.succeed(&unit("web.service", "ExecStart=/usr/bin/python3 -m http.server 8000 --directory /srv"), None)?;
            m.systemctl("daemon-reload", None)?;
            assert_eq!(m.start_job("web.service", None)?.0, 0);
            m.wait_for_unit("web.service", None, quick)?;
            m.wait_for_open_port(8000, None, quick)?;
            assert_eq!(m.succeed("curl -sf http://localhost:8000/", None)?, "from the guest\n");
            m.require_unit_state("web.service", "active")?;
            assert_eq!(m.get_unit_info("web.service", None)?["Id"], "web.service");
            assert_eq!(m.stop_job("web.service", None)?.0, 0);
            m.wait_for_closed_port(8000, None, quick)?;
            let err = m.require_unit_state("web.service", "active").unwrap_err();
            assert!(err.to_string().contains("but it is in state \"inactive\""), "{err}");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("wait_for_unit fails at once on a failed or idle unit", || {
            // Activating for a second, then failed.
            m.succeed(&unit("broken.service", "Type=oneshot\\nExecStart=/bin/sh -c \"sleep 1; exit 3\""), None)?;
            m.succeed(&unit("idle.service", "ExecStart=/bin/true"), None)?;
            m.systemctl("daemon-reload", None)?;
            m.systemctl("start --no-block broken.service", None)?;
            let asked = Instant::now();
            let err = m.wait_for_unit("broken.service", None, None).unwrap_err();
            assert!(asked.elapsed() < Duration::from_secs(15), "{:?}", asked.elapsed());
            assert!(err.to_string().contains("unit \"broken.service\" reached state \"failed\""), "{err}");
            assert!(err.to_string().contains("status=3"), "systemctl status is shown: {err}");
            let asked = Instant::now();
            let err = m.wait_for_unit("idle.service", None, None).unwrap_err();
            assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());
            assert!(err.to_string().contains("is inactive and there are no pending jobs"), "{err}");
            Ok(())
        })
        .unwrap();

    driver
        .subtest("journald lines reach the console as they are logged", || {
            m.succeed("(sleep 1; logger attest-late-line) >/dev/null 2>&1 &", None)?;
            m.wait_for_console_text("attest-late-line", quick)?;
            Ok(())
        })
        .unwrap();

    driver
        .subtest("typing on tty1", || {
            m.wait_until_tty_matches(1, "server login: ", quick)?;
            m.send_chars("root\n")?;
            m.wait_until_tty_matches(1, "root@server", quick)?;
            m.send_chars("echo typed-$((6 * 7))\n")?;
            let text = m.wait_until_tty_matches(1, "typed-42", quick)?;
            assert!(text.contains("echo typed-$((6 * 7))"), "{text}");
            let png = m.screenshot("tty1")?;
            let image = image::open(png).unwrap();
            assert!(image.width() >= 640, "{}", image.width());
            Ok(())
        })
        .unwrap();

    driver
        .subtest("reboot and shutdown", || {
            let boot_id = || m.succeed("cat /proc/sys/kernel/random/boot_id", None);
            let before = boot_id()?;
            m.reboot()?;
            m.wait_for_unit("multi-user.target", None, None)?;
            assert_ne!(boot_id()?, before);
            m.shutdown()?;
            assert!(!m.is_up());
            Ok(())
        })
        .unwrap();
}
