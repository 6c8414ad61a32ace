//! A machine's block devices: disks and cdroms described independently of the VMM, copy-on-write
//! overlays that keep a base image untouched, and blank disks that are really empty.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{MachineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub media: Media,
    pub bus: DiskBus,
    pub read_only: bool,
    /// The image an overlay made by [`overlay`] reads through to (what the disk holds at first).
    pub backing: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// The format of an existing image, from its first bytes: qcow2 has a magic number, raw has none.
    pub fn detect(path: &Path) -> Result<DiskFormat> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(MachineError::io(format!("opening {}", path.display())))?;
        let read = file.read(&mut magic).map_err(MachineError::io(format!("reading {}", path.display())))?;
        Ok(if read == 4 && &magic == b"QFI\xfb" { DiskFormat::Qcow2 } else { DiskFormat::Raw })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Disk,
    Cdrom,
}

/// The controller a disk hangs off, which decides its guest name (`/dev/vda` or `/dev/sda`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Scsi,
}

/// `qemu-img`: `$ATTEST_QEMU_IMG`, else on PATH (Debian: qemu-utils).
pub fn qemu_img() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ATTEST_QEMU_IMG") {
        return Ok(PathBuf::from(path));
    }
    which::which("qemu-img").map_err(|_| MachineError::MissingHelper {
        program: "qemu-img",
        purpose: "to create disk overlays and blank disks".into(),
        fix: "install Debian's qemu-utils (scripts/setup does this) or set ATTEST_QEMU_IMG",
    })
}

/// A qcow2 overlay at `overlay` whose reads fall through to `base`, which is never written.
pub fn overlay(base: &Path, overlay: &Path) -> Result<Disk> {
    let base = base.canonicalize().map_err(MachineError::io(format!("disk image {}", base.display())))?;
    let format = DiskFormat::detect(&base)?;
    let mut command = Command::new(qemu_img()?);
    command.args(["create", "-q", "-f", "qcow2", "-F", format.name(), "-b"]).arg(&base).arg(overlay);
    run(command, &format!("creating an overlay of {}", base.display()))?;
    Ok(Disk { backing: Some(base), ..overlay_disk(overlay) })
}

/// The disk an overlay at `path` is, as [`overlay`] makes it (for a spec that names its disks
/// without making them).
pub fn overlay_disk(path: &Path) -> Disk {
    Disk {
        path: path.into(),
        format: DiskFormat::Qcow2,
        media: Media::Disk,
        bus: DiskBus::Virtio,
        read_only: false,
        backing: None,
    }
}

/// A new, empty disk of `size_mib` at `path`: a sparse file (raw) or an empty qcow2.
pub fn blank(path: &Path, size_mib: u64, format: DiskFormat) -> Result<Disk> {
    let bytes = size_mib * 1024 * 1024;
    match format {
        DiskFormat::Raw => {
            let file =
                std::fs::File::create_new(path).map_err(MachineError::io(format!("creating {}", path.display())))?;
            file.set_len(bytes).map_err(MachineError::io(format!("sizing {}", path.display())))?;
        }
        DiskFormat::Qcow2 => {
            let mut command = Command::new(qemu_img()?);
            command.args(["create", "-q", "-f", "qcow2"]).arg(path).arg(bytes.to_string());
            run(command, &format!("creating the blank disk {}", path.display()))?;
        }
    }
    Ok(Disk { path: path.into(), format, media: Media::Disk, bus: DiskBus::Virtio, read_only: false, backing: None })
}

fn run(mut command: Command, what: &str) -> Result<()> {
    let output = command.output().map_err(MachineError::io(format!("{what}: running qemu-img")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(MachineError::Io {
        what: what.into(),
        source: std::io::Error::other(format!(
            "qemu-img {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_takes_the_writes_and_the_base_stays_as_it_was() {
        if qemu_img().is_err() {
            return eprintln!("SKIP: qemu-img not found (Debian: qemu-utils)");
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let disk = overlay(&base, &dir.path().join("top.qcow2")).unwrap();
        assert_eq!((disk.format, DiskFormat::detect(&disk.path).unwrap()), (DiskFormat::Qcow2, DiskFormat::Qcow2));
        let status =
            Command::new(qemu_img().unwrap()).args(["info", "--output=json"]).arg(&disk.path).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(info["backing-filename-format"], "raw", "{info}");
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 1 << 20]);
        assert!(overlay(&dir.path().join("missing.img"), &dir.path().join("x.qcow2")).is_err());
    }

    #[test]
    fn blank_disks_are_empty_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let raw = blank(&dir.path().join("a.raw"), 64, DiskFormat::Raw).unwrap();
        let meta = std::fs::metadata(&raw.path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(std::fs::read(&raw.path).unwrap().iter().all(|&b| b == 0));
        assert!(blank(&raw.path, 1, DiskFormat::Raw).is_err(), "an existing file is never reused");
        if qemu_img().is_ok() {
            let qcow = blank(&dir.path().join("b.qcow2"), 64, DiskFormat::Qcow2).unwrap();
            assert_eq!(DiskFormat::detect(&qcow.path).unwrap(), DiskFormat::Qcow2);
        }
    }
}
