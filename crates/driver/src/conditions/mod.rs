//! Conditions: what a boot image must have set up, declared in the test instead of checked by hand.
//! Each has a name, a kind (a unit's state, a file's contents, a command's result, a block device,
//! an LVM volume group or logical volume, an interface's IPv4 address, console text) and how long
//! after the machine's start it may take to hold. `Machine::check_conditions` checks them all,
//! never stopping at the first failure, and gathers evidence for each that fails; [`report`] shows
//! the verdicts as text, JSON and JUnit. A condition that can no longer come to hold (a failed unit
//! nothing will start again, see [`unit`]) is failed at once instead of at the end of its `within`.
//!
//! ```toml
//! [[machines.installer.conditions]]
//! name = "provisioning ran"
//! unit = "provision.service"
//! state = "inactive"
//! within = 300            # seconds after the machine started; default: checked once
//! ```

pub mod report;
mod unit;

use std::time::Duration;

use serde::Deserialize;

pub use report::{ConditionResult, Outcome, Report};

/// One declared condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub name: String,
    pub kind: Kind,
    /// How long after the machine's start it may take to hold; `None`: it must hold when checked.
    pub within: Option<Duration>,
}

/// What a condition expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The unit's `ActiveState` (what `systemctl is-active UNIT` prints) is `state`.
    Unit {
        unit: String,
        state: String,
    },
    /// The file exists and (if given) its contents match the regex (as commands' output: without
    /// the final newline).
    File {
        path: String,
        matches: Option<String>,
    },
    /// The command exits with `status` and (if given) its output matches the regex.
    Command {
        command: String,
        status: i32,
        output: Option<String>,
    },
    BlockDevice {
        path: String,
    },
    VolumeGroup {
        name: String,
    },
    /// `vg/lv`.
    LogicalVolume {
        name: String,
    },
    /// The interface has an IPv4 address.
    Ipv4 {
        interface: String,
    },
    /// The console printed a line matching the regex (at any time since the machine started).
    Console {
        regex: String,
    },
}

impl Kind {
    /// The condition in a few words, for reports.
    pub fn describe(&self) -> String {
        match self {
            Kind::Unit { unit, state } => format!("{unit} is {state}"),
            Kind::File { path, matches: Some(regex) } => format!("{path} matches /{regex}/"),
            Kind::File { path, matches: None } => format!("{path} exists"),
            Kind::Command { command, status, output: Some(regex) } => {
                format!("`{command}` exits {status} with output matching /{regex}/")
            }
            Kind::Command { command, status, output: None } => format!("`{command}` exits {status}"),
            Kind::BlockDevice { path } => format!("block device {path} exists"),
            Kind::VolumeGroup { name } => format!("LVM volume group {name} exists"),
            Kind::LogicalVolume { name } => format!("LVM logical volume {name} exists"),
            Kind::Ipv4 { interface } => format!("{interface} has an IPv4 address"),
            Kind::Console { regex } => format!("the console printed /{regex}/"),
        }
    }

    /// The guest command whose result decides the condition (none for console text).
    pub(crate) fn probe(&self) -> Option<String> {
        let quoted = |s: &str| attest_shell::quote(s);
        Some(match self {
            Kind::Unit { unit, .. } => unit::probe(unit),
            Kind::File { path, .. } => format!("cat {}", quoted(path)),
            Kind::Command { command, .. } => command.clone(),
            Kind::BlockDevice { path } => format!("test -b {}", quoted(path)),
            Kind::VolumeGroup { name } => format!("vgs --noheadings -o vg_name {}", quoted(name)),
            Kind::LogicalVolume { name } => format!("lvs --noheadings -o lv_name {}", quoted(name)),
            Kind::Ipv4 { interface } => format!("ip -4 -o addr show dev {}", quoted(interface)),
            Kind::Console { .. } => return None,
        })
    }

    /// Whether the probe's exit status and output satisfy the condition.
    pub(crate) fn holds(&self, status: i32, output: &str) -> bool {
        // Without its final newline, so that `^alice$` matches the output of `id -un`.
        let text = output.strip_suffix('\n').unwrap_or(output);
        let matches = |regex: &Option<String>| {
            regex.as_ref().is_none_or(|r| regex::Regex::new(r).is_ok_and(|r| r.is_match(text)))
        };
        match self {
            Kind::Unit { state, .. } => unit::UnitState::parse(output).active == *state,
            Kind::File { matches: regex, .. } => status == 0 && matches(regex),
            Kind::Command { status: expected, output: regex, .. } => status == *expected && matches(regex),
            Kind::Ipv4 { .. } => status == 0 && output.contains("inet "),
            Kind::BlockDevice { .. } | Kind::VolumeGroup { .. } | Kind::LogicalVolume { .. } => status == 0,
            Kind::Console { .. } => false,
        }
    }

