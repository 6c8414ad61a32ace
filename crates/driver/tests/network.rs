//! Virtual networks between real VMs (QEMU, TCG here) running attest's minimal guest: VLANs in
//! switch mode (a vde_switch each) and in TAP mode (bridges in a user+net namespace), reached by
//! name, blocked and unblocked, routed across, and forwarded to from the host; and what must be
//! gone afterwards.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use attest_driver::{BuiltinImage, Driver, MachineConfig, NetworkMode, TestConfig};
use attest_network::NetworkError;

fn minimal(name: &str) -> MachineConfig {
    MachineConfig::image(name, BuiltinImage::Minimal).memory_mib(256)
}

fn vlan_driver(mode: NetworkMode, vlans: &[u32], machines: Vec<MachineConfig>) -> Option<Driver> {
    if mode == NetworkMode::Switch && which::which("vde_switch").is_err() {
        eprintln!("SKIP: vde_switch not found (Debian's vde2; scripts/setup installs it)");
        return None;
    }
    common::driver_with(TestConfig::new(machines).vlans(vlans.iter().copied()).network(mode))
}

/// One megabyte of random bytes served by busybox httpd on `server`, fetched by `client` by name:
/// byte-exact. Then `block()` makes the fetch fail within its deadline and `unblock()` restores it.
fn two_machines_talk(driver: &Driver) {
    let (server, client) = (driver.machine("server").unwrap(), driver.machine("client").unwrap());
    driver.start_all().unwrap();
    driver
        .subtest("ping by name, IPv4 and IPv6", || {
            client.succeed("ping -c 1 -W 10 server", None)?;
            client.succeed("ping -c 1 -W 10 2001:db8:1::2", None)?;
            server.succeed("ping -c 1 -W 10 client", None)?;
            let hosts = client.succeed("cat /etc/hosts", None)?;
            assert!(hosts.contains("192.168.1.2 server # attest"), "{hosts}");
            let addresses = client.succeed("ip -o addr show dev eth1", None)?;
            assert!(addresses.contains("192.168.1.1/24") && addresses.contains("2001:db8:1::1/64"), "{addresses}");
            assert!(client.succeed("cat /sys/class/net/eth1/address", None)? == "52:54:00:12:01:01\n");
            Ok(())
        })
        .unwrap();
    driver
        .subtest("a file over HTTP, byte-exact", || {
            server.succeed("mkdir -p /srv && head -c 1000000 /dev/urandom > /srv/blob && httpd -p 80 -h /srv", None)?;
            server.wait_for_open_port(80, None, None)?;
            let served = server.succeed("sha256sum < /srv/blob", None)?;
            let fetched = client.succeed("wget -q -O - http://server/blob | sha256sum", None)?;
            assert_eq!(fetched, served);
            Ok(())
        })
        .unwrap();
    driver
        .subtest("block and unblock", || {
            client.block(None)?;
            let asked = Instant::now();
            client.fail("timeout 3 wget -q -O /dev/null http://server/blob", Some(Duration::from_secs(20)))?;
            assert!(asked.elapsed() < Duration::from_secs(20), "{:?}", asked.elapsed());
            // The user-mode card stays up.
            assert_eq!(client.succeed("cat /sys/class/net/eth0/carrier", None)?, "1\n");
            client.unblock(None)?;
            client.succeed("timeout 10 wget -q -O /dev/null http://server/blob", None)?;
            Ok(())
        })
        .unwrap();
}

