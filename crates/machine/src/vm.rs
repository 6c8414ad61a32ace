//! A running machine: the VMM process, its helper daemons and its console, whatever the backend.
//! Dropping a `Vm` kills and reaps all of them. The VMM's stderr goes to the console too, and is
//! kept apart as well: when the VMM refuses to start, its own words are the error
//! ([`Vm::refusal`]).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;

use nix::fcntl::OFlag;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attest_protocol::ExitStatus;

use crate::backend::Backend;
use crate::console::{Console, Echo};
use crate::control::{PendingControl, VmControl};
use crate::error::{MachineError, Result};
use crate::events::{EventSink, MachineEvent, MachineEventSink, VmEvent};
use crate::process::ManagedChild;
use crate::spec::MachineSpec;
use crate::state_dir::MachineDir;
use crate::transport::Transport;

/// How much of the VMM's stderr is kept for [`Vm::refusal`]: its last words, not a whole log.
const STDERR_KEPT: usize = 16 << 10;
/// How long [`Vm::refusal`] waits for the dead VMM's last output to reach the console.
const DRAIN: Duration = Duration::from_secs(2);
/// Console lines a refusal shows besides the VMM's own.
const REFUSAL_TAIL: usize = 20;

pub struct Vm {
    name: String,
    /// The VMM as users know it ("QEMU").
    vmm_name: &'static str,
    vmm: ManagedChild,
    /// The latest of the VMM's stderr, as it also went to the console.
    stderr: Arc<Mutex<Vec<u8>>>,
    helpers: Vec<ManagedChild>,
    console: Console,
    agent: Option<Box<dyn Transport>>,
    control: ControlState,
    /// Set when the VM is being stopped on purpose: its helpers' exits are then no failure.
    stopping: Arc<AtomicBool>,
    /// Hangs up when the VMM exits: a wait can include it instead of asking whether it did.
    exit_fd: OwnedFd,
}

