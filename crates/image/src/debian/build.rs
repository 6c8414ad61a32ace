//! Building a Debian root tree from a [`Recipe`]: debootstrap into a temporary root, the recipe's
//! files and the kernel's modules staged in, the chroot script; one build at a time per cache
//! directory, every step with a time limit and its output in the build log, and nothing left mounted
//! or half-written on failure. Packing the tree (qcow2 or cpio) is in `pack.rs`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};

use super::recipe::*;
use crate::ImageError;

/// Takes the exclusive build lock of `dir` (`.build.lock`), saying so when another build holds it.
pub(super) fn lock_builds(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Flock<File>, ImageError> {
    let path = dir.join(".build.lock");
    let io = |what: &str| ImageError::io(format!("{what} {}", path.display()));
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io("opening"))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            progress("waiting for another attest to finish building a Debian image");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io("locking")(errno.into()))
        }
        Err((_, errno)) => Err(io("locking")(errno.into())),
    }
}

/// One build's private directory (`cache/debian/build-<pid>-<n>`: the debootstrap root, the raw
/// filesystem) and log. Dropping it unmounts whatever is still mounted under the root (debootstrap
/// mounts /proc and /sys in the chroot, and a failure may leave them) and removes the directory
/// without crossing into any mount that could not be undone.
pub(super) struct Build {
    dir: PathBuf,
    log_path: PathBuf,
    log: File,
}

impl Build {
    pub(super) fn new(parent: &Path, log_path: PathBuf) -> Result<Build, ImageError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!("build-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
        // A fresh file in append mode: every step's output lands at the end, and a straggler of an
        // earlier build still holding the old log cannot write holes into this one.
        let _ = std::fs::remove_file(&log_path);
        let log = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&log_path)
            .map_err(ImageError::io(format!("creating {}", log_path.display())))?;
        Ok(Build { dir, log_path, log })
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The build's private directory, for intermediate files.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The build's root tree: debootstrap of the recipe's suite and packages, its files over it,
    /// the kernel's `modules` directory under `/usr/lib/modules`, the chroot script, and nothing left
    /// mounted. Packing it is [`super::pack`]'s job.
    pub(super) fn make_root(
        &mut self,
        recipe: &Recipe,
        modules: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let root = self.root();
        progress(&format!(
            "debootstrap {} from {} (about a minute; log: {})",
            recipe.suite,
            recipe.mirror,
            self.log_path.display()
        ));
        let include = format!("--include={}", recipe.packages.join(","));
        self.command("debootstrap", true, 1200, "debootstrap", |c| {
            c.args(["--variant=minbase", &include, &recipe.suite]).arg(&root).arg(&recipe.mirror)
        })?;

        progress("configuring the guest");
        let staged = self.dir.join("files");
        stage_files(&staged, &recipe.files)?;
        self.command("copying the configuration files", true, 300, "cp", |c| {
            c.args(["-R", "--preserve=mode", "--remove-destination"]).arg(staged.join(".")).arg(&root)
        })?;
        let guest_modules = root.join("usr/lib/modules");
        self.command("copying the kernel's modules", true, 300, "sh", |c| {
            c.args(["-c", "mkdir -p \"$1\" && cp -R \"$2\" \"$1/\"", "sh"]).arg(&guest_modules).arg(modules)
        })?;
        self.command("configuring the guest in a chroot", true, 300, "chroot", |c| {
            c.arg(&root).args(["/bin/sh", "-c", &recipe.chroot_script, "sh", &recipe.kernel_release])
        })?;
        self.unmount_all()?;
        Ok(root)
    }

