//! Starting and stopping a machine, with the NixOS driver's names: `start` (returns at once; the
//! first command waits for the backdoor shell), `is_up`, `shutdown`, `reboot`, `crash`,
//! `wait_for_shutdown`; and the driver's own teardown (`stop`) and global-timeout `kill`.

use std::os::unix::net::UnixStream;
use std::panic::Location;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use attest_machine::transport::listening::wait_readable;

use super::{lock, Machine, Shell};
use crate::error::Result;

/// How long a graceful stop may take before the VMM is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Machine {
    /// Boots the machine unless it runs already, and returns without waiting for the guest: the
    /// first command does. So `start` on every machine boots them all in parallel.
    #[track_caller]
    pub fn start(&self) -> Result<()> {
        self.start_at(Location::caller())
    }

    /// [`Machine::start`], with NixOS's `allow_reboot`: a reboot restarts the guest instead of
    /// ending the VMM. Takes effect at the next start of the VMM.
    #[track_caller]
    pub fn start_allowing_reboot(&self, allow_reboot: bool) -> Result<()> {
        if allow_reboot {
            self.state().machine.spec_mut().allow_reboot = true;
        }
        self.start_at(Location::caller())
    }

    /// Starts the machine if needed and waits for its backdoor shell (NixOS's `connect`).
    #[track_caller]
    pub fn connect(&self) -> Result<()> {
        self.shell(Location::caller()).map(drop)
    }

    /// A message in the test log, about this machine.
    pub fn log(&self, message: &str) {
        self.shared.log.info(Some(&self.name), message);
    }

    /// Whether the machine runs and its backdoor shell is connected. Never waits, even while a
    /// command runs.
    pub fn is_up(&self) -> bool {
        let generation = self.generation();
        generation != 0 && self.connected.load(Ordering::SeqCst) == generation && self.is_running()
    }

    /// Powers the guest off (`poweroff` through its shell, as NixOS does) and waits until it is down.
    #[track_caller]
    pub fn shutdown(&self) -> Result<()> {
        let at = Location::caller();
        if !self.is_running() {
            return Ok(());
        }
        self.shared.log.nested(Some(&self.name), "shutting down", || {
            let mut shell = self.shell(at)?;
            let sent = shell.get().write_raw(b"poweroff\n");
            *shell.0 = None;
            self.connected.store(0, Ordering::SeqCst);
            drop(shell);
            sent.map_err(|e| self.broken(at, format!("sending poweroff: {e}")))?;
            self.wait_down(at)
        })
    }

    /// Reboots the guest with ctrl-alt-delete. The machine must allow reboots (otherwise the VMM
    /// ends, as with NixOS's `-no-reboot`); the next command waits for the shell again.
    #[track_caller]
    pub fn reboot(&self) -> Result<()> {
        let at = Location::caller();
        let mut shell = lock(&self.shell);
        self.send_key_at(at, "ctrl-alt-delete")?;
        // The VMM keeps its end of the channel across the guest's reboot: the stream carries over.
        let stream: Option<UnixStream> = shell.take().map(|Shell { shell, .. }| shell.into_stream());
        self.connected.store(0, Ordering::SeqCst);
        {
            // A new start in the same VMM: the guest's serial login does not survive its reboot
            // either, and the boot deadline counts from here.
            let mut state = self.state();
            let console = state.start.console.clone().expect("started");
            state.begin(console, false);
            state.start.rebooting = stream;
        }
        drop(shell);
        self.connect_in_background();
        Ok(())
    }

    /// Stops the machine at once, as pulling the plug would (QMP `quit`). Nothing to do when it
    /// is down.
    #[track_caller]
    pub fn crash(&self) -> Result<()> {
        let at = Location::caller();
        if !self.is_running() {
            return Ok(());
        }
        self.shared.log.info(Some(&self.name), "forced crash");
        if let Ok(control) = self.control(at) {
            control.quit(Instant::now() + Duration::from_secs(5)).ok();
        }
        self.state().machine.kill();
        Ok(())
    }

    /// Waits until the VMM has exited by itself (the guest powered off), within the global timeout.
    #[track_caller]
    pub fn wait_for_shutdown(&self) -> Result<()> {
        let at = Location::caller();
        self.shared.log.nested(Some(&self.name), "waiting for the VM to power off", || self.wait_down(at))
    }

    fn wait_down(&self, at: &'static Location<'static>) -> Result<()> {
        if !self.wait_exit(self.shared.wait_deadline()) {
            let message = "expected the machine to power off, but it was still running at the global timeout";
            return Err(self.assertion(at, message.into(), true));
        }
        Ok(())
    }

    /// Waits for the VMM's exit until `deadline` without holding the machine's lock; true if it
    /// exited (and is now reaped).
    pub(super) fn wait_exit(&self, deadline: Instant) -> bool {
        let exit = self.state().machine.vm().and_then(|vm| vm.exit_watch().ok());
        if let Some(exit) = exit {
            wait_readable(&exit, None, deadline).ok();
        }
        self.state().machine.wait_exited(Instant::now())
    }

    /// Teardown: a `sync` if the shell is free, QMP `quit`, then a kill after the grace period.
    pub(crate) fn stop(&self) {
        if !self.is_running() {
            return;
        }
        let grace = Instant::now() + STOP_GRACE;
        if let Ok(mut shell) = self.shell.try_lock() {
            if let Some(Shell { shell, .. }) = shell.as_mut() {
                shell.execute("sync", None, grace).ok();
            }
        }
        if let Ok(control) = self.control(Location::caller()) {
            control.quit(grace).ok();
        }
        self.wait_exit(grace);
        self.state().machine.kill();
    }

    /// Kills the VMM at once (the global timeout).
    pub(crate) fn kill(&self) {
        self.state().machine.kill();
    }
}
