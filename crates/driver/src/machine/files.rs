//! Moving files between host and guest: `copy_from_host` (through the shared directory for NixOS
//! start scripts, which mount it at /tmp/shared; else through the shell), `copy_from_host_via_shell`
//! (base64 in chunks), and `copy_from_vm` into the output directory, byte for byte.

use std::panic::Location;
use std::path::{Path, PathBuf};
use std::time::Duration;

use attest_shell::quote;
use base64::Engine;

use super::commands::DEFAULT_TIMEOUT;
use super::Machine;
use crate::config::BootConfig;
use crate::error::{DriverError, Result};

/// Bytes of a file per command when copying through the shell: the command travels as one argument
/// of `bash -c`, which the kernel limits to 128 KiB (`MAX_ARG_STRLEN`), and base64 adds a third.
const CHUNK: usize = 48 * 1024;

impl Machine {
    /// Copies the host file `source` to `target` in the guest.
    #[track_caller]
    pub fn copy_from_host(&self, source: &Path, target: &str) -> Result<()> {
        let at = Location::caller();
        let BootConfig::StartScript { .. } = self.config.boot else {
            return self.copy_via_shell(at, source, target);
        };
        // NixOS guests mount SHARED_DIR at /tmp/shared.
        let name =
            source.file_name().ok_or_else(|| DriverError::Config(format!("{} is not a file", source.display())))?;
        let exchange = tempfile::Builder::new()
            .prefix("copy-")
            .tempdir_in(&self.shared.shared_dir)
            .map_err(DriverError::io("creating a directory in the shared directory"))?;
        let host_copy = exchange.path().join(name);
        copy_tree(source, &host_copy)?;
        let guest_dir = format!("/tmp/shared/{}", exchange.path().file_name().unwrap_or_default().to_string_lossy());
        let guest_copy = format!("{guest_dir}/{}", name.to_string_lossy());
        let command = format!("mkdir -p {} && cp -r {} {}", quote(&parent(target)), quote(&guest_copy), quote(target));
        self.succeed_at(at, &command, Some(DEFAULT_TIMEOUT)).map(drop)
    }

    /// Copies the host file `source` to `target` through the shell (no shared directory needed).
    #[track_caller]
    pub fn copy_from_host_via_shell(&self, source: &Path, target: &str) -> Result<()> {
        self.copy_via_shell(Location::caller(), source, target)
    }

    fn copy_via_shell(&self, at: &'static Location<'static>, source: &Path, target: &str) -> Result<()> {
        let bytes = std::fs::read(source).map_err(DriverError::io(format!("reading {}", source.display())))?;
        self.shared.log.nested(Some(&self.name), &format!("copying {} to {target}", source.display()), || {
            let target = quote(target);
            self.succeed_at(at, &format!("mkdir -p \"$(dirname {target})\" && : > {target}"), Some(DEFAULT_TIMEOUT))?;
            for chunk in bytes.chunks(CHUNK) {
                let encoded = base64::engine::general_purpose::STANDARD.encode(chunk);
                self.succeed_at(at, &format!("printf %s {encoded} | base64 -d >> {target}"), Some(DEFAULT_TIMEOUT))?;
            }
            Ok(())
        })
    }

    /// NixOS's older name of [`Machine::copy_from_machine`].
    #[track_caller]
    pub fn copy_from_vm(&self, source: &str, target_dir: &str) -> Result<PathBuf> {
        self.copy_out(Location::caller(), source, target_dir)
    }

    /// Copies the guest file or directory `source` to `<output directory>/<target_dir>/<name>`
    /// and returns that path.
    #[track_caller]
    pub fn copy_from_machine(&self, source: &str, target_dir: &str) -> Result<PathBuf> {
        self.copy_out(Location::caller(), source, target_dir)
    }

    fn copy_out(&self, at: &'static Location<'static>, source: &str, target_dir: &str) -> Result<PathBuf> {
        let name = Path::new(source).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "root".into());
        let destination = self.out_dir().join(target_dir);
        std::fs::create_dir_all(&destination)
            .map_err(DriverError::io(format!("creating {}", destination.display())))?;
        let target = destination.join(&name);
        self.shared.log.nested(Some(&self.name), &format!("copying {source} to {}", target.display()), || {
            let quoted = quote(source);
            let (status, bytes) = self.run(
                at,
                &format!("if [ -d {quoted} ]; then tar -C {quoted} -cf - .; else cat {quoted}; fi"),
                Some(DEFAULT_TIMEOUT),
            )?;
            if status != 0 {
                return Err(self.assertion(
                    at,
                    format!("copying {source} out of the guest failed (exit code {status})"),
                    false,
                ));
            }
            let is_dir = self.run(at, &format!("[ -d {quoted} ]"), Some(Duration::from_secs(60)))?.0 == 0;
            let written = if is_dir {
                std::fs::create_dir_all(&target).and_then(|()| tar::Archive::new(bytes.as_slice()).unpack(&target))
            } else {
                std::fs::write(&target, &bytes)
            };
            written.map_err(DriverError::io(format!("writing {}", target.display())))?;
            Ok(target.clone())
        })
    }
}

fn parent(path: &str) -> String {
    Path::new(path).parent().map(|p| p.to_string_lossy().into_owned()).filter(|p| !p.is_empty()).unwrap_or(".".into())
}

/// Copies a file, or a directory with everything in it.
fn copy_tree(source: &Path, target: &Path) -> Result<()> {
    let io = |path: &Path| DriverError::io(format!("copying {}", path.display()));
    if source.is_dir() {
        std::fs::create_dir_all(target).map_err(io(target))?;
        for entry in std::fs::read_dir(source).map_err(io(source))? {
            let entry = entry.map_err(io(source))?;
            copy_tree(&entry.path(), &target.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(source, target).map(drop).map_err(io(source))
    }
}
