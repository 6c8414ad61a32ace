//! Who is on which VLAN, and the addresses that follow from it, exactly as NixOS computes them:
//! node numbers 1 to 254 in sorted machine-name order, MAC `52:54:00:12:VV:NN`, `192.168.V.N/24`
//! and `2001:db8:V::N/64`. Interface names are fixed too: `eth0` is the user-mode network card,
//! `eth1`, `eth2`… are the machine's VLANs in ascending order (NixOS names them the same way).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{NetworkError, Result};

/// VLAN numbers are a byte of the MAC address and of `192.168.V.N`.
pub const MAX_VLAN: u8 = 255;
/// Node numbers are the last byte of `192.168.V.N`; 255 would be the broadcast address.
const MAX_NODE: usize = 254;
pub const PREFIX_V4: u8 = 24;
pub const PREFIX_V6: u8 = 64;

/// One machine's card on one VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanNic {
    pub vlan: u8,
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The guest's interface name (`eth1`…).
    pub interface: String,
    /// The VMM's device id (`vlan1`…), which `block()` addresses.
    pub device_id: String,
}

/// A machine's place in the test's networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePlan {
    pub node: u8,
    pub nics: Vec<VlanNic>,
}

/// The VLANs of a test and every machine's cards on them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub vlans: BTreeSet<u8>,
    pub machines: BTreeMap<String, MachinePlan>,
}

/// `vlan` checked to be a valid VLAN number.
pub fn vlan_number(vlan: u32) -> Result<u8> {
    u8::try_from(vlan).ok().filter(|v| *v >= 1).ok_or(NetworkError::VlanOutOfRange { vlan, max: MAX_VLAN })
}

impl Plan {
    /// Numbers every machine (NixOS numbers all nodes, on a VLAN or not) and gives each the cards
    /// of the VLANs it joins, which must be among `vlans`.
    pub fn new<'a>(vlans: &[u32], machines: impl IntoIterator<Item = (&'a str, &'a [u32])>) -> Result<Plan> {
        let vlans = vlans.iter().map(|v| vlan_number(*v)).collect::<Result<BTreeSet<u8>>>()?;
        let machines: BTreeMap<&str, &[u32]> = machines.into_iter().collect();
        if machines.len() > MAX_NODE && machines.values().any(|v| !v.is_empty()) {
            return Err(NetworkError::TooManyNodes { count: machines.len() });
        }
        let mut plan = Plan { vlans, machines: BTreeMap::new() };
        for (index, (name, joins)) in machines.into_iter().enumerate() {
            let node = u8::try_from(index + 1).unwrap_or(u8::MAX);
            let nics = plan.nics(name, node, joins)?;
            plan.machines.insert(name.to_string(), MachinePlan { node, nics });
        }
        Ok(plan)
    }

    /// Adds a machine defined after the test started (NixOS's `create_machine`), with the next
    /// free node number.
    pub fn add(&mut self, name: &str, joins: &[u32]) -> Result<&MachinePlan> {
        let used = self.machines.values().map(|m| m.node).max().unwrap_or(0);
        let node = used.checked_add(1).filter(|n| usize::from(*n) <= MAX_NODE);
        let node = node.ok_or(NetworkError::TooManyNodes { count: self.machines.len() + 1 })?;
        let nics = self.nics(name, node, joins)?;
        Ok(self.machines.entry(name.to_string()).or_insert(MachinePlan { node, nics }))
    }

    fn nics(&self, machine: &str, node: u8, joins: &[u32]) -> Result<Vec<VlanNic>> {
        let mut numbers = BTreeSet::new();
        for &vlan in joins {
            let number = vlan_number(vlan)?;
            if !self.vlans.contains(&number) {
                let declared: Vec<String> = self.vlans.iter().map(u8::to_string).collect();
                let declared = if declared.is_empty() { "none".into() } else { declared.join(", ") };
                return Err(NetworkError::UndeclaredVlan { machine: machine.into(), vlan, declared });
            }
            if !numbers.insert(number) {
                return Err(NetworkError::DuplicateVlan { machine: machine.into(), vlan });
            }
        }
        Ok(numbers.into_iter().enumerate().map(|(index, vlan)| VlanNic::new(vlan, node, index + 1)).collect())
    }

    pub fn machine(&self, name: &str) -> Option<&MachinePlan> {
        self.machines.get(name)
    }

    /// The `/etc/hosts` lines of `machine`: every machine on a VLAN (itself too), by the address of a VLAN
    /// the two share (so it is reachable directly), else of its first VLAN, as NixOS lists them.
    pub fn hosts_for(&self, machine: &str) -> Vec<(IpAddr, String)> {
        let own: BTreeSet<u8> =
            self.machine(machine).map(|m| m.nics.iter().map(|n| n.vlan).collect()).unwrap_or_default();
        let mut hosts = Vec::new();
        for (name, other) in &self.machines {
            let Some(nic) = other.nics.iter().find(|n| own.contains(&n.vlan)).or(other.nics.first()) else { continue };
            hosts.push((IpAddr::V4(nic.ipv4), name.clone()));
            hosts.push((IpAddr::V6(nic.ipv6), name.clone()));
        }
        hosts
    }
}

