//! A test's running networks: its [`Plan`] and, per mode, the switches or the TAP namespace behind
//! it; what each machine's cards plug into; and how attest's own guests are told their addresses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attest_machine::{NetBackend, Nic};
use serde::Deserialize;

use crate::error::{NetworkError, Result};
use crate::plan::Plan;
use crate::switch::VdeSwitch;
use crate::tap::TapNetwork;

/// How VLANs are carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A `vde_switch` per VLAN, as the NixOS driver runs.
    #[default]
    Switch,
    /// A bridge per VLAN and a TAP per card, in a user+net namespace.
    Tap,
}

pub struct Networks {
    plan: Plan,
    mode: Mode,
    switches: Vec<VdeSwitch>,
    tap: Option<TapNetwork>,
}

impl Networks {
    /// Starts what `plan` needs: nothing without VLANs. `on_failure` hears of a switch that dies
    /// while the test runs.
    pub fn start(
        plan: Plan,
        mode: Mode,
        dir: &Path,
        on_failure: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<Networks> {
        let mut networks = Networks { plan, mode, switches: Vec::new(), tap: None };
        if networks.plan.vlans.is_empty() {
            return Ok(networks);
        }
        match mode {
            Mode::Switch => {
                let binary = VdeSwitch::find()?;
                let on_failure = Arc::new(on_failure);
                for &vlan in &networks.plan.vlans {
                    let on_failure = on_failure.clone();
                    networks.switches.push(VdeSwitch::start(&binary, vlan, dir, move |why| on_failure(why))?);
                }
            }
            Mode::Tap => {
                let ports: Vec<(u8, u8)> =
                    networks.plan.machines.values().flat_map(|m| m.nics.iter().map(|n| (n.vlan, m.node))).collect();
                networks.tap = Some(TapNetwork::create(&networks.plan.vlans, &ports)?);
            }
        }
        Ok(networks)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Plans a machine defined while the test runs. Its VLANs must exist already; in TAP mode,
    /// whose devices are made before the test starts, it can join none.
    pub fn add_machine(&mut self, name: &str, vlans: &[u32]) -> Result<()> {
        if self.mode == Mode::Tap && !vlans.is_empty() {
            return Err(NetworkError::LateTapMachine { machine: name.into() });
        }
        self.plan.add(name, vlans).map(|_| ())
    }

    /// The VLAN cards of `machine`, each plugged into its VLAN.
    pub fn nics(&self, machine: &str) -> Vec<Nic> {
        let Some(plan) = self.plan.machine(machine) else { return Vec::new() };
        let backend = |vlan: u8| match (&self.tap, self.switch(vlan)) {
            (Some(tap), _) => tap.tap(vlan, plan.node).map(NetBackend::Tap),
            (None, Some(switch)) => Some(NetBackend::Vde(switch.socket().to_path_buf())),
            (None, None) => None,
        };
        let nic = |n: &crate::VlanNic| backend(n.vlan).map(|b| Nic { id: n.device_id.clone(), mac: n.mac, backend: b });
        plan.nics.iter().filter_map(nic).collect()
    }

    /// `QEMU_VDE_SOCKET_<vlan>` for NixOS start scripts, which choose their own VLANs.
    pub fn vde_sockets(&self) -> Vec<(u8, PathBuf)> {
        self.switches.iter().map(|s| (s.vlan(), s.socket().to_path_buf())).collect()
    }

    fn switch(&self, vlan: u8) -> Option<&VdeSwitch> {
        self.switches.iter().find(|s| s.vlan() == vlan)
    }

    /// The switches' process ids, by VLAN (for tests and diagnostics).
    pub fn switch_pids(&self) -> Vec<(u8, u32)> {
        self.switches.iter().map(|s| (s.vlan(), s.pid())).collect()
    }

    pub fn tap_network(&self) -> Option<&TapNetwork> {
        self.tap.as_ref()
    }
}
