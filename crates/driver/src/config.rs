//! Machine definitions, backend-agnostic: built in Rust ([`MachineConfig`]'s builder) or read from a
//! test's TOML file ([`TestConfig::from_toml`]), checked before anything boots, with the offending
//! line named.
//!
//! ```toml
//! global_timeout = 1800          # seconds; default 3600, as NixOS
//! vlans = [1, 2]                 # the test's VLANs (1 to 255)
//! network = "switch"             # or "tap": how VLANs are carried
//!
//! [machines.server]
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
use std::path::{Path, PathBuf};
use std::time::Duration;

use attest_machine::{DiskBus, DiskFormat, StartScript};
pub use attest_network::Mode as NetworkMode;
use serde::Deserialize;

use crate::conditions::{Condition, RawCondition};
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

    pub fn from_toml_file(path: &Path) -> Result<TestConfig> {
        let text = std::fs::read_to_string(path).map_err(DriverError::io(format!("reading {}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        TestConfig::from_toml(&text, base).map_err(|e| DriverError::Config(format!("{}:{e}", path.display())))
    }

    /// Parses a test definition; relative paths in it are relative to `base`. Errors start with
    /// the line number.
    pub fn from_toml(text: &str, base: &Path) -> Result<TestConfig> {
        let raw: RawTest = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            DriverError::Config(format!("{line}: {}", e.message()))
        })?;
        let mut machines = Vec::new();
        for (name, machine) in raw.machines {
            let line = line_of(text, machine.span().start);
            let machine = machine
                .into_inner()
                .into_config(name, base)
                .map_err(|e| DriverError::Config(format!("{line}: {e}")))?;
            machines.push(machine);
        }
        if machines.is_empty() {
            return Err(DriverError::Config("1: the test defines no machines: add a [machines.NAME] table".into()));
        }
        let global_timeout = raw.global_timeout.map(Duration::from_secs).unwrap_or(DEFAULT_GLOBAL_TIMEOUT);
        Ok(TestConfig { machines, global_timeout, vlans: raw.vlans, network: raw.network, extra: raw.extra })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Deserialize)]
struct RawTest {
    global_timeout: Option<u64>,
    #[serde(default)]
    vlans: Vec<u32>,
    #[serde(default)]
    network: NetworkMode,
    #[serde(default)]
    machines: BTreeMap<String, toml::Spanned<RawMachine>>,
    #[serde(flatten)]
    extra: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    #[serde(default)]
    backend: BackendKind,
    image: Option<BuiltinImage>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    disk: Option<PathBuf>,
    iso: Option<PathBuf>,
    start_script: Option<PathBuf>,
    qemu_opts: Option<String>,
    kernel_params: Option<String>,
    memory: Option<u64>,
    cpus: Option<u32>,
    #[serde(default)]
    qemu_args: Vec<String>,
    #[serde(default)]
    blank_disks: Vec<RawBlankDisk>,
    #[serde(default)]
    allow_reboot: bool,
    /// Seconds.
    boot_timeout: Option<u64>,
    vlans: Option<Vec<u32>>,
    login: Option<Login>,
    firmware: Option<FirmwareKind>,
    #[serde(default)]
    conditions: Vec<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlankDisk {
    size: Size,
    #[serde(default = "qcow2")]
    format: DiskFormat,
    #[serde(default)]
    bus: DiskBus,
}

fn qcow2() -> DiskFormat {
    DiskFormat::Qcow2
}

/// A size in MiB: a number, or a string with a K, M, G or T suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Mib(u64),
    Text(String),
}

impl Size {
    fn mib(&self) -> std::result::Result<u64, String> {
        let text = match self {
            Size::Mib(mib) => return Ok(*mib),
            Size::Text(text) => text.trim(),
        };
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| format!("size {text:?} is not a number with K, M, G or T"))?;
        let kib = match unit.trim().trim_end_matches(['i', 'B']).to_ascii_uppercase().as_str() {
            "K" => number,
            "" | "M" => number << 10,
            "G" => number << 20,
            "T" => number << 30,
            _ => return Err(format!("size {text:?}: the unit must be K, M, G or T")),
        };
        Ok(kib.div_ceil(1024))
    }
}

