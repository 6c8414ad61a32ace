//! TAP networks for real (these need user and network namespaces and /dev/net/tun): what is in the
//! namespace, that the host sees none of it, and that nothing is left once the network is dropped.
//! Each test uses node numbers of its own, as the tests run in parallel in one process.

use std::fs;
use std::path::Path;

use super::*;

/// A TAP network, or `None` after printing why this host cannot make one (no user namespaces, no
/// usable `/dev/net/tun`): then the test has nothing to check.
fn create(vlans: &[u8], ports: &[(u8, u8)]) -> Option<TapNetwork> {
    match TapNetwork::create(&vlans.iter().copied().collect(), ports) {
        Err(e @ (NetworkError::NoNamespaces { .. } | NetworkError::NoTunDevice { .. })) => {
            eprintln!("SKIP: {e}");
            None
        }
        other => Some(other.unwrap()),
    }
}

/// The links of `network`, as the kernel reports them.
fn link_details(network: &TapNetwork) -> Vec<attest_netlink::Link> {
    network.rtnetlink.lock().unwrap().link_details().unwrap()
}

fn on_host(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Targets of this process's descriptors (`net:[N]`, `socket:[N]`, `/dev/net/tun`...).
fn fd_targets() -> Vec<String> {
    let entries = fs::read_dir("/proc/self/fd").unwrap();
    entries
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

/// The TAP names this process's `/dev/net/tun` descriptors are attached to (their fdinfo's `iff:`).
fn attached_taps() -> Vec<String> {
    let entries = fs::read_dir("/proc/self/fdinfo").unwrap();
    let infos = entries.filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok());
    infos
        .flat_map(|info| {
            info.lines().filter_map(|line| Some(line.strip_prefix("iff:")?.trim().to_owned())).collect::<Vec<_>>()
        })
        .collect()
}

/// The name and flags a TAP descriptor reports (TUNGETIFF).
fn tap_identity(tap: &OwnedFd) -> (String, libc::c_int) {
    // SAFETY: ifreq is plain old data, for which all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which lives across the call.
    let result = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETIFF, &mut request) };
    assert_eq!(result, 0, "TUNGETIFF: {}", io::Error::last_os_error());
    let name: Vec<u8> = request.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    // SAFETY: TUNGETIFF filled in the flags member.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    (String::from_utf8(name).unwrap(), libc::c_int::from(flags))
}

#[test]
fn bridges_and_taps_live_in_a_namespace_of_their_own_until_dropped() {
    let Some(network) = create(&[1, 2], &[(1, 1), (1, 2), (2, 3)]) else { return };

    let mut names = network.links().unwrap();
    names.sort();
    assert_eq!(names, ["br1", "br2", "lo", "tap1n1", "tap1n2", "tap2n3"]);
    let links = link_details(&network);
    let link = |name: &str| links.iter().find(|link| link.name == name).unwrap().clone();
    for (tap, bridge) in [("tap1n1", "br1"), ("tap1n2", "br1"), ("tap2n3", "br2")] {
        assert_eq!(link(tap).master, Some(link(bridge).index), "{tap} should be on {bridge}: {links:?}");
        assert!(link(tap).up && link(bridge).up, "{tap} and {bridge} should be up: {links:?}");
        assert!(!on_host(tap) && !on_host(bridge), "{tap} or {bridge} appeared on the host");
    }
    assert_eq!(link("br1").master, None);

    for (vlan, node, name) in [(1, 1, "tap1n1"), (1, 2, "tap1n2"), (2, 3, "tap2n3")] {
        let (attached, flags) = tap_identity(&network.tap(vlan, node).unwrap());
        assert_eq!(attached, name);
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        assert_eq!(flags & wanted, wanted, "flags of {name}: {flags:#x}");
    }
    assert!(network.tap(2, 1).is_none() && network.tap(3, 3).is_none());

    let namespace = format!("net:[{}]", network.namespace_id());
    let host_namespace = fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
    assert_ne!(namespace, host_namespace);
    assert!(fd_targets().contains(&namespace));
    let attached = attached_taps();
    assert!(["tap1n1", "tap1n2", "tap2n3"].iter().all(|tap| attached.iter().any(|a| a == tap)), "{attached:?}");

    drop(network);
    assert!(!fd_targets().contains(&namespace), "a descriptor still holds {namespace}");
    let attached = attached_taps();
    assert!(!["tap1n1", "tap1n2", "tap2n3"].iter().any(|tap| attached.iter().any(|a| a == tap)), "{attached:?}");
    // No process (such as a helper left behind) is in the namespace either.
    let processes =
        fs::read_dir("/proc").unwrap().filter_map(|entry| fs::read_link(entry.ok()?.path().join("ns/net")).ok());
    assert!(!processes.map(|target| target.display().to_string()).any(|target| target == namespace));
    assert!(["br1", "br2", "tap1n1", "tap1n2", "tap2n3"].iter().all(|name| !on_host(name)));
}

#[test]
fn two_networks_are_independent() {
    let (Some(first), Some(second)) = (create(&[1], &[(1, 11)]), create(&[1], &[(1, 12)])) else { return };
    assert_ne!(first.namespace_id(), second.namespace_id());
    let mut first_links = first.links().unwrap();
    first_links.sort();
    assert_eq!(first_links, ["br1", "lo", "tap1n11"]);

    drop(first);
    let mut second_links = second.links().unwrap();
    second_links.sort();
    assert_eq!(second_links, ["br1", "lo", "tap1n12"]);
    assert_eq!(tap_identity(&second.tap(1, 12).unwrap()).0, "tap1n12");
}

#[test]
fn a_port_on_an_undeclared_vlan_is_refused_before_anything_is_created() {
    let error = TapNetwork::create(&BTreeSet::from([1]), &[(1, 21), (2, 22)]).err().unwrap();
    assert!(matches!(error, NetworkError::UndeclaredVlan { vlan: 2, .. }), "{error}");
}

#[test]
fn a_network_without_vlans_is_an_empty_namespace() {
    let Some(network) = create(&[], &[]) else { return };
    assert_eq!(network.links().unwrap(), ["lo"]);
}
