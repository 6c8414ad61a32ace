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
            lock(&self.vm).spec_mut().allow_reboot = true;
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
        let generation = self.generation.load(Ordering::SeqCst);
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
        if let Some(Shell { shell, generation }) = shell.take() {
            // The VMM keeps its end of the channel across the guest's reboot: reuse the stream.
            let stream: UnixStream = shell.into_stream();
            *lock(&self.rebooting) = Some((generation, stream));
        }
        self.connected.store(0, Ordering::SeqCst);
        // The guest's serial login does not survive its reboot either.
        *lock(&self.serial) = None;
        // The boot deadline counts from here.
        *lock(&self.started) = Some(Instant::now());
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
        if let Ok(qmp) = self.qmp(at) {
            qmp.execute("quit", None, Instant::now() + Duration::from_secs(5)).ok();
        }
        lock(&self.vm).kill();
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
        let exit = lock(&self.vm).vm().and_then(|vm| vm.exit_watch().ok());
        if let Some(exit) = exit {
            wait_readable(&exit, None, deadline).ok();
        }
        lock(&self.vm).wait_exited(Instant::now())
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
        if let Ok(qmp) = self.qmp(Location::caller()) {
            qmp.execute("quit", None, grace).ok();
        }
        self.wait_exit(grace);
        lock(&self.vm).kill();
    }

    /// Kills the VMM at once (the global timeout).
    pub(crate) fn kill(&self) {
        lock(&self.vm).kill();
    }
}
