//! A test's machine: its state, its locks, and the channels every part of the machine API goes
//! through: the backdoor shell (connected on the first command of each start), the VMM's control
//! ([`VmControl`], connected on first use) and the console, plus how failures are reported. The
//! API itself is in the sibling modules: lifecycle, commands, units, waits, files, screen, network,
//! snapshots.
//!
//! Each start (a boot, a reboot's new boot, a restore) is one [`Start`] value, replaced whole under
//! the `state` lock: nothing of an earlier start (its shell, control, serial login) can be
//! mistaken for the current one's. Lock order: `shell`, then `connecting`, then `state`. `state` is
//! only ever held briefly, never across a wait on the guest: another thread (or the global-timeout
//! watchdog) can always crash, kill or inspect a machine whose command or boot is in progress.

mod commands;
mod conditions;
mod files;
mod lifecycle;
mod network;
mod screen;
mod serial_console;
mod snapshots;
mod units;
mod waits;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::Location;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use attest_machine::{Console, VmControl};
use attest_shell::{BackdoorShell, ShellError};

use crate::config::MachineConfig;
use crate::error::{DriverError, Failure, Result};
use crate::prepare::MachineNetwork;
use crate::serial::SerialShell;
use crate::shared::Shared;

pub use screen::key_for_char;

/// How long the VMM may take to connect its control channel.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long giving a guest its addresses may take.
const NETWORK_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VMM whose channel closed may take to be seen exiting.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// Console lines shown with an error.
const TAIL_LINES: usize = 25;

pub struct Machine {
    name: String,
    config: MachineConfig,
    shared: Arc<Shared>,
    /// The machine (its definition and VM) and its current start.
    state: Mutex<State>,
    shell: Mutex<Option<Shell>>,
    /// Held while a start's control channel connects, so that only one thread connects it.
    connecting: Mutex<()>,
    /// The start whose shell is connected (0: none), readable while a command holds the shell.
    connected: AtomicU64,
    network: MachineNetwork,
    /// The test's snapshots of this machine, by name.
    snapshots: Mutex<HashMap<String, attest_machine::Snapshot>>,
    /// What the test set up on the VMM's side, which a restored VMM is given again.
    host_side: Mutex<HostSide>,
    /// This machine, for the thread that connects to a new start's shell.
    me: Weak<Machine>,
}

struct State {
    machine: attest_machine::Machine,
    start: Start,
}

/// One start of the machine and what belongs to it alone.
#[derive(Default)]
struct Start {
    /// Counts starts (0: never started).
    generation: u64,
    /// Its console; it outlives the VMM, for errors and `get_console_log`.
    console: Option<Console>,
    /// When it happened (or the guest rebooted), for the boot deadline.
    at: Option<Instant>,
    /// The channel of a rebooting guest: kept until its new shell announces itself.
    rebooting: Option<UnixStream>,
    /// A restored guest's shell is idle already: nothing announces it.
    restored: bool,
    /// Why connecting to its shell failed, when a background connect found out.
    connect_failure: Option<String>,
    /// Its shell on the serial console (guests without a backdoor).
    serial: Option<Arc<SerialShell>>,
    /// A first boot that becomes a cached ready machine once it is ready.
    template: Option<attest_machine::snapshot::cache::Builder>,
}

/// The VMM-side settings of the test, in the order made.
#[derive(Default)]
struct HostSide {
    forwards: Vec<attest_machine::PortForward>,
    /// Cards whose link the test took down.
    links_down: Vec<String>,
}

/// A connected backdoor shell and the start it belongs to.
struct Shell {
    generation: u64,
    shell: BackdoorShell,
}