impl Vm {
    /// Starts the machine; `events` hears, from watcher threads, when the VMM exits or a helper
    /// fails. Any thread may call it: processes are forked by [`ManagedChild`]'s spawner thread.
    pub fn start(
        backend: &dyn Backend,
        spec: &MachineSpec,
        dir: &MachineDir,
        echo: Echo,
        events: MachineEventSink,
    ) -> Result<Vm> {
        let stopping = Arc::new(AtomicBool::new(false));
        let events: EventSink = {
            let (machine, stopping) = (spec.name.clone(), stopping.clone());
            Arc::new(move |event| {
                if matches!(event, VmEvent::HelperFailed(_)) && stopping.load(Ordering::SeqCst) {
                    return;
                }
                events(MachineEvent { machine: machine.clone(), event })
            })
        };
        let prepared = backend.prepare(spec, dir, &events)?;
        let log = dir.path().join("console.log");
        let console = Console::new(Some(&log), echo)
            .map_err(MachineError::io(format!("creating the console log {}", log.display())))?;
        let mut command = prepared.command;
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!(?command, "starting {}", backend.name());
        // Close-on-exec, so no child holds the write end: it closes when `on_exit` has run.
        let (exit_fd, exit_writer) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| MachineError::io("creating a pipe")(e.into()))?;
        let on_exit = move |status| {
            events(VmEvent::VmmExited(status));
            drop(exit_writer);
        };
        let mut vmm =
            ManagedChild::spawn(format!("{} ({})", spec.name, backend.name()), &mut command, on_exit).map_err(
                |source| MachineError::Spawn { program: command.get_program().to_string_lossy().into(), source },
            )?;
        if let Some(configure) = prepared.after_spawn {
            // On failure the VMM and helpers are dropped here, which kills them.
            configure(vmm.id())?;
        }
        console.attach_input(vmm.take_stdin().expect("piped stdin"));
        console.attach(vmm.take_stdout().expect("piped stdout"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        console.attach(Tee { inner: vmm.take_stderr().expect("piped stderr"), kept: stderr.clone() });
        let control = match prepared.control {
            Some(pending) => ControlState::Pending(pending),
            None => ControlState::None,
        };
        Ok(Vm {
            name: spec.name.clone(),
            vmm_name: backend.vmm_name(),
            vmm,
            stderr,
            helpers: prepared.helpers,
            console,
            agent: prepared.agent,
            control,
            stopping,
            exit_fd,
        })
    }

    /// An fd that hangs up once the VMM has exited, for waits that should end then (see
    /// [`Transport::connect`]); a duplicate, so it can be waited on without holding the `Vm`.
    pub fn exit_watch(&self) -> Result<OwnedFd> {
        self.exit_fd.try_clone().map_err(MachineError::io("duplicating the VMM's exit pipe"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.vmm.id()
    }

    /// Whether the VMM has exited.
    pub fn has_exited(&mut self) -> bool {
        self.vmm.wait_until(Instant::now()).is_some()
    }

    /// Waits, at most until `deadline`, for the VMM to exit; true if it did.
    pub fn wait_exited(&mut self, deadline: Instant) -> bool {
        self.vmm.wait_until(deadline).is_some()
    }

    /// Why the VMM refused to start, when it exited by itself with a failure: for a caller whose
    /// wait for the guest ended before the guest got anywhere (its channel never connected or
    /// closed before announcing itself), so that the error is the VMM's own message and not the
    /// wait's. `None` while the VMM runs, after it exited with status 0 (a guest that powered off
    /// or panicked with `-no-reboot`), or was killed. It does not wait for the exit: a caller
    /// that saw only the channel close waits on [`Vm::exit_watch`] first.
    pub fn refusal(&mut self) -> Option<MachineError> {
        let status = self.vmm.wait_until(Instant::now())?;
        if !matches!(status, ExitStatus::Code(code) if code != 0) || self.stopping.load(Ordering::SeqCst) {
            return None;
        }
        self.console.wait_closed(DRAIN);
        let kept = self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let stderr: Vec<String> = String::from_utf8_lossy(&kept)
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(Into::into)
            .collect();
        let console_tail =
            self.console.tail(REFUSAL_TAIL).into_iter().filter(|l| !l.is_empty() && !stderr.contains(l)).collect();
        Some(MachineError::VmmRefused { vmm: self.vmm_name, machine: self.name.clone(), status, stderr, console_tail })
    }

    /// The guest command channel, to connect (with [`Vm::exit_watch`]) outside any lock on the `Vm`.
    pub fn take_agent(&mut self) -> Option<Box<dyn Transport>> {
        self.agent.take()
    }

    /// The VMM's control channel (QMP for QEMU), connected on first use, at most until `deadline`.
    pub fn control(&mut self, deadline: Instant) -> Result<Arc<dyn VmControl>> {
        if let Some(pending) = self.take_control() {
            self.control = ControlState::Connected(pending(deadline, Some(self.exit_fd.as_fd()))?);
        }
        match &self.control {
            ControlState::Connected(control) => Ok(control.clone()),
            _ => Err(MachineError::NoControl { machine: self.name.clone() }),
        }
    }

    /// The control channel once connected, without waiting for it.
    pub fn connected_control(&self) -> Option<Arc<dyn VmControl>> {
        match &self.control {
            ControlState::Connected(control) => Some(control.clone()),
            _ => None,
        }
    }

    /// Keeps `control`, connected from [`Vm::take_control`] outside any lock, as this VM's.
    pub fn keep_control(&mut self, control: Arc<dyn VmControl>) {
        self.control = ControlState::Connected(control);
    }

    /// The control channel before it is connected, to connect (with [`Vm::exit_watch`]) outside
    /// any lock on the `Vm`; `None` once taken or connected.
    pub fn take_control(&mut self) -> Option<PendingControl> {
        match std::mem::replace(&mut self.control, ControlState::None) {
            ControlState::Pending(pending) => Some(pending),
            other => {
                self.control = other;
                None
            }
        }
    }

    /// Kills the VMM, then its helpers (which exit with it anyway, and are not failing).
    pub fn kill(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.vmm.kill();
        for helper in &mut self.helpers {
            helper.kill();
        }
    }
}

/// The VMM's stderr on its way to the console, its latest [`STDERR_KEPT`] bytes kept aside.
struct Tee<R> {
    inner: R,
    kept: Arc<Mutex<Vec<u8>>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.extend_from_slice(&buf[..n]);
        let excess = kept.len().saturating_sub(STDERR_KEPT);
        kept.drain(..excess);
        Ok(n)
    }
}

/// The control channel: none, bound but not yet connected, or connected.
enum ControlState {
    None,
    Pending(PendingControl),
    Connected(Arc<dyn VmControl>),
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::{AfterSpawn, Prepared};
    use attest_protocol::ExitStatus;
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A stand-in VMM (`sleep`) with one helper daemon (`sleep`) that reports its exit as a failure,
    /// as virtiofsd does: for the Vm's own bookkeeping only, no guest.
    pub(crate) struct SleepBackend(pub(crate) Configure);

    /// What the stand-in backend's post-spawn step does.
    #[derive(Clone, Copy)]
    pub(crate) enum Configure {
        Nothing,
        Fails,
    }

    impl Backend for SleepBackend {
        fn name(&self) -> &'static str {
            "sleep"
        }

        fn vmm_binary(&self) -> &std::path::Path {
            "/bin/sleep".as_ref()
        }

        fn supports(&self, _: crate::backend::Capability) -> bool {
            false
        }

        fn guest_drivers(&self, _: &MachineSpec) -> Vec<&'static str> {
            Vec::new()
        }

        fn prepare(&self, _: &MachineSpec, _: &MachineDir, events: &EventSink) -> Result<Prepared> {
            let events = events.clone();
            let report = move |status| events(VmEvent::HelperFailed(format!("helper exited ({status})")));
            let helper = ManagedChild::spawn("helper", Command::new("sleep").arg("600"), report).unwrap();
            let mut command = Command::new("sleep");
            command.arg("600");
            let after_spawn: AfterSpawn = match self.0 {
                Configure::Nothing => Box::new(|_| Ok(())),
                Configure::Fails => Box::new(|pid| {
                    Err(MachineError::Unsupported { backend: "sleep", what: format!("configuring pid {pid}") })
                }),
            };
            Ok(Prepared { command, helpers: vec![helper], agent: None, control: None, after_spawn: Some(after_spawn) })
        }
    }

