//! Snapshots inside a test, attest's addition to the NixOS machine API: `snapshot(name)` saves the
//! running machine (memory, devices, disks) and `restore(name)` puts it back as it was then, in a
//! fresh VMM, with the shell usable at once, the console log carrying on, the host's time, a
//! reseeded random number generator, and the test's port forwards and blocked links as they are.

use std::panic::Location;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attest_shell::BackdoorShell;

use super::{lock, Machine};
use crate::error::Result;

/// How long saving or loading a snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the restored guest may take for its first command (setting its clock).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

impl Machine {
    /// Saves the running machine as snapshot `name` (replacing one of that name): its memory, its
    /// devices and its disks at this instant. The machine runs on as before.
    #[track_caller]
    pub fn snapshot(&self, name: &str) -> Result<()> {
        let at = Location::caller();
        self.check_snapshot_name(at, name)?;
        self.shared.log.nested(Some(&self.name), &format!("saving snapshot {name:?}"), || {
            let mut shell = lock(&self.shell);
            if !self.is_running() {
                let message = format!("cannot save snapshot {name:?}: the machine is not running (start it first)");
                return Err(self.assertion(at, message, false));
            }
            // The guest's shell must be idle in the snapshot, so that a restore can use it at once.
            let generation = self.generation();
            self.connect_locked(at, &mut shell, generation)?;
            let control = self.control(at)?;
            let deadline = self.shared.wait_deadline().min(Instant::now() + SNAPSHOT_TIMEOUT);
            let started = Instant::now();
            let saved = {
                let mut state = self.state();
                let into = state.machine.dir().path().join("snapshots").join(name);
                state.machine.save_snapshot(&into, deadline)
            };
            // Paused by the save, whether or not it succeeded.
            let resumed = control.resume(deadline);
            let snapshot = saved.map_err(|e| self.broken(at, format!("saving snapshot {name:?}: {e}")))?;
            resumed.map_err(|e| self.broken(at, format!("resuming after snapshot {name:?}: {e}")))?;
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
                let restored = state.machine.restore(&snapshot, deadline).and_then(|vm| {
                    let control = vm.control(deadline)?;
                    Ok((vm.console().clone(), control))
                });
                if let Ok((console, _)) = &restored {
                    state.begin(console.clone(), true);
                }
                restored
            };
            let (console, control) =
                restored.map_err(|e| self.broken(at, format!("restoring snapshot {name:?}: {e}")))?;
            console.note(&format!("[attest] restored snapshot {name:?}"));
            self.reapply_host_side(at, control.as_ref(), deadline)?;
            control.resume(deadline).map_err(|e| self.broken(at, format!("resuming snapshot {name:?}: {e}")))?;
            let generation = self.generation();
            self.connect_locked(at, &mut shell, generation)?;
            self.shared.log.info(
                Some(&self.name),
                &format!("restored snapshot {name:?} in {:.2} s", started.elapsed().as_secs_f64()),
            );
            Ok(())
        })
    }

    /// Gives a fresh VMM what the test had set up on the old one's side: the port forwards and
    /// the links it took down (the guest's own side of them is in the snapshot).
    fn reapply_host_side(
        &self,
        at: &'static Location<'static>,
        control: &dyn attest_machine::VmControl,
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
        match shell.execute(&after_restore_script(), Some(RESUME_TIMEOUT), deadline) {
            Ok((0, _)) => Ok(shell),
            Ok((status, output)) => Err(self.broken(
                at,
                format!(
                    "setting the restored guest's clock failed (exit code {status}): {}",
                    String::from_utf8_lossy(&output).trim()
                ),
            )),
            Err(e) => Err(self.shell_failed(at, "the restored guest's first command", e)),
        }
    }

    fn check_snapshot_name(&self, at: &'static Location<'static>, name: &str) -> Result<()> {
        crate::config::rules::check_identifier("snapshot", name).map_err(|message| self.assertion(at, message, false))
    }
}

/// What a restored guest runs first. Its clock stood still while it was saved: it gets the host's
/// time. Its random number generator would repeat the snapshot's output in every clone: a kernel
/// with the vmgenid driver has reseeded it already (the VMM's generation ID changed); otherwise
/// host randomness is mixed in and, where perl or python3 can make the call, the kernel reseeds
/// at once (`RNDRESEEDCRNG`), as it otherwise would only within a minute.
fn after_restore_script() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seed: String = rand_bytes().iter().map(|b| format!("\\x{b:02x}")).collect();
    format!(
        "exec 2>&1\n\
         date -u -s @{secs}.{millis:03} >/dev/null 2>&1 || date -u -s @{rounded} >/dev/null\n\
         printf '{seed}' > /dev/urandom\n\
         if command -v perl >/dev/null; then perl -e 'open(my $f, \"<\", \"/dev/urandom\") and ioctl($f, 0x5207, 0)' || true\n\
         elif command -v python3 >/dev/null; then python3 -c 'import fcntl; fcntl.ioctl(open(\"/dev/urandom\"), 0x5207)' || true; fi\n",
        secs = now.as_secs(),
        millis = now.subsec_millis(),
        rounded = (now + Duration::from_millis(500)).as_secs(),
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
