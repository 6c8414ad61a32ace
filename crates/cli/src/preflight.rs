//! `attest preflight TEST.toml`, which `attest run` also does first: every check of a test that
//! needs no boot, in about a second, each `ok`/`warn`/`FAIL` with its fix. The definition's values
//! by the config's own rules (vCPUs, memory, disk sizes, timeouts, VLANs: `TestConfig::problems`),
//! every file it names as the driver will use it (`prepare::check_files`: a kernel must boot), the
//! host (QEMU, the devices this test's machines use, the accelerator, firmware, the machines'
//! memory against the host's available memory and the cgroup's limit, their vCPUs against the
//! host's, the blank disks against free space, TAP and switch networking), each ISO (a single ISO
//! 9660 file, bootable by the machine's firmware, its kernels' console on the serial port attest
//! reads), and the test's own declarations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use attest_driver::conditions::Kind;
use attest_driver::config::{BootConfig, FirmwareKind, MachineConfig, NetworkMode, TestConfig};
use attest_image::iso::{self, Platform};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::network::user_mode;
use attest_machine::state_dir;
use attest_machine::{
    Backend, Boot, Disk, DiskFormat, Firmware, GuestChannel, MachineSpec, Media, Qemu, StateDir, Uefi,
};

use attest_driver::prepare;

use crate::checks::{
    available_memory_mib, check_disk, check_qemu, fail, free_space, ok, report, warn, Check, Status, APT,
};

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
    let problems = config.problems();
    let vlans_wrong = problems.iter().any(|p| p.key == "vlans");
    checks.extend(problems.into_iter().map(|p| fail(p.key, p.what, p.fix)));
    for machine in &config.machines {
        let files = check_files(machine);
        let files_ok = files.iter().all(|c| c.status != Status::Fail);
        checks.extend(files);
        if let (BootConfig::Iso(path), true) = (&machine.boot, files_ok) {
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
    checks.extend(check_memory_for(config));
    checks.extend(check_cpus(config));
    checks.push(check_disk(&attest_image::cache_dir()));
    checks.extend(check_blank_disks(config));
    if !config.vlans.is_empty() && !vlans_wrong {
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
    let stand_in = |media, bus| Disk {
        path: "/dev/null".into(),
        format: DiskFormat::Raw,
        media,
        bus,
        read_only: true,
        backing: None,
    };
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

/// Each file a machine's definition names, checked as the driver will use it.
fn check_files(machine: &MachineConfig) -> Vec<Check> {
    let failed: Vec<Check> = prepare::check_files(machine).into_iter().map(|p| fail(p.key, p.what, p.fix)).collect();
    let named = prepare::named_files(machine);
    if !failed.is_empty() || named.is_empty() {
        return failed;
    }
    let listed: Vec<String> = named.iter().map(|(key, path)| format!("{key} {}", path.display())).collect();
    vec![ok("files", format!("{}: {}", machine.name, listed.join(", ")))]
}

/// The test's machines together against this host's available memory and the cgroup's limit:
/// guests that would not fit are refused, not merely reported (QEMU maps guest memory lazily, so
/// too much is either refused at its start or, worse, runs the host into the OOM killer later).
fn check_memory_for(config: &TestConfig) -> Vec<Check> {
    // QEMU itself takes some memory beyond the guest's.
    let needed: u64 = config.machines.iter().map(|m| m.memory_mib.saturating_add(100)).fold(0, u64::saturating_add);
    let detail = format!("the test's {} machines need about {needed} MiB", config.machines.len());
    let available = available_memory_mib();
    let host = match available {
        0 => warn("memory", format!("{detail}; /proc/meminfo gives no MemAvailable"), "check free -m"),
        mib if mib < needed => fail(
            "memory",
            format!("{detail}, but this host has {mib} MiB available"),
            "give the machines less memory (`memory = …` in MiB), or free memory on the host",
        ),
        mib => ok("memory", format!("{detail}; {mib} MiB available")),
    };
    let cgroup = match cgroup_memory_limit() {
        Some((mib, file)) if mib < needed => fail(
            "cgroup",
            format!("{detail}, but {} limits this process to {mib} MiB", file.display()),
            "run outside the limit (or raise it), or give the machines less memory",
        ),
        Some((mib, file)) => ok("cgroup", format!("{detail}; {} allows {mib} MiB", file.display())),
        None => ok("cgroup", "no cgroup memory limit"),
    };
    vec![host, cgroup]
}

/// Machines with more vCPUs than the host has CPUs: they run, but each vCPU is a host thread, and
/// under TCG the guest crawls.
fn check_cpus(config: &TestConfig) -> Option<Check> {
    let host = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // A count out of range FAILs by the config's rule already.
    let fitting = config.machines.iter().filter(|m| m.cpus <= attest_machine::backend::qemu::MAX_CPUS);
    let most = fitting.max_by_key(|m| m.cpus).filter(|m| m.cpus as usize > host)?;
    Some(warn(
        "cpus",
        format!("machine {}: cpus = {}, but this host has {host} CPUs", most.name, most.cpus),
        format!("give it at most {host} vCPUs: more than the host's CPUs only slow the guest down"),
    ))
}

/// The blank disks of the whole test against the free space where the machines' state goes. They
/// are sparse, but a guest may fill what it is given (an installer formats and writes it), and a
/// host filesystem that fills up mid-test fails the guest with I/O errors at some random point:
/// disks larger together than the free space fail here instead.
fn check_blank_disks(config: &TestConfig) -> Option<Check> {
    let total: u64 =
        config.machines.iter().flat_map(|m| &m.blank_disks).map(|d| d.size_mib).fold(0, u64::saturating_add);
    if total == 0 {
        return None;
    }
    let (free, dir) = free_space(&state_dir::base_dir().ok()?)?;
    let free_mib = free >> 20;
    let detail = format!("the test's blank disks take up to {total} MiB");
    Some(match total > free_mib {
        true => fail(
            "blank_disks",
            format!("{detail}, but {} has {free_mib} MiB free", dir.display()),
            "give the blank disks smaller sizes (`size = \"8G\"`), or free space on that filesystem",
        ),
        false => ok("blank_disks", format!("{detail}; {} has {free_mib} MiB free", dir.display())),
    })
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
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    for check in checks.iter().filter(|c| c.status != Status::Ok) {
        let label = if check.status == Status::Fail { "FAIL" } else { "warn" };
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
