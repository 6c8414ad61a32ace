//! Choosing between KVM and TCG for QEMU by trying KVM for real: a throwaway QEMU runs three guest
//! instructions under `-accel kvm` with the CPU model attest's VMs use. `/dev/kvm` existing proves
//! nothing (on PVM hosts an ordinary guest aborts with "failed to set MSR"). The verdict is cached
//! per host boot, keyed by the QEMU binary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use attest_protocol::ExitStatus;
use serde::{Deserialize, Serialize};

use super::{accel_args, MACHINE_TYPE};
use crate::accel::{boot_id, Accel, AccelChoice, AccelRequest};
use crate::error::MachineError;
use crate::process::ManagedChild;

/// What the KVM probe found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmProbe {
    pub usable: bool,
    pub detail: String,
    #[serde(skip)]
    pub cached: bool,
    /// The verdict holds until the host reboots (only such verdicts are cached).
    #[serde(skip)]
    pub definitive: bool,
}

const PROBE_DEADLINE: Duration = Duration::from_secs(15);
/// isa-debug-exit turns the byte 0x31 written by the probe into QEMU exit status (0x31 << 1) | 1.
const PROBE_EXIT: i32 = 99;

pub fn choose(request: AccelRequest, qemu: &Path, cache_dir: &Path) -> Result<AccelChoice, MachineError> {
    if request == AccelRequest::Tcg {
        return Ok(AccelChoice { accel: Accel::Tcg, reason: "requested with --accel tcg".into(), probed: false });
    }
    let probe = probe_kvm_cached(qemu, cache_dir);
    let cached = if probe.cached { ", cached for this boot" } else { "" };
    let probed = !probe.cached;
    match (request, probe.usable) {
        (_, true) => Ok(AccelChoice { accel: Accel::Kvm, reason: format!("KVM probe ran a guest{cached}"), probed }),
        (AccelRequest::Kvm, false) => {
            Err(MachineError::AccelUnusable { accel: Accel::Kvm, detail: probe.detail, cached: probe.cached })
        }
        _ => {
            Ok(AccelChoice { accel: Accel::Tcg, reason: format!("KVM is unusable: {}{cached}", probe.detail), probed })
        }
    }
}

/// Bumped when the meaning of a cached verdict changes, so older entries are ignored.
const CACHE_FORMAT: u32 = 2;

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    format: u32,
    boot_id: String,
    qemu: PathBuf,
    probe: KvmProbe,
}

pub fn probe_kvm_cached(qemu: &Path, cache_dir: &Path) -> KvmProbe {
    let boot_id = boot_id();
    let cache_file = cache_dir.join("kvm-probe.json");
    if let Some(entry) = std::fs::read(&cache_file).ok().and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok()) {
        // /dev/kvm access can change within a boot (group membership, seat ACLs): check it anyway.
        if entry.format == CACHE_FORMAT && entry.boot_id == boot_id && entry.qemu == qemu && open_kvm().is_ok() {
            return KvmProbe { cached: true, ..entry.probe };
        }
    }
    let probe = probe_kvm(qemu);
    // Only a verdict that cannot change before the next boot is kept: KVM ran, or QEMU itself
    // refused it. Permissions, a missing binary or a probe slowed by load are checked afresh.
    if !probe.definitive {
        return probe;
    }
    let entry = CacheEntry { format: CACHE_FORMAT, boot_id, qemu: qemu.to_path_buf(), probe: probe.clone() };
    if std::fs::create_dir_all(cache_dir).is_ok() {
        if let Ok(tmp) = tempfile::NamedTempFile::new_in(cache_dir) {
            if serde_json::to_writer(tmp.as_file(), &entry).is_ok() {
                tmp.persist(&cache_file).ok();
            }
        }
    }
    probe
}

fn open_kvm() -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm")
}

pub fn probe_kvm(qemu: &Path) -> KvmProbe {
    let verdict = open_kvm()
        .map_err(|e| ProbeFailure { detail: format!("cannot open /dev/kvm: {e}"), definitive: false })
        .and_then(|_| run_probe_guest(qemu, Accel::Kvm));
    match verdict {
        Ok(()) => KvmProbe { usable: true, detail: "a KVM guest ran".into(), cached: false, definitive: true },
        Err(ProbeFailure { detail, definitive }) => KvmProbe { usable: false, detail, cached: false, definitive },
    }
}

