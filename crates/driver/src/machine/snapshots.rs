//! Snapshots, attest's addition to the NixOS machine API. Inside a test, `snapshot(name)` saves the
//! running machine (memory, devices, disks) and `restore(name)` puts it back as it was then, in a
//! fresh VMM, with the shell usable at once, the console log carrying on, the host's time, a
//! reseeded random number generator, and the test's port forwards and blocked links as they are.
//! Across runs, a machine that declares when it is `ready` is saved at that point into the cache
//! of ready machines on its first boot, and restored from there by every later run of the same
//! definition: the first run restores it too, so every run sees the same machine.

use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attest_machine::backend::Capability;
use attest_machine::machine::save_planned;
use attest_machine::snapshot::cache::{Begin, Builder, Entry, Lookup, SnapshotCache};
use attest_machine::{Boot, Console, MachineSpec, RamBacking, ShareFs, VmControl};
use attest_shell::{quote, BackdoorShell};
use serde_json::json;

use super::commands::guest_poll_loop;
use super::{lock, Machine, State};
use crate::config::Ready;
use crate::error::Result;

/// How long saving or loading a snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Room for a cached machine's disk writes, besides its memory.
const CACHE_DISK_ROOM_MIB: u64 = 512;
/// How long the restored guest may take for its first command (setting its clock).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

impl Machine {
    /// Saves the running machine as snapshot `name` (replacing one of that name): its memory, its
    /// devices and its disks at this instant. The machine runs on as before.
    #[track_caller]
    pub fn snapshot(&self, name: &str) -> Result<()> {
        let at = Location::caller();
        self.check_snapshot_name(at, name)?;
        self.capable(at, Capability::Snapshots)?;
        self.shared.log.nested(Some(&self.name), &format!("saving snapshot {name:?}"), || {
            let mut shell = lock(&self.shell);
            if !self.is_running() {
                let message = format!("cannot save snapshot {name:?}: the machine is not running (start it first)");
                return Err(self.assertion(at, message, false));
            }
            // The guest's shell must be idle in the snapshot, so that a restore can use it at once.
            let generation = self.generation();
            self.connect_locked(at, &mut shell, generation)?;
            // Connected here, outside the machine's lock, so the plan below only clones it.
            self.control(at)?;
            let deadline = self.shared.wait_deadline().min(Instant::now() + SNAPSHOT_TIMEOUT);
            let started = Instant::now();
            let (control, plan) = {
                let mut state = self.state();
                let into = state.machine.dir().path().join("snapshots").join(name);
                state.machine.plan_snapshot(&into, deadline)
            }
            .map_err(|e| self.broken(at, format!("saving snapshot {name:?}: {e}")))?;
            // Saved without the machine's lock, which the watchdog (or a crash) may need meanwhile.
            let saved = save_planned(control.as_ref(), &plan, deadline);
            if saved.is_ok() {
                self.state().machine.saved(&plan);
            }
            // Paused by the save, whether or not it succeeded.
            let resumed = control.resume(deadline);
            saved.map_err(|e| self.broken(at, format!("saving snapshot {name:?}: {e}")))?;
            resumed.map_err(|e| self.broken(at, format!("resuming after snapshot {name:?}: {e}")))?;
            let snapshot = plan.snapshot;
            self.shared.log.info(
                Some(&self.name),
                &format!("saved snapshot {name:?} in {:.2} s", started.elapsed().as_secs_f64()),
            );
            lock(&self.snapshots).insert(name.to_string(), snapshot);
            Ok(())
        })
    }

