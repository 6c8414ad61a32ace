//! Guest networking, set up before the program starts: the hostname, loopback (always), and the
//! interfaces the host configured, found by MAC address, with their addresses and default route.
//! Spoken over rtnetlink, as `ip` does, without a helper process.

use std::ffi::OsStr;
use std::io;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context, Result};
use attest_protocol::{mac_text, Interface, IpPrefix, Network};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The kernel gives loopback the first interface index. Bringing it up also gives it 127.0.0.1/8
/// and ::1, as on any Linux host.
const LOOPBACK_INDEX: u32 = 1;

pub fn configure(hostname: &[u8], network: &Network) -> Result<()> {
    if !hostname.is_empty() {
        nix::unistd::sethostname(OsStr::from_bytes(hostname)).context("setting the hostname")?;
    }
    let mut rtnl = Rtnetlink::open().context("opening an rtnetlink socket")?;
    rtnl.set_up(LOOPBACK_INDEX).context("bringing up loopback")?;
    if network.interfaces.is_empty() {
        return Ok(());
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

fn configure_interface(rtnl: &mut Rtnetlink, index: u32, interface: &Interface) -> Result<()> {
    rtnl.set_up(index).context("bringing it up")?;
    for prefix in &interface.addresses {
        rtnl.add_address(index, prefix).with_context(|| format!("adding {prefix}"))?;
    }
    if let Some(gateway) = interface.gateway {
        rtnl.add_default_route(index, gateway).with_context(|| format!("adding a default route via {gateway}"))?;
    }
    Ok(())
}

struct Rtnetlink {
    socket: Socket,
    sequence: u32,
}

impl Rtnetlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnetlink { socket, sequence: 0 })
    }

    fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0).map(drop)
    }

    /// (index, MAC, name) of every interface.
    fn links(&mut self) -> io::Result<Vec<(u32, [u8; 6], String)>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .filter_map(|link| {
                let mut mac = None;
                let mut name = String::new();
                for attribute in &link.attributes {
                    match attribute {
                        LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                        LinkAttribute::IfName(text) => name = text.clone(),
                        _ => {}
                    }
                }
                Some((link.header.index, mac?, name))
            })
            .collect())
    }

    fn add_address(&mut self, index: u32, prefix: &IpPrefix) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = family(prefix.addr);
        message.header.prefix_len = prefix.len;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(prefix.addr));
        message.attributes.push(AddressAttribute::Address(prefix.addr));
        self.request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    fn add_default_route(&mut self, index: u32, gateway: IpAddr) -> io::Result<()> {
        let mut route = RouteMessage::default();
        route.header.address_family = family(gateway);
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.protocol = RouteProtocol::Static;
        route.header.kind = RouteType::Unicast;
        route.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        route.attributes.push(RouteAttribute::Oif(index));
        self.request(RouteNetlinkMessage::NewRoute(route), NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Sends one request and collects the replies: a dump ends with its done message, anything
    /// else with the kernel's acknowledgement, which carries the error if the request failed.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence += 1;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (reply.header.length as usize).clamp(1, rest.len());
                rest = &rest[length..];
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) if error.code.is_none() => return Ok(replies),
                    NetlinkPayload::Error(error) => return Err(error.to_io()),
                    _ => {}
                }
            }
        }
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read-only on the host: the same dump the guest uses to find its cards.
    #[test]
    fn the_link_dump_finds_loopback_at_index_one() {
        let mut rtnl = Rtnetlink::open().unwrap();
        let links = rtnl.links().unwrap();
        assert!(
            links.iter().any(|(index, mac, name)| *index == LOOPBACK_INDEX && *mac == [0; 6] && name == "lo"),
            "{links:?}"
        );
        assert_eq!(family("::1".parse().unwrap()), AddressFamily::Inet6);
    }
}