impl RawMachine {
    fn into_config(self, name: String, base: &Path) -> std::result::Result<MachineConfig, String> {
        let at = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let given: Vec<&str> = [
            ("image", self.image.is_some()),
            ("kernel", self.kernel.is_some()),
            ("iso", self.iso.is_some()),
            ("start_script", self.start_script.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        let only = |keys: &[(&str, bool)]| match keys.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(format!("machine {name}: `{key}` does not go with `{}`", given[0])),
            None => Ok(()),
        };
        let script_only = self.qemu_opts.is_some() || self.kernel_params.is_some();
        let boot = match (given.as_slice(), self.disk) {
            ([], None) => {
                return Err(format!(
                    "machine {name} has nothing to boot: give one of image, kernel, disk, iso or start_script"
                ))
            }
            ([_, second, ..], _) => {
                return Err(format!("machine {name}: `{}` and `{second}` are both boot sources; keep one", given[0]))
            }
            ([], Some(disk)) => BootConfig::Disk(at(disk)),
            (["image"], disk) => {
                only(&[
                    ("disk", disk.is_some()),
                    ("initrd", self.initrd.is_some()),
                    ("cmdline", self.cmdline.is_some()),
                ])?;
                BootConfig::Image(self.image.expect("given"))
            }
            (["kernel"], disk) => BootConfig::Kernel {
                kernel: at(self.kernel.expect("given")),
                initrd: self.initrd.map(at),
                cmdline: self.cmdline.unwrap_or_default(),
                disk: disk.map(at),
            },
            (["iso"], disk) => {
                only(&[
                    ("disk", disk.is_some()),
                    ("initrd", self.initrd.is_some()),
                    ("cmdline", self.cmdline.is_some()),
                ])?;
                BootConfig::Iso(at(self.iso.expect("given")))
            }
            (_, disk) => {
                only(&[
                    ("disk", disk.is_some()),
                    ("initrd", self.initrd.is_some()),
                    ("cmdline", self.cmdline.is_some()),
                ])?;
                let path = at(self.start_script.expect("given"));
                if let Some(from_file) = StartScript::machine_name(&path).filter(|n| *n != name) {
                    return Err(format!("machine {name}: its start script is for machine {from_file:?}"));
                }
                BootConfig::StartScript { path, qemu_opts: self.qemu_opts, kernel_params: self.kernel_params }
            }
        };
        if matches!(boot, BootConfig::StartScript { .. }) && self.vlans.is_some() {
            return Err(format!(
                "machine {name}: a start script joins the VLANs it was built with; drop `vlans` (the test's `vlans` starts their switches)"
            ));
        }
        if self.firmware.is_some() && !matches!(boot, BootConfig::Disk(_) | BootConfig::Iso(_)) {
            return Err(format!("machine {name}: `firmware` is for machines booting a disk or an ISO"));
        }
        if !matches!(boot, BootConfig::StartScript { .. }) && script_only {
            return Err(format!(
                "machine {name}: qemu_opts and kernel_params are for start scripts; use qemu_args or cmdline"
            ));
        }
        let blank_disks = self
            .blank_disks
            .iter()
            .map(|d| Ok(BlankDisk { size_mib: d.size.mib()?, format: d.format, bus: d.bus }))
            .collect::<std::result::Result<_, String>>()
            .map_err(|e| format!("machine {name}: {e}"))?;
        let conditions = self
            .conditions
            .into_iter()
            .map(RawCondition::into_condition)
            .collect::<std::result::Result<_, String>>()
            .map_err(|e| format!("machine {name}: {e}"))?;
        let defaults = MachineConfig::new(name, boot);
        Ok(MachineConfig {
            backend: self.backend,
            memory_mib: self.memory.unwrap_or(defaults.memory_mib),
            cpus: self.cpus.unwrap_or(defaults.cpus),
            qemu_args: self.qemu_args,
            blank_disks,
            allow_reboot: self.allow_reboot,
            boot_timeout: self.boot_timeout.map(Duration::from_secs).unwrap_or(DEFAULT_BOOT_TIMEOUT),
            vlans: self.vlans,
            login: self.login,
            firmware: self.firmware.unwrap_or_default(),
            conditions,
            ..defaults
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TestConfig> {
        TestConfig::from_toml(text, Path::new("/tests"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_definition_reads_as_the_builder_would_make_it() {
        let test = parse(
            r#"
global_timeout = 600
script = "test.py"

[machines.server]
image = "debian"
memory = 2048
qemu_args = ["-device", "virtio-balloon"]
blank_disks = [{ size = "2G" }, { size = 64, format = "raw", bus = "scsi" }]

[machines.client]
kernel = "bzImage"
initrd = "/boot/initrd"
cmdline = "console=ttyS0"
disk = "root.qcow2"
allow_reboot = true
boot_timeout = 90
"#,
        )
        .unwrap();
        assert_eq!(test.global_timeout, Duration::from_secs(600));
        assert_eq!(test.extra["script"].as_str(), Some("test.py"));
        let server = MachineConfig::image("server", BuiltinImage::Debian)
            .memory_mib(2048)
            .qemu_args(["-device", "virtio-balloon"])
            .blank_disk(2048, DiskFormat::Qcow2);
        let mut server = server;
        server.blank_disks.push(BlankDisk { size_mib: 64, format: DiskFormat::Raw, bus: DiskBus::Scsi });
        let client = MachineConfig::new(
            "client",
            BootConfig::Kernel {
                kernel: "/tests/bzImage".into(),
                initrd: Some("/boot/initrd".into()),
                cmdline: "console=ttyS0".into(),
                disk: Some("/tests/root.qcow2".into()),
            },
        )
        .allow_reboot(true)
        .boot_timeout(Duration::from_secs(90));
        // Machines come in name order, which NixOS's node numbers follow too.
        assert_eq!(test.machines, [client, server]);
    }

    #[test]
    fn conditions_and_login_read_as_declared() {
        use crate::conditions::Kind;
        let test = parse(
            r#"
[machines.installer]
iso = "installer.iso"
firmware = "uefi"
login = { user = "tester", password = "pw", sudo = true }
[[machines.installer.conditions]]
name = "provisioned"
unit = "provision.service"
state = "inactive"
within = 300
[[machines.installer.conditions]]
name = "volume"
logical_volume = "main/slash"
"#,
        )
        .unwrap();
        let machine = &test.machines[0];
        assert_eq!(machine.login, Some(Login { user: "tester".into(), password: Some("pw".into()), sudo: true }));
        let kinds: Vec<&Kind> = machine.conditions.iter().map(|c| &c.kind).collect();
        assert_eq!(
            kinds,
            [
                &Kind::Unit { unit: "provision.service".into(), state: "inactive".into() },
                &Kind::LogicalVolume { name: "main/slash".into() }
            ]
        );
        assert_eq!(machine.conditions[0].within, Some(Duration::from_secs(300)));
        assert_eq!(machine.firmware, FirmwareKind::Uefi);
        assert!(
            error("[machines.a]\nimage = \"minimal\"\nfirmware = \"uefi\"\n").contains("`firmware` is for machines")
        );
        let bad = |condition: &str| {
            error(&format!("[machines.a]\nimage = \"minimal\"\n[[machines.a.conditions]]\n{condition}"))
        };
        assert!(bad("name = \"x\"\n").contains("checks nothing"), "{}", bad("name = \"x\"\n"));
        assert!(bad("name = \"x\"\nunit = \"a\"\nfile = \"/b\"\n").contains("`unit` and `file` are two kinds"));
        assert!(bad("name = \"x\"\nunit = \"a\"\n").contains("needs `state`"));
        assert!(bad("name = \"x\"\nfile = \"/a\"\nstate = \"active\"\n").contains("`state` goes with `unit`"));
        assert!(bad("name = \"x\"\nlogical_volume = \"slash\"\n").contains("named VG/LV"));
        assert!(bad("name = \"x\"\nconsole = \"(\"\n").contains("bad regex"));
        assert!(bad("name = \"x\"\nfile = \"/a\"\nsize = 3\n").contains("unknown field `size`"));
    }

    #[test]
    fn vlans_default_to_nixos_vlan_one() {
        let test = parse(
            "vlans = [1, 2]\nnetwork = \"tap\"\n[machines.a]\nimage = \"minimal\"\n[machines.b]\nimage = \"minimal\"\nvlans = [2]\n",
        )
        .unwrap();
        assert_eq!((test.vlans.as_slice(), test.network), (&[1, 2][..], NetworkMode::Tap));
        let joins: Vec<Vec<u32>> = test.machines.iter().map(|m| m.joins(&test.vlans)).collect();
        assert_eq!(joins, [vec![1], vec![2]]);
        assert!(MachineConfig::image("c", BuiltinImage::Minimal).joins(&[2]).is_empty());
    }

    #[test]
    fn start_scripts_iso_and_disk_boot_sources() {
        let test = parse(
            r#"
[machines.server]
start_script = "/nix/store/x/bin/run-server-vm"
qemu_opts = "-m 2048"
[machines.installer]
iso = "nixos.iso"
blank_disks = [{ size = "8G" }]
[machines.legacy]
disk = "/images/old.raw"
"#,
        )
        .unwrap();
        let boots: Vec<&BootConfig> = test.machines.iter().map(|m| &m.boot).collect();
        assert_eq!(
            boots,
            [
                &BootConfig::Iso("/tests/nixos.iso".into()),
                &BootConfig::Disk("/images/old.raw".into()),
                &BootConfig::StartScript {
                    path: "/nix/store/x/bin/run-server-vm".into(),
                    qemu_opts: Some("-m 2048".into()),
                    kernel_params: None
                },
            ]
        );
        assert_eq!(MachineConfig::start_script("/x/run-db-vm").unwrap().name, "db");
        assert!(MachineConfig::start_script("/x/start-db").is_err());
    }

    #[test]
    fn bad_definitions_name_the_line_and_the_fix() {
        assert!(
            error("[machines.a]\nimage = \"debian\"\nmemory = \"lots\"\n").starts_with("3: invalid type"),
            "{}",
            error("[machines.a]\nimage = \"debian\"\nmemory = \"lots\"\n")
        );
        let unknown = error("\n[machines.a]\nbackend = \"bochs\"\nimage = \"debian\"\n");
        assert!(
            unknown
                .starts_with("3: unknown variant `bochs`, expected one of `qemu`, `firecracker`, `cloud-hypervisor`"),
            "{unknown}"
        );
        let duplicate = error("[machines.a]\nimage = \"debian\"\n[machines.a]\nimage = \"minimal\"\n");
        assert!(duplicate.starts_with("3: ") && duplicate.contains("duplicate"), "{duplicate}");
        let two = error("[machines.a]\nimage = \"debian\"\nkernel = \"/k\"\n");
        assert_eq!(two, "1: machine a: `image` and `kernel` are both boot sources; keep one");
        let none = error("\n\n[machines.a]\nmemory = 512\n");
        assert!(none.starts_with("3: machine a has nothing to boot"), "{none}");
        let typo = error("[machines.a]\nimage = \"debian\"\nmemroy = 5\n");
        assert!(typo.starts_with("3: unknown field `memroy`"), "{typo}");
        assert!(error("[machines.a]\nimage = \"minimal\"\ndisk = \"x\"\n").contains("`disk` does not go with `image`"));
        assert!(
            error("[machines.a]\nstart_script = \"/bin/run-b-vm\"\n").contains("its start script is for machine \"b\"")
        );
        assert!(error("[machines.a]\nimage = \"debian\"\nblank_disks = [{ size = \"2Q\" }]\n").contains("unit must be"));
        assert!(error("global_timeout = 5\n").contains("defines no machines"));
        assert!(error("network = \"bridge\"\n[machines.a]\nimage = \"minimal\"\n").contains("unknown variant `bridge`"));
        assert!(error("[machines.a]\nstart_script = \"/bin/run-a-vm\"\nvlans = [1]\n").contains("drop `vlans`"));
        assert!(error("[machines.a\n").starts_with("1: "), "{}", error("[machines.a\n"));
    }
}
