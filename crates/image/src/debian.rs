//! A Debian bookworm guest with systemd that speaks the NixOS test driver's backdoor protocol:
//! the recipe (packages, configuration files, the steps run in the chroot), the qcow2 built from it
//! with debootstrap and `mkfs.ext4 -d` (no loop mounts), cached under a hash of the recipe, and the
//! boot initramfs that loads the block driver and switches to the image's systemd.
//!
//! The guest is configured like NixOS's `test-instrumentation.nix`: `backdoor.service` runs NixOS's
//! script on hvc0 (stderr on ttyS0), no getty on ttyS0 or hvc0 (one on tty1), journald forwarded to
//! ttyS0, root without a password, systemd's start and device timeouts at 300 s.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::backdoor::BACKDOOR_SCRIPT;
use crate::initramfs::{base_layout, with_modules};
use crate::{ImageError, Initramfs, Kernel, ModuleFile};
use attest_protocol::MODULE_LIST;

pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// Installed on top of debootstrap's minbase (Priority: required).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "bash",
    "kmod",
    "procps",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "curl",
    "ca-certificates",
    "python3",
    "less",
];
/// Units masked in the guest: the consoles the backdoor owns (no getty on ttyS0 or hvc0), the
/// first-boot wizard (it would prompt on the console), periodic maintenance useless in a
/// short-lived test VM, and boot steps nothing in a test uses.
pub const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "serial-getty@hvc0.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-timesyncd.service",
    // Boot work a test VM does not need (about 1 s of a 12 s boot under TCG).
    "modprobe@drm.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "systemd-pstore.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
];
/// The image's virtual size: free space for tests (qcow2 stores only what is written).
pub const DISK_SIZE: &str = "2G";
/// The ext4 label of the root filesystem.
pub const LABEL: &str = "attest-root";

/// Run in the chroot after the files are in place (`$1` is the guest kernel's release).
const CHROOT_SCRIPT: &str = "set -eu
passwd --delete root
depmod --all \"$1\"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
";

/// The drivers the boot initramfs always loads: the disk and its filesystem.
pub const BOOT_DRIVERS: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// What a guest file is in the recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    File { text: String, mode: u32 },
    Symlink(String),
}

/// Everything that determines the image. Its [`Recipe::digest`] names the cached qcow2.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    /// Files and symlinks written over debootstrap's tree, paths relative to the guest's root.
    pub files: Vec<(String, Content)>,
    pub chroot_script: String,
    /// The guest kernel's release: its `/lib/modules/<release>` is copied into the image.
    pub kernel_release: String,
}

impl Recipe {
    /// The recipe of the attest Debian guest for a kernel release.
    pub fn new(kernel_release: &str) -> Recipe {
        let file = |path: &str, text: &str, mode: u32| (path.to_string(), Content::File { text: text.into(), mode });
        let link = |path: &str, target: &str| (path.to_string(), Content::Symlink(target.into()));
        let units = "etc/systemd/system";
        let mut files = vec![
            file("etc/attest/backdoor", BACKDOOR_SCRIPT, 0o755),
            file(&format!("{units}/backdoor.service"), BACKDOOR_UNIT, 0o644),
            link(&format!("{units}/multi-user.target.wants/backdoor.service"), "/etc/systemd/system/backdoor.service"),
            link(&format!("{units}/default.target"), "/lib/systemd/system/multi-user.target"),
            file("etc/systemd/journald.conf.d/attest.conf", JOURNALD_CONF, 0o644),
            file("etc/systemd/system.conf.d/attest.conf", SYSTEM_CONF, 0o644),
            file("etc/fstab", "/dev/vda / ext4 rw,relatime 0 0\n", 0o644),
            // The driver names each machine with `systemd.hostname=` on the kernel command line.
            file("etc/hostname", "debian\n", 0o644),
            // Not the build host's resolver; a test that wants DNS configures it.
            file("etc/resolv.conf", "", 0o644),
            // A fixed id, so no boot is a "first boot"; the driver passes `systemd.machine_id=`
            // per machine (see [`DebianGuest::cmdline_for`]).
            file("etc/machine-id", "a77e57deb1a40000a77e57deb1a40000\n", 0o444),
        ];
        files.extend(MASKED_UNITS.iter().map(|unit| link(&format!("{units}/{unit}"), "/dev/null")));
        Recipe {
            suite: SUITE.into(),
            mirror: MIRROR.into(),
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
            files,
            chroot_script: CHROOT_SCRIPT.into(),
            kernel_release: kernel_release.into(),
        }
    }

