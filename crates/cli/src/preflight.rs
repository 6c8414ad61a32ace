//! `attest preflight TEST.toml`, which `attest run` also does first: every check of a test that
//! needs no boot, in about a second, each `ok`/`warn`/`FAIL` with its fix. The host (QEMU, the
//! devices this test's machines use, the accelerator, firmware, memory against the test's machines
//! and the cgroup's limit, disk, TAP and switch networking), each ISO (a single ISO 9660 file,
//! bootable by the machine's firmware, its kernels' console on the serial port attest reads), and
//! the test's own declarations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use attest_driver::conditions::Kind;
use attest_driver::config::{BootConfig, FirmwareKind, MachineConfig, NetworkMode, TestConfig};
use attest_image::iso::{self, Platform};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::network::user_mode;
use attest_machine::{
    Backend, Boot, Disk, DiskFormat, Firmware, GuestChannel, MachineSpec, Media, Qemu, StateDir, Uefi,
};

use crate::checks::{check_disk, check_memory, check_qemu, fail, ok, report, warn, Check, APT};

/// The serial port attest reads a guest's console from.
const SERIAL_TTY: &str = "ttyS0";

#[derive(clap::Args)]
pub struct PreflightArgs {
    /// The test (TOML; see README).
    test: PathBuf,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PreflightArgs) -> i32 {
    match TestConfig::from_toml_file(&args.test) {
        Ok(config) => report(&checks(&config), args.json),
        Err(e) => crate::exit_code::setup_error(&e),
    }
}

/// Every check of `config` that needs no boot.
pub fn checks(config: &TestConfig) -> Vec<Check> {
    let qemu = Qemu::find_binary().filter(|p| p.is_file());
    let mut checks = vec![check_qemu(qemu.as_deref())];
    if let Some(binary) = &qemu {
        checks.push(check_accel(binary));
        checks.push(check_devices(binary, config));
    }
    for machine in &config.machines {
        if let BootConfig::Iso(path) = &machine.boot {
            checks.extend(check_iso(machine, path));
        }
        if machine.firmware == FirmwareKind::Uefi {
            checks.push(match Uefi::find() {
                Ok(uefi) => ok("firmware", format!("{}: OVMF {}", machine.name, uefi.code.display())),
                Err(e) => fail("firmware", format!("{}: {e}", machine.name), format!("{APT} ovmf")),
            });
        }
        checks.extend(check_declarations(machine));
    }
    checks.push(check_memory_for(config));
    checks.push(check_memory());
    checks.push(check_disk(&attest_image::cache_dir()));
    if !config.vlans.is_empty() {
        checks.push(match config.network {
            NetworkMode::Switch => match attest_network::switch::VdeSwitch::find() {
                Ok(path) => ok("vlans", format!("VLANs {:?} on vde_switch ({})", config.vlans, path.display())),
                Err(e) => fail("vlans", e.to_string(), format!("{APT} vde2, or network = \"tap\"")),
            },
            // Makes an empty namespace for real: a host that refuses namespaces shows here.
            NetworkMode::Tap => {
                let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
                match (attest_network::tap::TapNetwork::create(&BTreeSet::new(), &[]), tun) {
                    (Ok(_), Ok(_)) => {
                        ok("vlans", format!("VLANs {:?} on TAP devices in a user+net namespace", config.vlans))
                    }
                    (Err(e), _) => fail("vlans", e.to_string(), "allow user namespaces, or network = \"switch\""),
                    (_, Err(e)) => fail("vlans", format!("/dev/net/tun: {e}"), "modprobe tun, or network = \"switch\""),
                }
            }
        });
    }
    checks
}

fn check_accel(qemu: &Path) -> Check {
    let probe = kvm_probe::probe_kvm(qemu);
    match probe.usable {
        true => ok("accelerator", "KVM"),
        false => warn(
            "accelerator",
            format!("TCG: boots and commands run some 5 to 20 times slower than under KVM ({})", probe.detail),
            "on a host with KVM: load kvm_intel or kvm_amd and give this user rw access to /dev/kvm",
        ),
    }
}

