//! A test's machine: its state, its locks, and the channels every part of the machine API goes
//! through: the backdoor shell (connected on the first command of each start), QMP (connected on
//! first use) and the console, plus how failures are reported. The API itself is in the sibling
//! modules: lifecycle, commands, units, waits, files, screen.
//!
//! Lock order: `shell`, then `qmp`, then `vm`. `vm` is only ever held briefly, never across a wait
//! on the guest: another thread (or the global-timeout watchdog) can always crash, kill or inspect
//! a machine whose command or boot is in progress.

mod commands;
mod conditions;
mod files;
mod lifecycle;
mod network;
mod screen;
mod serial_console;
mod units;
mod waits;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::Location;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use attest_machine::backend::Control;
use attest_machine::qmp::Qmp;
use attest_machine::Console;
use attest_network::VlanNic;
use attest_shell::{BackdoorShell, ShellError};

use crate::config::MachineConfig;
use crate::driver::Shared;
use crate::error::{DriverError, Failure, Result};

pub use screen::key_for_char;

/// How long the VMM may take to connect its QMP monitor.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
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
    vm: Mutex<attest_machine::Machine>,
    shell: Mutex<Option<Shell>>,
    /// QMP of the start it was connected in.
    qmp: Mutex<Option<(u64, Arc<Qmp>)>>,
    /// The channel of a rebooting guest, and its start: kept until its new shell announces itself.
    rebooting: Mutex<Option<(u64, UnixStream)>>,
    /// Counts starts (0: never started); a shell or QMP connection belongs to one start.
    generation: AtomicU64,
    /// The start whose shell is connected (0: none), readable while a command holds the shell.
    connected: AtomicU64,
    /// The console of the latest start; it outlives the VMM, for errors and `get_console_log`.
    console: Mutex<Option<Console>>,
    /// When the latest start (or reboot) happened, for the boot deadline.
    started: Mutex<Option<Instant>>,
    network: MachineNetwork,
    /// Why connecting to the shell of a start failed, when a background connect found out.
    connect_failure: Mutex<Option<(u64, String)>>,
    /// The shell on the serial console of the start it belongs to (guests without a backdoor).
    serial: Mutex<Option<(u64, Arc<crate::serial::SerialShell>)>>,
    /// This machine, for the thread that connects to a new start's shell.
    me: Weak<Machine>,
}

