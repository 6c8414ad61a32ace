//! What a test's machines share with each other and with the driver: the test log, the global
//! deadline and why everything was halted, the output and scratch directories, the backend. A leaf
//! below both the driver and its machines.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attest_machine::Backend;

use crate::error::DriverError;
use crate::log::Log;

/// What the driver's machines share.
pub(crate) struct Shared {
    pub log: Log,
    /// When the global timeout expires: every wait ends by then.
    pub deadline: Instant,
    pub global_timeout: Duration,
    pub timed_out: AtomicBool,
    /// Why a network failed while the test ran, if one did.
    pub network_failure: Mutex<Option<String>>,
    pub out_dir: PathBuf,
    /// `SHARED_DIR` of NixOS start scripts.
    pub shared_dir: PathBuf,
    /// Host-side scratch files (screen dumps).
    pub scratch: PathBuf,
    pub backend: Arc<dyn Backend + Send + Sync>,
    /// The cache of ready machines; `None` with `--fresh`.
    pub snapshot_cache: Option<attest_machine::snapshot::cache::SnapshotCache>,
}

/// How long after the global deadline a machine's own waits give up by themselves. The watchdog
/// stops every machine at the deadline, and a wait ends as its machine dies; so the caller sees
/// the global timeout only once everything is stopped, never a wait that raced the watchdog to it.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(5);

impl Shared {
    /// The latest a machine's wait may run to: the global deadline, plus the moment the watchdog
    /// needs to stop every machine ([`WATCHDOG_MARGIN`]), which ends the wait first.
    pub fn wait_deadline(&self) -> Instant {
        self.deadline + WATCHDOG_MARGIN
    }

    /// The global-timeout error, once it has expired: the watchdog has fired, or is about to (a
    /// wait bounded by the same deadline may end first).
    pub fn timed_out(&self) -> Option<DriverError> {
        let expired = self.timed_out.load(Ordering::SeqCst) || Instant::now() >= self.deadline;
        expired.then_some(DriverError::GlobalTimeout(self.global_timeout))
    }

    /// Why every machine was stopped under the test, if they were: the global timeout, or a
    /// network that died.
    pub fn halted(&self) -> Option<DriverError> {
        let failure = self.network_failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.timed_out().or(failure.map(DriverError::NetworkFailed))
    }
}
