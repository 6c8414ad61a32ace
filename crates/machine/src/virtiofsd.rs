//! virtiofsd, the vhost-user daemon that serves one shared directory over virtio-fs.
//! attest binds the listening socket itself and hands it over as fd 3, so the daemon is ready the
//! moment it is spawned and the VMM can connect without waiting for a socket file to appear.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::process::ManagedChild;
use crate::spec::Share;

const LISTEN_FD: RawFd = 3;

/// `$ATTEST_VIRTIOFSD`, else `virtiofsd` on PATH, else the distributions' libexec locations, else cargo's bin dir.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ATTEST_VIRTIOFSD") {
        return Some(PathBuf::from(path));
    }
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    which::which("virtiofsd")
        .ok()
        .into_iter()
        .chain(["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].map(PathBuf::from))
        .chain(home_cargo)
        .find(|p| p.is_file())
}

pub fn spawn(binary: &Path, share: &Share, socket: &Path, log: &Path) -> Result<ManagedChild> {
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    let log = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new(binary);
    command
        .arg(format!("--fd={LISTEN_FD}"))
        .arg("--shared-dir")
        .arg(&share.host_path)
        .args(["--sandbox=none", "--cache=auto", "--log-level=warn"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if share.read_only {
        command.arg("--readonly");
    }
    let fd = listener.as_raw_fd();
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
    let name = format!("virtiofsd {}", share.host_path.display());
    ManagedChild::spawn(name, &mut command, |_| {})
        .with_context(|| format!("starting {} for {}", binary.display(), share.host_path.display()))
}
