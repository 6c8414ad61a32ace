//! `attest preflight TEST.toml`, which `attest run` also does first: every check of a test that
//! needs no boot, in about a second, each `ok`/`warn`/`FAIL` with its fix. The definition's values
//! by the config's own rules (names, vCPUs, memory, disk sizes, timeouts, VLANs:
//! `TestConfig::problems`), every file it names as the driver will use it (`prepare::check_files`:
//! a kernel must boot), the host (QEMU; the devices of each machine's spec as the driver makes it
//! for a run, `prepare::planned_spec`, with the test's networks started for real; the accelerator,
//! firmware, the machines' memory against the host's available memory and the cgroup's limit,
//! their vCPUs against the host's, the blank disks against free space), each ISO (a single ISO
//! 9660 file, bootable by the machine's firmware, its kernels' console on the serial port attest
//! reads), and the test's own declarations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use attest_driver::conditions::Kind;
use attest_driver::config::{BootConfig, FirmwareKind, MachineConfig, NetworkMode, TestConfig};
use attest_driver::{prepare, DriverError, Log};
use attest_image::iso::{self, Platform};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::state_dir;
use attest_machine::{Accel, Backend, Boot, MachineDir, MachineSpec, Qemu, StateDir, Uefi};
use attest_network::{Networks, Plan};

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
    let problems = config.problems();
    let vlans_wrong = problems.iter().any(|p| p.key == "vlans");
    // A scratch run directory like the driver's, for the networks' sockets and the machines'
    // directories; declared before what is in it, so it goes last.
    let state = StateDir::create(false);
    let (networks, vlans) = match &state {
        Ok(state) => start_networks(config, state, vlans_wrong),
        Err(e) => (None, Some(fail("state", format!("creating a state directory: {e}"), "free space there"))),
    };
    let mut specs = Vec::new();
    if let Some(binary) = &qemu {
        let (check, accel) = check_accel(binary);
        checks.push(check);
        if let (Ok(state), Some(networks)) = (&state, &networks) {
            let backend = Qemu { binary: binary.clone(), virtiofsd: None, vhost_vsock: None };
            specs = planned_specs(config, &backend, accel, state, networks);
            checks.extend(check_devices(&backend, &specs));
        }
    }
    checks.extend(problems.into_iter().map(|p| fail(p.key, p.what, p.fix)));
    for (index, machine) in config.machines.iter().enumerate() {
        let mut own = check_files(machine);
        let files_ok = own.iter().all(|c| c.status != Status::Fail);
        if let (BootConfig::Iso(path), true) = (&machine.boot, files_ok) {
            own.extend(check_iso(machine, path));
        }
        if machine.firmware == FirmwareKind::Uefi {
            own.push(match Uefi::find() {
                Ok(uefi) => ok("firmware", format!("{}: OVMF {}", machine.name, uefi.code.display())),
                Err(e) => fail("firmware", format!("{}: {e}", machine.name), format!("{APT} ovmf")),
            });
        }
        own.extend(check_declarations(machine));
        // What else keeps its spec from being made (no kernel for a built-in guest), unless a FAIL
        // above says it already.
        if let Some(Err(e)) = specs.get(index) {
            if own.iter().all(|c| c.status != Status::Fail) {
                own.push(fail("machine", format!("{}: {e}", machine.name), "a run would stop here: fix what it names"));
            }
        }
        checks.extend(own);
    }
    checks.extend(check_memory_for(config));
    checks.extend(check_cpus(config));
    checks.push(check_disk(&attest_image::cache_dir()));
    checks.extend(check_blank_disks(config));
    checks.extend(vlans);
    checks
}

/// The test's networks, started for real as a run starts them (its switches or its TAP namespace,
/// stopped when dropped), and the check saying how that went. A test without VLANs, or whose VLANs
/// are wrong (a FAIL of its own) or cannot start, gets networks without VLANs, so that its machines'
/// other devices are still checked.
fn start_networks(config: &TestConfig, state: &StateDir, vlans_wrong: bool) -> (Option<Networks>, Option<Check>) {
    let none = || Networks::start(Plan::new(&[], []).expect("an empty plan"), config.network, state.path(), |_| {});
    let plan = match config.plan() {
        Ok(plan) if !config.vlans.is_empty() && !vlans_wrong => plan,
        _ => return (none().ok(), None),
    };
    let started = Networks::start(plan, config.network, state.path(), |_| {});
    let check = match (config.network, &started) {
        (NetworkMode::Switch, Ok(_)) => ok("vlans", format!("VLANs {:?}: a vde_switch each, started", config.vlans)),
        (NetworkMode::Switch, Err(e)) => fail("vlans", e.to_string(), format!("{APT} vde2, or network = \"tap\"")),
        (NetworkMode::Tap, _) => {
            let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
            match (&started, tun) {
                (Ok(_), Ok(_)) => ok(
                    "vlans",
                    format!("VLANs {:?}: bridges and TAP devices in a user+net namespace, made", config.vlans),
                ),
                (_, Err(e)) => fail("vlans", format!("/dev/net/tun: {e}"), "modprobe tun, or network = \"switch\""),
                (Err(e), _) => fail("vlans", e.to_string(), "allow user namespaces, or network = \"switch\""),
            }
        }
    };
    match started {
        Ok(networks) => (Some(networks), Some(check)),
        Err(_) => (none().ok(), Some(check)),
    }
}

