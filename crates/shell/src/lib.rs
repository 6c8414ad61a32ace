//! The host side of the NixOS test driver's backdoor shell protocol, byte for byte, so NixOS guests
//! work unchanged: the guest's `backdoor.service` runs `bash` on `/dev/hvc0` after printing
//! [`MARKER`]; each command goes as `timeout N bash -c '<quoted>' | (base64 -w 0; echo)`, and its
//! status is read with `echo ${PIPESTATUS[0]}`.
//!
//! Unlike the Python driver, every read has a host-side deadline: a hung guest or a dead guest ends
//! the call with an error, never a hang. And a command that leaves a background process holding
//! its stdout (`sleep 100 &`, NixOS issue #144875) returns when the command ends (see
//! [`command_line`]). The guest side is unchanged: any NixOS guest works.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::Engine;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// What the guest prints once the backdoor shell is about to start.
pub const MARKER: &[u8] = b"Spawning backdoor root shell...";

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("expected the guest shell to {what} within {waited:?}, but it did not")]
    Timeout { what: String, waited: Duration },
    #[error("the guest shell's channel closed while waiting to {what}")]
    Closed { what: String },
    #[error("the guest shell is out of step: an earlier command did not finish")]
    OutOfStep,
    #[error("the guest shell sent {got:?} where {what} was expected")]
    Garbled { what: &'static str, got: String },
    #[error(
        "the guest could not write the command's output to a file under $TMPDIR (else /tmp): is it full or read-only?"
    )]
    NoOutputFile,
    #[error("guest shell channel: {0}")]
    Io(#[from] io::Error),
}

/// One guest's backdoor shell.
pub struct BackdoorShell {
    stream: UnixStream,
    buffered: Vec<u8>,
    /// Set when a command's reply never came: what the shell sends next belongs to that command.
    out_of_step: bool,
    /// Commands sent, which number their output files.
    sent: u64,
    /// Output files not yet removed, and their bytes.
    leftover_files: u64,
    leftover_bytes: u64,
}

