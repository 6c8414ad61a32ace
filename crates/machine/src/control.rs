//! Runtime control of a running VM: the one seam through which the driver acts on a VMM after it
//! started (quit, pause, screen, keys, links, port forwards, snapshots, the VMM's events). Each
//! backend hands back its own [`VmControl`]; the driver never speaks a VMM's protocol itself.
//!
//! How the VMMs map onto it:
//!
//! | operation | QEMU (QMP, `backend/qemu/control.rs`) | Firecracker (REST on its API socket) | Cloud Hypervisor (REST on `--api-socket`) |
//! |---|---|---|---|
//! | `quit` | `quit` | `PUT /actions {SendCtrlAltDel}` then kill; no graceful quit | `PUT /vmm.shutdown` |
//! | `pause`/`resume` | `stop`/`cont` | `PATCH /vm {"state":"Paused"/"Resumed"}` | `PUT /vm.pause`/`PUT /vm.resume` |
//! | `screendump`, `send_keys` | `screendump`, `send-key` | unsupported (no display, no keyboard) | unsupported |
//! | `set_link` | `set_link` | unsupported (`PATCH /network-interfaces` changes rate limits only) | unsupported |
//! | `forward_port` | `hostfwd_add` on the user-mode netdev | unsupported (TAP only: forwarding is the host's) | unsupported |
//! | `save_snapshot` | `migrate` to `file:`, then a `transaction` of `blockdev-snapshot-sync` | `PUT /snapshot/create {snapshot_path, mem_file_path}`, disks copied by the caller | `PUT /vm.snapshot {destination_url}` (a directory: config, state, memory) |
//! | `load_snapshot` | `migrate-incoming` into a QEMU started with `-incoming defer` | `PUT /snapshot/load {snapshot_path, mem_backend}` into a fresh process | `--restore source_url=…` on a fresh process, then `PUT /vm.resume` |
//! | `wait_for_event` | QMP events | none (polled state only): unsupported | `--event-monitor` JSON lines |
//!
//! A restore always happens in a fresh VMM process started to receive it, on every backend: that
//! is what Firecracker and Cloud Hypervisor require, and for QEMU it keeps one path for a test's
//! own snapshots and the cache of ready machines. What a backend lacks is
//! [`MachineError::Unsupported`], naming the backend and the operation.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{MachineError, Result};
use crate::snapshot::{SavePlan, Snapshot};

/// Something the VMM reported on its own (QMP's `STOP`, `RESET`, `SHUTDOWN`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct VmmEvent {
    pub name: String,
    pub data: serde_json::Value,
}

/// A TCP port of the host's loopback forwarded to a port of the guest's user-mode card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// The operations a driver performs on a running VM. Every call waits at most until its
/// `deadline`. The defaults are the "backend X does not support Y" answers, so a backend
/// implements exactly what its VMM can do. Usable from any thread at once: a long wait (for an
/// event) never holds up another call.
pub trait VmControl: Send + Sync {
    /// The backend's name, for errors ("the firecracker backend does not support screenshots").
    fn backend(&self) -> &'static str;

    /// Ends the VMM at once, as pulling the plug would.
    fn quit(&self, deadline: Instant) -> Result<()>;

    /// Stops the guest's vCPUs; the VMM stays.
    fn pause(&self, deadline: Instant) -> Result<()>;

    /// Runs the guest's vCPUs again after [`VmControl::pause`] or a [`VmControl::load_snapshot`].
    fn resume(&self, deadline: Instant) -> Result<()>;

    /// Writes the screen to `ppm` as a PPM image.
    fn screendump(&self, _ppm: &Path, _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "screenshots"))
    }

    /// Presses the keys of one combination together, in QEMU's key names (`ctrl`, `alt`, `delete`,
    /// `a`, `0x02`), and releases them.
    fn send_keys(&self, _keys: &[&str], _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "sending keys"))
    }

    /// Takes the link of network card `device` down or up, as pulling its cable would.
    fn set_link(&self, _device: &str, _up: bool, _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "changing a card's link"))
    }

    /// Forwards the host's `127.0.0.1:host_port` to `guest_port` on the user-mode card `netdev`
    /// (`None`: the VMM's only one).
    fn forward_port(&self, _netdev: Option<&str>, _forward: PortForward, _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "port forwarding"))
    }

    /// Saves the paused VM as `plan` says: its device state (and memory, unless that is already a
    /// file) written out, then its writable disks frozen where they are and continued on new
    /// overlays. The VM stays paused. On success the files `plan` names are complete; on failure
    /// the VM's disks are the ones it had.
    fn save_snapshot(&self, _plan: &SavePlan, _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "snapshots"))
    }

    /// Loads `snapshot` into this VMM, which was started to receive it; the guest stays paused.
    fn load_snapshot(&self, _snapshot: &Snapshot, _deadline: Instant) -> Result<()> {
        Err(unsupported(self.backend(), "snapshots"))
    }

    /// A command in the VMM's own monitor language (QEMU's HMP), with its text output.
    fn monitor_command(&self, _command: &str, _deadline: Instant) -> Result<String> {
        Err(unsupported(self.backend(), "monitor commands"))
    }

    /// Waits for the first event (since the last one taken) that `matches` accepts, and takes it.
    fn wait_for_event(&self, _matches: &dyn Fn(&VmmEvent) -> bool, _deadline: Instant) -> Result<VmmEvent> {
        Err(unsupported(self.backend(), "VMM events"))
    }
}

/// A control channel bound before the VMM starts: connects once the VMM runs, at most until the
/// deadline, giving up at once when the fd (the VMM's exit watch) becomes readable.
pub type PendingControl = Box<dyn for<'a> FnOnce(Instant, Option<BorrowedFd<'a>>) -> Result<Arc<dyn VmControl>> + Send>;

fn unsupported(backend: &'static str, what: &str) -> MachineError {
    MachineError::Unsupported { backend, what: what.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM that can only be started and stopped: everything else is the trait's answer.
    struct Bare;

    impl VmControl for Bare {
        fn backend(&self) -> &'static str {
            "bare"
        }
        fn quit(&self, _: Instant) -> Result<()> {
            Ok(())
        }
        fn pause(&self, _: Instant) -> Result<()> {
            Ok(())
        }
        fn resume(&self, _: Instant) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn what_a_backend_lacks_names_the_backend_and_the_operation() {
        let soon = Instant::now();
        let snapshot = Snapshot { state: "/s".into(), memory: crate::MemoryImage::InState, disks: Vec::new() };
        let plan = SavePlan { snapshot: snapshot.clone(), continue_on: Vec::new() };
        let errors = [
            Bare.save_snapshot(&plan, soon).unwrap_err(),
            Bare.load_snapshot(&snapshot, soon).unwrap_err(),
            Bare.screendump(Path::new("/x.ppm"), soon).unwrap_err(),
            Bare.send_keys(&["ret"], soon).unwrap_err(),
            Bare.forward_port(None, PortForward { host_port: 1, guest_port: 2 }, soon).unwrap_err(),
        ];
        let said: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            said,
            [
                "the bare backend does not support snapshots",
                "the bare backend does not support snapshots",
                "the bare backend does not support screenshots",
                "the bare backend does not support sending keys",
                "the bare backend does not support port forwarding",
            ]
        );
    }
}