    /// A digest of everything in the recipe (and of the build steps' version).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(BUILD_STEPS_VERSION.as_bytes());
        field(self.suite.as_bytes());
        field(self.mirror.as_bytes());
        for package in &self.packages {
            field(package.as_bytes());
        }
        for (path, content) in &self.files {
            field(path.as_bytes());
            match content {
                Content::File { text, mode } => {
                    field(format!("file {mode:o}").as_bytes());
                    field(text.as_bytes());
                }
                Content::Symlink(target) => field(format!("symlink {target}").as_bytes()),
            }
        }
        field(self.chroot_script.as_bytes());
        field(self.kernel_release.as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cached image's file name: `debian-<suite>-<digest prefix>.qcow2`.
    pub fn file_name(&self) -> String {
        format!("debian-{}-{}.qcow2", self.suite, &self.digest()[..16])
    }
}

/// Bumped when the build steps in this file change in a way the recipe's data does not show.
const BUILD_STEPS_VERSION: &str = "1: debootstrap minbase, files, modules, chroot script, mkfs.ext4 -d, qcow2";

/// NixOS's `systemd.services.backdoor` (test-instrumentation.nix).
const BACKDOOR_UNIT: &str = "[Unit]
Description=attest backdoor shell (NixOS test driver protocol)
Requires=dev-hvc0.device dev-ttyS0.device
After=dev-hvc0.device dev-ttyS0.device

[Service]
ExecStart=/bin/bash /etc/attest/backdoor
KillSignal=SIGHUP

[Install]
WantedBy=multi-user.target
";

const JOURNALD_CONF: &str = "[Journal]
ForwardToConsole=yes
TTYPath=/dev/ttyS0
MaxLevelConsole=debug
";

const SYSTEM_CONF: &str = "[Manager]
DefaultTimeoutStartSec=300
DefaultDeviceTimeoutSec=300
ShowStatus=false
";

/// A bootable Debian guest: direct kernel boot of `kernel` with `initrd` and `cmdline`, root on
/// `disk` as the first virtio-blk device (`/dev/vda`).
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// The cached qcow2. Never boot it directly: give each VM an overlay
    /// (`qemu-img create -f qcow2 -b DISK -F qcow2 overlay.qcow2`), so the cache is never modified.
    pub disk: PathBuf,
    /// The bzImage whose modules the image carries.
    pub kernel: PathBuf,
    /// The boot initramfs: loads the drivers, mounts /dev/vda, switches root to systemd.
    pub initrd: PathBuf,
    /// The kernel command line, without a hostname (see [`DebianGuest::cmdline_for`]).
    pub cmdline: String,
}

/// The kernel command line of the Debian guest. ttyS0 is the serial log; tty0 comes last, so
/// it is `/dev/console`, as in NixOS's test VMs (a VGA console to type on, tty1 has a getty);
/// `net.ifnames=0` names NICs eth0, eth1… as NixOS tests expect.
pub const CMDLINE: &str = "console=ttyS0 console=tty0 root=/dev/vda rw panic=-1 net.ifnames=0";

impl DebianGuest {
    /// The command line for the machine `name`: its hostname and a machine id of its own (derived
    /// from the name, so the same machine keeps its id across restarts).
    pub fn cmdline_for(&self, name: &str) -> String {
        let id: String =
            Sha256::digest(format!("attest machine {name}")).iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{} systemd.hostname={name} systemd.machine_id={id}", self.cmdline)
    }
}

