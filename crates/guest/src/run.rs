//! Runs the requested program and pumps its stdin, stdout and stderr over the agent channel,
//! then reports how it ended. As PID 1 it also reaps every orphan that exits meanwhile.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use attest_protocol::{ExitStatus, Frame, GuestMessage, HostMessage, Start, CHUNK, FALLBACK_SHELLS};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::system::uptime_ms;
use crate::terminal::{self, Pty};

/// How long output may stand still, after the program exited, before the drain stops waiting.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// Serialises whole frames from several threads onto the one channel.
#[derive(Clone)]
pub struct FrameWriter(Arc<Mutex<File>>);

impl FrameWriter {
    pub fn new(channel: File) -> Self {
        FrameWriter(Arc::new(Mutex::new(channel)))
    }

    pub fn send(&self, frame: Frame) -> io::Result<()> {
        let mut channel = self.0.lock().unwrap_or_else(|p| p.into_inner());
        frame.write_to(&mut *channel)
    }
}

pub fn run_program(start: &Start, channel: File, writer: &FrameWriter) -> Result<()> {
    let argv = program_argv(start)?;
    let (mut command, mut pty) = program_command(start, &argv)?;
    let spawned = command.spawn();
    // The command holds the agent's copies of the terminal's slave side: close them now, so the
    // master ends once the program's side of the terminal is closed.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let code = if err.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            let msg = format!("attest: {}: {err}\n", String::from_utf8_lossy(&argv[0]));
            writer.send(Frame::Stderr(msg.into_bytes()))?;
            let (hangup_tx, hangup_rx) = mpsc::channel();
            thread::spawn(move || read_host_frames(channel, HostFrameSinks::default(), hangup_tx));
            return exited(writer, ExitStatus::Code(code), hangup_rx);
        }
    };
    writer.send(Frame::Guest(GuestMessage::Started { started_ms: uptime_ms() }))?;

    let closed = HostReaders::default();
    let (outputs, stdin, terminal) = match &mut pty {
        Some(pty) => {
            pty.close_slave();
            let outputs: Vec<Output> = vec![(Box::new(pty.master()?), Frame::Stdout, closed.stdout.clone())];
            (outputs, Box::new(pty.master()?) as Box<dyn Write + Send>, Some(pty.master()?))
        }
        None => {
            let outputs: Vec<Output> = vec![
                (Box::new(child.stdout.take().unwrap()), Frame::Stdout, closed.stdout.clone()),
                (Box::new(child.stderr.take().unwrap()), Frame::Stderr, closed.stderr.clone()),
            ];
            (outputs, Box::new(child.stdin.take().unwrap()) as Box<dyn Write + Send>, None)
        }
    };
    let (drained_tx, drained_rx) = mpsc::channel();
    let forwarded = Arc::new(AtomicU64::new(0));
    let open_outputs = outputs.len();
    for (pipe, wrap, gone) in outputs {
        let writer = writer.clone();
        let drained = drained_tx.clone();
        let forwarded = forwarded.clone();
        thread::spawn(move || {
            pump_output(pipe, wrap, &gone, &forwarded, &writer);
            drained.send(()).ok();
        });
    }
    let (stdin_tx, stdin_rx) = mpsc::channel();
    let credit_writer = writer.clone();
    thread::spawn(move || feed_stdin(stdin, stdin_rx, &credit_writer));
    let (hangup_tx, hangup_rx) = mpsc::channel();
    let sinks = HostFrameSinks { stdin: Some(stdin_tx), closed, terminal };
    thread::spawn(move || read_host_frames(channel, sinks, hangup_tx));

    let status = wait_reaping_orphans(Pid::from_raw(child.id() as i32))?;
    await_drained(&drained_rx, open_outputs, &forwarded, writer)?;
    exited(writer, status, hangup_rx)
}

