//! Which QEMU release a binary is, read from `--version`, and the release attest is tested with, so
//! `attest doctor` can say when a host's QEMU is older than anything attest's tests have run on.

use std::fmt;
use std::path::Path;
use std::process::Command;

use crate::error::{MachineError, Result};

/// A QEMU release: major, minor, micro.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion(pub u32, pub u32, pub u32);

/// The release scripts/setup installs (bookworm-backports) and CI runs every test on. Older ones
/// lack what attest is built around (QEMU 9's `file:` migration with `mapped-ram` for snapshots)
/// and their TCG differs, so attest warns rather than refuses.
pub const TESTED: QemuVersion = QemuVersion(10, 0, 0);

impl QemuVersion {
    /// Reads it from the first line of `--version`: `QEMU emulator version 10.0.2 (Debian …)`.
    pub fn parse(version_output: &str) -> Option<QemuVersion> {
        let line = version_output.lines().next()?;
        let number = line.strip_prefix("QEMU emulator version ")?.split_whitespace().next()?;
        let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next()??, parts.next()??);
        Some(QemuVersion(major, minor, parts.next().flatten().unwrap_or(0)))
    }

    /// Runs `binary --version`; the first line of its output comes along, for showing the build.
    pub fn of(binary: &Path) -> Result<(QemuVersion, String)> {
        let out = Command::new(binary)
            .arg("--version")
            .output()
            .map_err(|source| MachineError::Spawn { program: binary.display().to_string(), source })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").to_string();
        match QemuVersion::parse(&text) {
            Some(version) if out.status.success() => Ok((version, first)),
            _ => Err(MachineError::Io {
                what: format!(
                    "reading the version of {} (expected \"QEMU emulator version X.Y.Z\", got {:?}{})",
                    binary.display(),
                    first,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: std::io::Error::other(format!("--version exited with {}", out.status)),
            }),
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_debian_and_upstream_version_lines() {
        let debian = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025";
        assert_eq!(QemuVersion::parse(debian), Some(QemuVersion(10, 0, 2)));
        assert_eq!(QemuVersion::parse("QEMU emulator version 7.2.0\n"), Some(QemuVersion(7, 2, 0)));
        assert_eq!(QemuVersion::parse("QEMU emulator version 9.1\n"), Some(QemuVersion(9, 1, 0)));
        assert_eq!(QemuVersion::parse("qemu-img version 10.0.2"), None);
        assert_eq!(QemuVersion::parse(""), None);
    }

    #[test]
    fn orders_releases() {
        assert!(QemuVersion(7, 2, 19) < TESTED);
        assert!(QemuVersion(10, 0, 2) >= TESTED);
        assert!(QemuVersion(10, 1, 0) > QemuVersion(10, 0, 9));
    }
}
