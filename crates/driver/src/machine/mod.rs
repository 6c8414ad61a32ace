//! A test's machine and its lifecycle, with the NixOS driver's names: `start` (returns at once;
//! the first command waits for the backdoor shell), `shutdown`, `reboot`, `crash`,
//! `wait_for_shutdown`, `is_up`. Commands, waits, files and the screen are in the sibling modules.
//!
//! Locks are held briefly, except the shell's for the length of one command: another thread can
//! always crash, kill or inspect a machine whose command is running.

mod commands;
mod files;
mod screen;
mod units;
mod waits;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::Location;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use attest_machine::backend::Control;
use attest_machine::qmp::Qmp;
use attest_machine::transport::listening::wait_readable;
use attest_machine::Console;
use attest_shell::{BackdoorShell, ShellError};

use crate::config::MachineConfig;
use crate::driver::Shared;
use crate::error::{DriverError, Failure, Result};

pub use screen::key_for_char;

/// How long a graceful stop may take before the VMM is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Console lines shown with an error.
const TAIL_LINES: usize = 25;

pub struct Machine {
    name: String,
    config: MachineConfig,
    shared: Arc<Shared>,
    /// Lock order: `shell` before `vm`; `vm` is only ever held briefly.
    vm: Mutex<attest_machine::Machine>,
    shell: Mutex<Option<Shell>>,
    /// The channel of a rebooting guest, kept until its new shell announces itself.
    rebooting: Mutex<Option<UnixStream>>,
    /// Counts starts: a shell belongs to the start it connected in.
    generation: AtomicU64,
    /// The console of the latest start; it outlives the VMM, for errors and `get_console_log`.
    console: Mutex<Option<Console>>,
    /// When the latest start happened, for the boot deadline.
    started: Mutex<Option<Instant>>,
}

/// A connected backdoor shell and the start it belongs to.
struct Shell {
    generation: u64,
    shell: BackdoorShell,
}

