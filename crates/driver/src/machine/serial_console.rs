//! The machine API over the serial console, for guests without a backdoor (installer ISOs, boot
//! images): `login`, `become_root`, `serial_execute`, `serial_succeed`. Each start of the machine
//! has its own [`SerialShell`] on that start's console.

use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::commands::DEFAULT_TIMEOUT;
use super::{brief, Machine};
use crate::error::Result;
use crate::serial::{boot_stage, SerialError, SerialShell, Step};

impl Machine {
    /// Logs in at the serial console's getty as `user` (typing `password` when asked), or accepts
    /// an autologin as `user`. Waits up to `timeout` (default: the machine's boot timeout) for the
    /// prompt, booting the machine if it is down.
    #[track_caller]
    pub fn login(&self, user: &str, password: Option<&str>, timeout: Option<Duration>) -> Result<()> {
        self.login_at(Location::caller(), user, password, timeout)
    }

    pub(crate) fn login_at(
        &self,
        at: &'static Location<'static>,
        user: &str,
        password: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let timeout = timeout.unwrap_or(self.config.boot_timeout);
        self.shared.log.nested(Some(&self.name), &format!("logging in on the serial console as {user}"), || {
            let shell = self.serial_shell(at)?;
            shell.login(user, password, self.deadline_in(timeout)).map_err(|e| self.serial_failed(at, e))
        })
    }

    /// Becomes root on the serial console with `sudo -i` (typing `password` if sudo asks).
    #[track_caller]
    pub fn become_root(&self, password: Option<&str>, timeout: Option<Duration>) -> Result<()> {
        self.become_root_at(Location::caller(), password, timeout)
    }

    pub(crate) fn become_root_at(
        &self,
        at: &'static Location<'static>,
        password: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let timeout = timeout.unwrap_or(Duration::from_secs(60));
        self.shared.log.nested(Some(&self.name), "becoming root with sudo -i", || {
            let shell = self.serial_shell(at)?;
            shell.become_root(password, self.deadline_in(timeout)).map_err(|e| self.serial_failed(at, e))
        })
    }

    /// Runs `command` in the serial console's shell (after [`Machine::login`]) and returns its exit
    /// status and output (default timeout 900 s; a command still running then is interrupted).
    #[track_caller]
    pub fn serial_execute(&self, command: &str, timeout: Option<Duration>) -> Result<(i32, String)> {
        self.serial_execute_at(Location::caller(), command, timeout)
    }

    pub(crate) fn serial_execute_at(
        &self,
        at: &'static Location<'static>,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<(i32, String)> {
        let deadline = self.deadline_in(timeout.unwrap_or(DEFAULT_TIMEOUT));
        let shell = self.serial_shell(at)?;
        let (status, output) = shell.execute(command, deadline).map_err(|e| self.serial_failed(at, e))?;
        Ok((status, String::from_utf8_lossy(&output).into_owned()))
    }

    /// [`Machine::serial_execute`], which must exit 0; returns the output.
    #[track_caller]
    pub fn serial_succeed(&self, command: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        self.shared.log.nested(
            Some(&self.name),
            &format!("must succeed on the serial console: {}", brief(command)),
            || {
                let deadline = self.deadline_in(timeout.unwrap_or(DEFAULT_TIMEOUT));
                let shell = self.serial_shell(at)?;
                match shell.execute(command, deadline).map_err(|e| self.serial_failed(at, e))? {
                    (0, output) => Ok(String::from_utf8_lossy(&output).into_owned()),
                    (status, output) => {
                        let output = String::from_utf8_lossy(&output);
                        let message =
                            format!("command `{}` failed (exit code {status}): {}", brief(command), output.trim_end());
                        Err(self.assertion(at, message, true))
                    }
                }
            },
        )
    }

    /// The serial shell of the current start, booting the machine if it is down.
    fn serial_shell(&self, at: &'static Location<'static>) -> Result<Arc<SerialShell>> {
        self.start_at(at)?;
        let mut state = self.state();
        let start = &mut state.start;
        let console = start.console.clone().expect("started");
        Ok(start.serial.get_or_insert_with(|| Arc::new(SerialShell::new(console))).clone())
    }

    fn deadline_in(&self, timeout: Duration) -> Instant {
        self.shared.wait_deadline().min(Instant::now() + timeout)
    }

    /// A serial-shell failure as the driver reports it: which step, how far the guest got when it
    /// never prompted, and the console's tail.
    fn serial_failed(&self, at: &'static Location<'static>, error: SerialError) -> crate::error::DriverError {
        if error.step == Step::Login {
            if let Some(refused) = self.refused(Instant::now() + Duration::from_secs(2)) {
                return refused;
            }
        }
        let mut message = error.to_string();
        if error.step == Step::Login && !self.get_console_log().contains("login:") {
            message.push_str(&format!(
                "; the guest never showed a login prompt: it got as far as the {}",
                boot_stage(&self.get_console_log())
            ));
        }
        if self.is_running() {
            self.assertion(at, message, true)
        } else {
            self.broken(at, format!("{message} (the machine stopped)"))
        }
    }
}