    pub(crate) fn spec(name: &str, kernel: &std::path::Path) -> MachineSpec {
        MachineSpec { memory_mib: 64, ..MachineSpec::new(name, crate::Boot::kernel(kernel, None, "")) }
    }

    /// QEMU and the cached guest kernel, or `None` after printing why the test cannot run here.
    pub(crate) fn qemu_and_kernel() -> Option<(crate::Qemu, attest_image::Kernel)> {
        let Some(binary) = crate::Qemu::find_binary() else {
            eprintln!("SKIP: qemu-system-x86_64 not found");
            return None;
        };
        let Ok(kernel) = attest_image::kernel::locate(None, &attest_image::cache_dir()) else {
            eprintln!("SKIP: no guest kernel (scripts/setup fetches one)");
            return None;
        };
        Some((crate::Qemu { binary, virtiofsd: None, vhost_vsock: None }, kernel))
    }

    fn start(name: &str) -> (Vm, mpsc::Receiver<MachineEvent>, crate::StateDir) {
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, name).unwrap();
        let (tx, rx) = mpsc::channel();
        let sink: MachineEventSink = Arc::new(move |event| drop(tx.send(event)));
        let vm =
            Vm::start(&SleepBackend(Configure::Nothing), &spec(name, "/nonexistent".as_ref()), &dir, Echo::Off, sink)
                .unwrap();
        (vm, rx, state)
    }

    #[test]
    fn typing_into_the_serial_console_reaches_the_guest() {
        let Some((qemu, kernel)) = qemu_and_kernel() else { return };
        let Ok(busybox) = attest_image::find_busybox() else {
            return eprintln!("SKIP: no static busybox (scripts/setup installs busybox-static)");
        };
        let scratch = tempfile::tempdir().unwrap();
        // A guest whose only program is a shell on the serial console.
        let initramfs = attest_image::Initramfs::new()
            .dir("bin")
            .dir("dev")
            .char_device("dev/console", 5, 1)
            .file("bin/busybox", std::fs::read(&busybox).unwrap(), 0o755)
            .symlink("bin/sh", "busybox")
            .file("init", b"#!/bin/sh\necho console-shell-ready\nexec /bin/sh\n".to_vec(), 0o755)
            .write_cached(scratch.path())
            .unwrap();
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, "typed").unwrap();
        let mut spec = spec("typed", &kernel.path);
        spec.boot = crate::Boot::kernel(&kernel.path, Some(initramfs), "console=ttyS0 panic=-1 quiet rdinit=/init");
        // A bzImage needs room to decompress itself; with 64 MiB it resets before printing anything.
        spec.memory_mib = 256;
        let vm = Vm::start(&qemu, &spec, &dir, Echo::Off, Arc::new(|_| {})).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let wait = |pattern: &str| vm.console().wait_for(&regex::bytes::Regex::new(pattern).unwrap(), deadline);
        wait("console-shell-ready").unwrap_or_else(|e| panic!("{e}; console: {:?}", vm.console().tail(20)));
        vm.console().send(b"echo $((6 * 7))\n").unwrap();
        wait(r"\n42\r?\n").unwrap_or_else(|e| panic!("{e}; console: {:?}", vm.console().tail(20)));
    }

    #[test]
    fn a_qemu_machine_is_controlled_over_qmp() {
        let Some((qemu, kernel)) = qemu_and_kernel() else { return };
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, "controlled").unwrap();
        let mut vm = Vm::start(&qemu, &spec("controlled", &kernel.path), &dir, Echo::Off, Arc::new(|_| {})).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let control = vm.control(deadline).unwrap();
        let status = control.monitor_command("info status", deadline).unwrap();
        assert!(status.contains("running"), "{status}");
        control.pause(deadline).unwrap();
        let again = vm.control(deadline).unwrap();
        assert!(Arc::ptr_eq(&control, &again), "one connection per machine, kept");
        assert_eq!(again.wait_for_event(&|e| e.name == "STOP", deadline).unwrap().name, "STOP");
    }

    #[test]
    fn a_vmm_that_refuses_to_start_is_reported_in_its_own_words() {
        let Some((qemu, kernel)) = qemu_and_kernel() else { return };
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, "huge").unwrap();
        // Far more memory than any host has: QEMU cannot map it and exits at once.
        let spec = MachineSpec { memory_mib: 99_999_999, ..spec("huge", &kernel.path) };
        let mut vm = Vm::start(&qemu, &spec, &dir, Echo::Off, Arc::new(|_| {})).unwrap();
        assert!(vm.wait_exited(Instant::now() + Duration::from_secs(30)), "QEMU exits by itself");
        let refusal = vm.refusal().expect("a refusal").to_string();
        assert!(
            refusal.starts_with("QEMU refused to start: qemu-system-x86_64: cannot set up guest memory 'pc.ram'"),
            "{refusal}"
        );
        assert!(refusal.contains("(machine huge: QEMU exited (exit status 1) before the guest connected"), "{refusal}");

        // A VMM killed on purpose refused nothing.
        let (mut sleeping, _events, _state) = start("sleeping");
        sleeping.kill();
        assert!(sleeping.refusal().is_none());
    }

    #[test]
    fn a_missing_capability_names_the_backend_and_the_capability() {
        use crate::backend::{require, Capability};
        let err = require(&SleepBackend(Configure::Nothing), Capability::Snapshots).unwrap_err();
        assert_eq!(err.to_string(), "the sleep backend does not support snapshots");
        let qemu = crate::Qemu { binary: "qemu".into(), virtiofsd: None, vhost_vsock: None };
        assert!(require(&qemu, Capability::Screenshot).is_ok());
    }

    #[test]
    fn a_failing_post_spawn_step_fails_the_start_and_leaves_no_process() {
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, "rest").unwrap();
        let started =
            Vm::start(&SleepBackend(Configure::Fails), &spec("rest", "/x".as_ref()), &dir, Echo::Off, Arc::new(|_| {}));
        let err = started.err().expect("the start fails");
        let pid = err.to_string().rsplit(' ').next().unwrap().to_string();
        assert!(err.to_string().contains("configuring pid"), "{err}");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the VMM {pid} was killed and reaped");
    }

    #[test]
    fn a_helper_dying_under_a_running_vm_is_reported_with_the_machines_name() {
        let (vm, events, _state) = start("server");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.helpers[0].id() as i32), nix::sys::signal::SIGKILL)
            .unwrap();
        let event = events.recv_timeout(Duration::from_secs(10)).expect("the helper's exit is an event");
        assert_eq!(event.machine, "server");
        assert_eq!(event.event, VmEvent::HelperFailed("helper exited (killed by signal 9)".into()));
    }

    #[test]
    fn stopping_a_vm_on_purpose_reports_its_exit_and_no_helper_failure() {
        let (mut vm, events, _state) = start("client");
        let started = Instant::now();
        vm.kill();
        drop(vm);
        // Every sender lives in a watcher thread, which ends after reporting: this sees them all.
        let seen: Vec<VmEvent> = events.iter().map(|e| e.event).collect();
        assert_eq!(seen, [VmEvent::VmmExited(ExitStatus::Signal(9))]);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