/// The program's command: on the pseudo-terminal when the host asked for one, else on pipes.
fn program_command(start: &Start, argv: &[Vec<u8>]) -> Result<(Command, Option<Pty>)> {
    let cwd = Path::new(OsStr::from_bytes(&start.cwd));
    if !cwd.is_dir() {
        bail!("the working directory {} does not exist in the guest", cwd.display());
    }
    let mut command = Command::new(OsStr::from_bytes(&argv[0]));
    command
        .args(argv[1..].iter().map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .envs(start.env.iter().map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))))
        .current_dir(cwd);
    let Some(size) = start.terminal else {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // The program gets default signal dispositions and a process group of its own, like a job
        // of a shell. Not a session of its own: a session leader without a terminal would make
        // the first terminal it opens its controlling one (without O_NOCTTY), and die of SIGHUP
        // when that terminal's master closes, as a program on a host (whose session leader is
        // the shell) does not.
        // SAFETY: setpgid is async-signal-safe and the hook allocates nothing.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0)).ok();
                Ok(())
            });
        }
        return Ok((command, None));
    };
    let pty = Pty::open(size)?;
    pty.attach(&mut command)?;
    Ok((command, Some(pty)))
}

/// Waits for the program's outputs to reach their end. A background process may hold them open
/// after the program exited: the wait gives up once no output has moved for [`DRAIN_IDLE`], and
/// never cuts off output that keeps flowing.
fn await_drained(
    drained: &mpsc::Receiver<()>,
    mut open_outputs: usize,
    forwarded: &AtomicU64,
    writer: &FrameWriter,
) -> Result<()> {
    let mut seen = forwarded.load(Ordering::SeqCst);
    while open_outputs > 0 {
        match drained.recv_timeout(DRAIN_IDLE) {
            Ok(()) => open_outputs -= 1,
            Err(_) if forwarded.load(Ordering::SeqCst) != seen => seen = forwarded.load(Ordering::SeqCst),
            Err(_) => {
                let note = "attest: output still held open by a background process after exit; not waiting for it\n";
                writer.send(Frame::Stderr(note.as_bytes().to_vec()))?;
                break;
            }
        }
    }
    Ok(())
}

/// One output of the program: where to read it, how to frame it, and whether the host's reader is gone.
type Output = (Box<dyn Read + Send>, fn(Vec<u8>) -> Frame, Arc<AtomicBool>);

/// The program's argv; an empty one asks for an interactive shell: `$SHELL` if it exists here,
/// else the first fallback shell that does.
fn program_argv(start: &Start) -> Result<Vec<Vec<u8>>> {
    if !start.argv.is_empty() {
        return Ok(start.argv.clone());
    }
    let from_env = start.env.iter().find(|(key, _)| key == b"SHELL").map(|(_, value)| value.clone());
    let shell = from_env
        .into_iter()
        .chain(FALLBACK_SHELLS.iter().map(|s| s.as_bytes().to_vec()))
        .find(|candidate| !candidate.is_empty() && Path::new(OsStr::from_bytes(candidate)).is_file())
        .with_context(|| {
            format!("no shell found: $SHELL is unset or missing and so are {}", FALLBACK_SHELLS.join(", "))
        })?;
    Ok(vec![shell])
}

/// Reports the exit, then waits for the host to hang up. From here the host owns the VM's
/// lifetime: it kills the VMM once it has read the report, and the VMM dies with the host. Powering
/// off ourselves could drop frames still queued for a host whose stdout is slow (a pager, say).
fn exited(writer: &FrameWriter, status: ExitStatus, hangup: mpsc::Receiver<()>) -> Result<()> {
    // Writes to shared directories must be on the host before the host tears the VM down.
    nix::unistd::sync();
    writer.send(Frame::Guest(GuestMessage::Exited { status, exited_ms: uptime_ms() }))?;
    hangup.recv().ok();
    Ok(())
}

/// Set when the host's reader of that stream has gone away.
#[derive(Default)]
struct HostReaders {
    stdout: Arc<AtomicBool>,
    stderr: Arc<AtomicBool>,
}