impl Machine {
    pub(crate) fn new(config: MachineConfig, machine: attest_machine::Machine, shared: Arc<Shared>) -> Machine {
        Machine {
            name: config.name.clone(),
            config,
            shared,
            vm: Mutex::new(machine),
            shell: Mutex::new(None),
            rebooting: Mutex::new(None),
            generation: AtomicU64::new(0),
            console: Mutex::new(None),
            started: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Boots the machine unless it runs already, and returns without waiting for the guest: the
    /// first command does. So `start` on every machine boots them all in parallel.
    #[track_caller]
    pub fn start(&self) -> Result<()> {
        self.start_at(Location::caller())
    }

    fn start_at(&self, at: &'static Location<'static>) -> Result<()> {
        let mut vm = lock(&self.vm);
        if vm.is_running() {
            return Ok(());
        }
        self.shared.log.info(Some(&self.name), "starting vm");
        let running = vm.start().map_err(|e| self.broken(at, format!("could not start: {e}")))?;
        *lock(&self.console) = Some(running.console().clone());
        *lock(&self.started) = Some(Instant::now());
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the machine runs and its backdoor shell is connected.
    pub fn is_up(&self) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        let connected = lock(&self.shell).as_ref().is_some_and(|s| s.generation == generation);
        connected && lock(&self.vm).is_running()
    }

    /// Powers the guest off (`poweroff` through its shell, as NixOS does) and waits until it is down.
    #[track_caller]
    pub fn shutdown(&self) -> Result<()> {
        let at = Location::caller();
        if !lock(&self.vm).is_running() {
            return Ok(());
        }
        self.shared.log.nested(Some(&self.name), "shutting down", || {
            let mut shell = self.shell(at)?;
            let sent = shell.get().write_raw(b"poweroff\n");
            *shell.0 = None;
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
        if let Some(Shell { shell, .. }) = shell.take() {
            // The VMM keeps its end of the channel across the guest's reboot: reuse the stream.
            *lock(&self.rebooting) = Some(shell.into_stream());
        }
        // The boot deadline counts from here.
        *lock(&self.started) = Some(Instant::now());
        Ok(())
    }

    /// Stops the machine at once, as pulling the plug would (QMP `quit`).
    #[track_caller]
    pub fn crash(&self) -> Result<()> {
        let at = Location::caller();
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
        let exit =
            lock(&self.vm).vm().map(|vm| vm.exit_watch()).transpose().map_err(|e| self.broken(at, e.to_string()))?;
        if let Some(exit) = exit {
            // Not under the machine's lock: the wait can last until the global timeout.
            wait_readable(&exit, None, self.shared.deadline).ok();
        }
        if lock(&self.vm).wait_exited(Instant::now() + Duration::from_secs(5)) {
            return Ok(());
        }
        let message = "expected the machine to power off, but it was still running at the global timeout";
        Err(self.assertion(at, message.into(), true))
    }

    /// Stops the machine for teardown: a `sync` if the shell is free, QMP `quit`, then a kill if
    /// it has not exited within the grace period.
    pub(crate) fn stop(&self) {
        if !lock(&self.vm).is_running() {
            return;
        }
        let grace = Instant::now() + STOP_GRACE;
        if let Ok(mut shell) = self.shell.try_lock() {
            if let Some(Shell { shell, .. }) = shell.as_mut() {
                shell.execute("sync", None, grace).ok();
            }
        }
        let control = lock(&self.vm).vm().and_then(|vm| vm.control(grace).ok());
        if let Some(Control::Qmp(qmp)) = control {
            qmp.execute("quit", None, grace).ok();
        }
        let mut vm = lock(&self.vm);
        if !vm.wait_exited(grace) {
            vm.kill();
        }
    }

    /// Kills the VMM at once (the global timeout).
    pub(crate) fn kill(&self) {
        lock(&self.vm).kill();
    }

    /// The connected backdoor shell, booting the machine and connecting first if needed (as
    /// NixOS does: a command on a machine that is down starts it).
    fn shell(&self, at: &'static Location<'static>) -> Result<ShellGuard<'_>> {
        let mut shell = lock(&self.shell);
        self.start_at(at)?;
        let generation = self.generation.load(Ordering::SeqCst);
        if shell.as_ref().is_none_or(|s| s.generation != generation) {
            *shell = None;
            *shell = Some(Shell { generation, shell: self.connect(at, generation)? });
        }
        Ok(ShellGuard(shell))
    }

    /// Waits for the guest's backdoor shell: the channel, then the marker line.
    fn connect(&self, at: &'static Location<'static>, generation: u64) -> Result<BackdoorShell> {
        let started = lock(&self.started).unwrap_or_else(Instant::now);
        let deadline = self.shared.deadline.min(started + self.config.boot_timeout);
        self.shared.log.nested(Some(&self.name), "waiting for the VM to finish booting", || {
            let rebooted =
                lock(&self.rebooting).take().filter(|_| generation == self.generation.load(Ordering::SeqCst));
            let stream = match rebooted {
                Some(stream) => stream,
                None => {
                    // Waited on without the machine's lock, so other threads can crash or inspect it.
                    let (channel, exit) = {
                        let mut vm = lock(&self.vm);
                        let vm = vm.vm().expect("started");
                        (vm.take_agent(), vm.exit_watch())
                    };
                    let no_channel =
                        || self.broken(at, "it has no guest channel left (a previous connect failed)".into());
                    let mut channel = channel.ok_or_else(no_channel)?;
                    let exit = exit.map_err(|e| self.broken(at, e.to_string()))?;
                    let connected = channel.connect(deadline, Some(exit.as_fd()));
                    connected.map_err(|e| self.boot_failed(at, started, &e.to_string()))?
                }
            };
            let (shell, _) =
                BackdoorShell::connect(stream, deadline).map_err(|e| self.boot_failed(at, started, &e.to_string()))?;
            self.shared.log.info(
                Some(&self.name),
                &format!("connected to guest root shell after {:.2} seconds", started.elapsed().as_secs_f64()),
            );
            Ok(shell)
        })
    }

    fn boot_failed(&self, at: &'static Location<'static>, started: Instant, what: &str) -> DriverError {
        let waited = started.elapsed();
        self.broken(
            at,
            format!(
                "expected the guest to print \"Spawning backdoor root shell...\" on its virtconsole within {:?} of starting, \
                 but after {waited:.1?}: {what}",
                self.shared.deadline.min(started + self.config.boot_timeout).saturating_duration_since(started)
            ),
        )
    }

    /// The machine's QMP connection.
    fn qmp(&self, at: &'static Location<'static>) -> Result<Arc<Qmp>> {
        self.start_at(at)?;
        let deadline = self.shared.deadline.min(Instant::now() + Duration::from_secs(30));
        let control = lock(&self.vm).vm().expect("started").control(deadline);
        match control {
            Ok(Control::Qmp(qmp)) => Ok(qmp),
            Err(e) => Err(self.broken(at, format!("its QMP monitor is unusable: {e}"))),
        }
    }

    /// Everything the console printed in the latest start (NixOS's `get_console_log`).
    pub fn get_console_log(&self) -> String {
        let log = lock(&self.vm).dir().path().join("console.log");
        String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
    }

    fn console(&self) -> Option<Console> {
        lock(&self.console).clone()
    }

    fn console_tail(&self) -> Vec<String> {
        let Some(console) = self.console() else { return Vec::new() };
        if !lock(&self.vm).is_running() {
            // The VMM's last words (a panic, QEMU's error) arrive just after it exits.
            console.wait_closed(Duration::from_secs(2));
        }
        console.tail(TAIL_LINES)
    }

    /// The test's expectation failed; `with_console` adds the console tail.
    fn assertion(&self, at: &'static Location<'static>, message: String, with_console: bool) -> DriverError {
        if let Some(timeout) = self.shared.timed_out() {
            return timeout;
        }
        let console_tail = if with_console { self.console_tail() } else { Vec::new() };
        DriverError::Assertion(Box::new(Failure { machine: self.name.clone(), message, location: at, console_tail }))
    }

    /// The machine failed under the test.
    fn broken(&self, at: &'static Location<'static>, message: String) -> DriverError {
        if let Some(timeout) = self.shared.timed_out() {
            return timeout;
        }
        let console_tail = self.console_tail();
        DriverError::Broken(Box::new(Failure { machine: self.name.clone(), message, location: at, console_tail }))
    }

    /// A shell error while `what`, as the driver reports it: a guest that died says so.
    fn shell_failed(&self, at: &'static Location<'static>, what: &str, error: ShellError) -> DriverError {
        let dead = !lock(&self.vm).is_running();
        let message = match (&error, dead) {
            (ShellError::Closed { .. }, true) => format!("{what}: the machine stopped while the command ran"),
            _ => format!("{what}: {error}"),
        };
        self.broken(at, message)
    }

    /// The output directory (screenshots, copied files).
    fn out_dir(&self) -> PathBuf {
        self.shared.out_dir.clone()
    }
}

/// A command as logs and errors show it: whole up to a few lines, else its start and its size.
fn brief(command: &str) -> std::borrow::Cow<'_, str> {
    const LIMIT: usize = 300;
    if command.len() <= LIMIT {
        return command.into();
    }
    let cut = (0..=LIMIT).rev().find(|&i| command.is_char_boundary(i)).unwrap_or(0);
    format!("{}… ({} bytes)", &command[..cut], command.len()).into()
}

/// The machine's connected shell, held for one command.
struct ShellGuard<'a>(MutexGuard<'a, Option<Shell>>);

impl ShellGuard<'_> {
    fn get(&mut self) -> &mut BackdoorShell {
        &mut self.0.as_mut().expect("connected by Machine::shell").shell
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