impl Machine {
    pub(crate) fn new(
        config: MachineConfig,
        machine: attest_machine::Machine,
        shared: Arc<Shared>,
        network: MachineNetwork,
        me: Weak<Machine>,
    ) -> Machine {
        Machine {
            name: config.name.clone(),
            config,
            shared,
            state: Mutex::new(State { machine, start: Start::default() }),
            shell: Mutex::new(None),
            connecting: Mutex::new(()),
            connected: AtomicU64::new(0),
            network,
            snapshots: Mutex::new(HashMap::new()),
            host_side: Mutex::new(HostSide::default()),
            me,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Starts the VMM unless it runs already. Never after the global timeout: the watchdog has
    /// stopped everything then (checked under the machine's lock, which the watchdog's kill takes).
    fn start_at(&self, at: &'static Location<'static>) -> Result<()> {
        let started = {
            let mut state = self.state();
            if let Some(timeout) = self.shared.halted() {
                return Err(timeout);
            }
            if state.machine.is_running() {
                return Ok(());
            }
            let first_of_ready = state.start.generation == 0 && self.config.ready.is_some();
            match first_of_ready.then(|| self.start_ready(&mut state)).flatten() {
                Some(started) => started,
                None => {
                    self.shared.log.info(Some(&self.name), "starting vm");
                    let started = state.machine.start().map(|running| running.console().clone());
                    if let Ok(console) = &started {
                        state.begin(console.clone(), false);
                    }
                    started
                }
            }
        };
        // Reported without the lock: a report reads the console tail, which takes it.
        started.map_err(|e| self.broken(at, format!("could not start: {e}")))?;
        self.connect_in_background();
        Ok(())
    }

    /// The machine and its current start, for a moment.
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The current start's number (0: never started).
    fn generation(&self) -> u64 {
        self.state().start.generation
    }

    /// An attest guest's network is configured through its shell; connecting as soon as the guest
    /// is up, instead of at the first command, makes its VLAN addresses there when the boot ends,
    /// as a guest that configures itself would have them. A failure is kept for the next command.
    fn connect_in_background(&self) {
        // For machines on a VLAN: their peers may reach them before any command of the test
        // does. And for a machine restored from the cache, whose shell worked when it was saved:
        // its clock and randomness are set meanwhile, for every machine of `start_all` at once.
        // Otherwise the first command configures the guest (a kernel machine may not even speak
        // the backdoor protocol).
        let on_vlan = self.network.guest_script.is_some() && !self.network.vlans.is_empty();
        if !on_vlan && !self.state().start.restored {
            return;
        }
        let (me, generation) = (self.me.clone(), self.generation());
        let connect = move || me.upgrade().map(|machine| machine.connect_start(Location::caller(), generation));
        if let Err(e) = std::thread::Builder::new().name(format!("connect-{}", self.name)).spawn(connect) {
            // The first command connects instead.
            self.shared.log.info(Some(&self.name), &format!("could not connect in the background: {e}"));
        }
    }

    /// When the latest start (or reboot) happened.
    pub(crate) fn started_at(&self) -> Option<Instant> {
        self.state().start.at
    }

    fn is_running(&self) -> bool {
        self.state().machine.is_running()
    }

    /// The connected backdoor shell, booting the machine and connecting first if needed (as
    /// NixOS does: a command on a machine that is down starts it).
    fn shell(&self, at: &'static Location<'static>) -> Result<ShellGuard<'_>> {
        let mut shell = lock(&self.shell);
        self.start_at(at)?;
        let generation = self.generation();
        self.connect_locked(at, &mut shell, generation)?;
        Ok(ShellGuard(shell))
    }

    /// The background connect of start `generation`: never starts the machine, and gives up if
    /// the machine was stopped or started again meanwhile.
    fn connect_start(&self, at: &'static Location<'static>, generation: u64) -> Result<()> {
        let mut shell = lock(&self.shell);
        if self.generation() != generation || !self.is_running() {
            return Ok(());
        }
        self.connect_locked(at, &mut shell, generation)
    }

    /// Connects the shell of start `generation` unless it is connected, under the shell lock.
    fn connect_locked(&self, at: &'static Location<'static>, shell: &mut Option<Shell>, generation: u64) -> Result<()> {
        if shell.as_ref().is_none_or(|s| s.generation != generation) {
            *shell = None;
            let (failed, restored) = match self.state().in_start(generation) {
                Some(start) => (start.connect_failure.clone(), start.restored),
                None => (None, false),
            };
            if let Some(why) = failed {
                return Err(self.broken(at, why));
            }
            // A restored guest has its addresses already: they are in the snapshot.
            let mut generation = generation;
            let connected = match restored {
                true => self.connect_restored(at),
                false => self.connect_shell(at, generation).and_then(|mut connected| {
                    self.configure_network(at, &mut connected)?;
                    let template = self.state().in_start(generation).and_then(|start| start.template.take());
                    match template {
                        Some(builder) => {
                            let (ready, shell) = self.make_ready(at, connected, builder)?;
                            generation = ready;
                            Ok(shell)
                        }
                        None => Ok(connected),
                    }
                }),
            };
            let connected = connected.inspect_err(|e| {
                let why = match e {
                    DriverError::Broken(failure) | DriverError::Assertion(failure) => failure.message.clone(),
                    other => other.to_string(),
                };
                if let Some(start) = self.state().in_start(generation) {
                    start.connect_failure = Some(why);
                }
            })?;
            *shell = Some(Shell { generation, shell: connected });
            self.connected.store(generation, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Waits for the guest's backdoor shell: the channel, then the marker line.
    fn connect_shell(&self, at: &'static Location<'static>, generation: u64) -> Result<BackdoorShell> {
        let started = self.started_at().unwrap_or_else(Instant::now);
        let deadline = self.shared.wait_deadline().min(started + self.config.boot_timeout);
        let rebooted = self.state().in_start(generation).and_then(|start| start.rebooting.take());
        self.shared.log.nested(Some(&self.name), "waiting for the VM to finish booting", || {
            let stream = match rebooted {
                Some(stream) => stream,
                None => {
                    // Waited on without the machine's lock, so other threads can crash or inspect it.
                    let (channel, exit) = self.take_channel();
                    let no_channel =
                        || self.broken(at, "it has no guest channel left (a previous connect failed)".into());
                    let mut channel = channel.ok_or_else(no_channel)?;
                    let exit = exit.map_err(|e| self.broken(at, e.to_string()))?;
                    let connected = channel.connect(deadline, Some(exit.as_fd()));
                    connected.map_err(|e| self.boot_failed(at, started, &e.to_string()))?
                }
            };
            // The VMM connects the channel while it sets up its devices, so it may still refuse
            // after this: boot_failed asks it first.
            let (shell, _) =
                BackdoorShell::connect(stream, deadline).map_err(|e| self.boot_failed(at, started, &e.to_string()))?;
            self.shared.log.info(
                Some(&self.name),
                &format!("connected to guest root shell after {:.2} seconds", started.elapsed().as_secs_f64()),
            );
            Ok(shell)
        })
    }

    /// Gives an attest guest its addresses and host names, before any command of the test runs.
    fn configure_network(&self, at: &'static Location<'static>, shell: &mut BackdoorShell) -> Result<()> {
        let Some(script) = &self.network.guest_script else { return Ok(()) };
        let deadline = self.shared.wait_deadline().min(Instant::now() + NETWORK_SETUP_TIMEOUT);
        match shell.execute(&format!("exec 2>&1\n{script}"), Some(NETWORK_SETUP_TIMEOUT), deadline) {
            Ok((0, _)) => Ok(()),
            Ok((status, output)) => Err(self.broken(
                at,
                format!(
                    "configuring its network cards failed (exit code {status}): {}",
                    String::from_utf8_lossy(&output).trim()
                ),
            )),
            Err(e) => Err(self.shell_failed(at, "configuring its network cards", e)),
        }
    }

    /// A wait for the guest's shell that ended: the VMM's refusal if it refused to start, else
    /// what was expected of the guest and what happened instead.
    fn boot_failed(&self, at: &'static Location<'static>, started: Instant, what: &str) -> DriverError {
        if let Some(refused) = self.refused(Instant::now() + REFUSAL_GRACE) {
            return refused;
        }
        let waited = started.elapsed();
        self.broken(
            at,
            format!(
                "expected the guest to print \"Spawning backdoor root shell...\" on its virtconsole within {:?} of starting, \
                 but after {waited:.1?}: {what}",
                self.shared.wait_deadline().min(started + self.config.boot_timeout).saturating_duration_since(started)
            ),
        )
    }

    /// The VMM's [`MachineError::VmmRefused`](attest_machine::MachineError) when the latest start's
    /// VMM exited by itself with a failure, waiting for that exit at most until `deadline` (a
    /// channel closes as the VMM dies): for waits that ended before the guest got anywhere.
    pub(crate) fn refused(&self, deadline: Instant) -> Option<DriverError> {
        if let Some(halted) = self.shared.halted() {
            return Some(halted);
        }
        if !self.wait_exit(deadline) {
            return None;
        }
        self.state().machine.vm().and_then(|vm| vm.refusal()).map(DriverError::Machine)
    }

    /// The guest channel of the current start and the VMM's exit watch, to wait on without the
    /// machine's lock.
    fn take_channel(
        &self,
    ) -> (Option<Box<dyn attest_machine::Transport>>, attest_machine::error::Result<std::os::fd::OwnedFd>) {
        let mut state = self.state();
        let vm = state.machine.vm().expect("started before");
        (vm.take_agent(), vm.exit_watch())
    }

    /// The runtime control of the running VM; connected on first use, outside the machine's
    /// lock. A machine that is down is not started for it (NixOS does not either).
    fn control(&self, at: &'static Location<'static>) -> Result<Arc<dyn VmControl>> {
        let _connecting = lock(&self.connecting);
        let (generation, pending, exit) = {
            let mut state = self.state();
            if !state.machine.is_running() {
                drop(state);
                return Err(self.broken(at, "it is not running".into()));
            }
            let generation = state.start.generation;
            let vm = state.machine.vm().expect("running");
            if let Some(control) = vm.connected_control() {
                return Ok(control);
            }
            (generation, vm.take_control(), vm.exit_watch())
        };
        let exit = exit.map_err(|e| self.broken(at, e.to_string()))?;
        let pending = pending.ok_or_else(|| self.broken(at, "its control channel was lost".into()))?;
        let deadline = self.shared.wait_deadline().min(Instant::now() + CONTROL_TIMEOUT);
        match pending(deadline, Some(exit.as_fd())) {
            Ok(control) => {
                let mut state = self.state();
                if state.start.generation == generation {
                    state.machine.vm().expect("started").keep_control(control.clone());
                }
                Ok(control)
            }
            Err(e) => Err(self.broken(at, format!("its {} control channel is unusable: {e}", self.vmm_name()))),
        }
    }

    /// The VMM as users know it ("QEMU").
    fn vmm_name(&self) -> &'static str {
        self.shared.backend.vmm_name()
    }

    /// Everything the console printed, every start of the machine (NixOS's `get_console_log`).
    pub fn get_console_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.console_log_path()).unwrap_or_default()).into_owned()
    }

