//! The vsock device of QEMU machines, served in user space by `vhost-device-vsock` (rust-vmm) over
//! vhost-user, so no host kernel module is needed. Its host side is Firecracker's hybrid vsock:
//! a guest connecting to host port P reaches the unix socket `<uds>_P`, which attest binds before
//! the VM starts, exactly as for virtio-serial.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::error::{MachineError, Result};
use crate::events::EventSink;
use crate::helper;
use crate::process::ManagedChild;
use crate::transport::listening::wait_readable;

/// How long the daemon may take to create its vhost-user socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);

/// `$ATTEST_VHOST_VSOCK`, else `vhost-device-vsock` on PATH or in ~/.cargo/bin.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ATTEST_VHOST_VSOCK") {
        return Some(PathBuf::from(path));
    }
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/vhost-device-vsock"));
    which::which("vhost-device-vsock").ok().into_iter().chain(home_cargo).find(|p| p.is_file())
}

/// Starts the daemon for guest CID 3 with its vhost-user socket at `vhost_user` and its hybrid
/// vsock sockets at `uds`, and returns once the vhost-user socket exists (QEMU connects to it at
/// start-up). The daemon cannot be handed a bound socket, so its creation is awaited on inotify.
pub fn spawn(binary: &Path, vhost_user: &Path, uds: &Path, log_path: &Path, events: EventSink) -> Result<ManagedChild> {
    let dir = vhost_user.parent().unwrap_or(Path::new("/"));
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| MachineError::io("watching for the vsock daemon's socket")(e.into()))?;
    inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE)
        .map_err(|e| MachineError::io(format!("watching {}", dir.display()))(e.into()))?;
    let mut command = Command::new(binary);
    command.arg("--vm").arg(format!("guest-cid=3,socket={},uds-path={}", vhost_user.display(), uds.display()));
    let daemon = helper::spawn(format!("{} for vsock", binary.display()), &mut command, log_path, events)?;
    wait_for_socket(&inotify, vhost_user, Instant::now() + SOCKET_DEADLINE)?;
    Ok(daemon)
}

fn wait_for_socket(inotify: &Inotify, path: &Path, deadline: Instant) -> Result<()> {
    while !path.exists() {
        wait_readable(inotify, None, deadline).map_err(|e| {
            let why = format!("the vsock daemon did not create it within {SOCKET_DEADLINE:?}: {e}");
            MachineError::io(format!("waiting for {}", path.display()))(std::io::Error::new(e.kind(), why))
        })?;
        inotify.read_events().ok();
    }
    Ok(())
}
