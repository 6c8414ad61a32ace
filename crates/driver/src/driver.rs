//! The driver: it owns a test's named machines and everything they run on the host. It prepares
//! them all before any boots (so a bad definition fails in a second), starts them in parallel,
//! enforces the global timeout, records subtests, and on drop stops every VM (gracefully, then by
//! force) and removes their state unless asked to keep it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use attest_machine::accel::AccelRequest;
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::{Accel, Backend, Echo, MachineEventSink, Qemu, StateDir};

use attest_network::{Networks, Plan};

use crate::conditions::Report;
use crate::config::{BackendKind, MachineConfig, NetworkMode, TestConfig};
use crate::error::{DriverError, Result};
use crate::log::{Log, SubtestRecord};
use crate::machine::Machine;
use crate::prepare;
use crate::shared::Shared;
use attest_machine::snapshot::cache::SnapshotCache;

/// How the driver runs, beyond the test's definition.
#[derive(Clone)]
pub struct DriverOptions {
    /// Keep the machines' state directories (NixOS's `--keep-vm-state`).
    pub keep_vm_state: bool,
    /// Where screenshots, copied files and console logs go, kept after the test. When `None`:
    /// `$ATTEST_OUT_DIR` if set, else a temporary directory removed with the driver.
    pub out_dir: Option<PathBuf>,
    pub log: Log,
    /// Boot every machine cold: ignore the cache of ready machines (`attest run --fresh`).
    pub fresh: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions { keep_vm_state: false, out_dir: None, log: Log::stderr(), fresh: false }
    }
}

pub struct Driver {
    /// Shared with the global-timeout watchdog; a script may add machines while the test runs.
    machines: Arc<RwLock<Vec<Arc<Machine>>>>,
    shared: Arc<Shared>,
    accel: Accel,
    cache: PathBuf,
    /// Dropping it stops the watchdog.
    _watchdog: mpsc::Sender<()>,
    /// The VLANs' switches or TAP namespace; dropped after every machine has stopped.
    networks: Mutex<Networks>,
    /// Kept until every machine is gone.
    _out_dir: Option<tempfile::TempDir>,
    state: StateDir,
}