/// Output files are removed in bulk, before a command, once this many have accumulated or their
/// bytes pass [`CLEANUP_BYTES`]: a `rm` per command would cost as much as the command (an exec of a
/// dynamically linked program takes ~35 ms under TCG).
const CLEANUP_FILES: u64 = 32;
const CLEANUP_BYTES: u64 = 16 << 20;
/// How long a write outside a command (`poweroff`) may wait for the guest to read.
const RAW_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl BackdoorShell {
    /// Waits, at most until `deadline`, for the guest to announce its shell. Whatever the guest
    /// wrote before the marker (firmware logs, for one) is returned, for the caller's log.
    pub fn connect(stream: UnixStream, deadline: Instant) -> Result<(BackdoorShell, Vec<u8>), ShellError> {
        let mut shell = BackdoorShell::resume(stream);
        let started = Instant::now();
        loop {
            // The whole marker line: its newline may come in a later read.
            let line_end = find(&shell.buffered, MARKER)
                .and_then(|at| shell.buffered[at..].iter().position(|&b| b == b'\n').map(|n| (at, at + n + 1)));
            if let Some((at, end)) = line_end {
                let before = shell.buffered[..at].to_vec();
                shell.buffered.drain(..end);
                return Ok((shell, before));
            }
            shell.fill(deadline, started, "announce its root shell")?;
        }
    }

    /// The shell of a guest restored from a snapshot taken while this shell was idle: it reads its
    /// next command at once, and announces nothing. ([`BackdoorShell::connect`] starts from it.)
    pub fn resume(stream: UnixStream) -> BackdoorShell {
        BackdoorShell {
            stream,
            buffered: Vec::new(),
            out_of_step: false,
            sent: 0,
            // Files an earlier connection left behind (the commands before a snapshot, or an
            // earlier boot's, with a disk-backed /tmp): removed before the first command.
            leftover_files: CLEANUP_FILES,
            leftover_bytes: 0,
        }
    }

    /// Runs `command` in the guest as the NixOS driver does (`set -euo pipefail` first), with the
    /// guest-side `timeout` when given, and returns its exit status and stdout. `deadline` bounds
    /// the whole call on the host.
    pub fn execute(
        &mut self,
        command: &str,
        timeout: Option<Duration>,
        deadline: Instant,
    ) -> Result<(i32, Vec<u8>), ShellError> {
        if self.out_of_step {
            return Err(ShellError::OutOfStep);
        }
        let cleanup = self.leftover_files >= CLEANUP_FILES || self.leftover_bytes >= CLEANUP_BYTES;
        if cleanup {
            (self.leftover_files, self.leftover_bytes) = (0, 0);
        }
        self.sent += 1;
        self.send(command_line(command, timeout, self.sent, cleanup).as_bytes(), deadline)?;
        self.out_of_step = true;
        let started = Instant::now();
        let encoded = self.read_line(deadline, started, "finish the command")?;
        if encoded == NO_OUTPUT_FILE.as_bytes() {
            // The reply is complete: the shell stays in step.
            self.send(b"echo ${PIPESTATUS[0]}\n", deadline)?;
            self.read_line(deadline, started, "report the exit status")?;
            self.out_of_step = false;
            return Err(ShellError::NoOutputFile);
        }
        let output = base64::engine::general_purpose::STANDARD.decode(&encoded).map_err(|_| ShellError::Garbled {
            what: "base64 output",
            got: String::from_utf8_lossy(&encoded[..encoded.len().min(200)]).into_owned(),
        })?;
        self.send(b"echo ${PIPESTATUS[0]}\n", deadline)?;
        let status = self.read_line(deadline, started, "report the exit status")?;
        let status = std::str::from_utf8(&status).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
            ShellError::Garbled { what: "an exit status", got: String::from_utf8_lossy(&status).into_owned() }
        })?;
        self.out_of_step = false;
        self.leftover_files += 1;
        self.leftover_bytes += output.len() as u64;
        Ok((status, output))
    }

    /// Runs `line` in the backdoor shell itself, outside the command protocol (no `bash -c`, no
    /// output file, no base64): for the few builtins a restored guest needs before anything else,
    /// where each program exec'd costs a fresh translation under TCG. Returns what the line printed
    /// before the end mark this adds; its exit status is not reported.
    pub fn run_in_shell(&mut self, line: &str, deadline: Instant) -> Result<Vec<u8>, ShellError> {
        if self.out_of_step {
            return Err(ShellError::OutOfStep);
        }
        self.sent += 1;
        let mark = format!("attest-done-{}", self.sent);
        self.send(format!("{line}\necho {mark}\n").as_bytes(), deadline)?;
        self.out_of_step = true;
        let started = Instant::now();
        let mut printed = Vec::new();
        loop {
            let read = self.read_line(deadline, started, "finish a line")?;
            if read == mark.as_bytes() {
                self.out_of_step = false;
                return Ok(printed);
            }
            printed.extend_from_slice(&read);
            printed.push(b'\n');
        }
    }

    /// Writes `bytes` to the shell as they are, outside the command protocol: NixOS's `shutdown`
    /// sends a bare `poweroff` line this way, whose reply never comes.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ShellError> {
        self.send(bytes, Instant::now() + RAW_WRITE_TIMEOUT)
    }

    /// The channel, for connecting again after the guest rebooted (the VMM keeps it open).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Writes `bytes`, at most until `deadline`: a guest that stops reading its channel cannot
    /// hold the caller past it.
    fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), ShellError> {
        let started = Instant::now();
        // A zero timeout means none to the socket: at least a millisecond.
        let left = deadline.saturating_duration_since(started).max(Duration::from_millis(1));
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write_all(bytes).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                ShellError::Closed { what: "take a command".into() }
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ShellError::Timeout { what: "take the command".into(), waited: started.elapsed() }
            }
            _ => ShellError::Io(e),
        })
    }

    /// The next line the shell writes, without its newline.
    fn read_line(&mut self, deadline: Instant, started: Instant, what: &str) -> Result<Vec<u8>, ShellError> {
        loop {
            if let Some(end) = self.buffered.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffered.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            self.fill(deadline, started, what)?;
        }
    }

    /// Waits for more bytes from the guest, at most until `deadline`.
    fn fill(&mut self, deadline: Instant, started: Instant, what: &str) -> Result<(), ShellError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return Err(ShellError::Timeout { what: what.into(), waited: started.elapsed() }),
            Ok(_) => {}
            Err(nix::Error::EINTR) => return Ok(()),
            Err(e) => return Err(ShellError::Io(e.into())),
        }
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ShellError::Closed { what: what.into() }),
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(ShellError::Closed { what: what.into() }),
            Err(e) => Err(ShellError::Io(e)),
        }
    }
}

