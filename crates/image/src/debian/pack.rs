//! Packing a built Debian root tree into what boots it, and the cache around a build: an ext4
//! filesystem in a qcow2 (the Debian guest's disk) or a zstd-compressed newc cpio (a root
//! filesystem that lives in an initrd, as in the test installer ISO). Outputs go through a temporary
//! name and a rename, so an interrupted build never leaves a partial file under the final name.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::build::{lock_builds, remove_stale_builds, Build};
use super::recipe::{Recipe, DISK_SIZE, LABEL};
use crate::ImageError;

/// How a recipe's root tree is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// An ext4 filesystem ([`LABEL`], [`DISK_SIZE`]) made with `mkfs.ext4 -d`, converted to qcow2.
    Qcow2,
    /// A newc cpio of the whole tree (owners, modes, device nodes, hard links kept), compressed with
    /// zstd, which Linux unpacks as its initramfs (`CONFIG_RD_ZSTD`).
    CpioZstd,
}

/// zstd level of [`Output::CpioZstd`]: a third smaller than level 3, in a few seconds on two cores.
const ZSTD_LEVEL: i32 = 12;

/// `dir/name`, built from `recipe` (with the kernel's `modules` directory) unless it is there and
/// `rebuild` is not set. One build at a time per `dir` (threads and processes alike), builds left by
/// killed processes removed first; the build log is kept as `dir/<name>.log`. Needs root or sudo.
pub fn build_cached(
    dir: &Path,
    name: &str,
    recipe: &Recipe,
    modules: &Path,
    output: Output,
    rebuild: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let path = dir.join(name);
    if path.exists() && !rebuild {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
    // The holder's steps all have time limits.
    let _lock = lock_builds(dir, progress)?;
    if path.exists() && !rebuild {
        return Ok(path);
    }
    remove_stale_builds(dir);
    let started = Instant::now();
    let mut build = Build::new(dir, dir.join(format!("{name}.log")))?;
    let root = build.make_root(recipe, modules, progress)?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(dir)
        .map_err(ImageError::io(format!("creating a temporary image in {}", dir.display())))?;
    match output {
        Output::Qcow2 => pack_qcow2(&mut build, &root, partial.path(), progress)?,
        Output::CpioZstd => pack_cpio_zstd(&mut build, &root, partial.path(), progress)?,
    }
    set_read_only(partial.path())?;
    partial.persist(&path).map_err(|e| e.error).map_err(ImageError::io(format!("storing {}", path.display())))?;
    progress(&format!("built {} in {:.0?}", path.display(), started.elapsed()));
    Ok(path)
}

fn pack_qcow2(build: &mut Build, root: &Path, image: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    progress("making the ext4 filesystem and the qcow2");
    let raw = build.dir().join("root.ext4");
    build.command("making the ext4 filesystem", true, 600, "mkfs.ext4", |c| {
        c.args(["-q", "-F", "-L", LABEL, "-d"]).arg(root).arg(&raw).arg(DISK_SIZE)
    })?;
    build.command("converting to qcow2", false, 600, "qemu-img", |c| {
        c.args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(image)
    })
}

/// `cpio -o -H newc` of the tree in a stable order (run as root: the tree has files only root
/// reads), then zstd in-process.
fn pack_cpio_zstd(
    build: &mut Build,
    root: &Path,
    image: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    progress("packing the root tree into a zstd-compressed cpio");
    let cpio = build.dir().join("root.cpio");
    let script = "cd \"$1\" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc > \"$2\"";
    build
        .command("packing the cpio archive", true, 600, "sh", |c| c.args(["-c", script, "sh"]).arg(root).arg(&cpio))?;
    let io = |what: &str, path: &Path| ImageError::io(format!("{what} {}", path.display()));
    let mut input = std::fs::File::open(&cpio).map_err(io("reading", &cpio))?;
    let out = std::fs::File::create(image).map_err(io("creating", image))?;
    let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL).map_err(io("compressing into", image))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    encoder.multithread(threads).map_err(io("compressing into", image))?;
    std::io::copy(&mut input, &mut encoder).map_err(io("compressing into", image))?;
    encoder.finish().and_then(|f| f.sync_all()).map_err(io("compressing into", image))
}

fn set_read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(ImageError::io(format!("making {} read-only", path.display())))
}
