//! Machine definitions, backend-agnostic: built in Rust ([`MachineConfig`]'s builder) or read from a
//! test's TOML file ([`TestConfig::from_toml`]), checked before anything boots: its shape when read,
//! with the offending line named, and its values by the rules in `rules.rs` ([`TestConfig::problems`]).
//!
//! ```toml
//! global_timeout = 1800          # seconds; default 3600, as NixOS
//! vlans = [1, 2]                 # the test's VLANs (1 to 255)
//! network = "switch"             # or "tap": how VLANs are carried
//!
//! [machines.server]              # a name is an identifier (`check_name`), as in NixOS
//! image = "debian"               # or: kernel/initrd/cmdline, disk, iso, start_script
//! memory = 1024                  # MiB
//! cpus = 1
//! qemu_args = ["-device", "virtio-balloon"]
//! blank_disks = [{ size = "2G", format = "qcow2" }]
//! vlans = [1, 2]                 # default: [1] if the test has VLAN 1, as NixOS
//!
//! [machines.installer]
//! iso = "installer.iso"          # firmware = "uefi" for OVMF; default SeaBIOS
//! login = { user = "tester", password = "tester", sudo = true }   # a shell on the serial console
//! [[machines.installer.conditions]]                               # see `conditions`
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use attest_machine::{DiskBus, DiskFormat, StartScript};
pub use attest_network::Mode as NetworkMode;
use attest_network::{NetworkError, Plan};
use serde::Deserialize;

pub use rules::{check_name, Problem};

use crate::conditions::Condition;
use crate::error::{DriverError, Result};

/// NixOS's default for `globalTimeout`.
pub const DEFAULT_GLOBAL_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a machine may take from start to its backdoor shell by default (NixOS waits without
/// limit; its connect timeout was raised to 10 minutes in PR #53828).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The VMM that runs a machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    #[default]
    Qemu,
    Firecracker,
    CloudHypervisor,
}

/// Guests attest builds itself, each speaking the NixOS backdoor protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinImage {
    /// busybox and bash in an initramfs, no init system: boots in seconds.
    Minimal,
    /// Debian bookworm with systemd (`attest image debian`).
    Debian,
}

/// Where a machine boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootConfig {
    Image(BuiltinImage),
    /// A kernel and initrd, optionally with a root disk image (through an overlay).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        disk: Option<PathBuf>,
    },
    /// A bootable disk image (qcow2 or raw), through a copy-on-write overlay.
    Disk(PathBuf),
    /// An ISO as cdrom.
    Iso(PathBuf),
    /// A NixOS `run-<name>-vm` script, with `QEMU_OPTS` and `QEMU_KERNEL_PARAMS`.
    StartScript {
        path: PathBuf,
        qemu_opts: Option<String>,
        kernel_params: Option<String>,
    },
}

/// A disk attest creates empty for the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlankDisk {
    pub size_mib: u64,
    pub format: DiskFormat,
    pub bus: DiskBus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub name: String,
    pub backend: BackendKind,
    pub boot: BootConfig,
    pub memory_mib: u64,
    pub cpus: u32,
    pub qemu_args: Vec<String>,
    pub blank_disks: Vec<BlankDisk>,
    pub allow_reboot: bool,
    /// How long the machine may take from start to its backdoor shell.
    pub boot_timeout: Duration,
    /// The VLANs it joins; `None`: VLAN 1 if the test has it (NixOS's default). A start script's
    /// machine has the VLANs its script was built with.
    pub vlans: Option<Vec<u32>>,
    /// How to reach a shell on a guest without a backdoor: logging in on the serial console.
    pub login: Option<Login>,
    /// The firmware of a machine booting from a disk or an ISO.
    pub firmware: FirmwareKind,
    /// What the guest must have set up, checked by [`Machine::check_conditions`](crate::Machine).
    pub conditions: Vec<Condition>,
    /// When the booted machine is ready: its snapshot at that point is cached, and later runs
    /// of the same definition restore it instead of booting.
    pub ready: Option<Ready>,
}

/// The point a machine is ready at, for the cache of ready machines. TOML: `ready = "shell"`,
/// `ready = { unit = "multi-user.target" }` or `ready = { command = "test -e /run/ok" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Ready {
    /// Its first shell prompt (`"shell"`).
    Shell(ReadyWord),
    /// A systemd unit is active.
    Unit { unit: String },
    /// A shell command succeeds.
    Command { command: String },
}

/// The one word `ready` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyWord {
    Shell,
}

/// BIOS (SeaBIOS) or UEFI (OVMF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareKind {
    #[default]
    Bios,
    Uefi,
}

/// A serial-console login: the user, its password, and whether to `sudo -i` afterwards (with the
/// same password if sudo asks).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub user: String,
    pub password: Option<String>,
    #[serde(default)]
    pub sudo: bool,
}