/// The accelerator check, and the accelerator a run would choose.
fn check_accel(qemu: &Path) -> (Check, Accel) {
    let probe = kvm_probe::probe_kvm(qemu);
    match probe.usable {
        true => (ok("accelerator", "KVM"), Accel::Kvm),
        false => (
            warn(
                "accelerator",
                format!("TCG: boots and commands run some 5 to 20 times slower than under KVM ({})", probe.detail),
                "on a host with KVM: load kvm_intel or kvm_amd and give this user rw access to /dev/kvm",
            ),
            Accel::Tcg,
        ),
    }
}

/// A machine's spec as a run would start it, and its directory; or why it cannot be made.
type Planned = Result<(MachineSpec, MachineDir), DriverError>;

/// Each machine's spec as the driver makes it for a run (`prepare::planned_spec`: the same
/// devices, no files made), in its own directory of `state`, numbered as the driver numbers them.
fn planned_specs(
    config: &TestConfig,
    backend: &Qemu,
    accel: Accel,
    state: &StateDir,
    networks: &Networks,
) -> Vec<Planned> {
    // Only a Debian build would log, and a planned spec builds nothing.
    let log = Log::to(Box::new(std::io::sink()));
    let cache = attest_image::cache_dir();
    let shared_dir = state.path().join("shared-xchg");
    let cx = prepare::Context { backend, accel, cache: &cache, shared_dir: &shared_dir, log: &log, networks };
    let spec = |index: usize, machine: &MachineConfig| -> Planned {
        let dir = state.machine_dir(index, &machine.name)?;
        Ok((prepare::planned_spec(machine, &cx, &dir)?, dir))
    };
    config.machines.iter().enumerate().map(|(index, machine)| spec(index, machine)).collect()
}

/// Whether this QEMU has every device the test's machines use: the `-device`s of the command line
/// the backend makes of each machine's spec. None when no machine has one to check: a machine
/// whose spec cannot be made has a FAIL of its own, and a start script's machine runs the script's
/// own QEMU, not this one.
fn check_devices(backend: &Qemu, specs: &[Planned]) -> Option<Check> {
    let specs: Vec<_> = specs.iter().flatten().filter(|(spec, _)| !matches!(spec.boot, Boot::StartScript(_))).collect();
    if specs.is_empty() {
        return None;
    }
    let binary = &backend.binary;
    let help = match Command::new(binary).args(["-device", "help"]).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        Err(e) => return Some(fail("devices", format!("{} -device help: {e}", binary.display()), "reinstall QEMU")),
    };
    let mut wanted = BTreeSet::new();
    for (spec, dir) in specs {
        let events: attest_machine::EventSink = std::sync::Arc::new(|_| {});
        match backend.prepare(spec, dir, &events) {
            Ok(prepared) => {
                let args: Vec<String> = prepared.command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
                let devices = args.windows(2).filter(|w| w[0] == "-device");
                wanted.extend(devices.map(|w| w[1].split(',').next().unwrap_or("").to_string()));
            }
            Err(e) => return Some(fail("devices", format!("{}: {e}", spec.name), "see the error")),
        }
    }
    // A test's own `-device` in qemu_args may give an alias (virtio-balloon for virtio-balloon-pci).
    let known = |d: &String| ["name", "alias"].iter().any(|what| help.contains(&format!("{what} \"{d}\"")));
    let missing: Vec<&String> = wanted.iter().filter(|d| !known(d)).collect();
    Some(match missing.as_slice() {
        [] => ok("devices", wanted.into_iter().collect::<Vec<_>>().join(", ")),
        _ => fail(
            "devices",
            format!("this QEMU lacks {}", missing.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")),
            format!("{APT} qemu-system-x86 (a full build), or set ATTEST_QEMU (or correct a -device of qemu_args)"),
        ),
    })
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
