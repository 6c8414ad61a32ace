//! Running commands in the guest with the NixOS driver's names and defaults: `execute`, `succeed`,
//! `fail`, `wait_until_succeeds`, `wait_until_fails`, `sleep`.
//!
//! Every call has a host-side deadline: the command's timeout plus [`HOST_GRACE`] when it has one,
//! else the global timeout. The guest enforces the timeout itself too (`timeout N`), as in NixOS.
//! [`Machine::pace`] is the pause of the host's retry loops, for what no event announces.

use std::panic::Location;
use std::time::{Duration, Instant};

use super::{brief, Machine};
use crate::error::Result;

/// NixOS's default timeout of `execute` and of every `wait_*`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long past a command's own timeout the host waits for the guest's `timeout` to report.
const HOST_GRACE: Duration = Duration::from_secs(30);
/// Pause between attempts of `wait_until_*` (NixOS: 1 s): a pacing, as nothing announces that a
/// test's command would now succeed; each attempt is a guest round trip of 20 to 100 ms.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Machine {
    /// Runs `command` and returns its exit status and output (NixOS's `execute`; `timeout`
    /// defaults to 900 s). Output is decoded as UTF-8 with invalid bytes replaced, as NixOS does.
    #[track_caller]
    pub fn execute(&self, command: &str, timeout: Option<Duration>) -> Result<(i32, String)> {
        self.execute_at(Location::caller(), command, timeout)
    }

    pub(crate) fn execute_at(
        &self,
        at: &'static Location<'static>,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<(i32, String)> {
        let (status, output) = self.run(at, command, Some(timeout.unwrap_or(DEFAULT_TIMEOUT)))?;
        Ok((status, String::from_utf8_lossy(&output).into_owned()))
    }

    /// NixOS's `execute(command, timeout=None)`: no guest-side timeout; the global one still applies.
    #[track_caller]
    pub fn execute_without_timeout(&self, command: &str) -> Result<(i32, String)> {
        let (status, output) = self.run(Location::caller(), command, None)?;
        Ok((status, String::from_utf8_lossy(&output).into_owned()))
    }

    /// Runs `command`, which must exit 0, and returns its output. No timeout by default, as in
    /// NixOS; the global timeout still ends it.
    #[track_caller]
    pub fn succeed(&self, command: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        self.shared.log.nested(Some(&self.name), &format!("must succeed: {}", brief(command)), || {
            self.succeed_at(at, command, timeout)
        })
    }

    /// [`Machine::succeed`] without its log block, for the API's own commands (copying files).
    pub(super) fn succeed_at(
        &self,
        at: &'static Location<'static>,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<String> {
        let (status, output) = self.run(at, command, timeout)?;
        let output = String::from_utf8_lossy(&output).into_owned();
        if status != 0 {
            self.shared.log.info(Some(&self.name), &format!("output: {output}"));
            let message = format!("command `{}` failed (exit code {status}){}", brief(command), shown(&output));
            // The guest's stderr is on the serial console: the tail shows why.
            return Err(self.assertion(at, message, true));
        }
        Ok(output)
    }

    /// Runs `command`, which must fail, and returns its output.
    #[track_caller]
    pub fn fail(&self, command: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        self.shared.log.nested(Some(&self.name), &format!("must fail: {}", brief(command)), || {
            let (status, output) = self.run(at, command, timeout)?;
            let output = String::from_utf8_lossy(&output).into_owned();
            if status == 0 {
                return Err(self.assertion(
                    at,
                    format!("command `{}` unexpectedly succeeded{}", brief(command), shown(&output)),
                    false,
                ));
            }
            Ok(output)
        })
    }

    /// Runs `command` until it exits 0, each attempt limited to `timeout` too (default 900 s), and
    /// returns its output.
    #[track_caller]
    pub fn wait_until_succeeds(&self, command: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        let what = format!("wait for success: {}", brief(command));
        self.retry(at, &what, command, timeout, |status| status == 0)
    }

    /// Runs `command` until it exits non-zero, and returns its output.
    #[track_caller]
    pub fn wait_until_fails(&self, command: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        let what = format!("wait for failure: {}", brief(command));
        self.retry(at, &what, command, timeout, |status| status != 0)
    }

    /// Sleeps in the guest, so the time counts on the guest's clock.
    #[track_caller]
    pub fn sleep(&self, duration: Duration) -> Result<()> {
        let at = Location::caller();
        self.run(at, &format!("sleep {}", duration.as_secs_f64()), None).map(drop)
    }

    fn retry(
        &self,
        at: &'static Location<'static>,
        what: &str,
        command: &str,
        timeout: Option<Duration>,
        done: impl Fn(i32) -> bool,
    ) -> Result<String> {
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        self.shared.log.nested(Some(&self.name), what, || {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let (status, output) = self.run(at, command, Some(left.max(Duration::from_secs(1))))?;
                if done(status) {
                    return Ok(String::from_utf8_lossy(&output).into_owned());
                }
                if Instant::now() + RETRY_PAUSE >= deadline {
                    let output = String::from_utf8_lossy(&output);
                    let message =
                        format!("{what}: timed out after {timeout:?} (last exit code {status}){}", shown(&output));
                    return Err(self.assertion(at, message, true));
                }
                // The next attempt would boot a machine that stopped anew.
                if self.pace(RETRY_PAUSE, deadline) {
                    let output = String::from_utf8_lossy(&output);
                    let message = format!(
                        "{what}: the machine stopped while it waited (last exit code {status}){}",
                        shown(&output)
                    );
                    return Err(self.broken(at, message));
                }
            }
        })
    }

    /// The pause of a loop that re-checks what no event announces (a test's command succeeding, a
    /// condition starting to hold, a tty's text): `pause`, at most until `deadline`, ended early by
    /// the VMM's exit (woken by it, not polled). True if the machine stopped, so that the loop
    /// ends rather than boot it again with its next check.
    pub(super) fn pace(&self, pause: Duration, deadline: Instant) -> bool {
        self.wait_exit((Instant::now() + pause).min(deadline))
    }

    /// Runs `command` through the backdoor shell, with the guest's `timeout` when given.
    pub(super) fn run(
        &self,
        at: &'static Location<'static>,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<(i32, Vec<u8>)> {
        self.run_limited(at, &format!("running `{}`", brief(command)), command, timeout, timeout)
    }

    /// Runs a [`guest_poll_loop`], which keeps its own time in the guest; `what` names the wait in
    /// errors.
    pub(super) fn run_loop(
        &self,
        at: &'static Location<'static>,
        what: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>)> {
        self.run_limited(at, what, script, None, Some(timeout))
    }

    /// Runs `command` with the guest's `timeout` when `guest_limit` is given, and a host deadline of
    /// `host_limit` plus a grace period (else the global timeout).
    fn run_limited(
        &self,
        at: &'static Location<'static>,
        what: &str,
        command: &str,
        guest_limit: Option<Duration>,
        host_limit: Option<Duration>,
    ) -> Result<(i32, Vec<u8>)> {
        let mut shell = self.shell(at)?;
        let deadline = match host_limit {
            Some(limit) => self.shared.wait_deadline().min(Instant::now() + limit + HOST_GRACE),
            None => self.shared.wait_deadline(),
        };
        shell.get().execute(command, guest_limit, deadline).map_err(|e| {
            drop(shell);
            self.shell_failed(at, what, e)
        })
    }
}

/// How often a guest-side loop rechecks its condition.
const GUEST_POLL: &str = "0.05";

/// A script that runs `body` every [`GUEST_POLL`] until `body` exits the script itself, and exits
/// 124 (as `timeout` would) after `timeout`. Between checks it uses only bash builtins: no `sleep`
/// (an exec costs ~35 ms under TCG) and no `timeout` process (busybox's lingers up to a second).
/// The pause is a `read -t` on a pipe nobody writes to (opened read-write, so it never ends). The
/// clock is `$EPOCHREALTIME` with every non-digit removed (its decimal point follows the locale).
pub(super) fn guest_poll_loop(body: &str, timeout: Duration) -> String {
    format!(
        "__end=$(( ${{EPOCHREALTIME//[!0-9]/}} + {micros} )); exec 9<> <(:); \
         while true; do {body}\n[ ${{EPOCHREALTIME//[!0-9]/}} -lt $__end ] || exit 124; read -t {GUEST_POLL} -u 9 || :; done",
        micros = timeout.as_micros()
    )
}

/// The output for an error message: nothing when empty, else after a colon, cut when long.
fn shown(output: &str) -> String {
    const LIMIT: usize = 4000;
    let output = output.trim_end();
    match output.len() {
        0 => String::new(),
        n if n <= LIMIT => format!(", output:\n{output}"),
        n => {
            let cut = output.char_indices().map(|(i, _)| i).take_while(|&i| i <= n - LIMIT).last().unwrap_or(0);
            format!(", output (last {LIMIT} bytes):\n{}", &output[cut..])
        }
    }
}
