//! Checks with a verdict and a fix (`ok`, `warn`, `FAIL`), shown as a list or as JSON: what
//! `attest doctor` and `attest preflight` are made of, and the host checks they share.

use std::path::{Path, PathBuf};

use attest_machine::backend::qemu::version::{self as qemu_version, QemuVersion};
use attest_machine::state_dir;
use serde::Serialize;

pub const APT: &str = "apt-get install --no-install-recommends";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
pub struct Check {
    pub status: Status,
    pub name: &'static str,
    pub detail: String,
    pub fix: Option<String>,
    /// The file this check found (the kernel, QEMU, busybox), for scripts.
    pub path: Option<PathBuf>,
}

impl Check {
    pub fn at(mut self, path: &Path) -> Check {
        self.path = Some(path.to_path_buf());
        self
    }
}

pub fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { status: Status::Ok, name, detail: detail.into(), fix: None, path: None }
}

pub fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { status: Status::Warn, name, detail: detail.into(), fix: Some(fix.into()), path: None }
}

pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { status: Status::Fail, name, detail: detail.into(), fix: Some(fix.into()), path: None }
}

/// Prints `checks` (a list, or JSON) and returns the exit status: 1 if one failed.
pub fn report(checks: &[Check], json: bool) -> i32 {
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if json {
        match serde_json::to_string_pretty(checks) {
            Ok(json) => out!("{json}"),
            Err(err) => return crate::exit_code::setup_error(&err),
        }
        return i32::from(failed > 0);
    }
    for check in checks {
        let label = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out!("{label}  {:<12} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            out!("      {:<12} fix: {fix}", "");
        }
    }
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    out!("{} checks: {} ok, {warned} warnings, {failed} failed", checks.len(), checks.len() - warned - failed);
    i32::from(failed > 0)
}

/// QEMU, its version, and a warning when it is older than the release attest is tested with.
pub fn check_qemu(qemu: Option<&Path>) -> Check {
    let fix = format!("{APT} qemu-system-x86 (or set ATTEST_QEMU)");
    let Some(qemu) = qemu else { return fail("qemu", "qemu-system-x86_64 not found on PATH", fix) };
    match QemuVersion::of(qemu) {
        Ok((version, _)) if version < qemu_version::TESTED => warn(
            "qemu",
            format!(
                "QEMU {version} ({}) is older than QEMU {}, which attest is tested with",
                qemu.display(),
                qemu_version::TESTED
            ),
            "run scripts/setup (it installs QEMU from bookworm-backports), or point ATTEST_QEMU at a newer one",
        )
        .at(qemu),
        Ok((version, line)) => ok("qemu", format!("QEMU {version} ({}): {line}", qemu.display())).at(qemu),
        Err(err) => fail("qemu", err.to_string(), fix),
    }
}

pub fn check_device(path: &str, name: &'static str, why: &str, fix: &str) -> Check {
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => ok(name, format!("{path} usable")),
        Err(err) => warn(name, format!("{path}: {err}; {why}"), fix),
    }
}

pub fn check_tool(program: &'static str, why: &str, package: &str) -> Check {
    match which::which(program) {
        Ok(path) => ok(program, path.display().to_string()),
        Err(_) => warn(program, format!("not found; {why}"), format!("{APT} {package}")),
    }
}

pub use attest_machine::state_dir::free_space;

pub fn check_disk(cache: &Path) -> Check {
    let dirs = [state_dir::base_dir().ok(), Some(cache.to_path_buf())];
    let lowest = dirs.iter().flatten().filter_map(|dir| free_space(dir)).min_by_key(|(free, _)| *free);
    let Some((free, dir)) = lowest else { return warn("disk", "could not read free space", "check df -h") };
    let mib = free / (1 << 20);
    let detail = format!("{mib} MiB free at {}", dir.display());
    match mib {
        0..=99 => fail("disk", detail, "free space: the initramfs cache and console logs need some 100 MiB"),
        100..=1023 => warn("disk", detail, "free at least 1 GiB for kernels and images"),
        _ => ok("disk", detail),
    }
}

/// `MemAvailable` of /proc/meminfo, in MiB (0 when unreadable).
pub fn available_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    available_kib / 1024
}

pub fn check_memory() -> Check {
    let mib = available_memory_mib();
    let detail = format!("{mib} MiB available (a default guest takes 512 MiB)");
    match mib {
        0..=639 => fail("memory", detail, "free memory or pass a smaller --memory"),
        640..=2047 => warn("memory", detail, "several machines at once need more"),
        _ => ok("memory", detail),
    }
}