    /// Puts the machine back as it was when snapshot `name` was saved: whatever ran since is gone.
    /// The shell works at once, and the guest's clock is the host's.
    #[track_caller]
    pub fn restore(&self, name: &str) -> Result<()> {
        let at = Location::caller();
        self.check_snapshot_name(at, name)?;
        let Some(snapshot) = lock(&self.snapshots).get(name).cloned() else {
            let mut taken: Vec<String> = lock(&self.snapshots).keys().cloned().collect();
            taken.sort();
            let message = format!("there is no snapshot {name:?} to restore; this test saved {taken:?}");
            return Err(self.assertion(at, message, false));
        };
        self.shared.log.nested(Some(&self.name), &format!("restoring snapshot {name:?}"), || {
            let started = Instant::now();
            let mut shell = lock(&self.shell);
            *shell = None;
            self.connected.store(0, Ordering::SeqCst);
            let deadline = self.shared.wait_deadline().min(Instant::now() + SNAPSHOT_TIMEOUT);
            let restored = {
                let mut state = self.state();
                if let Some(halted) = self.shared.halted() {
                    return Err(halted);
                }
                restore_start(&mut state, &snapshot, deadline, &format!("snapshot {name:?}"))
            };
            let control = restored.map_err(|e| self.broken(at, format!("restoring snapshot {name:?}: {e}")))?;
            self.reapply_host_side(at, control.as_ref(), deadline)?;
            control.resume(deadline).map_err(|e| self.broken(at, format!("resuming snapshot {name:?}: {e}")))?;
            let loaded = started.elapsed();
            let generation = self.generation();
            self.connect_locked(at, &mut shell, generation)?;
            let (took, guest) = (started.elapsed(), started.elapsed() - loaded);
            self.shared.log.info(
                Some(&self.name),
                &format!(
                    "restored snapshot {name:?} in {:.2} s ({} {:.2} s, guest's first command {:.2} s)",
                    took.as_secs_f64(),
                    self.vmm_name(),
                    loaded.as_secs_f64(),
                    guest.as_secs_f64()
                ),
            );
            Ok(())
        })
    }

    /// Gives a fresh VMM what the test had set up on the old one's side: the port forwards and
    /// the links it took down (the guest's own side of them is in the snapshot).
    fn reapply_host_side(
        &self,
        at: &'static Location<'static>,
        control: &dyn VmControl,
        deadline: Instant,
    ) -> Result<()> {
        let (forwards, links_down) = {
            let host_side = lock(&self.host_side);
            (host_side.forwards.clone(), host_side.links_down.clone())
        };
        let netdev = self.user_netdev();
        for forward in forwards {
            control
                .forward_port(netdev.as_deref(), forward, deadline)
                .map_err(|e| self.broken(at, format!("forwarding port {} again: {e}", forward.host_port)))?;
        }
        for device in links_down {
            control
                .set_link(&device, false, deadline)
                .map_err(|e| self.broken(at, format!("blocking {device} again: {e}")))?;
        }
        Ok(())
    }

    /// The shell of a restored start: idle since the snapshot, so the channel is all there is to
    /// wait for. Its first command gives the guest the host's time and fresh randomness.
    pub(super) fn connect_restored(&self, at: &'static Location<'static>) -> Result<BackdoorShell> {
        let deadline = self.shared.wait_deadline().min(Instant::now() + RESUME_TIMEOUT);
        let (channel, exit) = self.take_channel();
        let mut channel = channel.ok_or_else(|| self.broken(at, "it has no guest channel".into()))?;
        let exit = exit.map_err(|e| self.broken(at, e.to_string()))?;
        let stream = channel
            .connect(deadline, Some(std::os::fd::AsFd::as_fd(&exit)))
            .map_err(|e| self.broken(at, format!("connecting to the restored guest's shell: {e}")))?;
        let mut shell = BackdoorShell::resume(stream);
        match shell.run_in_shell(&after_restore_line(), deadline) {
            Ok(printed) if printed.is_empty() => Ok(shell),
            Ok(printed) => Err(self.broken(
                at,
                format!("setting the restored guest's clock failed: {}", String::from_utf8_lossy(&printed).trim()),
            )),
            Err(e) => Err(self.shell_failed(at, "the restored guest's first command", e)),
        }
    }

