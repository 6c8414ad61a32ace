//! Switch mode: one `vde_switch` per VLAN, started and stopped by attest, its control socket in the
//! test's state directory. It runs in hub mode, as the NixOS driver runs it (802.1Q frames pass),
//! and counts as ready once it answers `showinfo` with `1000 Success`, so nothing polls for its
//! socket. If it dies while the test runs, the caller hears about it with its exit and log tail.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attest_machine::process::ManagedChild;
use attest_machine::transport::listening::wait_readable;

use crate::error::{NetworkError, Result};

/// How long a switch may take to answer its first command (NixOS allows 5 s too).
const START_TIMEOUT: Duration = Duration::from_secs(5);
const READY: &str = "1000 Success";
/// Lines of the switch's log quoted when it dies.
const LOG_TAIL: usize = 5;

pub struct VdeSwitch {
    vlan: u8,
    socket: PathBuf,
    /// Set before attest stops the switch itself, so that exit is not reported as a failure.
    stopping: Arc<AtomicBool>,
    /// The switch reads commands here; closing it would end the switch.
    _stdin: ChildStdin,
    /// Kept open: closing it would make the switch's next prompt a SIGPIPE.
    _stdout: ChildStdout,
    child: ManagedChild,
}

impl VdeSwitch {
    /// `$ATTEST_VDE_SWITCH`, else `vde_switch` on PATH.
    pub fn find() -> Result<PathBuf> {
        let found = match std::env::var_os("ATTEST_VDE_SWITCH") {
            Some(path) => which::which(path),
            None => which::which("vde_switch"),
        };
        found.map_err(|_| NetworkError::MissingProgram {
            program: "vde_switch",
            purpose: "for the test's VLANs".into(),
            fix: "install Debian's vde2 (scripts/setup does), set ATTEST_VDE_SWITCH, or use network = \"tap\"",
        })
    }

    /// Starts the switch of `vlan` with its socket directory `vde<N>.ctl` in `dir`; `on_exit` is
    /// told, with the switch's exit and log tail, if it ever stops on its own.
    pub fn start(
        binary: &Path,
        vlan: u8,
        dir: &Path,
        on_exit: impl FnOnce(String) + Send + 'static,
    ) -> Result<VdeSwitch> {
        let socket = dir.join(format!("vde{vlan}.ctl"));
        let log_path = dir.join(format!("vde{vlan}.log"));
        let log =
            std::fs::File::create(&log_path).map_err(NetworkError::io(format!("creating {}", log_path.display())))?;
        let mut command = Command::new(binary);
        command.arg("--sock").arg(&socket).args(["--dirmode", "0700", "--hub"]);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
        let stopping = Arc::new(AtomicBool::new(false));
        let report = {
            let stopping = stopping.clone();
            move |status| {
                if !stopping.load(Ordering::SeqCst) {
                    on_exit(format!("the switch of VLAN {vlan} exited ({status}); {}", log_tail(&log_path)));
                }
            }
        };
        let name = format!("vde_switch (VLAN {vlan})");
        let mut child = ManagedChild::spawn(name, &mut command, report)
            .map_err(|e| NetworkError::SwitchStart { vlan, reason: format!("running {}: {e}", binary.display()) })?;
        let (Some(mut stdin), Some(mut stdout)) = (child.take_stdin(), child.take_stdout()) else {
            unreachable!("spawned with piped stdin and stdout")
        };
        let answered =
            stdin.write_all(b"showinfo\n").and_then(|_| await_ready(&mut stdout, Instant::now() + START_TIMEOUT));
        if let Err(reason) = answered {
            stopping.store(true, Ordering::SeqCst);
            let tail = log_tail(&dir.join(format!("vde{vlan}.log")));
            return Err(NetworkError::SwitchStart { vlan, reason: format!("{reason}; {tail}") });
        }
        Ok(VdeSwitch { vlan, socket, stopping, _stdin: stdin, _stdout: stdout, child })
    }

    pub fn vlan(&self) -> u8 {
        self.vlan
    }

    /// The socket directory QEMU's `-netdev vde,sock=` and `QEMU_VDE_SOCKET_N` name.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for VdeSwitch {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.child.kill();
    }
}

/// Reads the switch's answers until `showinfo` succeeded; it writes nothing more unless asked.
fn await_ready(stdout: &mut ChildStdout, deadline: Instant) -> std::io::Result<()> {
    let mut seen = Vec::new();
    let mut buffer = [0; 4096];
    while !String::from_utf8_lossy(&seen).contains(READY) {
        wait_readable(&*stdout, None, deadline).map_err(|e| {
            std::io::Error::new(e.kind(), format!("no {READY:?} after showinfo within {START_TIMEOUT:?} ({e})"))
        })?;
        match stdout.read(&mut buffer)? {
            0 => return Err(std::io::Error::other(format!("it exited before answering; it said {:?}", lossy(&seen)))),
            n => seen.extend_from_slice(&buffer[..n]),
        }
    }
    Ok(())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    match lines.len() {
        0 => "its log is empty".into(),
        n => format!("its log ends: {}", lines[n.saturating_sub(LOG_TAIL)..].join(" | ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn switch_binary() -> Option<PathBuf> {
        let found = VdeSwitch::find().ok();
        if found.is_none() {
            eprintln!("skipped: vde_switch is not installed (Debian's vde2)");
        }
        found
    }

    #[test]
    fn a_switch_starts_answers_and_reports_its_death() {
        let Some(binary) = switch_binary() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (died, death) = mpsc::channel();
        let switch = VdeSwitch::start(&binary, 7, dir.path(), move |why| died.send(why).unwrap()).unwrap();
        assert!(switch.socket().join("ctl").exists(), "the control socket exists once it answered");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(switch.pid() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let why = death.recv_timeout(Duration::from_secs(5)).expect("the death is reported");
        assert!(why.starts_with("the switch of VLAN 7 exited"), "{why}");
        drop(switch);
    }

    #[test]
    fn stopping_a_switch_is_not_a_death() {
        let Some(binary) = switch_binary() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (died, death) = mpsc::channel();
        let switch = VdeSwitch::start(&binary, 1, dir.path(), move |why| died.send(why).unwrap()).unwrap();
        let pid = switch.pid();
        drop(switch);
        assert!(death.recv_timeout(Duration::from_millis(300)).is_err());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the switch process is gone");
    }

    #[test]
    fn a_switch_that_cannot_start_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let err = VdeSwitch::start(Path::new("/bin/false"), 3, dir.path(), |_| {}).err().unwrap().to_string();
        assert!(err.starts_with("the switch for VLAN 3 did not start"), "{err}");
    }
}
