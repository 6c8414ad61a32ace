//! Reading a test from its TOML file: the raw shapes serde reads, checked and turned into a
//! [`TestConfig`], every error starting with the line it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use attest_machine::{DiskBus, DiskFormat, StartScript};
use serde::Deserialize;

use super::*;
use crate::conditions::RawCondition;
use crate::error::{DriverError, Result};

impl TestConfig {
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
            // Before anything uses the name: it becomes file names and a script's variable.
            check_name("machine", &name).map_err(|e| DriverError::Config(format!("{line}: {e}")))?;
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
    ready: Option<super::Ready>,
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
        match self {
            Size::Mib(mib) => Ok(*mib),
            Size::Text(text) => size_mib(text),
        }
    }
}

/// A size with a K, M (the default), G or T suffix, in MiB (rounded up): `"2G"`, `"512"`, `"64 MiB"`.
pub fn size_mib(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
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
            ready: self.ready,
            ..defaults
        })
    }
}
