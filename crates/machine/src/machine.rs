//! A named machine that can be started, stopped and started again (the NixOS driver's
//! `shutdown(); start()`): each start builds a fresh [`Vm`] from the same definition, in the same
//! state directory, whose console log it appends to.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::console::Echo;
use crate::error::Result;
use crate::events::MachineEventSink;
use crate::spec::MachineSpec;
use crate::state_dir::MachineDir;
use crate::vm::Vm;

pub struct Machine {
    spec: MachineSpec,
    backend: Arc<dyn Backend + Send + Sync>,
    dir: MachineDir,
    events: MachineEventSink,
    echo: Echo,
    vm: Option<Vm>,
}

impl Machine {
    pub fn new(
        spec: MachineSpec,
        backend: Arc<dyn Backend + Send + Sync>,
        dir: MachineDir,
        events: MachineEventSink,
        echo: Echo,
    ) -> Self {
        Machine { spec, backend, dir, events, echo, vm: None }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    /// The definition, to change before the next start.
    pub fn spec_mut(&mut self) -> &mut MachineSpec {
        &mut self.spec
    }

    pub fn dir(&self) -> &MachineDir {
        &self.dir
    }

    /// Starts the machine unless it runs already, and returns its running VM.
    pub fn start(&mut self) -> Result<&mut Vm> {
        if !self.is_running() {
            self.vm = None;
            let vm = Vm::start(self.backend.as_ref(), &self.spec, &self.dir, self.echo.clone(), self.events.clone())?;
            self.vm = Some(vm);
        }
        Ok(self.vm.as_mut().expect("started above"))
    }

    /// Whether the VMM of the latest start is still running.
    pub fn is_running(&mut self) -> bool {
        self.vm.as_mut().is_some_and(|vm| !vm.has_exited())
    }

    /// The VM of the latest start, running or not (its console outlives it).
    pub fn vm(&mut self) -> Option<&mut Vm> {
        self.vm.as_mut()
    }

    /// Stops the machine at once: the VMM and its helpers are killed. (A graceful shutdown asks the
    /// guest first; that belongs to the driver, which knows the guest.) Its console stays readable.
    pub fn kill(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.kill();
        }
    }

    /// Waits, at most until `deadline`, for the VMM to exit by itself (e.g. after the guest powered
    /// off); true if it did.
    pub fn wait_exited(&mut self, deadline: Instant) -> bool {
        self.vm.as_mut().is_none_or(|vm| vm.wait_exited(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{MachineEvent, VmEvent};
    use crate::vm::tests::{qemu_and_kernel, spec, Configure, SleepBackend};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_machine_starts_again_after_it_stopped() {
        let state = crate::StateDir::create(false).unwrap();
        let (tx, rx) = mpsc::channel::<MachineEvent>();
        let sink: MachineEventSink = Arc::new(move |event| drop(tx.send(event)));
        let dir = state.machine_dir(0, "server").unwrap();
        let mut machine = Machine::new(
            spec("server", "/nonexistent".as_ref()),
            Arc::new(SleepBackend(Configure::Nothing)),
            dir,
            sink,
            Echo::Off,
        );
        assert!(!machine.is_running());

        let first = machine.start().unwrap().pid();
        assert_eq!(machine.start().unwrap().pid(), first, "start on a running machine keeps it");
        assert!(machine.is_running());
        machine.kill();
        assert!(!machine.is_running());
        let exit = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            (exit.machine.as_str(), exit.event.clone()),
            ("server", VmEvent::VmmExited(attest_protocol::ExitStatus::Signal(9)))
        );

        let second = machine.start().unwrap().pid();
        assert_ne!(second, first, "a fresh VM");
        assert!(machine.is_running());
        assert!(!machine.wait_exited(Instant::now() + Duration::from_millis(50)));
    }

    /// A real QEMU binds its channel and QMP sockets in the machine's directory on every start.
    #[test]
    fn a_qemu_machine_starts_again_in_the_same_directory() {
        let Some((qemu, kernel)) = qemu_and_kernel() else { return };
        let state = crate::StateDir::create(false).unwrap();
        let mut spec = spec("again", &kernel.path);
        spec.guest_channel = Some(crate::GuestChannel::VirtConsole);
        let dir = state.machine_dir(0, "again").unwrap();
        let mut machine = Machine::new(spec, Arc::new(qemu), dir, Arc::new(|_| {}), Echo::Off);
        for start in ["first", "second"] {
            let deadline = Instant::now() + Duration::from_secs(30);
            let vm = machine.start().unwrap_or_else(|e| panic!("{start} start: {e}"));
            let crate::backend::Control::Qmp(qmp) = vm.control(deadline).unwrap();
            assert!(qmp.execute("query-status", None, deadline).is_ok(), "{start} start answers over QMP");
            machine.kill();
        }
    }
}