    /// Why the probe's result shows the condition can no longer hold without someone acting, if
    /// it does: the condition is then failed at once. Only a unit's state tells (files, commands,
    /// devices and addresses can always still appear).
    pub(crate) fn cannot_hold(&self, output: &str) -> Option<String> {
        match self {
            Kind::Unit { state, .. } => unit::UnitState::parse(output).cannot_become(state),
            _ => None,
        }
    }

    /// Commands whose output explains a failure, as one would gather it by hand.
    pub(crate) fn evidence(&self) -> Vec<String> {
        let quoted = |s: &str| attest_shell::quote(s);
        match self {
            Kind::Unit { unit, .. } => vec![
                format!("systemctl status --no-pager -l {}", quoted(unit)),
                format!("journalctl --no-pager -n 50 -u {}", quoted(unit)),
            ],
            Kind::File { path, .. } => vec![format!("ls -l {}", quoted(path))],
            Kind::Command { .. } | Kind::Console { .. } => Vec::new(),
            Kind::BlockDevice { .. } | Kind::VolumeGroup { .. } | Kind::LogicalVolume { .. } => {
                vec!["lsblk".into(), "vgs".into(), "lvs".into()]
            }
            Kind::Ipv4 { .. } => vec!["ip addr".into()],
        }
    }
}

/// A condition as the TOML file writes it: `name`, `within`, and the keys of one kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCondition {
    name: String,
    within: Option<u64>,
    unit: Option<String>,
    state: Option<String>,
    file: Option<String>,
    matches: Option<String>,
    command: Option<String>,
    status: Option<i32>,
    output: Option<String>,
    block_device: Option<String>,
    volume_group: Option<String>,
    logical_volume: Option<String>,
    ipv4: Option<String>,
    console: Option<String>,
}

impl RawCondition {
    pub(crate) fn into_condition(self) -> Result<Condition, String> {
        let name = self.name;
        let regex_ok = |r: &Option<String>| match r {
            Some(r) => regex::Regex::new(r).map(drop).map_err(|e| format!("condition {name:?}: bad regex {r:?}: {e}")),
            None => Ok(()),
        };
        regex_ok(&self.matches)?;
        regex_ok(&self.output)?;
        regex_ok(&self.console)?;
        let belongs = [
            ("state", self.state.is_some(), "unit"),
            ("matches", self.matches.is_some(), "file"),
            ("status", self.status.is_some(), "command"),
            ("output", self.output.is_some(), "command"),
        ];
        let kinds = [
            self.unit.as_ref().map(|_| "unit"),
            self.file.as_ref().map(|_| "file"),
            self.command.as_ref().map(|_| "command"),
            self.block_device.as_ref().map(|_| "block_device"),
            self.volume_group.as_ref().map(|_| "volume_group"),
            self.logical_volume.as_ref().map(|_| "logical_volume"),
            self.ipv4.as_ref().map(|_| "ipv4"),
            self.console.as_ref().map(|_| "console"),
        ];
        let given: Vec<&str> = kinds.into_iter().flatten().collect();
        if let Some((key, _, owner)) = belongs.iter().find(|(_, set, owner)| *set && given.first() != Some(owner)) {
            return Err(format!("condition {name:?}: `{key}` goes with `{owner}`"));
        }
        let kind = match given.as_slice() {
            [] => return Err(format!("condition {name:?} checks nothing: give one of unit, file, command, block_device, volume_group, logical_volume, ipv4, console")),
            [_, second, ..] => return Err(format!("condition {name:?}: `{}` and `{second}` are two kinds; keep one", given[0])),
            ["unit"] => Kind::Unit {
                unit: self.unit.expect("given"),
                state: self.state.ok_or_else(|| format!("condition {name:?}: a unit condition needs `state` (e.g. \"active\")"))?,
            },
            ["file"] => Kind::File { path: self.file.expect("given"), matches: self.matches },
            ["command"] => Kind::Command { command: self.command.expect("given"), status: self.status.unwrap_or(0), output: self.output },
            ["block_device"] => Kind::BlockDevice { path: self.block_device.expect("given") },
            ["volume_group"] => Kind::VolumeGroup { name: self.volume_group.expect("given") },
            ["logical_volume"] => {
                let lv = self.logical_volume.expect("given");
                if !lv.contains('/') {
                    return Err(format!("condition {name:?}: a logical volume is named VG/LV, not {lv:?}"));
                }
                Kind::LogicalVolume { name: lv }
            }
            ["ipv4"] => Kind::Ipv4 { interface: self.ipv4.expect("given") },
            _ => Kind::Console { regex: self.console.expect("given") },
        };
        Ok(Condition { name, kind, within: self.within.map(Duration::from_secs) })
    }
}