/// Whether this QEMU has every device the test's machines use, as the backend would ask for them.
fn check_devices(binary: &Path, config: &TestConfig) -> Check {
    let help = match Command::new(binary).args(["-device", "help"]).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        Err(e) => return fail("devices", format!("{} -device help: {e}", binary.display()), "reinstall QEMU"),
    };
    let mut wanted = BTreeSet::new();
    for machine in &config.machines {
        match devices_of(binary, machine, config.vlans.len()) {
            Ok(devices) => wanted.extend(devices),
            Err(e) => return fail("devices", format!("{}: {e}", machine.name), "see the error"),
        }
    }
    let missing: Vec<&String> = wanted.iter().filter(|d| !help.contains(&format!("name \"{d}\""))).collect();
    match missing.as_slice() {
        [] => ok("devices", wanted.into_iter().collect::<Vec<_>>().join(", ")),
        _ => fail(
            "devices",
            format!("this QEMU lacks {}", missing.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")),
            format!("{APT} qemu-system-x86 (a full build), or set ATTEST_QEMU"),
        ),
    }
}

/// The `-device` names the QEMU backend gives `machine`: it builds the machine's command line in a
/// scratch directory, with stand-ins for its files.
fn devices_of(binary: &Path, machine: &MachineConfig, vlans: usize) -> Result<Vec<String>, String> {
    if matches!(machine.boot, BootConfig::StartScript { .. }) {
        return Ok(Vec::new());
    }
    let stand_in = |media, bus| Disk { path: "/dev/null".into(), format: DiskFormat::Raw, media, bus, read_only: true };
    let mut disks: Vec<Disk> = machine.blank_disks.iter().map(|d| stand_in(Media::Disk, d.bus)).collect();
    if let BootConfig::Iso(_) = machine.boot {
        disks.push(stand_in(Media::Cdrom, Default::default()));
    }
    let boot = match machine.boot {
        BootConfig::Disk(_) | BootConfig::Iso(_) => Boot::Firmware(Firmware::Bios),
        _ => Boot::kernel("/dev/null", None, ""),
    };
    let mut nics = vec![user_mode::nic()];
    nics.extend((0..vlans).map(|_| user_mode::nic()));
    let spec = MachineSpec {
        disks,
        nics,
        rng: true,
        display: true,
        guest_channel: Some(GuestChannel::VirtConsole),
        ..MachineSpec::new(machine.name.clone(), boot)
    };
    let state = StateDir::create(false).map_err(|e| format!("a scratch directory: {e}"))?;
    let dir = state.machine_dir(0, &machine.name).map_err(|e| e.to_string())?;
    let qemu = Qemu { binary: binary.to_path_buf(), virtiofsd: None, vhost_vsock: None };
    let events: attest_machine::EventSink = std::sync::Arc::new(|_| {});
    let prepared = qemu.prepare(&spec, &dir, &events).map_err(|e| e.to_string())?;
    let args: Vec<String> = prepared.command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let devices =
        args.windows(2).filter(|w| w[0] == "-device").map(|w| w[1].split(',').next().unwrap_or("").to_string());
    Ok(devices.collect())
}

/// The ISO itself: a single ISO 9660 file, bootable by the machine's firmware, whose boot entries
/// put the kernel's console on the serial port the test reads.
fn check_iso(machine: &MachineConfig, path: &Path) -> Vec<Check> {
    let name = &machine.name;
    let report = match iso::inspect(path) {
        Ok(report) => report,
        Err(e) => return vec![fail("iso", format!("{name}: {e}"), "give the test a bootable ISO 9660 image")],
    };
    let mut checks = vec![ok("iso", format!("{name}: {} is ISO 9660, volume {:?}", path.display(), report.volume_id))];
    let (platform, firmware) = match machine.firmware {
        FirmwareKind::Bios => (Platform::Bios, "BIOS"),
        FirmwareKind::Uefi => (Platform::Uefi, "UEFI"),
    };
    checks.push(match report.boots_on(platform) {
        true => ok("iso boot", format!("{name}: El Torito has a {firmware} boot entry")),
        false => fail(
            "iso boot",
            format!("{name}: the ISO has no {firmware} boot entry in its El Torito catalog"),
            "boot it with the other firmware (`firmware = \"bios\"` or \"uefi\"), or rebuild the ISO for this one",
        ),
    });
    if report.configs.is_empty() {
        checks.push(warn(
            "iso console",
            format!("{name}: no boot loader configuration found (grub.cfg, isolinux.cfg, loader entries)"),
            format!(
                "make sure its kernel command line has console={SERIAL_TTY}: attest reads the guest on the serial port"
            ),
        ));
    }
    let missing = report.entries_without_console(SERIAL_TTY);
    checks.push(match missing.as_slice() {
        [] if !report.configs.is_empty() => {
            ok("iso console", format!("{name}: every boot entry has console={SERIAL_TTY}"))
        }
        [] => return checks,
        entries => {
            let named: Vec<String> = entries
                .iter()
                .map(|(config, entry)| {
                    let title = entry.title.as_deref().map(|t| format!(" ({t:?})")).unwrap_or_default();
                    format!("{} line {}{title}", config.path, entry.line)
                })
                .collect();
            fail(
                "iso console",
                format!("{name}: no console={SERIAL_TTY} on the kernel command line in {}", named.join(", ")),
                format!("add console={SERIAL_TTY},115200 to those lines: otherwise the boot and the login prompt never reach the serial console"),
            )
        }
    });
    checks
}

