//! The accelerator a machine runs under, KVM or TCG, and the choice of it as the user sees it. How
//! the choice is made belongs to the backend (QEMU's KVM probe: `backend/qemu/kvm_probe.rs`).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (software emulation)",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelRequest {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct AccelChoice {
    pub accel: Accel,
    /// One line saying why, for the user.
    pub reason: String,
    /// The KVM probe ran for this choice (the verdict was not cached).
    pub probed: bool,
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.accel, self.reason)
    }
}

/// Whether a freshly made verdict is news: the first time this host boot that the probe chose this
/// accelerator. Verdicts that are probed afresh on every run (see [`probe_kvm_cached`]) are still
/// announced once per boot, not on every run.
pub fn first_announcement(choice: &AccelChoice, cache_dir: &Path) -> bool {
    if !choice.probed {
        return false;
    }
    let marker = cache_dir.join("accel-announced");
    let stamp = format!("{} {:?}", boot_id(), choice.accel);
    if std::fs::read_to_string(&marker).is_ok_and(|seen| seen == stamp) {
        return false;
    }
    std::fs::create_dir_all(cache_dir).and_then(|()| std::fs::write(&marker, stamp)).ok();
    true
}

/// This host boot's identity: KVM verdicts and their announcement hold until the host reboots.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_verdict_is_announced_once_per_boot_and_accelerator() {
        let cache = tempfile::tempdir().unwrap();
        let probed = |accel| AccelChoice { accel, reason: "test".into(), probed: true };
        assert!(first_announcement(&probed(Accel::Tcg), cache.path()));
        assert!(!first_announcement(&probed(Accel::Tcg), cache.path()));
        assert!(first_announcement(&probed(Accel::Kvm), cache.path()), "a changed verdict is news");
        let cached = AccelChoice { probed: false, ..probed(Accel::Tcg) };
        assert!(!first_announcement(&cached, cache.path()), "a cached verdict was announced when made");
    }
}
