//! Network cards and the networks behind them, described independently of the VMM: QEMU's
//! user-mode network (NAT to the host, no privileges), a VLAN's switch, or a TAP device. The
//! switches and TAPs themselves are the attest-network crate's.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

pub use attest_protocol::mac_text;
use attest_protocol::{Interface, IpPrefix};

/// What a network card is plugged into.
#[derive(Debug, Clone)]
pub enum NetBackend {
    /// User-mode networking (QEMU's slirp): the guest reaches the host's loopback at
    /// [`user_mode::GATEWAY`] and the outside world through the host's sockets.
    User,
    /// A `vde_switch`, by its socket directory.
    Vde(PathBuf),
    /// An open TAP device (created in a namespace the VMM need not be in).
    Tap(Arc<OwnedFd>),
}

impl NetBackend {
    /// What kind of network it is, without the run's own socket or fd.
    pub fn kind(&self) -> &'static str {
        match self {
            NetBackend::User => "user",
            NetBackend::Vde(_) => "vde",
            NetBackend::Tap(_) => "tap",
        }
    }
}

/// One network card of a machine.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The VMM's device id, by which a card's link is taken down (`set_link`).
    pub id: String,
    pub mac: [u8; 6],
    pub backend: NetBackend,
}

impl Nic {
    /// The VMM's id of the network behind the card: distinct from the card's, so that `set_link`
    /// names the card alone.
    pub fn netdev_id(&self) -> String {
        format!("{}.net", self.id)
    }
}

/// The addresses of QEMU's user-mode network, which its built-in DHCP server would hand out. attest
/// configures them statically instead: no DHCP client in the guest and no wait for a lease.
pub mod user_mode {
    use super::*;

    /// QEMU's default MAC, outside the `52:54:00:12:VV:NN` range of VLAN cards.
    pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    pub const PREFIX_LEN: u8 = 24;
    /// The host, as the guest sees it: connections here go to the host's 127.0.0.1.
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

    /// The VMM's id of the card.
    pub const ID: &str = "user";

    pub fn nic() -> Nic {
        Nic { id: ID.into(), mac: MAC, backend: NetBackend::User }
    }

    /// How the guest agent configures the card.
    pub fn guest_interface() -> Interface {
        Interface {
            mac: MAC,
            addresses: vec![IpPrefix { addr: IpAddr::V4(GUEST), len: PREFIX_LEN }],
            gateway: Some(IpAddr::V4(GATEWAY)),
        }
    }
}