/// The Debian guest for `kernel`: builds the image unless it is cached (see [`image`]), and the boot
/// initramfs with `drivers` (the backend's, e.g. `virtio_console`, `virtio_net`) plus
/// [`BOOT_DRIVERS`], cached under `cache/initramfs`. `progress` hears about long steps.
pub fn ensure(
    cache: &Path,
    kernel: &Kernel,
    drivers: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<DebianGuest, ImageError> {
    let disk = image(cache, kernel, false, progress)?;
    let mut wanted: Vec<&str> = BOOT_DRIVERS.to_vec();
    wanted.extend(drivers.iter().filter(|d| !BOOT_DRIVERS.contains(d)));
    let resolution = kernel.module_tree()?.resolve(&wanted)?;
    if let Some(missing) = resolution.missing.iter().find(|m| BOOT_DRIVERS.contains(&m.as_str())) {
        return Err(ImageError::BadKernel {
            path: kernel.path.clone(),
            why: format!("the Debian guest needs driver {missing}, which is neither a module nor built in"),
        });
    }
    let busybox = crate::find_busybox()?;
    let initrd = boot_initramfs(&busybox, &resolution.load, kernel.accepts_unsigned_modules())?
        .write_cached(&cache.join("initramfs"))?;
    Ok(DebianGuest { disk, kernel: kernel.path.clone(), initrd, cmdline: CMDLINE.into() })
}

/// Seconds the boot initramfs waits for /dev/vda after loading the drivers.
const ROOT_WAIT_SECS: u32 = 10;

/// The boot initramfs's `/init`: load the modules, wait (bounded) for /dev/vda, mount it at
/// /sysroot and hand over to its systemd. Any failure is printed on the serial port and the console,
/// then the VM powers off (a clear message, not a kernel panic about a dying init).
fn boot_init() -> String {
    format!(
        r#"#!/bin/sh
fail() {{
  echo "attest boot initramfs: $*; powering off" > /dev/ttyS0
  echo "attest boot initramfs: $*; powering off" >&2
  poweroff -f
}}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for module in $(cat {MODULE_LIST}); do insmod "$module" || fail "cannot load $module"; done
tries=0
while [ ! -b /dev/vda ]; do
  tries=$((tries + 1))
  [ "$tries" -le {polls} ] || fail "no /dev/vda {ROOT_WAIT_SECS} s after loading virtio_blk (expected the root disk as the first virtio-blk device)"
  sleep 0.1
done
mount -t ext4 -o rw /dev/vda /sysroot || fail "cannot mount /dev/vda (ext4, label {LABEL}) at /sysroot"
# /sbin/init is an absolute symlink (to /lib/systemd/systemd): resolve it inside the new root.
[ -L /sysroot/sbin/init ] || [ -x /sysroot/sbin/init ] || fail "/dev/vda has no /sbin/init"
mount --move /dev /sysroot/dev || fail "cannot move /dev to /sysroot/dev"
umount /proc /sys
exec switch_root /sysroot /sbin/init
"#,
        polls = ROOT_WAIT_SECS * 10
    )
}

const BOOT_APPLETS: [&str; 9] = ["mount", "umount", "insmod", "sleep", "cat", "poweroff", "switch_root", "echo", "["];

/// The boot initramfs: busybox, `/init` ([`boot_init`]) and `modules` in load order.
pub fn boot_initramfs(busybox: &Path, modules: &[ModuleFile], unsigned_modules: bool) -> Result<Initramfs, ImageError> {
    let mut image = base_layout(busybox)?.file("init", boot_init().into_bytes(), 0o755);
    for applet in BOOT_APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    with_modules(image, modules, unsigned_modules)
}

/// The cached qcow2 for `kernel`: `cache/debian/<recipe file name>`, built when missing or when
/// `rebuild` is set. The build goes through a temporary name and a rename, so an interrupted build
/// never leaves a partial image under the final name; its log is kept beside the image
/// (`<name>.log`). Needs root or sudo (debootstrap, chroot, device nodes).
pub fn image(
    cache: &Path,
    kernel: &Kernel,
    rebuild: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let recipe = Recipe::new(&kernel.release);
    let dir = cache.join("debian");
    let path = dir.join(recipe.file_name());
    if path.exists() && !rebuild {
        return Ok(path);
    }
    let modules = kernel.modules_dir.as_deref().ok_or_else(|| ImageError::BadKernel {
        path: kernel.path.clone(),
        why: format!("no lib/modules/{} beside it; the Debian guest's udev needs the kernel's modules", kernel.release),
    })?;
    std::fs::create_dir_all(&dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
    // One build at a time (threads and processes alike); the holder's steps all have time limits.
    let _lock = lock_builds(&dir, progress)?;
    if path.exists() && !rebuild {
        return Ok(path);
    }
    remove_stale_builds(&dir);
    let started = Instant::now();
    let log_path = dir.join(format!("{}.log", recipe.file_name()));
    let mut build = Build::new(&dir, log_path)?;
    build.run(&recipe, modules, &path, progress)?;
    progress(&format!("built {} in {:.0?}", path.display(), started.elapsed()));
    Ok(path)
}

/// Takes the exclusive build lock of `dir` (`.build.lock`), saying so when another build holds it.
fn lock_builds(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Flock<File>, ImageError> {
    let path = dir.join(".build.lock");
    let io = |what: &str| ImageError::io(format!("{what} {}", path.display()));
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io("opening"))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            progress("waiting for another attest to finish building the Debian image");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io("locking")(errno.into()))
        }
        Err((_, errno)) => Err(io("locking")(errno.into())),
    }
}

/// One build's private directory (`cache/debian/build-<pid>-<n>`: the debootstrap root, the raw
/// filesystem) and log. Dropping it unmounts whatever is still mounted under the root (debootstrap
/// mounts /proc and /sys in the chroot, and a failure may leave them) and removes the directory
/// without crossing into any mount that could not be undone.
struct Build {
    dir: PathBuf,
    log_path: PathBuf,
    log: File,
}