    /// The first start of a machine with a ready point, when there is a cache: a restore of its
    /// cached snapshot, or else a cold boot that will be saved once ready (the start's
    /// `template`). `None`: start as usual (no key, or another run is building the entry).
    pub(super) fn start_ready(&self, state: &mut State) -> Option<attest_machine::error::Result<Console>> {
        let cache = self.shared.snapshot_cache.as_ref()?;
        let extra = json!({ "ready": self.config.ready, "network": self.network.guest_script });
        let spec = state.machine.spec().clone();
        let key = SnapshotCache::key(&spec, state.machine.dir().path(), self.shared.backend.vmm_binary(), &extra);
        let key = key.inspect_err(|e| self.log(&format!("not caching this machine: {e}"))).ok()?;
        match cache.lookup(&key) {
            Lookup::Hit(entry) => {
                let started = Instant::now();
                let deadline = self.shared.wait_deadline().min(started + SNAPSHOT_TIMEOUT);
                match restore_entry(state, &entry, deadline) {
                    Ok(console) => {
                        let took = started.elapsed().as_secs_f64();
                        self.log(&format!("restored the ready machine {} in {took:.2} s", entry.dir.display()));
                        return Some(Ok(console));
                    }
                    Err(e) => {
                        state.machine.kill();
                        cache.remove(&entry.dir);
                        self.log(&format!(
                            "WARNING: the cached snapshot {} could not be restored ({e}): booting cold and replacing it",
                            entry.dir.display()
                        ));
                    }
                }
            }
            Lookup::Unusable { dir, why } => self.log(&format!(
                "WARNING: ignoring the cached snapshot {}: {why}; booting cold and replacing it",
                dir.display()
            )),
            Lookup::Miss => {}
        }
        // At most its RAM, its disks' writes and the state; the disks' room is a guess.
        let needed = (spec.memory_mib + CACHE_DISK_ROOM_MIB) << 20;
        let builder = match cache.begin(&key, &self.name, needed) {
            Ok(Begin::Building(builder)) => builder,
            Ok(Begin::Busy) => {
                self.log("another run is caching this machine now: booting it cold");
                return None;
            }
            Ok(Begin::NoRoom { free, needed, dir }) => {
                self.log(&format!(
                    "WARNING: not caching this machine: {} has {} MiB free, and its snapshot may take {} MiB \
                     (free some space, or `attest cache clear`)",
                    dir.display(),
                    free >> 20,
                    needed >> 20
                ));
                return None;
            }
            Err(e) => {
                self.log(&format!("not caching this machine: {e}"));
                return None;
            }
        };
        let ram = match ram_can_be_a_file(&spec) {
            true => RamBacking::File { path: builder.memory_file(), shared: true },
            false => RamBacking::Anonymous,
        };
        self.log(&format!("starting vm, to be cached once ready (key {key})"));
        let started = state.machine.start_with(ram).map(|vm| vm.console().clone());
        if let Ok(console) = &started {
            state.begin(console.clone(), false);
            state.start.template = Some(builder);
        }
        Some(started)
    }

