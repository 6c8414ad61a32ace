//! A named machine that can be started, stopped and started again (the NixOS driver's
//! `shutdown(); start()`), saved as a snapshot and restored from one: each start or restore builds
//! a fresh [`Vm`] from the same definition, in the same state directory, whose console log it
//! appends to. Its disks carry over from one VM to the next, wherever snapshots moved them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::console::Echo;
use crate::control::VmControl;
use crate::disk::{self, Media};
use crate::error::{MachineError, Result};
use crate::events::MachineEventSink;
use crate::snapshot::{MemoryImage, RamBacking, SavePlan, Snapshot};
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
    /// The images the machine's disks are written to now: the spec's at first; a snapshot freezes
    /// them and moves the VM onto new overlays, and a restore gives it overlays of the frozen ones.
    live_disks: Vec<PathBuf>,
    /// The RAM of the running VM, when it is a file (a template's, shared, or a clone's, private).
    ram: RamBacking,
    /// Numbers the overlays snapshots and restores create.
    overlays: u32,
}

impl Machine {
    pub fn new(
        spec: MachineSpec,
        backend: Arc<dyn Backend + Send + Sync>,
        dir: MachineDir,
        events: MachineEventSink,
        echo: Echo,
    ) -> Self {
        let live_disks = spec.disks.iter().map(|d| d.path.clone()).collect();
        Machine { spec, backend, dir, events, echo, vm: None, live_disks, ram: RamBacking::Anonymous, overlays: 0 }
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
        self.start_with(RamBacking::Anonymous)
    }

    /// Starts the machine unless it runs already, its RAM in `ram`: a template to save with
    /// [`MemoryImage::File`] maps a new file shared.
    pub fn start_with(&mut self, ram: RamBacking) -> Result<&mut Vm> {
        if !self.is_running() {
            let spec = MachineSpec { ram, ..self.live_spec() };
            self.launch(spec)?;
        }
        Ok(self.vm.as_mut().expect("started above"))
    }

    /// The spec with the disks as they are now.
    fn live_spec(&self) -> MachineSpec {
        let mut spec = self.spec.clone();
        for (disk, live) in spec.disks.iter_mut().zip(&self.live_disks) {
            if disk.path != *live {
                // Snapshots' overlays are qcow2 whatever the image under them.
                (disk.path, disk.format) = (live.clone(), disk::DiskFormat::Qcow2);
            }
        }
        spec
    }

    fn launch(&mut self, spec: MachineSpec) -> Result<&mut Vm> {
        self.vm = None;
        self.ram = spec.ram.clone();
        let vm = Vm::start(self.backend.as_ref(), &spec, &self.dir, self.echo.clone(), self.events.clone())?;
        Ok(self.vm.insert(vm))
    }

    /// What saving the running VM into the directory `into` (created) takes: its control and the
    /// plan. The caller saves with [`save_planned`] (outside any lock on this machine, so others
    /// can kill or inspect it meanwhile) and reports success with [`Machine::saved`]. The VM's
    /// writable disks then continue on new overlays; the images they had are the snapshot's, never
    /// written again. The memory goes into the state file, unless the VM was started as a template
    /// ([`Machine::start_with`] a shared file), whose file then holds it. Refuses a snapshot that
    /// may not fit.
    pub fn plan_snapshot(&mut self, into: &Path, deadline: Instant) -> Result<(Arc<dyn VmControl>, SavePlan)> {
        let control = self.running_vm()?.control(deadline)?;
        std::fs::create_dir_all(into).map_err(MachineError::io(format!("creating {}", into.display())))?;
        let memory = match &self.ram {
            RamBacking::File { path, shared: true } => MemoryImage::File(path.clone()),
            _ => MemoryImage::InState,
        };
        if memory == MemoryImage::InState {
            // Up to all of its memory: a snapshot that cannot fit is refused, not half written.
            let needed = self.spec.memory_mib << 20;
            if let Some((free, dir)) = crate::state_dir::free_space(into).filter(|(free, _)| *free < needed) {
                return Err(MachineError::SnapshotFailed {
                    what: format!("saving a snapshot of machine {}", self.spec.name),
                    why: format!(
                        "{} has {} MiB free, and the snapshot may take up to {} MiB (the machine's memory)",
                        dir.display(),
                        free >> 20,
                        needed >> 20
                    ),
                });
            }
        }
        let mut snapshot = Snapshot { state: into.join("state"), memory, disks: vec![None; self.spec.disks.len()] };
        let mut continue_on = Vec::new();
        let writable: Vec<usize> = (0..self.spec.disks.len())
            .filter(|&i| self.spec.disks[i].media == Media::Disk && !self.spec.disks[i].read_only)
            .collect();
        for index in writable {
            snapshot.disks[index] = Some(self.live_disks[index].clone());
            continue_on.push((index, self.next_overlay(index)));
        }
        Ok((control, SavePlan { snapshot, continue_on }))
    }

    /// The VM saved `plan`: its disks are the overlays it continues on now.
    pub fn saved(&mut self, plan: &SavePlan) {
        for (index, overlay) in &plan.continue_on {
            self.live_disks[*index] = overlay.clone();
        }
    }

    /// Replaces the running VM (if any) with a fresh VMM that loads `snapshot`, on new overlays of
    /// its frozen disks, and returns it paused: the caller resumes it once it is ready to talk to
    /// the guest. A snapshot with its memory in a file maps that file private.
    pub fn restore(&mut self, snapshot: &Snapshot, deadline: Instant) -> Result<&mut Vm> {
        self.kill();
        if snapshot.disks.len() != self.spec.disks.len() {
            return Err(MachineError::SnapshotFailed {
                what: format!("restoring machine {}", self.spec.name),
                why: format!("the snapshot has {} disks, the machine {}", snapshot.disks.len(), self.spec.disks.len()),
            });
        }
        for (index, frozen) in snapshot.disks.iter().enumerate() {
            if let Some(frozen) = frozen {
                let overlay = self.next_overlay(index);
                disk::overlay(frozen, &overlay)?;
                self.live_disks[index] = overlay;
            }
        }
        let ram = match &snapshot.memory {
            MemoryImage::File(path) => RamBacking::File { path: path.clone(), shared: false },
            MemoryImage::InState => RamBacking::Anonymous,
        };
        let spec = MachineSpec { ram, receive_snapshot: true, ..self.live_spec() };
        let vm = self.launch(spec)?;
        vm.control(deadline)?.load_snapshot(snapshot, deadline)?;
        Ok(vm)
    }

    fn running_vm(&mut self) -> Result<&mut Vm> {
        if !self.is_running() {
            return Err(MachineError::NotRunning { machine: self.spec.name.clone() });
        }
        Ok(self.vm.as_mut().expect("running"))
    }

    fn next_overlay(&mut self, index: usize) -> PathBuf {
        self.overlays += 1;
        self.dir.path().join(format!("disk{index}-{}.qcow2", self.overlays))
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

/// Pauses the VM and saves it as `plan` says, through its control; a failed save leaves no state
/// file behind. The VM stays paused either way.
pub fn save_planned(control: &dyn VmControl, plan: &SavePlan, deadline: Instant) -> Result<()> {
    control.pause(deadline)?;
    control.save_snapshot(plan, deadline).inspect_err(|_| drop(std::fs::remove_file(&plan.snapshot.state)))
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
            let control = vm.control(deadline).unwrap();
            assert!(control.monitor_command("info status", deadline).is_ok(), "{start} start answers over QMP");
            machine.kill();
        }
    }
}
