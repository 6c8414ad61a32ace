//! systemd units, as the NixOS driver handles them: `systemctl`, `start_job`/`stop_job`,
//! `get_unit_info`, `get_unit_property`, `require_unit_state`, and `wait_for_unit`, which fails at
//! once on a failed unit or an inactive one with nothing queued, and otherwise waits in the guest
//! (no host round trip per check).

use std::collections::BTreeMap;
use std::panic::Location;
use std::time::Duration;

use attest_shell::quote;

use super::commands::{guest_poll_loop, DEFAULT_TIMEOUT};
use super::Machine;
use crate::error::Result;

impl Machine {
    /// Runs `systemctl Q`, for `user`'s manager when given; returns the status and output.
    #[track_caller]
    pub fn systemctl(&self, q: &str, user: Option<&str>) -> Result<(i32, String)> {
        let at = Location::caller();
        let (status, output) = self.run(at, &systemctl_command(q, user), Some(DEFAULT_TIMEOUT))?;
        Ok((status, String::from_utf8_lossy(&output).into_owned()))
    }

    #[track_caller]
    pub fn start_job(&self, unit: &str, user: Option<&str>) -> Result<(i32, String)> {
        self.systemctl(&format!("start {}", quote(unit)), user)
    }

    #[track_caller]
    pub fn stop_job(&self, unit: &str, user: Option<&str>) -> Result<(i32, String)> {
        self.systemctl(&format!("stop {}", quote(unit)), user)
    }

    /// The unit's properties (`systemctl show`).
    #[track_caller]
    pub fn get_unit_info(&self, unit: &str, user: Option<&str>) -> Result<BTreeMap<String, String>> {
        let at = Location::caller();
        let q = format!("--no-pager show {}", quote(unit));
        let (status, output) = self.run(at, &systemctl_command(&q, user), Some(DEFAULT_TIMEOUT))?;
        let output = String::from_utf8_lossy(&output);
        if status != 0 {
            let message =
                format!("retrieving systemctl info for unit {unit:?} failed with exit code {status}: {output}");
            return Err(self.assertion(at, message, false));
        }
        Ok(output.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// One property of the unit.
    #[track_caller]
    pub fn get_unit_property(&self, unit: &str, property: &str, user: Option<&str>) -> Result<String> {
        let at = Location::caller();
        let q = format!("--no-pager show --property={} {}", quote(property), quote(unit));
        let (status, output) = self.run(at, &systemctl_command(&q, user), Some(DEFAULT_TIMEOUT))?;
        let output = String::from_utf8_lossy(&output);
        let value = output.trim_end_matches('\n').strip_prefix(&format!("{property}="));
        match (status, value) {
            (0, Some(value)) => Ok(value.to_string()),
            _ => Err(self.assertion(
                at,
                format!("retrieving property {property} of unit {unit:?} failed (exit code {status}): {output}"),
                false,
            )),
        }
    }

    /// Fails unless the unit's `ActiveState` is `state` now.
    #[track_caller]
    pub fn require_unit_state(&self, unit: &str, state: &str) -> Result<()> {
        let at = Location::caller();
        let actual = self.get_unit_property(unit, "ActiveState", None)?;
        if actual != state {
            let message = format!("expected unit {unit:?} to be in state {state:?}, but it is in state {actual:?}");
            return Err(self.assertion(at, message, false));
        }
        Ok(())
    }

    /// Waits until the unit is active. Fails at once when it has failed, or is inactive with no
    /// jobs queued (it will never start by itself).
    #[track_caller]
    pub fn wait_for_unit(&self, unit: &str, user: Option<&str>, timeout: Option<Duration>) -> Result<()> {
        let at = Location::caller();
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        let state = systemctl_command(&format!("--no-pager show --property=ActiveState --value {}", quote(unit)), user);
        let jobs = systemctl_command("list-jobs --full", user);
        // Exit 0: active; 3: failed; 4: inactive with no jobs; 124: timed out.
        let script = guest_poll_loop(
            &format!(
                "case \"$({state})\" in active) exit 0;; failed) exit 3;; \
                 inactive) if {jobs} 2>&1 | grep -q 'No jobs' && [ \"$({state})\" = inactive ]; then exit 4; fi;; esac"
            ),
            timeout,
        );
        let who = user.map(|u| format!(" (user {u})")).unwrap_or_default();
        self.shared.log.nested(Some(&self.name), &format!("waiting for unit {unit}{who}"), || {
            let (status, _) = self.run_loop(at, &format!("waiting for unit {unit}"), &script, timeout)?;
            let message = match status {
                0 => return Ok(()),
                3 => format!("unit {unit:?} reached state \"failed\""),
                4 => format!("unit {unit:?} is inactive and there are no pending jobs"),
                124 => format!("timed out after {timeout:?} waiting for unit {unit:?} to become active"),
                other => format!("checking unit {unit:?} failed with exit code {other}"),
            };
            let status_output = self.run(
                at,
                &systemctl_command(&format!("--no-pager status {}", quote(unit)), user),
                Some(Duration::from_secs(30)),
            );
            let detail = status_output.map(|(_, out)| String::from_utf8_lossy(&out).into_owned()).unwrap_or_default();
            Err(self.assertion(at, format!("{message}\n{}", detail.trim_end()), true))
        })
    }
}

/// `systemctl Q`, or for `user` the NixOS driver's `su -l USER` form with the user's runtime dir.
fn systemctl_command(q: &str, user: Option<&str>) -> String {
    match user {
        None => format!("systemctl {q}"),
        Some(user) => {
            let inner = format!("XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}");
            format!("su -l {} --shell /bin/sh -c {}", quote(user), quote(&inner))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_units_go_through_su_as_in_nixos() {
        assert_eq!(systemctl_command("start x", None), "systemctl start x");
        assert_eq!(
            systemctl_command("start x", Some("alice")),
            "su -l alice --shell /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user start x'"
        );
    }
}
