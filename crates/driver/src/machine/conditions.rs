//! Checking a machine's conditions: through its backdoor shell, or through the serial console after
//! logging in (and `sudo -i`) when its definition has a `login`. Each condition is checked until it
//! holds, cannot hold any more (`Kind::cannot_hold`: decided at once) or its time after the
//! machine's start runs out; a failure gathers its evidence and the next condition is checked all
//! the same. If the machine can no longer be reached, the rest are
//! "not reached", and console conditions are still decided from the console of this start.

use std::panic::Location;
use std::time::{Duration, Instant};

use super::Machine;
use crate::conditions::report::{ConditionResult, Evidence, Outcome, Report};
use crate::conditions::{Condition, Kind};
use crate::error::Result;

/// Pause between two checks of a condition that does not hold yet: a pacing, as no guest event
/// tells (a probe is any command, and `holds` decides on the host); ended early by the machine's
/// stop ([`Machine::pace`]).
const RECHECK: Duration = Duration::from_millis(250);
/// How long one check or one evidence command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a machine whose channel broke may take to be seen exiting.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Evidence output kept per command.
const EVIDENCE_LIMIT: usize = 16 << 10;

impl Machine {
    /// Checks `conditions` in order, each until it holds or its `within` after the machine's start
    /// has passed, and returns the verdicts; the machine is booted first if it is down.
    #[track_caller]
    pub fn check_conditions(&self, conditions: &[Condition]) -> Result<Report> {
        let at = Location::caller();
        self.shared.log.nested(Some(&self.name), &format!("checking {} conditions", conditions.len()), || {
            self.start()?;
            let started = self.started_at().unwrap_or_else(Instant::now);
            let mut unreachable = self.reach_shell(at).err().map(|e| e.to_string());
            let mut results = Vec::new();
            for condition in conditions {
                let within = condition.within.unwrap_or_default();
                let latest = self.shared.wait_deadline();
                let deadline = started.checked_add(within).map_or(latest, |at| at.min(latest));
                let result = match (&condition.kind, &unreachable) {
                    (Kind::Console { regex }, _) => self.check_console(condition, regex, started, deadline),
                    (_, Some(why)) => verdict(condition, Outcome::NotReached, started, Some(why.clone()), Vec::new()),
                    _ => match self.check_in_guest(at, condition, started, deadline) {
                        Ok(result) => result,
                        // A probe that hung (and was interrupted) on a machine that still runs; a
                        // dying machine's VMM exits within moments of its channel breaking.
                        Err(e) if !self.wait_exit(Instant::now() + EXIT_GRACE) => {
                            let why = format!("its check did not complete: {e}");
                            verdict(condition, Outcome::Failed, started, Some(why), Vec::new())
                        }
                        Err(e) => {
                            let why = format!("the machine could not be reached: {e}");
                            unreachable = Some(why.clone());
                            verdict(condition, Outcome::NotReached, started, Some(why), Vec::new())
                        }
                    },
                };
                let said = match result.outcome {
                    Outcome::Passed => "holds",
                    Outcome::Failed => "FAILED",
                    Outcome::NotReached => "not reached",
                };
                self.log(&format!("condition {:?} {said} after {:.1} s", condition.name, result.after_seconds));
                results.push(result);
            }
            // A VMM that refused to start explains every verdict at once, in its own words.
            if results.iter().any(|r| r.outcome != Outcome::Passed) {
                if let Some(refused) = self.refused(Instant::now() + EXIT_GRACE) {
                    return Err(refused);
                }
            }
            Ok(Report { machine: self.name().to_string(), results })
        })
    }

    /// Logs in on the serial console when the definition says so; a backdoor shell connects on
    /// the first check.
    fn reach_shell(&self, at: &'static Location<'static>) -> Result<()> {
        let Some(login) = &self.config.login else { return Ok(()) };
        self.login_at(at, &login.user, login.password.as_deref(), None)?;
        if login.sudo {
            self.become_root_at(at, login.password.as_deref(), None)?;
        }
        Ok(())
    }

    /// When `unit` last changed state (e.g. failed), on the host's clock: the guest's monotonic
    /// clock read now and at the change, through the channel its conditions use. For measuring how
    /// soon a condition on the unit was decided.
    #[track_caller]
    pub fn unit_state_changed_at(&self, unit: &str) -> Result<Instant> {
        let at = Location::caller();
        let command = format!(
            "cut -d' ' -f1 /proc/uptime; systemctl show -p StateChangeTimestampMonotonic --value -- {}",
            attest_shell::quote(unit)
        );
        let asked = Instant::now();
        let (status, output) = self.condition_command(at, &command)?;
        // The guest read its clock about halfway through the round trip.
        let asked = asked + asked.elapsed() / 2;
        let numbers: Vec<f64> = output.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        match (status, numbers.as_slice()) {
            (0, &[uptime, changed]) if changed > 0.0 => {
                Ok(asked - Duration::from_secs_f64((uptime - changed / 1e6).max(0.0)))
            }
            _ => Err(self.assertion(
                at,
                format!("expected the guest's uptime and {unit}'s state change time, but `{command}` exited {status}: {output}"),
                false,
            )),
        }
    }

