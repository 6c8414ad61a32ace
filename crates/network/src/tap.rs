//! TAP mode: a user+net namespace holding a bridge per VLAN and a TAP device per machine card,
//! for VMMs that need TAP devices (Firecracker, Cloud Hypervisor; QEMU with `network = "tap"`).
//!
//! Nothing runs in the namespace and nothing on the host changes: [`namespace`] hands us an
//! rtnetlink socket and unattached `/dev/net/tun` files made inside it, and we configure it from
//! outside, with the CAP_NET_ADMIN its owner holds there. Those descriptors keep the namespace
//! alive; when this value and every VMM holding a TAP are gone, the kernel removes the namespace
//! with its bridges and TAPs (which are not persistent).

mod namespace;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};

use attest_netlink::Rtnetlink;

use crate::error::{NetworkError, Result};

pub struct TapNetwork {
    rtnetlink: Mutex<Rtnetlink>,
    /// The namespace itself (an nsfs file): held, so that its inode keeps naming it while we live.
    _namespace: File,
    namespace_id: u64,
    /// By (vlan, node). Shared, so that a VMM's process can keep its TAP open.
    taps: BTreeMap<(u8, u8), Arc<OwnedFd>>,
}

impl TapNetwork {
    /// Creates the namespace, bridge `br{V}` for each VLAN, and for each `(vlan, node)` port a TAP
    /// `tap{V}n{N}` on its VLAN's bridge, everything up.
    pub fn create(vlans: &BTreeSet<u8>, ports: &[(u8, u8)]) -> Result<TapNetwork> {
        let ports: BTreeSet<(u8, u8)> = ports.iter().copied().collect();
        if let Some((vlan, node)) = ports.iter().find(|(vlan, _)| !vlans.contains(vlan)) {
            let declared = vlans.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
            return Err(NetworkError::UndeclaredVlan {
                machine: format!("node {node}"),
                vlan: u32::from(*vlan),
                declared,
            });
        }
        let fds = namespace::create(ports.len())?;
        let namespace = namespace_of(&fds.netlink).map_err(NetworkError::io("finding the TAP network's namespace"))?;
        let namespace_id = namespace.metadata().map_err(NetworkError::io("reading the TAP network's namespace"))?.ino();
        let mut rtnetlink =
            Rtnetlink::from_fd(fds.netlink).map_err(NetworkError::io("opening rtnetlink in the TAP namespace"))?;

        let mut bridges = BTreeMap::new();
        for &vlan in vlans {
            let name = bridge_name(vlan);
            let index = rtnetlink.add_bridge(&name).map_err(NetworkError::io(format!("creating bridge {name}")))?;
            rtnetlink.set_up(index).map_err(NetworkError::io(format!("bringing up bridge {name}")))?;
            bridges.insert(vlan, index);
        }
        let mut taps = BTreeMap::new();
        for (&(vlan, node), tun) in ports.iter().zip(fds.tuns) {
            let name = tap_name(vlan, node);
            attach_tap(&tun, &name).map_err(NetworkError::io(format!("creating TAP {name}")))?;
            taps.insert((vlan, node), Arc::new(tun));
        }
        // One dump finds every TAP's index, rather than one per TAP.
        let indexes: BTreeMap<String, u32> = rtnetlink
            .link_details()
            .map_err(NetworkError::io("listing the TAP namespace's links"))?
            .into_iter()
            .map(|link| (link.name, link.index))
            .collect();
        for &(vlan, node) in taps.keys() {
            let name = tap_name(vlan, node);
            let missing = || io::Error::new(io::ErrorKind::NotFound, "the TAP is not in the namespace");
            let index =
                indexes.get(&name).copied().ok_or_else(missing).map_err(NetworkError::io(format!("finding {name}")))?;
            rtnetlink
                .set_master(index, bridges[&vlan])
                .map_err(NetworkError::io(format!("adding {name} to {}", bridge_name(vlan))))?;
            rtnetlink.set_up(index).map_err(NetworkError::io(format!("bringing up {name}")))?;
        }
        tracing::debug!(vlans = vlans.len(), taps = taps.len(), "created the TAP network");
        Ok(TapNetwork { rtnetlink: Mutex::new(rtnetlink), _namespace: namespace, namespace_id, taps })
    }

    /// The TAP of node `node` on `vlan`, for the VMM to use (`-netdev tap,fd=N`). It is close-on-exec:
    /// the VMM's launcher passes it on explicitly. The VMM probes and enables the virtio-net header
    /// (the TAP has IFF_VNET_HDR).
    pub fn tap(&self, vlan: u8, node: u8) -> Option<Arc<OwnedFd>> {
        self.taps.get(&(vlan, node)).cloned()
    }

    /// The inode of the network namespace, as in `net:[N]` links under `/proc/*/ns` and `/proc/*/fd`.
    pub fn namespace_id(&self) -> u64 {
        self.namespace_id
    }

    /// The names of the links in the namespace: `lo`, the bridges and the TAPs.
    pub fn links(&self) -> Result<Vec<String>> {
        let mut rtnetlink = self.rtnetlink.lock().unwrap_or_else(PoisonError::into_inner);
        let links = rtnetlink.link_details().map_err(NetworkError::io("listing the TAP namespace's links"))?;
        Ok(links.into_iter().map(|link| link.name).collect())
    }
}

fn bridge_name(vlan: u8) -> String {
    format!("br{vlan}")
}

fn tap_name(vlan: u8, node: u8) -> String {
    format!("tap{vlan}n{node}")
}

/// The network namespace of `socket`, as an nsfs file.
fn namespace_of(socket: &OwnedFd) -> io::Result<File> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor, or -1.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl's new descriptor is ours alone, wrapped once.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Turns an unattached `/dev/net/tun` file into TAP `name`, created in the file's namespace.
fn attach_tap(tun: &OwnedFd, name: &str) -> io::Result<()> {
    // SAFETY: ifreq is plain old data, for which all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // Names are at most "tap255n255": the ifreq keeps its terminating NUL.
    assert!(name.len() < request.ifr_name.len(), "interface name {name} is too long");
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    // No packet-information prefix; the virtio-net header, which QEMU probes for and uses.
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes back one ifreq, which lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
