//! Building a small bootable hybrid ISO with GRUB's `grub-mkrescue`: a kernel, an initrd and one menu
//! entry that boots at once, GRUB itself on the first serial port; bootable by BIOS (SeaBIOS: El
//! Torito and the hybrid MBR) and UEFI (OVMF: the EFI system partition image). The ISO is cached
//! under `cache/iso/<hash>.iso`, the hash covering everything that goes in.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// The Debian packages grub-mkrescue needs to make a BIOS and UEFI ISO.
const PACKAGES: &str = "grub-pc-bin grub-efi-amd64-bin mtools xorriso";

/// The programs grub-mkrescue runs (or is), and what each is for.
const PROGRAMS: [(&str, &str); 3] =
    [("grub-mkrescue", "grub-mkrescue"), ("xorriso", "xorriso"), ("mformat", "mformat (mtools, for the EFI image)")];

/// GRUB's platform directories: without one, grub-mkrescue quietly leaves that firmware out.
const PLATFORMS: [(&str, &str); 2] = [
    ("/usr/lib/grub/i386-pc", "GRUB for BIOS (/usr/lib/grub/i386-pc)"),
    ("/usr/lib/grub/x86_64-efi", "GRUB for UEFI (/usr/lib/grub/x86_64-efi)"),
];

/// Seconds grub-mkrescue may take (it takes about one).
const LIMIT_SECS: u32 = 120;

/// A GRUB ISO that boots `kernel` with `initrd` and `cmdline`, through one menu entry called `title`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubIso {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line, written into grub.cfg as is (GRUB expands `$` variables in it).
    pub cmdline: String,
    pub title: String,
}

impl GrubIso {
    /// The ISO's `/boot/grub/grub.cfg`: GRUB on the serial port (115200) and the screen, no menu delay.
    pub fn grub_cfg(&self) -> String {
        // GRUB quotes like a shell: a single quote inside single quotes is '\''.
        let title = self.title.replace('\'', r"'\''");
        format!(
            "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
             set timeout=0\n\nmenuentry '{title}' {{\n    linux /boot/vmlinuz {}\n    initrd /boot/initrd.img\n}}\n",
            self.cmdline
        )
    }

    /// The ISO, built unless `cache/iso` has it. A build stages the files and runs grub-mkrescue in a
    /// private directory beside the cache entry, then renames the result into place: concurrent
    /// builders never see a partial file, and a failed build leaves nothing behind.
    pub fn build_cached(&self, cache: &Path) -> Result<PathBuf, ImageError> {
        let version = grub_mkrescue_version()?;
        let dir = cache.join("iso");
        let path = dir.join(format!("{}.iso", self.digest(&version)?));
        if path.exists() {
            return Ok(path);
        }
        let io = |what: &str| ImageError::io(format!("{what} in {}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(io("creating the ISO cache"))?;
        let build = tempfile::Builder::new().prefix(".build-").tempdir_in(&dir).map_err(io("creating a build dir"))?;
        let stage = build.path().join("stage");
        std::fs::create_dir_all(stage.join("boot/grub")).map_err(io("staging the ISO's files"))?;
        for (from, to) in [(&self.kernel, "boot/vmlinuz"), (&self.initrd, "boot/initrd.img")] {
            std::fs::copy(from, stage.join(to)).map_err(ImageError::io(format!("copying {}", from.display())))?;
        }
        std::fs::write(stage.join("boot/grub/grub.cfg"), self.grub_cfg()).map_err(io("writing grub.cfg"))?;
        let output = build.path().join("image.iso");
        run_grub_mkrescue(&output, &stage, &path)?;
        std::fs::rename(&output, &path).map_err(io("storing the ISO"))?;
        Ok(path)
    }

    /// A hash of the kernel's and the initrd's contents, grub.cfg (the command line and the title)
    /// and grub-mkrescue's version.
    pub(super) fn digest(&self, version: &str) -> Result<String, ImageError> {
        let mut h = Sha256::new();
        h.update(format!("attest grub iso 1\0{version}\0{}\0", self.grub_cfg()));
        for path in [&self.kernel, &self.initrd] {
            let io = ImageError::io(format!("reading {}", path.display()));
            let mut file = File::open(path).map_err(&io)?;
            let len = std::io::copy(&mut file, &mut h).map_err(&io)?;
            h.update(format!("\0{len}\0"));
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Checks grub-mkrescue and what it needs are installed; returns its `--version` line.
fn grub_mkrescue_version() -> Result<String, ImageError> {
    let missing = |what: &str| ImageError::IsoTool { missing: what.into(), packages: PACKAGES };
    for (program, what) in PROGRAMS {
        which::which(program).map_err(|_| missing(what))?;
    }
    for (dir, what) in PLATFORMS {
        if !Path::new(dir).is_dir() {
            return Err(missing(what));
        }
    }
    let out = Command::new("grub-mkrescue")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(ImageError::io("running grub-mkrescue --version"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `grub-mkrescue -o output stage`, within [`LIMIT_SECS`]; its stderr goes into the error.
fn run_grub_mkrescue(output: &Path, stage: &Path, for_path: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", &LIMIT_SECS.to_string(), "grub-mkrescue", "-o"]).arg(output).arg(stage);
    let failed = |what: String, stderr: &[u8]| {
        // xorriso is chatty: keep the end, where the failure is.
        let stderr = String::from_utf8_lossy(stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        ImageError::IsoBuild { what, output: for_path.to_path_buf(), stderr: tail }
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("could not be started through timeout(1): {e}"), b""))?;
    match out.status.code() {
        Some(0) if output.is_file() => Ok(()),
        Some(0) => Err(failed("exited successfully but wrote no ISO".into(), &out.stderr)),
        Some(124 | 137) => Err(failed(format!("did not finish within {LIMIT_SECS} s (stopped)"), &out.stderr)),
        _ => Err(failed(format!("failed ({})", out.status), &out.stderr)),
    }
}
