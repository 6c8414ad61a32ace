//! Builds the program's root inside the guest: the host's shares, privately writable scratch
//! directories (tmpfs, or an overlay of the host's directory) and the kernel filesystems, then
//! chroots into it.

use std::ffi::OsStr;
use std::fs;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attest_protocol::{Mount, Scratch, ShareFs, Start};
use nix::mount::{mount, MsFlags};

const NEW_ROOT: &str = "/sysroot";

pub fn prepare_root(start: &Start) -> Result<()> {
    let Some((root, rest)) = start.mounts.split_first() else { bail!("no root mount was requested") };
    if root.guest_path != b"/" {
        bail!("the first mount must be the root, got {}", display(&root.guest_path));
    }
    fs::create_dir_all(NEW_ROOT)?;
    mount_share(root, Path::new(NEW_ROOT))?;

    for (index, scratch) in start.scratch.iter().enumerate() {
        let target = under_root(&scratch.path);
        if target.is_dir() {
            mount_scratch(scratch, &target, index)
                .with_context(|| format!("making {} writable", display(&scratch.path)))?;
        }
    }
    for (fs, dir, data) in [
        ("proc", "/proc", None),
        ("sysfs", "/sys", None),
        ("devtmpfs", "/dev", None),
        ("devpts", "/dev/pts", Some("ptmxmode=0666,mode=0620")),
        ("tmpfs", "/dev/shm", Some("mode=1777")),
    ] {
        let target = under_root(dir.as_bytes());
        fs::create_dir_all(&target).ok();
        mount(Some(fs), &target, Some(fs), MsFlags::empty(), data)
            .with_context(|| format!("mounting {fs} on {dir}"))?;
    }
    nix::unistd::chroot(NEW_ROOT).context("chroot into the host root")?;
    std::env::set_current_dir("/")?;

    // The other shares are mounted from inside the new root, so their paths (and any symlinks on
    // the way) resolve as the program will see them.
    for share in rest {
        let target = Path::new(OsStr::from_bytes(&share.guest_path));
        fs::create_dir_all(target).with_context(|| {
            format!(
                "creating mount point {} (it must exist in the host root or lie in /tmp, /var/tmp or /run)",
                display(&share.guest_path)
            )
        })?;
        mount_share(share, target)?;
    }
    if !start.network.nameservers.is_empty() {
        overlay_resolv_conf(&start.network.nameservers).context("pointing /etc/resolv.conf at the guest's DNS")?;
    }
    Ok(())
}

/// Shows the program a resolv.conf naming the guest network's DNS servers, bind-mounted over the
/// host's (read-only) one. Where the host's is a symlink into /run (systemd-resolved), the link's
/// target is created in the guest's private /run, so the bind lands where the link points.
fn overlay_resolv_conf(nameservers: &[IpAddr]) -> Result<()> {
    const TARGET: &str = "/etc/resolv.conf";
    let text: String = nameservers.iter().map(|server| format!("nameserver {server}\n")).collect();
    let source = Path::new("/run/attest/resolv.conf");
    fs::create_dir_all("/run/attest")?;
    fs::write(source, text)?;
    if fs::metadata(TARGET).is_err() {
        if let Ok(link) = fs::read_link(TARGET) {
            let dangling = Path::new("/etc").join(link);
            fs::create_dir_all(dangling.parent().unwrap_or(Path::new("/")))?;
            fs::write(&dangling, b"")?;
        }
    }
    mount(Some(source), TARGET, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} on {TARGET}", source.display()))
}

fn mount_scratch(scratch: &Scratch, target: &Path, index: usize) -> Result<()> {
    let tmpfs = |at: &Path| {
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))
            .with_context(|| format!("mounting a tmpfs on {}", at.display()))
    };
    if !scratch.over_host {
        return tmpfs(target);
    }
    // The overlay's own layers live on a tmpfs outside the new root.
    let layers = PathBuf::from(format!("/overlays/{index}"));
    fs::create_dir_all(&layers)?;
    tmpfs(&layers)?;
    let (upper, work) = (layers.join("upper"), layers.join("work"));
    fs::create_dir(&upper)?;
    fs::create_dir(&work)?;
    fs::set_permissions(&upper, fs::metadata(target)?.permissions())?;
    let options = format!("lowerdir={},upperdir={},workdir={}", target.display(), upper.display(), work.display());
    if let Err(err) = mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(options.as_str())) {
        // Without overlayfs the directory still becomes writable, only without the host's files.
        println!("attest-init: overlay on {} failed ({err}); using an empty tmpfs", display(&scratch.path));
        return tmpfs(target);
    }
    Ok(())
}

fn mount_share(share: &Mount, target: &Path) -> Result<()> {
    let mut flags = MsFlags::empty();
    if share.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let (fstype, data) = match share.fs {
        ShareFs::Virtiofs => ("virtiofs", None),
        ShareFs::NineP => ("9p", Some("trans=virtio,version=9p2000.L,msize=524288,cache=loose")),
    };
    mount(Some(share.tag.as_str()), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} share {:?} on {}", share.tag, display(&share.guest_path)))
}

fn under_root(guest_path: &[u8]) -> PathBuf {
    let relative = Path::new(OsStr::from_bytes(guest_path)).strip_prefix("/").unwrap_or(Path::new(""));
    Path::new(NEW_ROOT).join(relative)
}

fn display(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_land_under_the_new_root() {
        assert_eq!(under_root(b"/tmp"), Path::new("/sysroot/tmp"));
        assert_eq!(under_root(b"/"), Path::new("/sysroot"));
        assert_eq!(under_root(b"/var/tmp/x y"), Path::new("/sysroot/var/tmp/x y"));
    }
}
