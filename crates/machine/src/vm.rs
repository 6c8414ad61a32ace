//! A running machine: the VMM process, its helper daemons and its console, whatever the backend.
//! Dropping a `Vm` kills and reaps all of them.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::Backend;
use crate::console::Console;
use crate::error::{MachineError, Result};
use crate::events::{EventSink, MachineEvent, MachineEventSink, VmEvent};
use crate::process::ManagedChild;
use crate::spec::MachineSpec;
use crate::state_dir::MachineDir;
use crate::transport::Transport;

pub struct Vm {
    name: String,
    vmm: ManagedChild,
    helpers: Vec<ManagedChild>,
    console: Console,
    agent: Option<Box<dyn Transport>>,
    /// Set when the VM is being stopped on purpose: its helpers' exits are then no failure.
    stopping: Arc<AtomicBool>,
}

impl Vm {
    /// Starts the machine; `events` hears, from watcher threads, when the VMM exits or a helper
    /// fails. Call from the main thread (see [`ManagedChild::spawn`]).
    pub fn start(
        backend: &dyn Backend,
        spec: &MachineSpec,
        dir: &MachineDir,
        echo_console: bool,
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
        let console = Console::new(Some(&log), echo_console)
            .map_err(MachineError::io(format!("creating the console log {}", log.display())))?;
        let mut command = prepared.command;
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!(?command, "starting {}", backend.name());
        let on_exit = move |status| events(VmEvent::VmmExited(status));
        let mut vmm =
            ManagedChild::spawn(format!("{} ({})", spec.name, backend.name()), &mut command, on_exit).map_err(
                |source| MachineError::Spawn { program: command.get_program().to_string_lossy().into(), source },
            )?;
        console.attach(vmm.take_stdout().expect("piped stdout"));
        console.attach(vmm.take_stderr().expect("piped stderr"));
        Ok(Vm { name: spec.name.clone(), vmm, helpers: prepared.helpers, console, agent: prepared.agent, stopping })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    pub fn take_agent(&mut self) -> Option<Box<dyn Transport>> {
        self.agent.take()
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

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::backend::Prepared;
    use attest_protocol::ExitStatus;
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A stand-in VMM (`sleep`) with one helper daemon (`sleep`) that reports its exit as a failure,
    /// as virtiofsd does: for the Vm's own bookkeeping only, no guest.
    struct SleepBackend;

    impl Backend for SleepBackend {
        fn name(&self) -> &'static str {
            "sleep"
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
            Ok(Prepared { command, helpers: vec![helper], agent: None })
        }
    }

    fn start(name: &str) -> (Vm, mpsc::Receiver<MachineEvent>, crate::StateDir) {
        let state = crate::StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, name).unwrap();
        let spec = MachineSpec {
            name: name.into(),
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: 64,
            cpus: 1,
            accel: Accel::Tcg,
            shares: Vec::new(),
            nics: Vec::new(),
            agent_port: None,
        };
        let (tx, rx) = mpsc::channel();
        let sink: MachineEventSink = Arc::new(move |event| drop(tx.send(event)));
        (Vm::start(&SleepBackend, &spec, &dir, false, sink).unwrap(), rx, state)
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