/// A port of the host's 127.0.0.1 reaches the guest's HTTP server; it is not open elsewhere.
fn forward_port_from_the_host(driver: &Driver) {
    let server = driver.machine("server").unwrap();
    let port = free_port();
    server.forward_port(port, 80).unwrap();
    let mut body = Vec::new();
    let response = ureq::get(&format!("http://127.0.0.1:{port}/blob")).timeout(Duration::from_secs(30)).call();
    response.unwrap().into_reader().read_to_end(&mut body).unwrap();
    assert_eq!(body.len(), 1_000_000);
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let loopback = format!("0100007F:{port:04X}");
    let any = format!("00000000:{port:04X}");
    assert!(listening.contains(&loopback) && !listening.contains(&any), "bound to 127.0.0.1 only:\n{listening}");
    let bad = server.forward_port(port, 80).unwrap_err().to_string();
    assert!(bad.contains("forwarding host port") && bad.contains("failed"), "{bad}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Both machines of a VLAN restored from snapshots: their links, names, and a `block()` and a
/// port forward made before the snapshot all hold as before it, in the fresh VMMs.
#[test]
fn switch_mode_two_machines_after_a_restore() {
    let machines = vec![minimal("client"), minimal("server")];
    let Some(driver) = vlan_driver(NetworkMode::Switch, &[1], machines) else { return };
    let (server, client) = (driver.machine("server").unwrap(), driver.machine("client").unwrap());
    driver.start_all().unwrap();
    let port = free_port();
    server.forward_port(port, 80).unwrap();
    client.succeed("ping -c 1 -W 10 server", None).unwrap();
    client.block(None).unwrap();
    for m in [&server, &client] {
        m.snapshot("networked").unwrap();
    }
    client.succeed("ip link set eth1 down", None).unwrap();
    for m in [&server, &client] {
        m.restore("networked").unwrap();
    }
    client.fail("ping -c 1 -W 2 server", None).unwrap();
    client.unblock(None).unwrap();
    two_machines_talk(&driver);
    let mut body = Vec::new();
    let response = ureq::get(&format!("http://127.0.0.1:{port}/blob")).timeout(Duration::from_secs(30)).call();
    response.unwrap().into_reader().read_to_end(&mut body).unwrap();
    assert_eq!(body.len(), 1_000_000, "the port forwarded before the snapshot");
}

#[test]
fn switch_mode_two_machines() {
    let machines = vec![minimal("client"), minimal("server")];
    let Some(driver) = vlan_driver(NetworkMode::Switch, &[1], machines) else { return };
    two_machines_talk(&driver);
    forward_port_from_the_host(&driver);
    let switches = driver.with_networks(|n| n.switch_pids());
    let sockets = driver.state_dir().join("vde1.ctl");
    assert!(sockets.exists());
    drop(driver);
    for (vlan, pid) in switches {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the switch of VLAN {vlan} is gone");
    }
    assert!(!sockets.exists(), "its socket directory is gone");
}

#[test]
fn tap_mode_two_machines() {
    let machines = vec![minimal("client"), minimal("server")];
    if let Some(why) = common::missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let config = TestConfig::new(machines).vlans([1]).network(NetworkMode::Tap);
    let driver = match Driver::new(config, attest_driver::DriverOptions::default()) {
        Err(attest_driver::DriverError::Network(
            e @ (NetworkError::NoNamespaces { .. } | NetworkError::NoTunDevice { .. }),
        )) => return eprintln!("SKIP: {e}"),
        other => other.unwrap(),
    };
    let (namespace, links) = driver.with_networks(|n| {
        let tap = n.tap_network().expect("TAP mode");
        (tap.namespace_id(), tap.links().unwrap())
    });
    assert_eq!(links, ["lo", "br1", "tap1n1", "tap1n2"]);
    two_machines_talk(&driver);
    forward_port_from_the_host(&driver);
    drop(driver);
    // Nothing of ours refers to the namespace any more, so the kernel has removed it, with its
    // bridge and TAPs; none of them was ever on the host.
    let namespace = format!("net:[{namespace}]");
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        assert_ne!(std::fs::read_link(fd.path()).unwrap_or_default().to_string_lossy(), namespace);
    }
    for link in ["br1", "tap1n1", "tap1n2"] {
        assert!(!Path::new("/sys/class/net").join(link).exists(), "{link} is not on the host");
    }
}

#[test]
fn three_machines_on_two_vlans_with_a_router() {
    let machines = vec![minimal("a").vlans([1]), minimal("c").vlans([2]), minimal("router").vlans([1, 2])];
    let Some(driver) = vlan_driver(NetworkMode::Switch, &[1, 2], machines) else { return };
    let (a, c, router) =
        (driver.machine("a").unwrap(), driver.machine("c").unwrap(), driver.machine("router").unwrap());
    driver.start_all().unwrap();
    // Nodes in name order: a 1, c 2, router 3.
    a.succeed("ip route add 192.168.2.0/24 via 192.168.1.3", None).unwrap();
    c.succeed("ip route add 192.168.1.0/24 via 192.168.2.3", None).unwrap();
    a.succeed("ping -c 1 -W 10 router", None).unwrap();
    c.succeed("ping -c 1 -W 10 router", None).unwrap();
    a.fail("ping -c 1 -W 2 192.168.2.2", None).unwrap();
    router.succeed("echo 1 > /proc/sys/net/ipv4/ip_forward", None).unwrap();
    a.succeed("ping -c 1 -W 10 192.168.2.2", None).unwrap();
    // Blocking one of the router's VLANs cuts the route and leaves the other VLAN up.
    router.block(Some(2)).unwrap();
    a.fail("ping -c 1 -W 2 192.168.2.2", None).unwrap();
    a.succeed("ping -c 1 -W 10 router", None).unwrap();
    router.unblock(Some(2)).unwrap();
    // unblock() returns once the router's kernel has its link up again: the next packet gets through.
    a.succeed("ping -c 1 -W 10 192.168.2.2", None).unwrap();
    let none = a.block(Some(2)).unwrap_err().to_string();
    assert!(none.contains("it has no card on VLAN 2"), "{none}");
}

#[test]
fn a_switch_that_dies_fails_the_test_at_once() {
    let Some(driver) = vlan_driver(NetworkMode::Switch, &[1], vec![minimal("a")]) else { return };
    let a = driver.machine("a").unwrap();
    a.succeed("true", None).unwrap();
    let (_, pid) = driver.with_networks(|n| n.switch_pids())[0];
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let asked = Instant::now();
    let err = a.succeed("sleep 120", None).unwrap_err().to_string();
    killer.join().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(15), "{:?}", asked.elapsed());
    assert!(err.contains("the switch of VLAN 1 exited (killed by signal 9)"), "{err}");
}

#[test]
fn bad_networks_fail_before_anything_boots() {
    if common::missing_prerequisite().is_some() {
        return;
    }
    let started = Instant::now();
    let error = |config: TestConfig| {
        Driver::new(config, attest_driver::DriverOptions::default()).err().expect("refused").to_string()
    };
    let undeclared = error(TestConfig::new(vec![minimal("a").vlans([2])]).vlans([1]));
    assert!(undeclared.contains("machine a joins VLAN 2, which the test does not declare"), "{undeclared}");
    let range = error(TestConfig::new(vec![minimal("a")]).vlans([300]));
    assert!(range.contains("VLAN 300 is out of range"), "{range}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}
