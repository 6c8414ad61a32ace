//! The machine crate's errors: what went wrong preparing or starting a VM, in kinds a caller (the
//! CLI, the driver, a Python binding) can tell apart.

use std::io;
use std::path::PathBuf;

use attest_protocol::ExitStatus;

use crate::accel::Accel;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A host operation failed (creating a socket, a log, a directory).
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The VMM or a helper daemon could not be started.
    #[error("starting {program}: {source}")]
    Spawn { program: String, source: io::Error },
    /// A helper program the machine's devices need is not installed.
    #[error("{program} is needed {purpose}, but was not found: {fix}")]
    MissingHelper { program: &'static str, purpose: String, fix: &'static str },
    /// A socket path would exceed what `sun_path` holds.
    #[error("socket path {path} is longer than the {limit}-byte unix socket limit")]
    SocketPathTooLong { path: PathBuf, limit: usize },
    /// The guest kernel cannot do what the machine needs.
    #[error("the guest kernel has no {what}: {fix}")]
    KernelLacks { what: String, fix: &'static str },
    /// A path the VMM must be given cannot be expressed in its options.
    #[error("path {path} is not UTF-8, which {vmm} options cannot carry")]
    UnrepresentablePath { path: PathBuf, vmm: &'static str },
    /// The backend cannot do what was asked of it.
    #[error("the {backend} backend does not support {what}")]
    Unsupported { backend: &'static str, what: String },
    /// The VMM's control channel failed.
    #[error("{0}")]
    Control(#[from] crate::backend::qemu::qmp::QmpError),
    /// Saving or loading a snapshot failed; `why` is the VMM's reason (a device that cannot be
    /// migrated names itself there).
    #[error("{what} failed: {why}")]
    SnapshotFailed { what: String, why: String },
    /// The machine has no guest command channel.
    #[error("machine {machine} has no guest command channel")]
    NoChannel { machine: String },
    /// The machine must be running for this.
    #[error("machine {machine} is not running")]
    NotRunning { machine: String },
    /// The machine's backend gave it no control channel.
    #[error("machine {machine} has no control channel")]
    NoControl { machine: String },
    /// The VMM exited by itself with a failure before the guest's channel connected: its own
    /// words (stderr) explain it, not the wait for a guest that was never coming.
    #[error(
        "{vmm} refused to start: {}\n(machine {machine}: {vmm} exited ({status}) before the guest connected; its \
         message says what to change in the machine's definition or on the host; `attest preflight` checks what \
         can be known before a boot){}",
        refusal_text(stderr),
        console_text(machine, console_tail)
    )]
    VmmRefused {
        vmm: &'static str,
        machine: String,
        status: ExitStatus,
        /// The VMM's own messages.
        stderr: Vec<String>,
        /// The console's last lines that are not among `stderr` (what the guest printed, if anything).
        console_tail: Vec<String>,
    },
    /// The requested accelerator cannot run guests on this host.
    #[error("{accel} was requested but is unusable: {detail}{}", if *.cached { " (verdict cached for this boot: remove kvm-probe.json in attest's cache to probe again)" } else { "" })]
    AccelUnusable { accel: Accel, detail: String, cached: bool },
}

impl MachineError {
    /// Wraps an I/O error with what was being done, for `map_err`.
    pub fn io(what: impl Into<String>) -> impl Fn(io::Error) -> MachineError {
        let what = what.into();
        move |source| MachineError::Io { what: what.clone(), source }
    }
}

fn refusal_text(stderr: &[String]) -> String {
    match stderr {
        [] => "it printed nothing on stderr".into(),
        lines => lines.join("\n"),
    }
}

fn console_text(machine: &str, tail: &[String]) -> String {
    let mut text = String::new();
    if !tail.is_empty() {
        text.push_str(&format!("\n--- last lines of {machine}'s console ---"));
        for line in tail {
            text.push('\n');
            text.push_str(line);
        }
    }
    text
}

pub type Result<T, E = MachineError> = std::result::Result<T, E>;
