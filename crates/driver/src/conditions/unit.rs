//! What a systemd unit's state says about its future, for unit conditions: the properties probed
//! (`systemctl show`), parsed, and the rule that decides whether the unit can still reach the
//! state a condition wants without someone acting. Pure, so the rule is tested on made-up states.
//!
//! The rule: a unit that is `failed` stays `failed` unless something starts it again or resets it.
//! systemd does so by itself only through a job already queued (a start pulled in by another unit),
//! a pending `Restart=` (which shows as `activating`/`auto-restart`, never as `failed`), a unit that
//! triggers it (a timer, path or socket: `TriggeredBy=`), or, for `inactive`, garbage collection of
//! a failed unit (`CollectMode=inactive-or-failed`). With none of these, a condition wanting any
//! other state is decided as failed at once. Every other state (`activating`, `deactivating`,
//! `inactive`, `active`, `reloading`) can still change by itself, so it is never decided early.

use std::collections::BTreeMap;

use attest_shell::quote;

/// The properties [`probe`] asks for: the state, and everything that could change a failed unit.
const PROPERTIES: &str = "ActiveState,SubState,Result,Job,TriggeredBy,CollectMode";

/// The command whose output [`UnitState::parse`] reads.
pub(crate) fn probe(unit: &str) -> String {
    format!("systemctl --no-pager show -p {PROPERTIES} -- {}", quote(unit))
}

/// A unit's state, as [`probe`] printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UnitState {
    /// `ActiveState`: what `systemctl is-active` prints (`inactive` for a unit that does not exist).
    pub active: String,
    pub sub: String,
    pub result: String,
    /// A job (start, stop, restart) is queued for it.
    pub job_queued: bool,
    /// Some timer, path or socket unit can start it.
    pub triggered: bool,
    /// A failed unit may be unloaded, and then shows as `inactive`.
    pub collected_when_failed: bool,
}

impl UnitState {
    /// Reads `systemctl show` output (`Key=value` lines; systemctl leaves out `Job` when none is
    /// queued, and lists nothing in `TriggeredBy` when nothing triggers it).
    pub fn parse(output: &str) -> UnitState {
        let properties: BTreeMap<&str, &str> = output.lines().filter_map(|line| line.split_once('=')).collect();
        let value = |key: &str| properties.get(key).map_or("", |v| v.trim()).to_string();
        let job = value("Job");
        UnitState {
            active: value("ActiveState"),
            sub: value("SubState"),
            result: value("Result"),
            job_queued: !job.is_empty() && job != "0",
            triggered: !value("TriggeredBy").is_empty(),
            collected_when_failed: value("CollectMode") == "inactive-or-failed",
        }
    }

    /// Why a unit in this state cannot reach ActiveState `wanted` without someone acting, if it
    /// cannot (see the module's rule); `None` when it holds or may still come to hold.
    pub fn cannot_become(&self, wanted: &str) -> Option<String> {
        if self.active != "failed" || wanted == "failed" {
            return None;
        }
        let coming = if self.job_queued {
            Some("a job is queued for it")
        } else if self.sub == "auto-restart" {
            Some("a restart is pending")
        } else if self.triggered {
            Some("a timer, path or socket unit can start it")
        } else if wanted == "inactive" && self.collected_when_failed {
            Some("CollectMode=inactive-or-failed may unload it")
        } else {
            None
        };
        if coming.is_some() {
            return None;
        }
        let result = if self.result.is_empty() { String::new() } else { format!(", Result={}", self.result) };
        Some(format!(
            "it is failed (SubState={}{result}) with no job queued, no restart pending and nothing to trigger it, \
             so it cannot become {wanted} without someone acting",
            self.sub
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(active: &str, sub: &str) -> UnitState {
        UnitState { active: active.into(), sub: sub.into(), result: "exit-code".into(), ..Default::default() }
    }

    #[test]
    fn systemctl_show_output_is_read() {
        let failed = UnitState::parse(
            "Result=exit-code\nActiveState=failed\nSubState=failed\nTriggeredBy=\nCollectMode=inactive\n",
        );
        assert_eq!(failed, state("failed", "failed"));
        let queued = UnitState::parse("ActiveState=failed\nJob=42\nTriggeredBy=provision.timer\n");
        assert!(queued.job_queued && queued.triggered);
        assert!(!UnitState::parse("Job=\nActiveState=inactive\n").job_queued);
        assert!(UnitState::parse("CollectMode=inactive-or-failed\n").collected_when_failed);
    }

    #[test]
    fn a_failed_unit_with_nothing_coming_is_decided_at_once() {
        let failed = state("failed", "failed");
        let why = failed.cannot_become("inactive").unwrap();
        assert!(why.contains("it is failed (SubState=failed, Result=exit-code)"), "{why}");
        assert!(why.ends_with("cannot become inactive without someone acting"), "{why}");
        assert!(failed.cannot_become("active").is_some());
        assert_eq!(failed.cannot_become("failed"), None, "it holds");
    }

    #[test]
    fn a_failed_unit_that_something_will_start_may_still_recover() {
        let failed = state("failed", "failed");
        for coming in [
            UnitState { job_queued: true, ..failed.clone() },
            UnitState { sub: "auto-restart".into(), ..failed.clone() },
            UnitState { triggered: true, ..failed.clone() },
        ] {
            assert_eq!(coming.cannot_become("active"), None, "{coming:?}");
            assert_eq!(coming.cannot_become("inactive"), None, "{coming:?}");
        }
        let collected = UnitState { collected_when_failed: true, ..failed };
        assert_eq!(collected.cannot_become("inactive"), None, "unloaded, it shows as inactive");
        assert!(collected.cannot_become("active").is_some());
    }

    #[test]
    fn every_other_state_can_still_change() {
        for (active, sub) in [
            ("activating", "start"),
            ("activating", "auto-restart"),
            ("deactivating", "stop-sigterm"),
            ("inactive", "dead"),
            ("active", "exited"),
            ("reloading", "reload"),
            ("", ""),
        ] {
            for wanted in ["active", "inactive", "failed"] {
                assert_eq!(state(active, sub).cannot_become(wanted), None, "{active}/{sub} -> {wanted}");
            }
        }
    }
}
