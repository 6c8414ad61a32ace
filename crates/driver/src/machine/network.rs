//! A machine's network links, with the NixOS driver's names: `block`/`unblock` take its VLAN
//! cards' links down and up (QMP `set_link`: the same whatever carries the VLAN, and the user-mode
//! card stays up; in attest's guests they return once the guest's kernel has seen the change), and
//! `forward_port` forwards a port of the host's 127.0.0.1 to the guest.

use std::panic::Location;

use std::time::Duration;

use attest_machine::network::user_mode;
use attest_machine::PortForward;

use super::commands::guest_poll_loop;
use super::{lock, Machine};
use crate::config::BootConfig;
use crate::error::Result;

/// How long a guest may take to see its link change.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// The device NixOS's `block()` addresses in a start script's QEMU: its first VLAN card.
const NIXOS_FIRST_VLAN_CARD: &str = "virtio-net-pci.1";

impl Machine {
    /// Takes down the links of the machine's VLAN cards: all of them, or only `vlan`'s.
    #[track_caller]
    pub fn block(&self, vlan: Option<u32>) -> Result<()> {
        self.set_links(Location::caller(), vlan, false)
    }

    /// Brings the links [`Machine::block`] took down up again.
    #[track_caller]
    pub fn unblock(&self, vlan: Option<u32>) -> Result<()> {
        self.set_links(Location::caller(), vlan, true)
    }

    fn set_links(&self, at: &'static Location<'static>, vlan: Option<u32>, up: bool) -> Result<()> {
        let what = match vlan {
            Some(vlan) => format!("VLAN {vlan}"),
            None => "all VLANs".into(),
        };
        let verb = if up { "unblocking" } else { "blocking" };
        self.shared.log.nested(Some(&self.name), &format!("{verb} {what}"), || {
            let cards = self.vlan_cards(at, vlan)?;
            let control = self.control(at)?;
            for (device, _) in &cards {
                control
                    .set_link(device, up, self.monitor_deadline())
                    .map_err(|e| self.broken(at, format!("{verb} {device}: {e}")))?;
                let mut host_side = lock(&self.host_side);
                host_side.links_down.retain(|d| d != device);
                if !up {
                    host_side.links_down.push(device.clone());
                }
            }
            self.await_links(at, &cards, up)
        })
    }

    /// The device ids and, in attest's guests, the interface names of the cards to block.
    fn vlan_cards(&self, at: &'static Location<'static>, vlan: Option<u32>) -> Result<Vec<(String, Option<String>)>> {
        if let BootConfig::StartScript { .. } = self.config.boot {
            // Its cards are the script's; NixOS blocks the first VLAN card, and so does attest.
            return match vlan {
                None => Ok(vec![(NIXOS_FIRST_VLAN_CARD.into(), None)]),
                Some(_) => Err(self.assertion(
                    at,
                    "block(vlan=…) needs the machine's VLAN cards, which its start script chose; call block() for its first VLAN".into(),
                    false,
                )),
            };
        }
        let named = self.network.guest_script.is_some();
        let chosen: Vec<(String, Option<String>)> = self
            .network
            .vlans
            .iter()
            .filter(|nic| vlan.is_none_or(|v| u32::from(nic.vlan) == v))
            .map(|nic| (nic.device_id.clone(), named.then(|| nic.interface.clone())))
            .collect();
        if chosen.is_empty() {
            let on = match vlan {
                Some(vlan) => format!("VLAN {vlan}"),
                None => "any VLAN".into(),
            };
            return Err(self.assertion(at, format!("it has no card on {on} to block or unblock"), false));
        }
        Ok(chosen)
    }

    /// In attest's guests, waits until the kernel has acted on the link change (its link watch
    /// takes up to a second), so that the next command sees the link as it was asked to be.
    fn await_links(&self, at: &'static Location<'static>, cards: &[(String, Option<String>)], up: bool) -> Result<()> {
        let interfaces: Vec<&str> = cards.iter().filter_map(|(_, name)| name.as_deref()).collect();
        if interfaces.is_empty() || !self.is_up() {
            return Ok(());
        }
        let check = interfaces
            .iter()
            .map(|name| {
                let state = format!("$(< /sys/class/net/{name}/operstate)");
                if up {
                    format!("[ {state} = up ]")
                } else {
                    format!("[ {state} != up ]")
                }
            })
            .collect::<Vec<_>>()
            .join(" && ");
        // Neighbours looked up while the link was down stay unresolved (or failed) after it comes back,
        // and would drop the next packet; the kernel forgets them when a link goes down, and so
        // does unblock() when it comes back up.
        let forget: String = if up {
            interfaces.iter().map(|name| format!("ip neigh flush dev {name}; ip -6 neigh flush dev {name}; ")).collect()
        } else {
            String::new()
        };
        let script = guest_poll_loop(&format!("if {check}; then {forget}exit 0; fi"), LINK_TIMEOUT);
        let (status, _) = self.run_loop(at, "waiting for the guest to see its links change", &script, LINK_TIMEOUT)?;
        if status != 0 {
            let state = if up { "up" } else { "down" };
            let message = format!("the guest did not see {} go {state} within {LINK_TIMEOUT:?}", interfaces.join(", "));
            return Err(self.broken(at, message));
        }
        Ok(())
    }

    /// Forwards TCP connections to the host's `127.0.0.1:host_port` to the guest's `guest_port`
    /// on its user-mode card (NixOS's `forward_port`, which defaults to 8080 and 80). Only the host
    /// itself can connect: the port is not opened on other interfaces.
    #[track_caller]
    pub fn forward_port(&self, host_port: u16, guest_port: u16) -> Result<()> {
        let at = Location::caller();
        let message = format!("forwarding host port {host_port} to guest port {guest_port}");
        self.shared.log.nested(Some(&self.name), &message, || {
            let forward = PortForward { host_port, guest_port };
            self.control(at)?
                .forward_port(self.user_netdev().as_deref(), forward, self.monitor_deadline())
                .map_err(|e| self.broken(at, format!("{message} failed: {e}")))?;
            lock(&self.host_side).forwards.push(forward);
            Ok(())
        })
    }

    /// The user-mode card's netdev, for port forwards: `None` for a start script's machine,
    /// whose VMM has only the one NixOS calls user.0.
    pub(super) fn user_netdev(&self) -> Option<String> {
        match self.config.boot {
            BootConfig::StartScript { .. } => None,
            _ => Some(user_mode::nic().netdev_id()),
        }
    }
}