    /// The machine's console log file, in its state directory.
    pub(crate) fn console_log_path(&self) -> PathBuf {
        self.state().machine.dir().path().join("console.log")
    }

    fn console(&self) -> Option<Console> {
        self.state().start.console.clone()
    }

    fn console_tail(&self) -> Vec<String> {
        let Some(console) = self.console() else { return Vec::new() };
        if !self.is_running() {
            // The VMM's last words (a panic, QEMU's error) arrive just after it exits.
            console.wait_closed(Duration::from_secs(2));
        }
        console.tail(TAIL_LINES)
    }

    /// The test's expectation failed; `with_console` adds the console tail.
    fn assertion(&self, at: &'static Location<'static>, message: String, with_console: bool) -> DriverError {
        if let Some(timeout) = self.shared.halted() {
            return timeout;
        }
        let console_tail = if with_console { self.console_tail() } else { Vec::new() };
        DriverError::Assertion(Box::new(Failure { machine: self.name.clone(), message, location: at, console_tail }))
    }

    /// The machine failed under the test.
    fn broken(&self, at: &'static Location<'static>, message: String) -> DriverError {
        if let Some(timeout) = self.shared.halted() {
            return timeout;
        }
        let mut console_tail = self.console_tail();
        // A long backtrace pushes the panic line itself out of the tail.
        if let Some(panic) = self.console().and_then(|c| c.kernel_panic()) {
            if !console_tail.contains(&panic) {
                console_tail.insert(0, panic);
            }
        }
        DriverError::Broken(Box::new(Failure { machine: self.name.clone(), message, location: at, console_tail }))
    }

    /// A shell error while `what`, as the driver reports it: a guest that died says so.
    fn shell_failed(&self, at: &'static Location<'static>, what: &str, error: ShellError) -> DriverError {
        // A channel closes as its VMM exits: give the exit a moment to be seen (an event, not a poll).
        let closed = matches!(error, ShellError::Closed { .. });
        let dead = closed && self.wait_exit(Instant::now() + REFUSAL_GRACE);
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

impl State {
    /// A new start replaces the last one whole.
    fn begin(&mut self, console: Console, restored: bool) {
        let generation = self.start.generation + 1;
        self.start =
            Start { generation, console: Some(console), at: Some(Instant::now()), restored, ..Start::default() };
    }

    /// The current start, if it is still `generation`.
    fn in_start(&mut self, generation: u64) -> Option<&mut Start> {
        (self.start.generation == generation).then_some(&mut self.start)
    }
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