impl Driver {
    pub fn new(config: TestConfig, options: DriverOptions) -> Result<Driver> {
        let started = Instant::now();
        config.validate()?;
        let qemu_binary = Qemu::find_binary().ok_or_else(|| {
            DriverError::Config(
                "qemu-system-x86_64 not found: install Debian's qemu-system-x86 (or set ATTEST_QEMU)".into(),
            )
        })?;
        let cache = attest_image::cache_dir();
        let accel = kvm_probe::choose(AccelRequest::Auto, &qemu_binary, &cache)?;
        options.log.info(None, &format!("accelerator: {accel}"));
        let backend: Arc<dyn Backend + Send + Sync> =
            Arc::new(Qemu { binary: qemu_binary, virtiofsd: None, vhost_vsock: None });

        let state = StateDir::create(options.keep_vm_state).map_err(DriverError::io("creating the state directory"))?;
        if options.keep_vm_state {
            options.log.info(None, &format!("keeping the machines' state in {}", state.path().display()));
        }
        let chosen = options.out_dir.clone().or_else(|| std::env::var_os("ATTEST_OUT_DIR").map(PathBuf::from));
        let (out_dir, owned_out_dir) = match &chosen {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(DriverError::io(format!("creating {}", dir.display())))?;
                (dir.clone(), None)
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("attest-out-")
                    .tempdir()
                    .map_err(DriverError::io("creating an output directory"))?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        options.log.info(None, &format!("output directory: {}", out_dir.display()));
        let shared_dir = state.path().join("shared-xchg");
        let scratch = state.path().join("scratch");
        for dir in [&shared_dir, &scratch] {
            std::fs::create_dir_all(dir).map_err(DriverError::io(format!("creating {}", dir.display())))?;
        }
        let deadline = started + config.global_timeout;
        let shared = Arc::new(Shared {
            log: options.log.clone(),
            deadline,
            global_timeout: config.global_timeout,
            timed_out: AtomicBool::new(false),
            network_failure: Mutex::new(None),
            out_dir,
            shared_dir: shared_dir.clone(),
            scratch,
            backend: backend.clone(),
            snapshot_cache: (!options.fresh).then(|| SnapshotCache::new(&cache)),
        });

        let machines = Arc::new(RwLock::new(Vec::new()));
        let networks = start_networks(&config, state.path(), &shared, &machines)?;
        let watchdog = spawn_watchdog(shared.clone(), machines.clone());
        let driver = Driver {
            machines,
            shared,
            accel: accel.accel,
            cache,
            _watchdog: watchdog,
            networks: Mutex::new(networks),
            _out_dir: owned_out_dir,
            state,
        };
        for machine in config.machines {
            driver.add_machine(machine)?;
        }
        Ok(driver)
    }

    /// Prepares one more machine (NixOS's `create_machine`); it starts when asked to, as any other.
    pub fn add_machine(&self, config: MachineConfig) -> Result<Arc<Machine>> {
        check_backend(&config)?;
        if let Some(problem) = config.problems().into_iter().next() {
            return Err(problem.into());
        }
        let mut machines = self.machines.write().unwrap_or_else(|p| p.into_inner());
        if machines.iter().any(|m| m.name() == config.name) {
            return Err(DriverError::Config(format!("two machines are named {:?}", config.name)));
        }
        let backend = self.shared.backend.clone();
        let mut networks = lock(&self.networks);
        if networks.plan().machine(&config.name).is_none() {
            let vlans: Vec<u32> = networks.plan().vlans.iter().map(|v| u32::from(*v)).collect();
            networks.add_machine(&config.name, &config.joins(&vlans))?;
        }
        let cx = prepare::Context {
            backend: backend.as_ref(),
            accel: self.accel,
            cache: &self.cache,
            shared_dir: &self.shared.shared_dir,
            log: &self.shared.log,
            networks: &networks,
        };
        let dir = self.state.machine_dir(machines.len(), &config.name)?;
        let spec = prepare::spec(&config, &cx, &dir)?;
        let network = prepare::network(&config, &networks);
        drop(networks);
        let (log, name) = (self.shared.log.clone(), config.name.clone());
        let echo = Echo::Lines(Arc::new(move |line: &str| log.serial(&name, line)));
        let events: MachineEventSink = Arc::new(|event| tracing::debug!(?event, "machine event"));
        let machine = attest_machine::Machine::new(spec, backend, dir, events, echo);
        let shared = self.shared.clone();
        let machine = Arc::new_cyclic(|me| Machine::new(config, machine, shared, network, me.clone()));
        machines.push(machine.clone());
        Ok(machine)
    }

    /// The machine named `name`.
    pub fn machine(&self, name: &str) -> Result<Arc<Machine>> {
        let machines = self.machines();
        machines.iter().find(|m| m.name() == name).cloned().ok_or_else(|| DriverError::NoSuchMachine {
            name: name.into(),
            known: machines.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The machines, in the order they were defined.
    pub fn machines(&self) -> Vec<Arc<Machine>> {
        self.machines.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts every machine; they boot in parallel (each start returns before its guest is up).
    pub fn start_all(&self) -> Result<()> {
        self.shared.log.nested(None, "starting all VMs", || self.machines().iter().try_for_each(|m| m.start()))
    }

    /// Checks the declared conditions of every machine that has some, all machines at once (a
    /// thread each), and returns each machine's report in definition order.
    pub fn check_conditions(&self) -> Vec<(Arc<Machine>, Result<Report>)> {
        let machines: Vec<_> = self.machines().into_iter().filter(|m| !m.config().conditions.is_empty()).collect();
        std::thread::scope(|scope| {
            let checks: Vec<_> =
                machines.iter().map(|m| scope.spawn(|| m.check_conditions(&m.config().conditions))).collect();
            let reports = checks.into_iter().map(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            machines.iter().cloned().zip(reports).collect()
        })
    }

    /// Waits until every machine has powered off.
    pub fn join_all(&self) -> Result<()> {
        self.shared.log.nested(None, "waiting for all VMs to finish", || {
            self.machines().iter().try_for_each(|m| m.wait_for_shutdown())
        })
    }

    /// Runs `body` as a named subtest: logged as a block, and recorded (with its error, if any)
    /// for the JUnit report.
    pub fn subtest<T>(&self, name: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = self.begin_subtest(name);
        let result = body();
        self.end_subtest(name, started, result.as_ref().err().map(|e| e.to_string()));
        result
    }

    /// Opens a subtest on this thread, for callers that cannot pass a closure (a script's
    /// `with subtest(…)`); [`Driver::end_subtest`] closes and records it.
    pub fn begin_subtest(&self, name: &str) -> Instant {
        self.shared.log.begin(None, &format!("subtest: {name}"))
    }

    pub fn end_subtest(&self, name: &str, started: Instant, failure: Option<String>) {
        self.shared.log.end(&format!("subtest: {name}"), started);
        if let Some(failure) = &failure {
            self.shared.log.info(None, &format!("!!! Test \"{name}\" failed with error: {failure}"));
        }
        self.shared.log.record_subtest(SubtestRecord { name: name.into(), duration: started.elapsed(), failure });
    }

    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// When the global timeout expires.
    pub fn global_deadline(&self) -> Instant {
        self.shared.deadline
    }

    pub fn global_timeout(&self) -> Duration {
        self.shared.global_timeout
    }

    /// Whether the global timeout has expired (and every machine was stopped).
    pub fn timed_out(&self) -> bool {
        self.shared.timed_out().is_some()
    }

    /// The test's VLANs and every machine's place on them.
    pub fn network_plan(&self) -> Plan {
        lock(&self.networks).plan().clone()
    }

    /// How the VLANs are carried, and their switches' sockets (switch mode) or namespace (tap mode).
    pub fn with_networks<T>(&self, look: impl FnOnce(&Networks) -> T) -> T {
        look(&lock(&self.networks))
    }

    /// Where screenshots and copied files go.
    pub fn out_dir(&self) -> &Path {
        &self.shared.out_dir
    }

    /// The run's state directory (sockets, console logs, overlays).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Writes the JUnit report of the subtests so far, with `failure` as the test's own error.
    pub fn write_junit(&self, path: &Path, suite: &str, failure: Option<&DriverError>) -> Result<()> {
        let failure = failure.map(|e| e.to_string());
        crate::log::write_junit(path, suite, &self.shared.log.subtests(), failure.as_deref())
            .map_err(DriverError::io(format!("writing {}", path.display())))
    }
}

impl Driver {
    /// Stops every machine in parallel, gracefully then by force, and keeps their console logs
    /// with the test's output. Dropping the driver does this too; a script runner calls it as soon
    /// as the script ends, so that calls still running on other threads end with it.
    pub fn stop_all(&self) {
        let machines = self.machines();
        std::thread::scope(|scope| {
            for machine in &machines {
                scope.spawn(|| machine.stop());
            }
        });
        for machine in &machines {
            let copy = self.shared.out_dir.join(format!("{}-console.log", machine.name()));
            std::fs::copy(machine.console_log_path(), copy).ok();
        }
    }
}

impl Drop for Driver {
    /// Whatever happened, no machine outlives the driver.
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Only QEMU runs machines today.
fn check_backend(machine: &MachineConfig) -> Result<()> {
    if machine.backend != BackendKind::Qemu {
        return Err(DriverError::Config(format!(
            "machine {}: the {:?} backend is not available yet; use backend = \"qemu\"",
            machine.name, machine.backend
        )));
    }
    Ok(())
}

/// Plans the test's VLANs and starts what carries them. A switch that dies later stops every
/// machine, so that whatever waits on one ends with the switch's exit instead of its own timeout.
fn start_networks(
    config: &TestConfig,
    dir: &Path,
    shared: &Arc<Shared>,
    machines: &Arc<RwLock<Vec<Arc<Machine>>>>,
) -> Result<Networks> {
    let plan = config.plan()?;
    if !config.vlans.is_empty() {
        let how = match config.network {
            NetworkMode::Switch => "a vde_switch each",
            NetworkMode::Tap => "bridges and TAP devices in a user+net namespace",
        };
        shared.log.info(None, &format!("VLANs {:?}: {how}", plan.vlans));
    }
    let (shared, machines) = (Arc::downgrade(shared), Arc::downgrade(machines));
    let on_failure = move |why: String| {
        let (Some(shared), Some(machines)) = (shared.upgrade(), machines.upgrade()) else { return };
        shared.log.info(None, &format!("!!! {why}: stopping every machine"));
        *shared.network_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        machines.read().unwrap_or_else(|p| p.into_inner()).iter().for_each(|m| m.kill());
    };
    Ok(Networks::start(plan, config.network, dir, on_failure)?)
}

/// Kills every machine when the global timeout expires, so whatever waits on one ends now.
fn spawn_watchdog(shared: Arc<Shared>, machines: Arc<RwLock<Vec<Arc<Machine>>>>) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let left = shared.deadline.saturating_duration_since(Instant::now());
        if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(left) {
            shared.timed_out.store(true, Ordering::SeqCst);
            shared.log.info(
                None,
                &format!("!!! the global timeout of {:?} expired: stopping every machine", shared.global_timeout),
            );
            machines.read().unwrap_or_else(|p| p.into_inner()).iter().for_each(|m| m.kill());
        }
    });
    stop
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