/// Where [`read_host_frames`] delivers what the host sends for the running program.
#[derive(Default)]
struct HostFrameSinks {
    /// Dropped on the host's end of stdin.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    closed: HostReaders,
    /// The program's terminal (master side), when it runs on one.
    terminal: Option<File>,
}

/// Forwards one output pipe. Once the host reader is gone the pipe is dropped, so the program's
/// next write fails with EPIPE/SIGPIPE exactly as it would writing into a closed shell pipe.
fn pump_output(
    mut pipe: Box<dyn Read + Send>,
    wrap: fn(Vec<u8>) -> Frame,
    gone: &AtomicBool,
    forwarded: &AtomicU64,
    writer: &FrameWriter,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(_) if gone.load(Ordering::SeqCst) => return,
            Ok(n) => {
                if writer.send(wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
                forwarded.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads the host's frames for the running program. It never blocks on the program: stdin goes to
/// [`feed_stdin`] (the host keeps within the credit window, so that queue stays bounded).
/// Signals `hangup` when the host closes the channel.
fn read_host_frames(mut channel: File, mut sinks: HostFrameSinks, hangup: mpsc::Sender<()>) {
    while let Ok(Some(frame)) = Frame::read_from(&mut channel) {
        match frame {
            Frame::Stdin(data) => {
                if let Some(queue) = &sinks.stdin {
                    queue.send(data).ok();
                }
            }
            // A terminal has no end of input: the host's stdin is a terminal too, and ^D travels as data.
            Frame::StdinEof if sinks.terminal.is_none() => sinks.stdin = None,
            Frame::StdoutClosed => sinks.closed.stdout.store(true, Ordering::SeqCst),
            Frame::StderrClosed => sinks.closed.stderr.store(true, Ordering::SeqCst),
            Frame::Host(HostMessage::Resize(size)) => {
                if let Some(master) = &sinks.terminal {
                    terminal::resize(master, size);
                }
            }
            _ => {}
        }
    }
    hangup.send(()).ok();
}

/// Writes queued stdin to the program and returns credit to the host for each chunk, also for
/// chunks dropped because the program closed its stdin, so the host is never left waiting.
fn feed_stdin(stdin: Box<dyn Write + Send>, queue: mpsc::Receiver<Vec<u8>>, writer: &FrameWriter) {
    let mut stdin = Some(stdin);
    for data in queue {
        if stdin.as_mut().is_some_and(|pipe| pipe.write_all(&data).is_err()) {
            stdin = None;
        }
        if writer.send(Frame::StdinCredit(data.len() as u64)).is_err() {
            return;
        }
    }
}

fn wait_reaping_orphans(pid: Pid) -> Result<ExitStatus> {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(p, signal, _)) if p == pid => return Ok(ExitStatus::Signal(signal as i32)),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e).context("waiting for the program"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attest_protocol::Network;

    fn start(argv: &[&str], shell: Option<&str>) -> Start {
        Start {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: shell.map(|s| (b"SHELL".to_vec(), s.as_bytes().to_vec())).into_iter().collect(),
            cwd: b"/".to_vec(),
            mounts: Vec::new(),
            scratch: Vec::new(),
            hostname: Vec::new(),
            network: Network::default(),
            terminal: None,
        }
    }

    #[test]
    fn an_empty_command_means_the_users_shell_or_a_fallback() {
        assert_eq!(program_argv(&start(&["true", "x"], None)).unwrap(), [b"true".to_vec(), b"x".to_vec()]);
        assert_eq!(program_argv(&start(&[], Some("/bin/sh"))).unwrap(), [b"/bin/sh".to_vec()]);
        let fallback = FALLBACK_SHELLS.iter().find(|s| Path::new(s).is_file()).unwrap();
        assert_eq!(program_argv(&start(&[], Some("/no/such/shell"))).unwrap(), [fallback.as_bytes().to_vec()]);
        assert_eq!(program_argv(&start(&[], None)).unwrap(), [fallback.as_bytes().to_vec()]);
    }
}
