//! Running a test script: the Python module written beside the run's state, the driver's socket,
//! `python3 -m attest_driver SCRIPT` as a child that dies with attest, Ctrl-C and SIGTERM passed on
//! to it, the global timeout enforced on it too, and every machine stopped when it ends.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use attest_driver::Driver;
use attest_machine::process::ManagedChild;
use attest_protocol::ExitStatus;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::{server, ScriptError, PYTHON_MODULE};

/// How long a script may take to end after the global timeout stopped its machines.
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

pub struct ScriptOptions {
    pub script: PathBuf,
    /// Where to write the JUnit report.
    pub junit_xml: Option<PathBuf>,
    /// A Python REPL with the script's globals instead of running it (NixOS's `-I`).
    pub interactive: bool,
}

/// Runs `options.script` against `driver`'s machines and returns the exit status attest should
/// exit with: the script's (0, 1 on an error, 130 after Ctrl-C), or 124 if the global timeout
/// ended it.
pub fn run_script(driver: Driver, options: &ScriptOptions) -> Result<i32, ScriptError> {
    let driver = Arc::new(driver);
    let module_dir = driver.state_dir().join("python");
    std::fs::create_dir_all(&module_dir).map_err(ScriptError::io(format!("creating {}", module_dir.display())))?;
    let module = module_dir.join("attest_driver.py");
    std::fs::write(&module, PYTHON_MODULE).map_err(ScriptError::io(format!("writing {}", module.display())))?;
    let socket = driver.state_dir().join("driver.sock");
    let listener = UnixListener::bind(&socket).map_err(ScriptError::io(format!("binding {}", socket.display())))?;
    server::serve(Arc::downgrade(&driver), listener);

    let mut command = std::process::Command::new(python()?);
    command
        .args(["-m", "attest_driver"])
        .arg(&options.script)
        .args(options.interactive.then_some("--interactive"))
        .env("PYTHONPATH", &module_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("ATTEST_DRIVER_SOCKET", &socket);
    let mut python = ManagedChild::spawn("python3", &mut command, |_| {})
        .map_err(ScriptError::io("starting python3 for the test script"))?;
    let forwarding = forward_signals(python.id())?;
    // A REPL reads the terminal: its process group must be the terminal's foreground one.
    let terminal = options.interactive.then(|| terminal::Foreground::give(python.id())).flatten();

    let deadline = driver.global_deadline() + TIMEOUT_GRACE;
    let status = python.wait_until(deadline);
    drop(terminal);
    forwarding.close();
    let timed_out = driver.timed_out();
    if status.is_none() {
        driver.log().info(None, "!!! the test script did not end after the global timeout: killing it");
        python.kill();
    }
    driver.stop_all();
    if let Some(path) = &options.junit_xml {
        let failure = timed_out.then(|| attest_driver::DriverError::GlobalTimeout(driver.global_timeout()));
        driver.write_junit(path, "NixOS integration test", failure.as_ref())?;
    }
    Ok(match status {
        _ if timed_out => 124,
        Some(ExitStatus::Code(code)) => code,
        Some(ExitStatus::Signal(signal)) => 128 + signal,
        None => 124,
    })
}

mod terminal {
    //! Lending the terminal to the script's process group (interactive mode) and taking it back.

    use std::os::fd::{AsFd, BorrowedFd};

    use nix::sys::signal::{signal, SigHandler, Signal};
    use nix::unistd::{getpgrp, tcsetpgrp, Pid};

    /// The terminal on stdin, in the foreground for the script until dropped.
    pub struct Foreground {
        ours: Pid,
    }

    impl Foreground {
        /// `None` when stdin is not a terminal (a REPL on a pipe needs no foreground).
        pub fn give(pid: u32) -> Option<Foreground> {
            let stdin = std::io::stdin();
            if !std::io::IsTerminal::is_terminal(&stdin) {
                return None;
            }
            let ours = getpgrp();
            set_foreground(stdin.as_fd(), Pid::from_raw(pid as i32));
            Some(Foreground { ours })
        }
    }

    impl Drop for Foreground {
        fn drop(&mut self) {
            set_foreground(std::io::stdin().as_fd(), self.ours);
        }
    }

    /// `tcsetpgrp` from what may be a background process group, which the kernel answers with
    /// SIGTTOU unless it is ignored.
    fn set_foreground(tty: BorrowedFd<'_>, group: Pid) {
        // SAFETY: SIG_IGN installs no handler code; the previous disposition is restored at once.
        let previous = unsafe { signal(Signal::SIGTTOU, SigHandler::SigIgn) };
        tcsetpgrp(tty, group).ok();
        if let Ok(previous) = previous {
            // SAFETY: restoring the disposition that was in place before, whatever it was.
            unsafe { signal(Signal::SIGTTOU, previous) }.ok();
        }
    }
}

/// `$ATTEST_PYTHON`, else `python3` on PATH.
fn python() -> Result<PathBuf, ScriptError> {
    if let Some(path) = std::env::var_os("ATTEST_PYTHON") {
        return Ok(PathBuf::from(path));
    }
    which::which("python3").map_err(|_| ScriptError::NoPython)
}

/// Passes SIGINT, SIGTERM and SIGHUP on to the script's process group (it has its own, so a
/// terminal's Ctrl-C reaches attest alone and attest decides): Python turns SIGINT into a
/// KeyboardInterrupt at the script's current line.
fn forward_signals(pid: u32) -> Result<signal_hook::iterator::Handle, ScriptError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(ScriptError::io("installing signal handlers"))?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let Ok(signal) = Signal::try_from(signal) else { continue };
            killpg(Pid::from_raw(pid as i32), signal).ok();
        }
    });
    Ok(handle)
}