impl MachineConfig {
    pub fn new(name: impl Into<String>, boot: BootConfig) -> MachineConfig {
        MachineConfig {
            name: name.into(),
            backend: BackendKind::Qemu,
            boot,
            memory_mib: 1024,
            cpus: 1,
            qemu_args: Vec::new(),
            blank_disks: Vec::new(),
            allow_reboot: false,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            vlans: None,
            login: None,
            firmware: FirmwareKind::Bios,
            conditions: Vec::new(),
            ready: None,
        }
    }

    /// The VLANs the machine joins in a test with `test_vlans`.
    pub fn joins(&self, test_vlans: &[u32]) -> Vec<u32> {
        match (&self.vlans, &self.boot) {
            (_, BootConfig::StartScript { .. }) => Vec::new(),
            (Some(vlans), _) => vlans.clone(),
            (None, _) if test_vlans.contains(&1) => vec![1],
            (None, _) => Vec::new(),
        }
    }

    /// A machine running one of attest's own guests.
    pub fn image(name: impl Into<String>, image: BuiltinImage) -> MachineConfig {
        MachineConfig::new(name, BootConfig::Image(image))
    }

    pub fn kernel(
        name: impl Into<String>,
        kernel: impl Into<PathBuf>,
        initrd: Option<PathBuf>,
        cmdline: impl Into<String>,
    ) -> MachineConfig {
        let boot = BootConfig::Kernel { kernel: kernel.into(), initrd, cmdline: cmdline.into(), disk: None };
        MachineConfig::new(name, boot)
    }

    pub fn disk(name: impl Into<String>, image: impl Into<PathBuf>) -> MachineConfig {
        MachineConfig::new(name, BootConfig::Disk(image.into()))
    }

    pub fn iso(name: impl Into<String>, iso: impl Into<PathBuf>) -> MachineConfig {
        MachineConfig::new(name, BootConfig::Iso(iso.into()))
    }

    /// A NixOS start script; the machine's name comes from its file name, as NixOS takes it.
    pub fn start_script(path: impl Into<PathBuf>) -> Result<MachineConfig> {
        let path = path.into();
        let name = StartScript::machine_name(&path).ok_or_else(|| {
            DriverError::Config(format!("{}: a start script is named run-<machine>-vm", path.display()))
        })?;
        Ok(MachineConfig::new(name, BootConfig::StartScript { path, qemu_opts: None, kernel_params: None }))
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn qemu_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn blank_disk(mut self, size_mib: u64, format: DiskFormat) -> Self {
        self.blank_disks.push(BlankDisk { size_mib, format, bus: DiskBus::Virtio });
        self
    }

    /// Caches the machine once it is `ready` (see [`Ready`]).
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = Some(ready);
        self
    }

    pub fn allow_reboot(mut self, allow: bool) -> Self {
        self.allow_reboot = allow;
        self
    }

    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    pub fn vlans(mut self, vlans: impl IntoIterator<Item = u32>) -> Self {
        self.vlans = Some(vlans.into_iter().collect());
        self
    }

    pub fn login(mut self, user: &str, password: Option<&str>, sudo: bool) -> Self {
        self.login = Some(Login { user: user.into(), password: password.map(Into::into), sudo });
        self
    }

    pub fn firmware(mut self, firmware: FirmwareKind) -> Self {
        self.firmware = firmware;
        self
    }

    pub fn condition(mut self, condition: Condition) -> Self {
        self.conditions.push(condition);
        self
    }
}

/// A whole test's machines and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct TestConfig {
    pub machines: Vec<MachineConfig>,
    pub global_timeout: Duration,
    /// The test's VLANs.
    pub vlans: Vec<u32>,
    pub network: NetworkMode,
    /// Further keys of the file (e.g. `script`), for the commands that use them.
    pub extra: BTreeMap<String, toml::Value>,
}

impl TestConfig {
    pub fn new(machines: Vec<MachineConfig>) -> TestConfig {
        TestConfig {
            machines,
            global_timeout: DEFAULT_GLOBAL_TIMEOUT,
            vlans: Vec::new(),
            network: NetworkMode::default(),
            extra: BTreeMap::new(),
        }
    }

    pub fn vlans(mut self, vlans: impl IntoIterator<Item = u32>) -> Self {
        self.vlans = vlans.into_iter().collect();
        self
    }

    pub fn network(mut self, mode: NetworkMode) -> Self {
        self.network = mode;
        self
    }

    /// The test's network plan: its VLANs and what each machine joins, as [`crate::Driver`] plans it.
    pub fn plan(&self) -> std::result::Result<Plan, NetworkError> {
        let joins: Vec<(&str, Vec<u32>)> =
            self.machines.iter().map(|m| (m.name.as_str(), m.joins(&self.vlans))).collect();
        Plan::new(&self.vlans, joins.iter().map(|(name, vlans)| (*name, vlans.as_slice())))
    }
}

mod file;
pub use file::size_mib;
mod rules;
#[cfg(test)]
mod tests;
