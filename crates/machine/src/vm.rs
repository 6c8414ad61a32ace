//! A running machine: the VMM process, its helper daemons and its console, whatever the backend.
//! Dropping a `Vm` kills and reaps all of them.

use std::process::Stdio;

use crate::backend::Backend;
use crate::console::Console;
use crate::error::{MachineError, Result};
use crate::events::{EventSink, VmEvent};
use crate::process::ManagedChild;
use crate::spec::MachineSpec;
use crate::state_dir::StateDir;
use crate::transport::Transport;

pub struct Vm {
    name: String,
    vmm: ManagedChild,
    helpers: Vec<ManagedChild>,
    console: Console,
    agent: Option<Box<dyn Transport>>,
}

impl Vm {
    /// Starts the machine; `events` hears, from watcher threads, when the VMM or a helper exits.
    /// Call from the main thread (see [`ManagedChild::spawn`]).
    pub fn start(
        backend: &dyn Backend,
        spec: &MachineSpec,
        dir: &StateDir,
        echo_console: bool,
        events: EventSink,
    ) -> Result<Vm> {
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
        Ok(Vm { name: spec.name.clone(), vmm, helpers: prepared.helpers, console, agent: prepared.agent })
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
