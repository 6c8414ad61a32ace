//! A small synchronous rtnetlink client: the few link, address and route requests attest makes,
//! spoken as `ip` does, without a helper process. The guest init configures its cards with it; the
//! host's TAP networks build their bridges and TAPs with it, on a socket from another namespace.

use std::io;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// One network interface, as a link dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// None for links without a hardware address (a TUN device, for one).
    pub mac: Option<[u8; 6]>,
    /// The index of the bridge (or bond) this link is enslaved to.
    pub master: Option<u32>,
    /// Administratively up (IFF_UP).
    pub up: bool,
}

/// An rtnetlink socket, talking to the kernel of the network namespace the socket was created in.
pub struct Rtnetlink {
    socket: Socket,
    sequence: u32,
}

impl Rtnetlink {
    /// A socket on the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        Self::from_socket(Socket::new(NETLINK_ROUTE)?)
    }

    /// Talks over an existing `NETLINK_ROUTE` socket, which stays bound to the namespace it was
    /// created in, whichever namespace the caller is in.
    pub fn from_socket(mut socket: Socket) -> io::Result<Self> {
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnetlink { socket, sequence: 0 })
    }

    /// As [`Rtnetlink::from_socket`], for a socket received as a file descriptor. It must be an
    /// `AF_NETLINK` socket of protocol `NETLINK_ROUTE`; any other socket fails on the first request.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: into_raw_fd hands over sole ownership of an open descriptor, which Socket takes
        // (and closes on drop); nothing else refers to it any more.
        let socket = unsafe { Socket::from_raw_fd(fd.into_raw_fd()) };
        Self::from_socket(socket)
    }

    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0).map(drop)
    }

    /// Enslaves link `index` to the bridge `master_index`.
    pub fn set_master(&mut self, index: u32, master_index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Controller(master_index));
        self.request(RouteNetlinkMessage::SetLink(link), 0).map(drop)
    }

    /// Creates bridge `name` (down) and returns its index; fails if a link of that name exists.
    pub fn add_bridge(&mut self, name: &str) -> io::Result<u32> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        link.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.request(RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL)?;
        self.index_of(name)?.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("bridge {name} vanished")))
    }

    /// The index of link `name`, if there is one.
    pub fn index_of(&mut self, name: &str) -> io::Result<Option<u32>> {
        Ok(self.link_details()?.into_iter().find(|link| link.name == name).map(|link| link.index))
    }

    /// (index, MAC, name) of every interface with a MAC address.
    pub fn links(&mut self) -> io::Result<Vec<(u32, [u8; 6], String)>> {
        Ok(self.link_details()?.into_iter().filter_map(|link| Some((link.index, link.mac?, link.name))).collect())
    }

    /// Every interface.
    pub fn link_details(&mut self) -> io::Result<Vec<Link>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|message| {
                let mut link = Link {
                    index: message.header.index,
                    name: String::new(),
                    mac: None,
                    master: None,
                    up: message.header.flags.contains(LinkFlags::Up),
                };
                for attribute in message.attributes {
                    match attribute {
                        LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                        LinkAttribute::IfName(text) => link.name = text,
                        LinkAttribute::Controller(index) => link.master = Some(index),
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = family(addr);
        message.header.prefix_len = prefix_len;
        message.header.index = index;
        message.attributes.push(AddressAttribute::Local(addr));
        message.attributes.push(AddressAttribute::Address(addr));
        self.request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// A default route straight out of link `index`, without a gateway (`ip route add default dev
    /// X`), for IPv6 or IPv4.
    pub fn add_default_device_route(&mut self, index: u32, ipv6: bool) -> io::Result<()> {
        let mut route = RouteMessage::default();
        route.header.address_family = if ipv6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.protocol = RouteProtocol::Static;
        route.header.scope = RouteScope::Link;
        route.header.kind = RouteType::Unicast;
        route.attributes.push(RouteAttribute::Oif(index));
        self.request(RouteNetlinkMessage::NewRoute(route), NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    pub fn add_default_route(&mut self, index: u32, gateway: IpAddr) -> io::Result<()> {
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
    /// The kernel answers rtnetlink requests while handling them, so this does not wait on anyone.
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

    /// The kernel gives loopback the first interface index.
    const LOOPBACK_INDEX: u32 = 1;

    /// Read-only on the host: the same dump the guest uses to find its cards.
    #[test]
    fn the_link_dump_finds_loopback_at_index_one() {
        let mut rtnl = Rtnetlink::open().unwrap();
        let links = rtnl.links().unwrap();
        assert!(
            links.iter().any(|(index, mac, name)| *index == LOOPBACK_INDEX && *mac == [0; 6] && name == "lo"),
            "{links:?}"
        );
        assert_eq!(rtnl.index_of("lo").unwrap(), Some(LOOPBACK_INDEX));
        assert_eq!(rtnl.index_of("no-such-link").unwrap(), None);
        assert_eq!(family("::1".parse().unwrap()), AddressFamily::Inet6);
    }
}
