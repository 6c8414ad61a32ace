//! [`VmControl`] for QEMU, over QMP (and HMP through QMP where QEMU has no QMP command: `sendkey`
//! with its key names, `hostfwd_add`). Snapshots are migrations to a file: `migrate` writes the
//! device state (and memory, unless it lives in a shared file: `x-ignore-shared`), then one
//! `transaction` of `blockdev-snapshot-sync` freezes every writable disk, and a QEMU started with `-incoming defer` loads it with
//! `migrate-incoming`. Both wait for QEMU's `MIGRATION` events, not by asking.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::qmp::{Qmp, QmpError};
use crate::control::{PortForward, VmControl, VmmEvent};
use crate::error::{MachineError, Result};
use crate::snapshot::{MemoryImage, SavePlan, Snapshot};

/// QEMU's block device name for the disk at `index` of a spec (`-drive …,id=disk0`).
pub fn drive_id(index: usize) -> String {
    format!("disk{index}")
}

pub struct QemuControl {
    qmp: Arc<Qmp>,
}

impl QemuControl {
    pub fn new(qmp: Qmp) -> QemuControl {
        QemuControl { qmp: Arc::new(qmp) }
    }

    fn execute(&self, command: &str, arguments: Option<Value>, deadline: Instant) -> Result<Value> {
        Ok(self.qmp.execute(command, arguments, deadline)?)
    }

    fn hmp(&self, command: &str, deadline: Instant) -> Result<String> {
        Ok(self.qmp.human_monitor_command(command, deadline)?)
    }

    /// The migration capabilities a snapshot of `memory` needs, on both ends.
    fn migration_capabilities(&self, memory: &MemoryImage, deadline: Instant) -> Result<()> {
        let ignore_shared = matches!(memory, MemoryImage::File(_));
        let capabilities = json!([
            { "capability": "events", "state": true },
            { "capability": "x-ignore-shared", "state": ignore_shared },
        ]);
        self.execute("migrate-set-capabilities", Some(json!({ "capabilities": capabilities })), deadline).map(drop)
    }

    /// Waits for the migration to end, by its events; a failure carries QEMU's reason.
    fn await_migration(&self, what: &str, deadline: Instant) -> Result<()> {
        let ended = |e: &VmmEvent| {
            e.name == "MIGRATION" && matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        };
        let event = self.qmp.wait_for_event(&format!("the end of {what}"), ended, deadline)?;
        if event.data["status"] == "completed" {
            return Ok(());
        }
        let info = self.execute("query-migrate", None, deadline).unwrap_or_default();
        let why = info["error-desc"].as_str().unwrap_or("QEMU gave no reason");
        Err(MachineError::SnapshotFailed { what: what.into(), why: why.into() })
    }
}

impl QemuControl {
    /// Waits until QEMU has left `finish-migrate` for `postmigrate`: it reports a migration
    /// completed from the migration thread, then finalizes it on its main loop, and refuses `cont`
    /// or a block job in between ("Migration is not finalized yet"). No event marks that step, so
    /// this asks, a millisecond apart; it is a matter of milliseconds, and bounded by `deadline`.
    fn await_finalized(&self, deadline: Instant) -> Result<()> {
        loop {
            let status = self.execute("query-status", None, deadline)?;
            if status["status"] != "finish-migrate" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = "QEMU did not finalize the migration in time".to_string();
                return Err(MachineError::SnapshotFailed { what: "saving the snapshot".into(), why });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl VmControl for QemuControl {
    fn backend(&self) -> &'static str {
        "qemu"
    }

    fn quit(&self, deadline: Instant) -> Result<()> {
        match self.qmp.execute("quit", None, deadline) {
            // QEMU may close the connection before its reply arrives.
            Ok(_) | Err(QmpError::Closed(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn pause(&self, deadline: Instant) -> Result<()> {
        self.execute("stop", None, deadline).map(drop)
    }

    fn resume(&self, deadline: Instant) -> Result<()> {
        self.execute("cont", None, deadline).map(drop)
    }

    fn screendump(&self, ppm: &Path, deadline: Instant) -> Result<()> {
        self.execute("screendump", Some(json!({ "filename": ppm })), deadline).map(drop)
    }

    fn send_keys(&self, keys: &[&str], deadline: Instant) -> Result<()> {
        // HMP's names (and its `0x02` key codes) are the ones NixOS tests use.
        let output = self.hmp(&format!("sendkey {}", keys.join("-")), deadline)?;
        hmp_result("sendkey", &output)
    }

    fn set_link(&self, device: &str, up: bool, deadline: Instant) -> Result<()> {
        self.execute("set_link", Some(json!({ "name": device, "up": up })), deadline).map(drop)
    }

    fn forward_port(&self, netdev: Option<&str>, forward: PortForward, deadline: Instant) -> Result<()> {
        let netdev = netdev.map(|n| format!("{n} ")).unwrap_or_default();
        let PortForward { host_port, guest_port } = forward;
        let output = self.hmp(&format!("hostfwd_add {netdev}tcp:127.0.0.1:{host_port}-:{guest_port}"), deadline)?;
        hmp_result("hostfwd_add", &output)
    }

    fn save_snapshot(&self, plan: &SavePlan, deadline: Instant) -> Result<()> {
        self.migration_capabilities(&plan.snapshot.memory, deadline)?;
        let uri = format!("file:{}", plan.snapshot.state.display());
        self.execute("migrate", Some(json!({ "uri": uri })), deadline)?;
        self.await_migration("saving the snapshot", deadline)?;
        self.await_finalized(deadline)?;
        // Still paused, so the disks are as the state expects them; one transaction freezes all
        // of them or none.
        let actions: Vec<Value> = plan
            .continue_on
            .iter()
            .map(|(index, overlay)| {
                json!({ "type": "blockdev-snapshot-sync",
                        "data": { "device": drive_id(*index), "snapshot-file": overlay, "format": "qcow2" } })
            })
            .collect();
        if !actions.is_empty() {
            self.execute("transaction", Some(json!({ "actions": actions })), deadline)?;
        }
        Ok(())
    }

    fn load_snapshot(&self, snapshot: &Snapshot, deadline: Instant) -> Result<()> {
        self.migration_capabilities(&snapshot.memory, deadline)?;
        let uri = format!("file:{}", snapshot.state.display());
        self.execute("migrate-incoming", Some(json!({ "uri": uri })), deadline)?;
        self.await_migration("loading the snapshot", deadline)
    }

    fn monitor_command(&self, command: &str, deadline: Instant) -> Result<String> {
        self.hmp(command, deadline)
    }

    fn wait_for_event(&self, matches: &dyn Fn(&VmmEvent) -> bool, deadline: Instant) -> Result<VmmEvent> {
        Ok(self.qmp.wait_for_event("a matching QMP event", matches, deadline)?)
    }
}

/// HMP answers success with no output and failure with a message.
fn hmp_result(command: &str, output: &str) -> Result<()> {
    match output.trim() {
        "" => Ok(()),
        error => Err(MachineError::Control(QmpError::Command {
            command: command.into(),
            class: "GenericError".into(),
            desc: error.into(),
        })),
    }
}