    /// Runs `program` with the arguments `args` adds, its output appended to the log, stopped after
    /// `limit_secs`; `privileged` steps go through sudo unless attest is root.
    pub(super) fn command(
        &mut self,
        step: &str,
        privileged: bool,
        limit_secs: u32,
        program: &str,
        args: impl FnOnce(&mut Command) -> &mut Command,
    ) -> Result<(), ImageError> {
        use std::io::Write as _;
        let mut cmd = if privileged && !nix::unistd::geteuid().is_root() {
            let mut sudo = Command::new("sudo");
            sudo.arg("timeout");
            sudo
        } else {
            Command::new("timeout")
        };
        // GNU timeout: TERM after the limit (debootstrap unmounts on TERM), KILL 30 s later.
        cmd.args(["--kill-after=30", &limit_secs.to_string(), program]);
        args(&mut cmd);
        // If attest dies mid-build, SIGTERM the step: debootstrap traps it and unmounts what it
        // mounted in the chroot. (Lost across sudo, which is set-uid; attest running as root keeps it.)
        // SAFETY: between fork and exec the hook only makes the prctl system call and returns its
        // errno: async-signal-safe, no allocation, no locks.
        unsafe {
            cmd.pre_exec(|| Ok(nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?));
        }
        writeln!(self.log, "==> {step}: {cmd:?}").ok();
        let log = |f: &File| f.try_clone().map(Stdio::from);
        let io = ImageError::io(format!("opening the build log {}", self.log_path.display()));
        cmd.stdin(Stdio::null()).stdout(log(&self.log).map_err(&io)?).stderr(log(&self.log).map_err(&io)?);
        let status = cmd.status().map_err(|e| ImageError::GuestBuild {
            step: step.into(),
            what: format!("could not start {:?}: {e}", cmd.get_program()),
            log: self.log_path.clone(),
            tail: String::new(),
        })?;
        if status.success() {
            return Ok(());
        }
        let what = match status.code() {
            Some(124 | 137) => format!("did not finish within {limit_secs} s (stopped)"),
            Some(126 | 127) => {
                format!("could not run {program} (scripts/setup installs debootstrap, qemu-utils, e2fsprogs and cpio)")
            }
            _ => format!("exited with {status}"),
        };
        Err(ImageError::GuestBuild {
            step: step.into(),
            what,
            log: self.log_path.clone(),
            tail: log_tail(&self.log_path, 25),
        })
    }

    /// Unmounts everything mounted under the build directory (deepest first), and checks nothing is left.
    fn unmount_all(&mut self) -> Result<(), ImageError> {
        let mounts = mounts_under(&self.dir);
        for mount in mounts.iter().rev() {
            // Lazy: detached at once even if a straggler process still uses it.
            let _ = self.command(&format!("unmounting {}", mount.display()), true, 60, "umount", |c| {
                c.args(["--lazy"]).arg(mount)
            });
        }
        let left = mounts_under(&self.dir);
        if left.is_empty() {
            return Ok(());
        }
        Err(ImageError::GuestBuild {
            step: "unmounting the build's chroot".into(),
            what: format!("still mounted: {left:?}"),
            log: self.log_path.clone(),
            tail: log_tail(&self.log_path, 10),
        })
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        if self.unmount_all().is_err() {
            tracing::warn!("leaving {} in place: mounts under it could not be undone", self.dir.display());
            return;
        }
        // --one-file-system: never descend into a mount, even one that appeared since.
        let dir = self.dir.clone();
        if self
            .command("removing the build directory", true, 300, "rm", |c| {
                c.args(["-rf", "--one-file-system"]).arg(&dir)
            })
            .is_err()
        {
            tracing::warn!("could not remove {}; see {}", dir.display(), self.log_path.display());
        }
    }
}

/// Removes build directories left by builds whose process is gone (killed mid-build).
pub(super) fn remove_stale_builds(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("build-").and_then(|rest| rest.split('-').next()) else { continue };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let log_path = dir.join(format!("{name}.stale.log"));
        let Ok(log) = std::fs::OpenOptions::new().create(true).append(true).open(&log_path) else { continue };
        drop(Build { dir: entry.path(), log_path: log_path.clone(), log });
        let _ = std::fs::remove_file(log_path);
    }
}

/// Writes the recipe's files under `staged` (a tree copied over the guest's root).
fn stage_files(staged: &Path, files: &[(String, Content)]) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, content) in files {
        let target = staged.join(path);
        let io = ImageError::io(format!("staging {}", target.display()));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(&io)?;
        }
        match content {
            Content::File { text, mode } => {
                std::fs::write(&target, text).map_err(&io)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode)).map_err(&io)?;
            }
            Content::Symlink(to) => std::os::unix::fs::symlink(to, &target).map_err(&io)?,
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, in the order they were mounted (`/proc/self/mountinfo`).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(escaped.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")))
        .filter(|mount| mount.starts_with(dir))
        .collect()
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB).
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else { return String::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut tail = String::new();
    for line in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(tail, "  {line}");
    }
    tail
}