/// The test's own declarations, as far as they can be judged before boot.
fn check_declarations(machine: &MachineConfig) -> Vec<Check> {
    let name = &machine.name;
    let mut checks = Vec::new();
    let no_backdoor = matches!(machine.boot, BootConfig::Iso(_) | BootConfig::Disk(_));
    if !machine.conditions.is_empty() && no_backdoor && machine.login.is_none() {
        checks.push(warn(
            "conditions",
            format!("{name}: its conditions are checked through the NixOS backdoor shell, which an ISO or disk image rarely has"),
            "add `login = { user = \"…\", password = \"…\" }` to check them over the serial console",
        ));
    }
    for condition in &machine.conditions {
        let problem = match &condition.kind {
            Kind::File { path, .. } | Kind::BlockDevice { path } if !path.starts_with('/') => {
                Some((format!("{path:?} is not an absolute path"), "give the path from /".to_string()))
            }
            Kind::BlockDevice { path } if !path.starts_with("/dev/") => {
                Some((format!("{path:?} is not under /dev"), "name the device node, e.g. /dev/vda".into()))
            }
            Kind::Unit { unit, .. } if !unit.contains('.') => Some((
                format!("{unit:?} has no unit type"),
                format!("name the unit with its type, e.g. {unit}.service"),
            )),
            _ => None,
        };
        if let Some((problem, fix)) = problem {
            checks.push(fail("conditions", format!("{name}: condition {:?}: {problem}", condition.name), fix));
        }
    }
    if !machine.conditions.is_empty() && checks.is_empty() {
        checks.push(ok("conditions", format!("{name}: {} conditions declared", machine.conditions.len())));
    }
    checks
}

/// The test's machines together against this host's memory and the cgroup's limit.
fn check_memory_for(config: &TestConfig) -> Check {
    // QEMU itself takes some memory beyond the guest's.
    let needed: u64 = config.machines.iter().map(|m| m.memory_mib + 100).sum();
    let limit = cgroup_memory_limit();
    let detail = format!("the test's {} machines need about {needed} MiB", config.machines.len());
    match limit {
        Some((mib, file)) if mib < needed => fail(
            "cgroup",
            format!("{detail}, but {} limits this process to {mib} MiB", file.display()),
            "run outside the limit (or raise it), or give the machines less memory",
        ),
        Some((mib, file)) => ok("cgroup", format!("{detail}; {} allows {mib} MiB", file.display())),
        None => ok("cgroup", format!("{detail}; no cgroup memory limit")),
    }
}

/// The smallest `memory.max` on this process's cgroup v2 path, in MiB.
fn cgroup_memory_limit() -> Option<(u64, PathBuf)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
    let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let mut lowest: Option<(u64, PathBuf)> = None;
    loop {
        let file = dir.join("memory.max");
        if let Some(bytes) = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
            if lowest.as_ref().is_none_or(|(mib, _)| bytes >> 20 < *mib) {
                lowest = Some((bytes >> 20, file));
            }
        }
        if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
            return lowest;
        }
    }
}

/// What `attest run` does first: the checks that failed (and warnings) on stderr, and `Err` with
/// the exit status when one failed, so nothing boots.
pub fn gate(config: &TestConfig) -> Result<(), i32> {
    let checks = checks(config);
    let failed = checks.iter().any(|c| c.status == crate::checks::Status::Fail);
    for check in checks.iter().filter(|c| c.status != crate::checks::Status::Ok) {
        let label = if check.status == crate::checks::Status::Fail { "FAIL" } else { "warn" };
        say!("attest: preflight {label}: {}: {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            say!("attest:   fix: {fix}");
        }
    }
    match failed {
        true => Err(crate::exit_code::SETUP),
        false => Ok(()),
    }
}