    /// A template's first shell: waits until the machine is ready, saves it into the cache, and
    /// goes on, as every later run will, from a restore of what it saved. Returns the restored
    /// start and its shell.
    pub(super) fn make_ready(
        &self,
        at: &'static Location<'static>,
        mut shell: BackdoorShell,
        builder: Builder,
    ) -> Result<(u64, BackdoorShell)> {
        let started = self.started_at().unwrap_or_else(Instant::now);
        let deadline = self.shared.wait_deadline().min(started + self.config.boot_timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        let (what, check) = match self.config.ready.as_ref().expect("a template has a ready point") {
            Ready::Shell(_) => ("its shell".to_string(), None),
            Ready::Unit { unit } => (
                format!("unit {unit} to be active"),
                Some(format!("[ \"$(systemctl is-active {})\" = active ]", quote(unit))),
            ),
            Ready::Command { command } => {
                (format!("`{command}` to succeed"), Some(format!("( {command} ) >/dev/null 2>&1")))
            }
        };
        if let Some(check) = check {
            self.shared.log.nested(Some(&self.name), &format!("waiting for {what}, to cache the machine"), || {
                match shell.execute(&guest_poll_loop(&format!("if {check}; then exit 0; fi"), left), None, deadline) {
                    Ok((0, _)) => Ok(()),
                    Ok(_) => Err(self.assertion(
                        at,
                        format!("expected {what} within {left:.0?} (its ready point), but it was not"),
                        true,
                    )),
                    Err(e) => Err(self.shell_failed(at, "waiting for its ready point", e)),
                }
            })?;
        }
        // Connected here, outside the machine's lock, so the plan below only clones it.
        self.control(at)?;
        let saving = Instant::now();
        let planned = self.state().machine.plan_snapshot(builder.dir(), deadline);
        let planned = planned.map_err(|e| self.broken(at, format!("caching the ready machine failed: {e}")))?;
        let (control, plan) = planned;
        let saved = save_planned(control.as_ref(), &plan, deadline).and_then(|()| {
            self.state().machine.saved(&plan);
            builder.commit(&plan.snapshot)
        });
        let entry = saved.map_err(|e| {
            control.resume(deadline).ok();
            self.broken(at, format!("caching the ready machine failed: {e}"))
        })?;
        self.log(&format!(
            "saved the ready machine in {:.2} s: {}",
            saving.elapsed().as_secs_f64(),
            entry.dir.display()
        ));
        let restored = restore_entry(&mut self.state(), &entry, deadline);
        restored.map_err(|e| self.broken(at, format!("restoring the ready machine just saved: {e}")))?;
        let generation = self.generation();
        Ok((generation, self.connect_restored(at)?))
    }

    fn check_snapshot_name(&self, at: &'static Location<'static>, name: &str) -> Result<()> {
        crate::config::check_name("snapshot", name).map_err(|message| self.assertion(at, message, false))
    }
}

/// Replaces the machine's VM with a fresh one loaded from `snapshot` (paused), as a new start
/// whose shell is idle already, and marks the console log with `what` was restored.
fn restore_start(
    state: &mut State,
    snapshot: &attest_machine::Snapshot,
    deadline: Instant,
    what: &str,
) -> attest_machine::error::Result<Arc<dyn VmControl>> {
    let vm = state.machine.restore(snapshot, deadline)?;
    let (console, control) = (vm.console().clone(), vm.control(deadline)?);
    state.begin(console.clone(), true);
    console.note(&format!("[attest] restored {what}"));
    Ok(control)
}

/// [`restore_start`] from a cache entry, running: a first start has no test settings to give it.
fn restore_entry(state: &mut State, entry: &Entry, deadline: Instant) -> attest_machine::error::Result<Console> {
    let control =
        restore_start(state, &entry.snapshot(), deadline, &format!("the ready machine {}", entry.dir.display()))?;
    control.resume(deadline)?;
    Ok(state.start.console.clone().expect("begun above"))
}

/// Whether the VM's RAM can be a file its clones map: not for a start script's QEMU (whose
/// memory options are the script's) nor beside vhost-user devices (which need it shared).
fn ram_can_be_a_file(spec: &MachineSpec) -> bool {
    let vhost_user = matches!(spec.guest_channel, Some(attest_machine::GuestChannel::Vsock { .. }))
        || spec.shares.iter().any(|s| s.fs == ShareFs::Virtiofs);
    !matches!(spec.boot, Boot::StartScript(_)) && !vhost_user
}

/// What a restored guest runs first, as one line in its backdoor shell: its clock stood still
/// while it was saved, and gets the host's time; its random number generator would repeat the
/// snapshot's output in every clone. A kernel with the vmgenid driver has reseeded it already (the
/// VMM's generation ID changed); otherwise host randomness is mixed in and the kernel reseeds at
/// once (`RNDRESEEDCRNG`), as it would only within a minute by itself. Under TCG every program a
/// restored guest execs is translated afresh (0.3-0.45 s for the first), so this execs one: perl
/// sets the clock (`clock_settime`, to the nanosecond, whatever its own start took) and makes the
/// reseed call; without perl, `date` sets the clock to the second. The offset to the host is taken
/// with bash builtins before any exec. Prints nothing unless something failed.
fn after_restore_line() -> String {
    let host_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    let seed: String = rand_bytes().iter().map(|b| format!("\\x{b:02x}")).collect();
    let perl = "my $b = \"\\0\" x 16; syscall(228, 0, $b) == 0 or die \"clock_gettime: $!\"; \
                my ($s, $n) = unpack(\"q q\", $b); my $t = $s * 1000000000 + $n + $ARGV[0] * 1000; \
                syscall(227, 0, pack(\"q q\", int($t / 1000000000), $t % 1000000000)) == 0 or die \"clock_settime: $!\"; \
                open(my $f, \"<\", \"/dev/urandom\") or die \"urandom: $!\"; ioctl($f, 0x5207, 0) or die \"RNDRESEEDCRNG: $!\"";
    format!(
        "__o=$(( {host_us} - ${{EPOCHREALTIME//[!0-9]/}} )); printf '{seed}' > /dev/urandom; \
         if command -v perl >/dev/null; then perl -e '{perl}' -- \"$__o\" 2>&1; \
         else date -u -s @$(( (${{EPOCHREALTIME//[!0-9]/}} + __o + 500000) / 1000000 )) >/dev/null 2>&1 || echo 'date -s failed'; fi"
    )
}

/// 64 bytes from the host's random number generator.
fn rand_bytes() -> [u8; 64] {
    use std::io::Read;
    let mut bytes = [0u8; 64];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        tracing::warn!("no host randomness for the restored guest: {e}");
    }
    bytes
}