/// QEMU ran and named KVM in its complaint, and the cause is not a passing shortage (busy
/// virtualisation extensions, memory) or an outside kill (e.g. the OOM killer).
fn refuses_for_good(status: ExitStatus, stderr: &str) -> bool {
    let text = stderr.to_ascii_lowercase();
    let transient = ["busy", "cannot allocate memory", "out of memory", "interrupted"].iter().any(|t| text.contains(t));
    status != ExitStatus::Signal(9) && text.contains("kvm") && !transient
}

/// Why a probe guest did not run; `definitive` when QEMU itself ran and refused the accelerator.
#[derive(Debug)]
pub struct ProbeFailure {
    pub detail: String,
    pub definitive: bool,
}

/// Boots a 64 KiB "BIOS" whose reset vector writes to isa-debug-exit, under the given accelerator.
pub fn run_probe_guest(qemu: &Path, accel: Accel) -> Result<(), ProbeFailure> {
    let transient = |detail: String| ProbeFailure { detail, definitive: false };
    let mut bios = vec![0xF4u8; 64 * 1024];
    // At the reset vector F000:FFF0: mov al,0x31; out 0xf4,al; cli; hlt; jmp $-1
    bios[0xFFF0..0xFFF8].copy_from_slice(&[0xB0, 0x31, 0xE6, 0xF4, 0xFA, 0xF4, 0xEB, 0xFD]);
    let file = tempfile::NamedTempFile::new().map_err(|e| transient(format!("creating the probe image: {e}")))?;
    std::fs::write(file.path(), &bios).map_err(|e| transient(format!("writing the probe image: {e}")))?;

    let mut command = Command::new(qemu);
    command
        .args(["-machine", MACHINE_TYPE])
        .args(accel_args(accel))
        .args(["-m", "16", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-bios"])
        .arg(file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ManagedChild::spawn("kvm-probe", &mut command, |_| {})
        .map_err(|e| transient(format!("cannot run {}: {e}", qemu.display())))?;
    let status = child.wait_until(Instant::now() + PROBE_DEADLINE);
    child.kill();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.take_stderr() {
        pipe.read_to_string(&mut stderr).ok();
    }
    let first_error = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    match status {
        Some(ExitStatus::Code(PROBE_EXIT)) => Ok(()),
        None => Err(transient(format!("a {accel} probe guest did not finish within {PROBE_DEADLINE:?}"))),
        Some(status) => Err(ProbeFailure {
            definitive: refuses_for_good(status, &stderr),
            detail: format!(
                "{} {} failed ({status}){}",
                qemu.display(),
                accel_args(accel).join(" "),
                if first_error.is_empty() { String::new() } else { format!(": {first_error}") }
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Qemu;

    #[test]
    fn probe_guest_runs_under_tcg_so_a_failure_means_the_accelerator() {
        let Some(qemu) = Qemu::find_binary() else {
            eprintln!("SKIP: qemu-system-x86_64 not found");
            return;
        };
        run_probe_guest(&qemu, Accel::Tcg).expect("the probe guest must reach isa-debug-exit under TCG");
    }

    #[test]
    fn only_lasting_refusals_are_definitive() {
        let pvm = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n\
                   qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.";
        assert!(refuses_for_good(ExitStatus::Signal(6), pvm));
        assert!(refuses_for_good(ExitStatus::Code(1), "Could not access KVM kernel module: No such file"));
        assert!(!refuses_for_good(ExitStatus::Code(1), "failed to initialize kvm: Device or resource busy"));
        assert!(!refuses_for_good(ExitStatus::Signal(9), pvm));
        assert!(!refuses_for_good(ExitStatus::Code(1), "qemu: could not load PC BIOS"));
    }

    #[test]
    fn explicit_tcg_needs_no_probe() {
        let choice = choose(AccelRequest::Tcg, Path::new("/nonexistent/qemu"), Path::new("/nonexistent")).unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(!choice.probed);
    }
}
