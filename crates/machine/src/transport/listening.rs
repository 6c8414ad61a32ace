//! A unix socket that attest binds before the VMM starts and the VMM (or one of its device daemons)
//! connects to, so there is no window in which it could find nothing listening: a virtio-serial
//! port or virtconsole, a guest's hybrid vsock connection (`<uds>_PORT`), or QEMU's QMP.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::Transport;
use crate::error::MachineError;

pub struct ListeningSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ListeningSocket {
    pub fn bind(path: &Path) -> Result<Self, MachineError> {
        let listener = UnixListener::bind(path).map_err(MachineError::io(format!("binding {}", path.display())))?;
        Ok(ListeningSocket { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Transport for ListeningSocket {
    fn connect(&mut self, deadline: Instant, unless: Option<BorrowedFd<'_>>) -> io::Result<UnixStream> {
        wait_readable(&self.listener, unless, deadline).map_err(|e| {
            io::Error::new(e.kind(), format!("the VMM did not connect to {}: {e}", self.path.display()))
        })?;
        let (stream, _) = self.listener.accept()?;
        Ok(stream)
    }

    fn describe(&self) -> String {
        format!("socket {}", self.path.display())
    }
}

/// Blocks until `fd` is readable or `deadline` passes (`TimedOut`), or `unless` becomes readable
/// or hangs up first (`BrokenPipe`).
pub fn wait_readable(fd: &impl AsFd, unless: Option<BorrowedFd<'_>>, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        fds.extend(unless.map(|stop| PollFd::new(stop, PollFlags::POLLIN)));
        match poll(&mut fds, timeout) {
            Ok(0) if Instant::now() >= deadline => return Err(io::ErrorKind::TimedOut.into()),
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) if fds.get(1).and_then(|stop| stop.any()).unwrap_or(false) => {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the VMM exited"))
            }
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