impl VlanNic {
    /// The card of node `node` on `vlan`, the machine's `ordinal`-th VLAN (from 1).
    pub fn new(vlan: u8, node: u8, ordinal: usize) -> VlanNic {
        VlanNic {
            vlan,
            mac: [0x52, 0x54, 0x00, 0x12, vlan, node],
            ipv4: Ipv4Addr::new(192, 168, vlan, node),
            ipv6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(vlan), 0, 0, 0, 0, u16::from(node)),
            interface: format!("eth{ordinal}"),
            device_id: device_id(vlan),
        }
    }
}

/// The VMM's device id of a machine's card on `vlan`.
pub fn device_id(vlan: u8) -> String {
    format!("vlan{vlan}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_nixos() {
        let plan = Plan::new(&[1, 2], [("server", &[1][..]), ("client", &[2, 1][..]), ("observer", &[][..])]).unwrap();
        // Sorted names: client 1, observer 2, server 3.
        let client = plan.machine("client").unwrap();
        assert_eq!(client.node, 1);
        let text: Vec<String> = client
            .nics
            .iter()
            .map(|n| format!("{} {:02x?} {} {} {}", n.interface, n.mac, n.ipv4, n.ipv6, n.device_id))
            .collect();
        assert_eq!(
            text,
            [
                "eth1 [52, 54, 00, 12, 01, 01] 192.168.1.1 2001:db8:1::1 vlan1",
                "eth2 [52, 54, 00, 12, 02, 01] 192.168.2.1 2001:db8:2::1 vlan2"
            ]
        );
        assert_eq!(plan.machine("observer").unwrap().node, 2);
        assert!(plan.machine("observer").unwrap().nics.is_empty());
        assert_eq!(plan.machine("server").unwrap().nics[0].ipv4, Ipv4Addr::new(192, 168, 1, 3));
    }

    #[test]
    fn hosts_prefer_a_shared_vlan() {
        let plan = Plan::new(&[1, 2], [("a", &[1][..]), ("b", &[2][..]), ("router", &[1, 2][..])]).unwrap();
        let hosts = |m| plan.hosts_for(m).into_iter().map(|(ip, n)| format!("{ip} {n}")).collect::<Vec<_>>();
        assert_eq!(
            hosts("b"),
            [
                "192.168.1.1 a",
                "2001:db8:1::1 a",
                "192.168.2.2 b",
                "2001:db8:2::2 b",
                "192.168.2.3 router",
                "2001:db8:2::3 router"
            ]
        );
        assert!(hosts("a").contains(&"192.168.1.3 router".to_string()));
    }

    #[test]
    fn bad_vlans_are_refused_with_the_fix() {
        let err = Plan::new(&[0], []).unwrap_err().to_string();
        assert!(err.contains("VLAN 0 is out of range"), "{err}");
        assert!(Plan::new(&[256], []).is_err());
        let err = Plan::new(&[1], [("a", &[3][..])]).unwrap_err().to_string();
        assert_eq!(
            err,
            "machine a joins VLAN 3, which the test does not declare (declared: 1); add it to the test's `vlans`"
        );
        assert!(Plan::new(&[1], [("a", &[1, 1][..])]).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn machines_added_later_take_the_next_node() {
        let mut plan = Plan::new(&[1], [("a", &[1][..])]).unwrap();
        assert_eq!(plan.add("late", &[1]).unwrap().nics[0].ipv4, Ipv4Addr::new(192, 168, 1, 2));
    }
}
