//! virtiofsd, the vhost-user daemon that serves one shared directory over virtio-fs.
//! attest binds the listening socket itself and hands it over as fd 3, so the daemon is ready the
//! moment it is spawned and the VMM can connect without waiting for a socket file to appear.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{MachineError, Result};

use crate::events::EventSink;
use crate::helper;
use crate::process::ManagedChild;
use crate::spec::Share;

const LISTEN_FD: RawFd = 3;

/// `$ATTEST_VIRTIOFSD`, else `virtiofsd` on PATH, else where distributions put the Rust virtiofsd,
/// else cargo's bin dir. (QEMU's old C daemon in /usr/lib/qemu takes other options and is not used.)
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ATTEST_VIRTIOFSD") {
        return Some(PathBuf::from(path));
    }
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    which::which("virtiofsd")
        .ok()
        .into_iter()
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .chain(home_cargo)
        .find(|p| p.is_file())
}

/// Starts the daemon; if it exits on its own, `events` hears why, with the tail of its log.
pub fn spawn(binary: &Path, share: &Share, socket: &Path, log_path: &Path, events: EventSink) -> Result<ManagedChild> {
    let listener = UnixListener::bind(socket).map_err(MachineError::io(format!("binding {}", socket.display())))?;
    let mut command = Command::new(binary);
    command.arg(format!("--fd={LISTEN_FD}")).arg("--shared-dir").arg(&share.host_path).args([
        "--sandbox=none",
        "--cache=auto",
        "--log-level=warn",
    ]);
    if share.read_only {
        command.arg("--readonly");
    }
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec the hook only calls fcntl or dup2 on a descriptor number it
    // copied in: async-signal-safe, no allocation, no locks.
    unsafe {
        command.pre_exec(move || {
            if fd == LISTEN_FD {
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            } else {
                nix::unistd::dup2(fd, LISTEN_FD)?;
            }
            Ok(())
        });
    }
    helper::spawn(format!("virtiofsd for {}", share.host_path.display()), &mut command, log_path, events)
}
