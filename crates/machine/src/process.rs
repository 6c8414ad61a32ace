//! Child processes that attest owns (VMMs, file-sharing daemons): spawned so they die with attest even
//! when attest is SIGKILLed, and watched so their exit is an event rather than something to poll for.
//!
//! The kernel sends the parent-death signal when the spawning *thread* exits, not the process. So
//! every child is forked by one spawner thread that lives as long as attest, whichever thread asks:
//! a VM started on behalf of a short-lived thread (a request handler, a script call) outlives it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use attest_protocol::ExitStatus;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

struct SpawnRequest {
    name: String,
    /// Lent to the spawner thread and handed back with the result.
    command: Command,
    on_exit: Box<dyn FnOnce(ExitStatus) + Send>,
    reply: Sender<(Command, io::Result<ManagedChild>)>,
}

/// The spawner thread's queue, started on first use; the thread runs until attest exits.
fn spawner() -> &'static Mutex<Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("attest-spawner".into())
            .spawn(move || {
                for SpawnRequest { name, mut command, on_exit, reply } in incoming {
                    let spawned = ManagedChild::spawn_here(name, &mut command, on_exit);
                    reply.send((command, spawned)).ok();
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(requests)
    })
}

/// A child that is killed and reaped when dropped.
pub struct ManagedChild {
    name: String,
    child: Child,
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    /// Once reaped, its pid (and process group id) may belong to someone else.
    reaped: bool,
}

impl ManagedChild {
    /// Spawns `command` with a parent-death signal, from the spawner thread, then watches it from
    /// a thread that calls `on_exit` once it has exited (the zombie stays until this value reaps
    /// it, so the pid can never be reused while we might still signal it). Any thread may call it.
    pub fn spawn(
        name: impl Into<String>,
        command: &mut Command,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> io::Result<ManagedChild> {
        let (reply, replied) = mpsc::channel();
        let request = SpawnRequest {
            name: name.into(),
            command: std::mem::replace(command, Command::new("")),
            on_exit: Box::new(on_exit),
            reply,
        };
        let spawner = spawner().lock().unwrap_or_else(|p| p.into_inner()).clone();
        spawner.send(request).map_err(|_| io::Error::other("the spawner thread is gone"))?;
        let (returned, spawned) = replied.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?;
        *command = returned;
        spawned
    }

    /// The spawner thread's half of [`ManagedChild::spawn`].
    fn spawn_here(
        name: String,
        command: &mut Command,
        on_exit: Box<dyn FnOnce(ExitStatus) + Send>,
    ) -> io::Result<ManagedChild> {
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec the hook only makes the prctl and getppid system calls and
        // returns a bare errno: async-signal-safe, no allocation, no locks.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died between fork and prctl; then nobody would ever signal us.
                if nix::unistd::getppid() != parent {
                    // No allocation after fork: a bare errno, which std hands back to the parent.
                    return Err(nix::Error::ESRCH.into());
                }
                Ok(())
            });
        }
        // Own process group: a terminal Ctrl-C reaches attest alone, which then tears down in order.
        command.process_group(0);
        let child = command.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, exited) = mpsc::channel();
        std::thread::Builder::new().name(format!("watch-{}", child.id())).spawn(move || {
            let status = wait_without_reaping(pid);
            tx.send(status).ok();
            on_exit(status);
        })?;
        Ok(ManagedChild { name, child, exited, status: None, reaped: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit until `deadline`; `None` if it is still running then.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        if self.status.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.status = self.exited.recv_timeout(left).ok();
        }
        self.status
    }

    /// SIGKILL to its whole process group (it leads its own), so what it started goes too (a NixOS
    /// start script's helpers), then reap.
    pub fn kill(&mut self) {
        if !self.reaped {
            // Not reaped: the zombie keeps the pid and group id ours.
            nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL).ok();
        }
        if let Ok(status) = self.child.wait() {
            self.reaped = true;
            use std::os::unix::process::ExitStatusExt;
            let status = match (status.code(), status.signal()) {
                (Some(code), _) => ExitStatus::Code(code),
                (None, signal) => ExitStatus::Signal(signal.unwrap_or(Signal::SIGKILL as i32)),
            };
            self.status.get_or_insert(status);
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_without_reaping(pid: Pid) -> ExitStatus {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(WaitStatus::Exited(_, code)) => return ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return ExitStatus::Signal(signal as i32),
            Err(nix::Error::EINTR) | Ok(_) => continue,
            // ECHILD: already reaped by kill(); report it as killed.
            Err(_) => return ExitStatus::Signal(Signal::SIGKILL as i32),
        }
    }
}

impl ManagedChild {
    /// The child's stderr pipe, if it was spawned with `Stdio::piped()`.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn the_exit_is_an_event_and_waits_have_deadlines() {
        let (tx, rx) = mpsc::channel();
        let mut child =
            ManagedChild::spawn("exit 3", Command::new("sh").args(["-c", "exit 3"]), move |s| tx.send(s).unwrap())
                .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(ExitStatus::Code(3)), "on_exit hears the status");
        assert_eq!(child.wait_until(Instant::now()), Some(ExitStatus::Code(3)));

        let mut sleeper = ManagedChild::spawn("sleep", Command::new("sleep").arg("600"), |_| {}).unwrap();
        let asked = Instant::now();
        assert_eq!(sleeper.wait_until(asked + Duration::from_millis(100)), None, "still running at the deadline");
        assert!(asked.elapsed() < Duration::from_secs(5));
        let pid = sleeper.id();
        sleeper.kill();
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
    }

    #[test]
    fn a_child_spawned_for_a_short_lived_thread_outlives_it() {
        let child =
            std::thread::spawn(|| ManagedChild::spawn("sleep", Command::new("sleep").arg("600"), |_| {}).unwrap())
                .join()
                .unwrap();
        // The asking thread is gone; a parent-death signal tied to it would have killed the child.
        let mut child = child;
        assert_eq!(child.wait_until(Instant::now() + std::time::Duration::from_millis(300)), None, "still running");
    }

    #[test]
    fn each_child_leads_its_own_process_group() {
        let child = ManagedChild::spawn("sleep", Command::new("sleep").arg("600"), |_| {}).unwrap();
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(child.id() as i32))).unwrap();
        assert_eq!(pgid.as_raw() as u32, child.id(), "a terminal's ^C must reach attest alone");
    }
}
