//! Guest networking, set up before the program starts: the hostname, loopback (always), and the
//! interfaces the host configured, found by MAC address, with their addresses and default route.
//! Without any (`--net none`), default routes into a dummy interface: a program behaves as on a
//! host whose network goes nowhere (a datagram to anywhere is sent, and lost; a TCP connection
//! waits for an answer that never comes), not as on one without a route (ENETUNREACH at once),
//! which is rarer on hosts than a dead uplink and which programs treat differently.
//! Spoken over rtnetlink with attest-netlink's client, as `ip` does, without a helper process.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context, Result};
use attest_netlink::Rtnetlink;
use attest_protocol::{mac_text, Interface, Network};

/// The kernel gives loopback the first interface index. Bringing it up also gives it 127.0.0.1/8
/// and ::1, as on any Linux host.
const LOOPBACK_INDEX: u32 = 1;
/// Where `--net none` routes everything.
const DUMMY: &str = "dummy0";

pub fn configure(hostname: &[u8], network: &Network) -> Result<()> {
    if !hostname.is_empty() {
        nix::unistd::sethostname(OsStr::from_bytes(hostname)).context("setting the hostname")?;
    }
    let mut rtnl = Rtnetlink::open().context("opening an rtnetlink socket")?;
    rtnl.set_up(LOOPBACK_INDEX).context("bringing up loopback")?;
    if network.interfaces.is_empty() {
        return nowhere(&mut rtnl);
    }
    let links = rtnl.links().context("listing network interfaces")?;
    for interface in &network.interfaces {
        let Some((index, name)) = links.iter().find(|(_, mac, _)| *mac == interface.mac).map(|(i, _, n)| (*i, n))
        else {
            bail!("no network interface has MAC {} (is the NIC's driver loaded?)", mac_text(&interface.mac));
        };
        configure_interface(&mut rtnl, index, interface).with_context(|| format!("configuring {name}"))?;
    }
    Ok(())
}

/// The dummy module makes `dummy0` as it loads; where the kernel has none, there is no route.
fn nowhere(rtnl: &mut Rtnetlink) -> Result<()> {
    let Some(index) = rtnl.index_of(DUMMY).context("listing network interfaces")? else { return Ok(()) };
    rtnl.set_up(index).with_context(|| format!("bringing up {DUMMY}"))?;
    for ipv6 in [false, true] {
        rtnl.add_default_device_route(index, ipv6).with_context(|| format!("adding a default route into {DUMMY}"))?;
    }
    Ok(())
}

fn configure_interface(rtnl: &mut Rtnetlink, index: u32, interface: &Interface) -> Result<()> {
    rtnl.set_up(index).context("bringing it up")?;
    for prefix in &interface.addresses {
        rtnl.add_address(index, prefix.addr, prefix.len).with_context(|| format!("adding {prefix}"))?;
    }
    if let Some(gateway) = interface.gateway {
        rtnl.add_default_route(index, gateway).with_context(|| format!("adding a default route via {gateway}"))?;
    }
    Ok(())
}