/// A machine's place on the test's VLANs.
pub(crate) struct MachineNetwork {
    /// Its VLAN cards (none for a start script's machine, whose script chose them).
    pub vlans: Vec<VlanNic>,
    /// Commands that give an attest guest its addresses, run on each new shell.
    pub guest_script: Option<String>,
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
            vm: Mutex::new(machine),
            shell: Mutex::new(None),
            qmp: Mutex::new(None),
            rebooting: Mutex::new(None),
            generation: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            console: Mutex::new(None),
            started: Mutex::new(None),
            network,
            connect_failure: Mutex::new(None),
            serial: Mutex::new(None),
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
            let mut vm = lock(&self.vm);
            if let Some(timeout) = self.shared.halted() {
                return Err(timeout);
            }
            if vm.is_running() {
                return Ok(());
            }
            self.shared.log.info(Some(&self.name), "starting vm");
            vm.start().map(|running| running.console().clone())
        };
        // Reported without the lock: a report reads the console tail, which takes it.
        let console = started.map_err(|e| self.broken(at, format!("could not start: {e}")))?;
        *lock(&self.console) = Some(console);
        *lock(&self.started) = Some(Instant::now());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.connect_in_background();
        Ok(())
    }

    /// An attest guest's network is configured through its shell; connecting as soon as the guest
    /// is up, instead of at the first command, makes its VLAN addresses there when the boot ends,
    /// as a guest that configures itself would have them. A failure is kept for the next command.
    fn connect_in_background(&self) {
        // Only for machines on a VLAN: their peers may reach them before any command of the test
        // does. Otherwise the first command configures the guest (a kernel machine may not even
        // speak the backdoor protocol).
        if self.network.guest_script.is_none() || self.network.vlans.is_empty() {
            return;
        }
        let (me, generation) = (self.me.clone(), self.generation.load(Ordering::SeqCst));
        let connect = move || me.upgrade().map(|machine| machine.connect_start(Location::caller(), generation));
        if let Err(e) = std::thread::Builder::new().name(format!("connect-{}", self.name)).spawn(connect) {
            // The first command connects instead.
            self.shared.log.info(Some(&self.name), &format!("could not connect in the background: {e}"));
        }
    }

    /// When the latest start (or reboot) happened.
    pub(crate) fn started_at(&self) -> Option<Instant> {
        *lock(&self.started)
    }

    fn is_running(&self) -> bool {
        lock(&self.vm).is_running()
    }

    /// The connected backdoor shell, booting the machine and connecting first if needed (as
    /// NixOS does: a command on a machine that is down starts it).
    fn shell(&self, at: &'static Location<'static>) -> Result<ShellGuard<'_>> {
        let mut shell = lock(&self.shell);
        self.start_at(at)?;
        let generation = self.generation.load(Ordering::SeqCst);
        self.connect_locked(at, &mut shell, generation)?;
        Ok(ShellGuard(shell))
    }

    /// The background connect of start `generation`: never starts the machine, and gives up if
    /// the machine was stopped or started again meanwhile.
    fn connect_start(&self, at: &'static Location<'static>, generation: u64) -> Result<()> {
        let mut shell = lock(&self.shell);
        if self.generation.load(Ordering::SeqCst) != generation || !self.is_running() {
            return Ok(());
        }
        self.connect_locked(at, &mut shell, generation)
    }

    /// Connects the shell of start `generation` unless it is connected, under the shell lock.
    fn connect_locked(&self, at: &'static Location<'static>, shell: &mut Option<Shell>, generation: u64) -> Result<()> {
        if shell.as_ref().is_none_or(|s| s.generation != generation) {
            *shell = None;
            if let Some((_, why)) = lock(&self.connect_failure).as_ref().filter(|(of, _)| *of == generation) {
                return Err(self.broken(at, why.clone()));
            }
            let connected = self.connect_shell(at, generation).and_then(|mut connected| {
                self.configure_network(at, &mut connected)?;
                Ok(connected)
            });
            let connected = connected.inspect_err(|e| {
                let why = match e {
                    DriverError::Broken(failure) | DriverError::Assertion(failure) => failure.message.clone(),
                    other => other.to_string(),
                };
                *lock(&self.connect_failure) = Some((generation, why));
            })?;
            *shell = Some(Shell { generation, shell: connected });
            self.connected.store(generation, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Waits for the guest's backdoor shell: the channel, then the marker line.
    fn connect_shell(&self, at: &'static Location<'static>, generation: u64) -> Result<BackdoorShell> {
        let started = lock(&self.started).unwrap_or_else(Instant::now);
        let deadline = self.shared.wait_deadline().min(started + self.config.boot_timeout);
        self.shared.log.nested(Some(&self.name), "waiting for the VM to finish booting", || {
            let rebooted = lock(&self.rebooting).take().filter(|(of, _)| *of == generation).map(|(_, stream)| stream);
            let stream = match rebooted {
                Some(stream) => stream,
                None => {
                    // Waited on without the machine's lock, so other threads can crash or inspect it.
                    let (channel, exit) = {
                        let mut vm = lock(&self.vm);
                        let vm = vm.vm().expect("started before");
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
        lock(&self.vm).vm().and_then(|vm| vm.refusal()).map(DriverError::Machine)
    }

    /// The QMP connection of the running VM; connected on first use, outside the machine's lock.
    /// A machine that is down is not started for it (NixOS does not either).
    fn qmp(&self, at: &'static Location<'static>) -> Result<Arc<Qmp>> {
        let mut cached = lock(&self.qmp);
        let generation = self.generation.load(Ordering::SeqCst);
        match &*cached {
            Some((of, qmp)) if *of == generation && self.is_running() => return Ok(qmp.clone()),
            _ => *cached = None,
        }
        let (pending, exit) = {
            let mut vm = lock(&self.vm);
            if !vm.is_running() {
                (None, None)
            } else {
                let vm = vm.vm().expect("running");
                (vm.take_control(), Some(vm.exit_watch()))
            }
        };
        let exit = exit.ok_or_else(|| self.broken(at, "it is not running".into()))?;
        let exit = exit.map_err(|e| self.broken(at, e.to_string()))?;
        let pending = pending.ok_or_else(|| self.broken(at, "its QMP connection was lost".into()))?;
        let deadline = self.shared.wait_deadline().min(Instant::now() + QMP_TIMEOUT);
        match pending.connect(deadline, Some(exit.as_fd())) {
            Ok(Control::Qmp(qmp)) => {
                *cached = Some((generation, qmp.clone()));
                Ok(qmp)
            }
            Err(e) => Err(self.broken(at, format!("its QMP monitor is unusable: {e}"))),
        }
    }

    /// Everything the console printed, every start of the machine (NixOS's `get_console_log`).
    pub fn get_console_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.console_log_path()).unwrap_or_default()).into_owned()
    }

    /// The machine's console log file, in its state directory.
    pub(crate) fn console_log_path(&self) -> PathBuf {
        lock(&self.vm).dir().path().join("console.log")
    }

    fn console(&self) -> Option<Console> {
        lock(&self.console).clone()
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
        let dead = !self.is_running();
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