/// What the guest prints instead of base64 when the command's output file could not be read
/// (a full or read-only `$TMPDIR`): not base64, so it cannot be taken for output.
const NO_OUTPUT_FILE: &str = "!";

/// The line the backdoor shell is sent for `command`, command number `serial`. NixOS sends
/// `timeout N bash -c '<set -euo pipefail; CMD>' | (base64 -w 0; echo)`, which waits for every
/// process holding the pipe, so a command that leaves one running (`sleep 100 &`, NixOS #144875)
/// hangs the call. Here the command's stdout is a file instead, and `base64` reads it once `bash -c`
/// has exited: nothing the command leaves running can hold anything, and output written before
/// the guest's `timeout` struck is kept. The status still comes from `echo ${PIPESTATUS[0]}`: the
/// last pipeline starts with `(exit $?)`, which carries `bash -c`'s status. The guest runs no
/// program NixOS's line does not. With `cleanup`, earlier output files are removed first.
pub fn command_line(command: &str, timeout: Option<Duration>, serial: u64, cleanup: bool) -> String {
    const DIR: &str = "\"${TMPDIR:-/tmp}\"";
    let limit = timeout.map(|t| format!("timeout {} ", t.as_secs().max(1))).unwrap_or_default();
    let cleanup = if cleanup { format!("rm -f {DIR}/.attest-out-*; ") } else { String::new() };
    let script = quote(&format!("set -euo pipefail; {command}"));
    let file = format!("{DIR}/.attest-out-{serial}");
    format!("{cleanup}{limit}bash -c {script} >{file}; (exit $?) | (base64 -w 0 {file} || printf '{NO_OUTPUT_FILE}'; echo)\n")
}