    /// Runs a command the way this machine's conditions are checked: exit status and output
    /// (stdout and stderr).
    fn condition_command(&self, at: &'static Location<'static>, command: &str) -> Result<(i32, String)> {
        let command = format!("{{ {command}\n}} 2>&1");
        match self.config.login {
            Some(_) => self.serial_execute_at(at, &command, Some(COMMAND_TIMEOUT)),
            None => self.execute_at(at, &command, Some(COMMAND_TIMEOUT)),
        }
    }

    /// Probes `condition` until it holds, cannot hold any more (decided at once, see
    /// [`Kind::cannot_hold`]) or its deadline comes. A machine that stopped is not probed again
    /// (a probe would boot it anew): a condition already seen not holding then fails; one never
    /// probed is an error, which the caller reports as "not reached".
    fn check_in_guest(
        &self,
        at: &'static Location<'static>,
        condition: &Condition,
        started: Instant,
        deadline: Instant,
    ) -> Result<ConditionResult> {
        let probe = condition.kind.probe().expect("a guest condition has a probe");
        let mut last: Option<String> = None;
        loop {
            if !self.is_running() {
                let Some(said) = last else {
                    return Err(self.broken(at, "the machine stopped before it could be checked".into()));
                };
                let reason = format!("{said}; then the machine stopped, so it never will");
                return Ok(verdict(condition, Outcome::Failed, started, Some(reason), Vec::new()));
            }
            let (status, output) = self.condition_command(at, &probe)?;
            if condition.kind.holds(status, &output) {
                return Ok(verdict(condition, Outcome::Passed, started, None, Vec::new()));
            }
            let said = format!(
                "expected {}, but `{probe}` exited {status}{}",
                condition.kind.describe(),
                if output.trim().is_empty() { String::new() } else { format!(" saying: {}", cut(&output).trim_end()) }
            );
            let hopeless = condition.kind.cannot_hold(&output);
            if hopeless.is_some() || Instant::now() + RECHECK >= deadline {
                let reason = match hopeless {
                    Some(why) => format!("{said}; {why}"),
                    None => said,
                };
                let mut evidence = Vec::new();
                for command in condition.kind.evidence() {
                    let output = match self.condition_command(at, &command) {
                        Ok((_, output)) => cut(&output),
                        Err(e) => format!("(could not run: {e})"),
                    };
                    evidence.push(Evidence { command, output });
                }
                evidence.extend(self.failure_screenshot(condition));
                return Ok(verdict(condition, Outcome::Failed, started, Some(reason), evidence));
            }
            last = Some(said);
            // A machine that stops meanwhile is seen at the top of the loop.
            self.pace(RECHECK, deadline);
        }
    }

    /// The screen when a condition failed, in the output directory (a login prompt, an installer
    /// dialog or a kernel message on tty0 often says what the serial console does not).
    fn failure_screenshot(&self, condition: &Condition) -> Option<Evidence> {
        let slug: String = condition.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let path = self.screenshot(&format!("{}-failed-{slug}", self.name)).ok()?;
        Some(Evidence { command: "(screenshot)".into(), output: path.display().to_string() })
    }

    /// Console text is decided from everything the console printed since the machine started,
    /// woken by its output; a console that ended (the machine stopped) decides at once.
    fn check_console(
        &self,
        condition: &Condition,
        regex: &str,
        started: Instant,
        deadline: Instant,
    ) -> ConditionResult {
        // A line matching, in what this start of the machine printed.
        let pattern = regex::bytes::Regex::new(&format!("(?m){regex}")).expect("checked when the test was read");
        let Some(console) = self.console() else {
            let why = "the machine has no console (it never started)".to_string();
            return verdict(condition, Outcome::NotReached, started, Some(why), Vec::new());
        };
        match console.wait_printed(&pattern, deadline) {
            Ok(_) => verdict(condition, Outcome::Passed, started, None, Vec::new()),
            Err(e) => {
                let evidence = vec![Evidence {
                    command: "(the console's last lines)".into(),
                    output: self.console_tail().join("\n"),
                }];
                let stopped = if e.ended { " (the machine stopped)" } else { "" };
                let reason = format!("expected {}, but it never did{stopped}", condition.kind.describe());
                verdict(condition, Outcome::Failed, started, Some(reason), evidence)
            }
        }
    }
}

fn verdict(
    condition: &Condition,
    outcome: Outcome,
    started: Instant,
    reason: Option<String>,
    evidence: Vec<Evidence>,
) -> ConditionResult {
    ConditionResult {
        name: condition.name.clone(),
        expected: condition.kind.describe(),
        outcome,
        after_seconds: started.elapsed().as_secs_f64(),
        reason,
        evidence,
    }
}

/// Long output cut to its end, where the news is.
fn cut(output: &str) -> String {
    if output.len() <= EVIDENCE_LIMIT {
        return output.to_string();
    }
    let start = (output.len() - EVIDENCE_LIMIT..output.len()).find(|&i| output.is_char_boundary(i)).unwrap_or(0);
    format!("(…{} bytes before)\n{}", start, &output[start..])
}
