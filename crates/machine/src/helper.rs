//! Helper daemons a VM depends on (virtiofsd, vhost-device-vsock): spawned as [`ManagedChild`]s
//! with their output in a log of their own, and an exit while the VM runs reported as a
//! [`VmEvent::HelperFailed`] that quotes the end of that log.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{MachineError, Result};
use crate::events::{EventSink, VmEvent};
use crate::process::ManagedChild;

/// Lines of the helper's log quoted when it dies.
const LOG_TAIL: usize = 5;

pub fn spawn(name: String, command: &mut Command, log_path: &Path, events: EventSink) -> Result<ManagedChild> {
    let log = std::fs::File::create(log_path).map_err(MachineError::io(format!("creating {}", log_path.display())))?;
    let log_copy = log.try_clone().map_err(MachineError::io(format!("duplicating {}", log_path.display())))?;
    command.stdin(Stdio::null()).stdout(log_copy).stderr(log);
    let on_exit = {
        let (name, log_path) = (name.clone(), log_path.to_path_buf());
        move |status| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL).collect::<Vec<_>>().into_iter().rev().collect();
            events(VmEvent::HelperFailed(format!("{name} exited ({status}); its log ends: {}", tail.join(" | "))));
        }
    };
    ManagedChild::spawn(name.clone(), command, on_exit).map_err(|source| MachineError::Spawn { program: name, source })
}
