//! Per-run state directories: private (0700), with paths short enough for unix sockets, and removed
//! when the run ends, also when attest itself is SIGKILLed (a detached reaper removes it then).
//! Each machine of a run has its own subdirectory ([`MachineDir`]) for its sockets and logs.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::MachineError;

/// `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Longest socket file name attest puts in a machine's directory (e.g. `virtiofs-15.sock`).
const LONGEST_SOCKET_NAME: usize = 24;
/// Longest name of a machine's directory (`NN-name`, the name cut to fit).
const LONGEST_MACHINE_DIR: usize = 16;
/// What a run adds under the base: `/XXXXXX/` (the run) and `/` after the machine's directory.
const RUN_AND_SEPARATORS: usize = "/XXXXXX/".len() + "/".len();

pub struct StateDir {
    path: PathBuf,
    keep: bool,
    reaper: Option<Child>,
}

impl StateDir {
    /// Creates a fresh directory under the per-user base. With `keep`, it survives the run.
    pub fn create(keep: bool) -> io::Result<StateDir> {
        let base = base_dir()?;
        let dir = tempfile::Builder::new().prefix("").rand_bytes(6).tempdir_in(&base)?;
        let path = dir.keep();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        let reaper = if keep { None } else { Some(spawn_reaper(&path)?) };
        Ok(StateDir { path, keep, reaper })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(&self) -> bool {
        self.keep
    }

    /// The directory of the run's machine number `index` named `name`, created if needed:
    /// `NN-name`, with the name cut so that socket paths still fit.
    pub fn machine_dir(&self, index: usize, name: &str) -> Result<MachineDir, MachineError> {
        let mut dir_name = format!("{index:02}-");
        for c in name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }) {
            if dir_name.len() + c.len_utf8() > LONGEST_MACHINE_DIR {
                break;
            }
            dir_name.push(c);
        }
        let path = self.path.join(dir_name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(MachineError::io(format!("creating {}", path.display()))(e)),
        }
        Ok(MachineDir { path })
    }
}

/// One machine's part of a run's state directory: its sockets, console log and helper logs.
/// Removed with the run's directory.
pub struct MachineDir {
    path: PathBuf,
}

impl MachineDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path in this directory for a unix socket, checked against the kernel's length limit and
    /// free to bind: a machine that starts again finds its previous start's socket files there.
    pub fn socket(&self, name: &str) -> Result<PathBuf, MachineError> {
        let path = self.path.join(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(MachineError::SocketPathTooLong { path, limit: MAX_SOCKET_PATH });
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(MachineError::io(format!("removing the old socket {}", path.display()))(e)),
        }
        Ok(path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep {
            std::fs::remove_dir_all(&self.path).ok();
        }
        // Closing the reaper's stdin tells it we are done; the directory is gone already.
        if let Some(mut reaper) = self.reaper.take() {
            drop(reaper.stdin.take());
            reaper.wait().ok();
        }
    }
}

/// Bytes to spare in the longest socket path attest would create under `base`
/// (`base/XXXXXX/NN-machine/socket`); negative when such paths do not fit.
pub fn socket_headroom(base: &Path) -> i64 {
    let longest = base.as_os_str().len() + RUN_AND_SEPARATORS + LONGEST_MACHINE_DIR + LONGEST_SOCKET_NAME;
    MAX_SOCKET_PATH as i64 - longest as i64
}

/// The per-user parent of state directories: `$XDG_RUNTIME_DIR/attest` when its paths leave room for
/// socket names, else `/tmp/attest-<uid>`. It must be ours and private.
pub fn base_dir() -> io::Result<PathBuf> {
    let uid = nix::unistd::getuid().as_raw();
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("attest"));
    let base = runtime
        .filter(|p| p.parent().is_some_and(Path::is_dir) && socket_headroom(p) >= 0)
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/attest-{uid}")));
    match std::fs::DirBuilder::new().mode(0o700).create(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("creating {}: {e}", base.display()))),
    }
    let meta = std::fs::symlink_metadata(&base)?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} must be a directory owned by uid {uid} with mode 0700; remove it and retry",
            base.display()
        )));
    }
    Ok(base)
}

/// A shell in its own process group (so a terminal's Ctrl-C does not reach it) that waits for its
/// stdin to close, which happens when attest exits by any means, and then removes the directory.
fn spawn_reaper(dir: &Path) -> io::Result<Child> {
    Command::new("/bin/sh")
        .args(["-c", "cat >/dev/null; rm -rf -- \"$1\"", "attest-reaper"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

/// The free bytes of the filesystem `dir` is (or will be) on, and the directory asked about.
pub fn free_space(dir: &Path) -> Option<(u64, PathBuf)> {
    let probe = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf();
    let stat = nix::sys::statvfs::statvfs(&probe).ok()?;
    Some((stat.blocks_available() * stat.fragment_size(), probe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_headroom_counts_the_run_directory_and_the_longest_socket_name() {
        let fits_exactly = "/".repeat(MAX_SOCKET_PATH - RUN_AND_SEPARATORS - LONGEST_MACHINE_DIR - LONGEST_SOCKET_NAME);
        assert_eq!(socket_headroom(Path::new(&fits_exactly)), 0);
        assert_eq!(socket_headroom(Path::new(&format!("{fits_exactly}x"))), -1);
        let dir = StateDir::create(false).unwrap();
        let machine = dir.machine_dir(99, "a-machine-name-far-too-long-for-a-directory").unwrap();
        assert_eq!(machine.path().file_name().unwrap().len(), LONGEST_MACHINE_DIR);
        assert!(machine.socket(&"x".repeat(LONGEST_SOCKET_NAME)).is_ok(), "base_dir leaves room");
        assert!(machine
            .socket(&"x".repeat(LONGEST_SOCKET_NAME + socket_headroom(&base_dir().unwrap()) as usize + 1))
            .is_err());
    }

    #[test]
    fn state_dirs_are_private_distinct_and_removed() {
        let a = StateDir::create(false).unwrap();
        let b = StateDir::create(false).unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let server = a.machine_dir(0, "server").unwrap();
        let client = a.machine_dir(1, "client/../x").unwrap();
        assert_eq!(server.path(), a.path().join("00-server"));
        assert_eq!(client.path(), a.path().join("01-client_.._x"));
        assert!(server.socket("virtiofs-15.sock").is_ok());
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn kept_state_dirs_survive() {
        let a = StateDir::create(true).unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(path.exists());
        std::fs::remove_dir_all(path).unwrap();
    }
}