/// Quotes `text` for a POSIX shell exactly as Python's `shlex.quote` does, which the NixOS driver
/// uses: bare when every character is safe, else in single quotes with `'` written `'"'"'`.
pub fn quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', "'\"'\"'"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    /// The guest going away: its shell and everything the shell started.
    fn kill_guest((child, _tmp): &mut (Child, tempfile::TempDir)) {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGKILL).ok();
        child.wait().ok();
    }

    /// A real bash speaking the protocol over a socket pair, as `backdoor.service` does on hvc0:
    /// noise, the marker, then `bash --norc` reading commands from the channel.
    /// The guest's shell, what it printed before the marker, and its process with its own TMPDIR.
    fn guest() -> (BackdoorShell, Vec<u8>, (Child, tempfile::TempDir)) {
        let (host, guest) = UnixStream::pair().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let script = "echo 'firmware noise'; echo 'Spawning backdoor root shell...'; PS1='' exec bash --norc";
        let child = Command::new("bash")
            .args(["-c", script])
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(guest.try_clone().unwrap())))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(guest)))
            .process_group(0)
            .spawn()
            .unwrap();
        let (shell, before) = BackdoorShell::connect(host, soon()).unwrap();
        (shell, before, (child, tmp))
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn quoting_matches_pythons_shlex() {
        assert_eq!(quote("plain/path-1.0"), "plain/path-1.0");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("it's here"), "'it'\"'\"'s here'");
        assert_eq!(quote("a\nb $x"), "'a\nb $x'");
    }

    #[test]
    fn commands_return_status_and_byte_exact_output() {
        let (mut shell, before, mut child) = guest();
        assert_eq!(before, b"firmware noise\n");
        assert_eq!(shell.execute("echo hello", None, soon()).unwrap(), (0, b"hello\n".to_vec()));
        assert_eq!(shell.execute("echo partial; exit 3", None, soon()).unwrap(), (3, b"partial\n".to_vec()));
        let (status, out) = shell.execute(r#"printf 'quote '"'"' nl\n nul\0 end'"#, None, soon()).unwrap();
        assert_eq!((status, out.as_slice()), (0, &b"quote ' nl\n nul\0 end"[..]));
        let (status, out) = shell.execute("head -c 3000000 /dev/zero", None, soon()).unwrap();
        assert_eq!((status, out.len()), (0, 3_000_000));
        assert_eq!(shell.execute("false | true", None, soon()).unwrap().0, 1, "pipefail, as NixOS sets it");
        kill_guest(&mut child);
    }

    #[test]
    fn the_guest_timeout_is_124_and_a_host_deadline_ends_a_stuck_command() {
        let (mut shell, _, mut child) = guest();
        let (status, out) = shell.execute("echo partial; sleep 10", Some(Duration::from_secs(1)), soon()).unwrap();
        assert_eq!((status, out.as_slice()), (124, &b"partial\n"[..]), "what came before the timeout is kept");

        // Only the host's deadline ends a command that never finishes; the shell is then unusable.
        let started = Instant::now();
        let stuck = shell.execute("sleep 30", None, Instant::now() + Duration::from_millis(800));
        assert!(matches!(stuck, Err(ShellError::Timeout { .. })), "{stuck:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(shell.execute("true", None, soon()), Err(ShellError::OutOfStep)));
        kill_guest(&mut child);
    }

    #[test]
    fn an_output_file_that_cannot_be_written_is_an_error_not_a_silent_failure() {
        let (mut shell, _, mut child) = guest();
        // The backdoor shell's own TMPDIR decides where output files go.
        shell.write_raw(b"export TMPDIR=/nonexistent\n").unwrap();
        let err = shell.execute("echo never runs", None, soon()).unwrap_err();
        assert!(matches!(err, ShellError::NoOutputFile), "{err:?}");
        shell.write_raw(b"export TMPDIR=/tmp\n").unwrap();
        assert_eq!(shell.execute("echo in step", None, soon()).unwrap(), (0, b"in step\n".to_vec()));
        kill_guest(&mut child);
    }

    #[test]
    fn a_background_process_holding_stdout_does_not_hold_the_command() {
        let (mut shell, _, mut child) = guest();
        // This hangs the Python driver until the background process exits.
        let started = Instant::now();
        let (status, out) = shell.execute("echo before; sleep 30 & echo after", None, soon()).unwrap();
        assert_eq!((status, out.as_slice()), (0, &b"before\nafter\n"[..]));
        // A background subshell (which does not exec, so keeps every fd it inherited) too.
        let (status, out) = shell.execute("(sleep 30; echo late) & echo now", None, soon()).unwrap();
        assert_eq!((status, out.as_slice()), (0, &b"now\n"[..]));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let (status, out) = shell.execute("echo x # a trailing comment", None, soon()).unwrap();
        assert_eq!((status, out.as_slice()), (0, &b"x\n"[..]));
        assert_eq!(shell.execute("cat <<EOF\nheredoc\nEOF", None, soon()).unwrap().1, b"heredoc\n");
        assert_eq!(shell.execute("echo $never_set", None, soon()).unwrap().0, 1, "set -u, as NixOS sets it");
        // Output files are removed in bulk: never more than a batch of them.
        for _ in 0..2 * CLEANUP_FILES {
            shell.execute("true", None, soon()).unwrap();
        }
        let files = shell.execute("ls -A $TMPDIR | wc -l", None, soon()).unwrap().1;
        let files: u64 = String::from_utf8(files).unwrap().trim().parse().unwrap();
        assert!((1..=CLEANUP_FILES + 1).contains(&files), "{files} output files");
        kill_guest(&mut child);
    }

    #[test]
    fn a_guest_that_stops_reading_cannot_hold_a_write_past_the_deadline() {
        let (host, _guest) = UnixStream::pair().unwrap();
        // Nobody reads the guest's end: the socket buffer fills and the write would block.
        let mut shell = BackdoorShell {
            stream: host,
            buffered: Vec::new(),
            out_of_step: false,
            sent: 0,
            leftover_files: 0,
            leftover_bytes: 0,
        };
        let started = Instant::now();
        let huge = "x".repeat(4 << 20);
        let err = shell.execute(&format!("echo {huge}"), None, Instant::now() + Duration::from_millis(500));
        assert!(matches!(err, Err(ShellError::Timeout { .. })), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn a_guest_that_dies_mid_command_is_an_error_not_a_hang() {
        let (mut shell, _, mut child) = guest();
        let group = nix::unistd::Pid::from_raw(child.0.id() as i32);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            nix::sys::signal::killpg(group, nix::sys::signal::SIGKILL).ok();
        });
        let started = Instant::now();
        let died = shell.execute("sleep 20", None, soon());
        child.0.wait().ok();
        assert!(matches!(died, Err(ShellError::Closed { .. })), "{died:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "noticed when the channel closed, not at the deadline");
    }
}
