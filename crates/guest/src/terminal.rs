//! The program's pseudo-terminal, for `attest exec --tty`: the program gets the slave side as its
//! stdin, stdout, stderr and controlling terminal; the agent keeps the master and pumps it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use attest_protocol::WindowSize;
use nix::libc;
use nix::pty::{openpty, Winsize};

nix::ioctl_write_ptr_bad!(set_window_size_ioctl, libc::TIOCSWINSZ, Winsize);

pub struct Pty {
    master: OwnedFd,
    slave: Option<OwnedFd>,
}

impl Pty {
    pub fn open(size: WindowSize) -> Result<Pty> {
        let pty = openpty(Some(&winsize(size)), None).context("opening a pseudo-terminal")?;
        Ok(Pty { master: pty.master, slave: Some(pty.slave) })
    }

    /// Makes the slave the command's stdio and, in the child, its controlling terminal (in a new
    /// session, so job control and terminal signals work as in a login shell).
    pub fn attach(&self, command: &mut Command) -> Result<()> {
        let slave = self.slave.as_ref().context("the terminal was already handed out")?;
        let stdio = || slave.try_clone().map(Stdio::from).context("duplicating the terminal");
        command.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        let pre_exec = || {
            nix::unistd::setsid()?;
            // SAFETY: TIOCSCTTY takes an int argument and touches no memory of ours; fd 0 is the
            // slave, already in place when pre_exec hooks run.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook calls only async-signal-safe functions (setsid, ioctl) and allocates nothing.
        unsafe { std::os::unix::process::CommandExt::pre_exec(command, pre_exec) };
        Ok(())
    }

    /// Closes the agent's copy of the slave once the program has it, so the master reads EIO (end)
    /// when the program and everything it started have closed the terminal.
    pub fn close_slave(&mut self) {
        self.slave = None;
    }

    pub fn master(&self) -> Result<File> {
        Ok(File::from(self.master.try_clone().context("duplicating the terminal master")?))
    }
}

/// Sets the terminal's size; the kernel then sends SIGWINCH to its foreground process group.
pub fn resize(master: &File, size: WindowSize) {
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
    let result = unsafe { set_window_size_ioctl(master.as_raw_fd(), &winsize(size)) };
    if let Err(err) = result {
        println!("attest-init: resizing the terminal: {err}");
    }
}

fn winsize(size: WindowSize) -> Winsize {
    Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 }
}