impl Build {
    fn new(parent: &Path, log_path: PathBuf) -> Result<Build, ImageError> {
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

    fn run(
        &mut self,
        recipe: &Recipe,
        modules: &Path,
        image: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
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

        progress("making the ext4 filesystem and the qcow2");
        let raw = self.dir.join("root.ext4");
        self.command("making the ext4 filesystem", true, 600, "mkfs.ext4", |c| {
            c.args(["-q", "-F", "-L", LABEL, "-d"]).arg(&root).arg(&raw).arg(DISK_SIZE)
        })?;
        let parent = image.parent().unwrap_or(Path::new("."));
        let partial = tempfile::Builder::new()
            .prefix(".partial-")
            .suffix(".qcow2")
            .tempfile_in(parent)
            .map_err(ImageError::io(format!("creating a temporary image in {}", parent.display())))?;
        self.command("converting to qcow2", false, 600, "qemu-img", |c| {
            c.args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(partial.path())
        })?;
        set_read_only(partial.path())?;
        partial.persist(image).map_err(|e| e.error).map_err(ImageError::io(format!("storing {}", image.display())))?;
        Ok(())
    }

    /// Runs `program` with the arguments `args` adds, its output appended to the log, stopped after
    /// `limit_secs`; `privileged` steps go through sudo unless attest is root.
    fn command(
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
                format!("could not run {program} (scripts/setup installs debootstrap, qemu-utils and e2fsprogs)")
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
fn remove_stale_builds(dir: &Path) {
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

fn set_read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(ImageError::io(format!("making {} read-only", path.display())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_name_follows_every_part_of_the_recipe() {
        let base = Recipe::new("6.1.0-56-cloud-amd64");
        assert_eq!(base.digest(), Recipe::new("6.1.0-56-cloud-amd64").digest(), "the digest is deterministic");
        let mut changed = Vec::new();
        changed.push(Recipe::new("6.1.0-57-cloud-amd64"));
        let mut r = base.clone();
        r.packages.push("vim".into());
        changed.push(r);
        let mut r = base.clone();
        r.files[0].1 = Content::File { text: "echo changed".into(), mode: 0o755 };
        changed.push(r);
        let mut r = base.clone();
        r.files[0].1 = Content::File { text: BACKDOOR_SCRIPT.into(), mode: 0o644 };
        changed.push(r);
        let mut r = base.clone();
        r.chroot_script.push_str("true\n");
        changed.push(r);
        for recipe in changed {
            assert_ne!(recipe.file_name(), base.file_name(), "{recipe:?}");
        }
        assert!(base.file_name().starts_with("debian-bookworm-") && base.file_name().ends_with(".qcow2"));
    }

    #[test]
    fn the_guest_runs_the_nixos_backdoor_and_no_getty_on_its_consoles() {
        let recipe = Recipe::new("6.1.0-56-cloud-amd64");
        let find = |path: &str| recipe.files.iter().find(|(p, _)| p == path).map(|(_, c)| c.clone());
        assert_eq!(find("etc/attest/backdoor"), Some(Content::File { text: BACKDOOR_SCRIPT.into(), mode: 0o755 }));
        for masked in ["serial-getty@ttyS0.service", "serial-getty@hvc0.service"] {
            assert_eq!(find(&format!("etc/systemd/system/{masked}")), Some(Content::Symlink("/dev/null".into())));
        }
        let Some(Content::File { text: unit, .. }) = find("etc/systemd/system/backdoor.service") else { panic!() };
        assert!(unit.contains("Requires=dev-hvc0.device dev-ttyS0.device") && unit.contains("KillSignal=SIGHUP"));
    }

    #[test]
    fn boot_initramfs_has_the_init_its_applets_and_the_modules_in_order() {
        let Ok(busybox) = crate::find_busybox() else { return eprintln!("SKIP: no static busybox") };
        let dir = tempfile::tempdir().unwrap();
        let modules: Vec<ModuleFile> = ["virtio_pci", "virtio_blk"]
            .iter()
            .map(|name| {
                let path = dir.path().join(format!("{name}.ko"));
                std::fs::write(&path, format!("module {name}")).unwrap();
                ModuleFile { name: name.to_string(), path }
            })
            .collect();
        let bytes = boot_initramfs(&busybox, &modules, false).unwrap().write_to(Vec::new()).unwrap();
        let mut files = std::collections::HashMap::new();
        let mut rest = bytes.as_slice();
        loop {
            let mut reader = cpio::newc::Reader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_string();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            files.insert(name, String::from_utf8_lossy(&data).into_owned());
            rest = reader.finish().unwrap();
        }
        let init = &files["init"];
        assert!(init.contains("exec switch_root /sysroot /sbin/init") && init.contains("poweroff -f"), "{init}");
        for applet in BOOT_APPLETS {
            assert_eq!(files[&format!("bin/{applet}")], "busybox", "applet {applet}");
        }
        assert_eq!(
            files[&MODULE_LIST[1..]],
            "/lib/modules/attest/00-virtio_pci.ko\n/lib/modules/attest/01-virtio_blk.ko\n"
        );
    }
}
