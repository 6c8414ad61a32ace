//! A machine's network links, with the NixOS driver's names: `block`/`unblock` take its VLAN
//! cards' links down and up (QMP `set_link`: the same whatever carries the VLAN, and the user-mode
//! card stays up), and `forward_port` forwards a port of the host's 127.0.0.1 to the guest.

use std::panic::Location;

use attest_machine::network::user_mode;
use attest_machine::NetBackend;
use serde_json::json;

use super::Machine;
use crate::config::BootConfig;
use crate::error::Result;

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
            let devices = self.vlan_devices(at, vlan)?;
            let qmp = self.qmp(at)?;
            for device in devices {
                qmp.execute("set_link", Some(json!({ "name": device, "up": up })), self.monitor_deadline())
                    .map_err(|e| self.broken(at, format!("{verb} {device}: {e}")))?;
            }
            Ok(())
        })
    }

    /// The device ids of the cards to block.
    fn vlan_devices(&self, at: &'static Location<'static>, vlan: Option<u32>) -> Result<Vec<String>> {
        if let BootConfig::StartScript { .. } = self.config.boot {
            // Its cards are the script's; NixOS blocks the first VLAN card, and so does attest.
            return match vlan {
                None => Ok(vec![NIXOS_FIRST_VLAN_CARD.into()]),
                Some(_) => Err(self.assertion(
                    at,
                    "block(vlan=…) needs the machine's VLAN cards, which its start script chose; call block() for its first VLAN".into(),
                    false,
                )),
            };
        }
        let vm = super::lock(&self.vm);
        let cards: Vec<(String, [u8; 6])> = vm
            .spec()
            .nics
            .iter()
            .filter(|nic| !matches!(nic.backend, NetBackend::User))
            .map(|nic| (nic.id.clone(), nic.mac))
            .collect();
        drop(vm);
        // The MAC's fifth byte is the VLAN (52:54:00:12:VV:NN).
        let chosen: Vec<String> = cards
            .iter()
            .filter(|(_, mac)| vlan.is_none_or(|v| u32::from(mac[4]) == v))
            .map(|(id, _)| id.clone())
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

    /// Forwards TCP connections to the host's `127.0.0.1:host_port` to the guest's `guest_port`
    /// on its user-mode card (NixOS's `forward_port`, which defaults to 8080 and 80). Only the host
    /// itself can connect: the port is not opened on other interfaces.
    #[track_caller]
    pub fn forward_port(&self, host_port: u16, guest_port: u16) -> Result<()> {
        let at = Location::caller();
        let message = format!("forwarding host port {host_port} to guest port {guest_port}");
        self.shared.log.nested(Some(&self.name), &message, || {
            let netdev = match self.config.boot {
                // NixOS's scripts call it user.0; HMP picks it when none is named.
                BootConfig::StartScript { .. } => String::new(),
                _ => format!("{} ", user_mode::nic().netdev_id()),
            };
            let output = self.monitor(at, &format!("hostfwd_add {netdev}tcp:127.0.0.1:{host_port}-:{guest_port}"))?;
            match output.trim() {
                "" => Ok(()),
                error => Err(self.broken(at, format!("{message} failed: {error}"))),
            }
        })
    }
}
