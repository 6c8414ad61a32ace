//! `attest doctor`: checks every prerequisite in about a second and says how to fix what is missing,
//! so a missing piece is found before a long run rather than by its timeout.

use std::path::{Path, PathBuf};
use std::process::Command;

use attest_image::{ImageError, Kernel};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::network::user_mode;
use attest_machine::{share_fs, state_dir, vhost_vsock, Backend, Boot, GuestChannel, MachineSpec};
use attest_machine::{virtiofsd, Qemu, ShareFs};
use attest_protocol::AGENT_PORT;
use serde::Serialize;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Check this kernel instead of the one `attest exec` would pick.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Print the checks as JSON (status, name, detail, fix, and the path found, if any).
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
struct Check {
    status: Status,
    name: &'static str,
    detail: String,
    fix: Option<String>,
    /// The file this check found (the kernel, QEMU, busybox), for scripts.
    path: Option<PathBuf>,
}

impl Check {
    fn at(mut self, path: &Path) -> Check {
        self.path = Some(path.to_path_buf());
        self
    }
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { status: Status::Ok, name, detail: detail.into(), fix: None, path: None }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { status: Status::Warn, name, detail: detail.into(), fix: Some(fix.into()), path: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { status: Status::Fail, name, detail: detail.into(), fix: Some(fix.into()), path: None }
}

/// The guest drivers an `attest exec` machine needs, and those that machines with more devices (a
/// network card, a vsock channel) need on top, as the QEMU backend computes them.
fn driver_sets(qemu: &Qemu, kernel: &Kernel) -> (Vec<&'static str>, Vec<&'static str>) {
    let exec = MachineSpec {
        guest_channel: Some(GuestChannel::VirtioSerialPort(AGENT_PORT.into())),
        ..MachineSpec::new("doctor", Boot::kernel(&kernel.path, None, ""))
    };
    let required = qemu.guest_drivers(&exec);
    let with_nic = MachineSpec { nics: vec![user_mode::nic()], ..exec.clone() };
    let with_vsock = MachineSpec { guest_channel: Some(GuestChannel::Vsock { port: 1024 }), ..exec };
    let mut devices: Vec<&'static str> = Vec::new();
    for driver in [qemu.guest_drivers(&with_nic), qemu.guest_drivers(&with_vsock)].concat() {
        if !required.contains(&driver) && !devices.contains(&driver) {
            devices.push(driver);
        }
    }
    (required, devices)
}

const APT: &str = "apt-get install --no-install-recommends";

pub fn run(args: DoctorArgs) -> i32 {
    let cache = attest_image::cache_dir();
    let mut checks = Vec::new();
    let qemu = Qemu::find_binary().filter(|p| p.is_file());
    checks.push(check_qemu(qemu.as_deref()));
    let backend = Qemu {
        binary: qemu.clone().unwrap_or_default(),
        virtiofsd: virtiofsd::find(),
        vhost_vsock: vhost_vsock::find(),
    };
    if let Some(qemu) = &qemu {
        let probe = kvm_probe::probe_kvm(qemu);
        checks.push(match probe.usable {
            true => ok("kvm", "usable: a KVM guest ran"),
            false => warn(
                "kvm",
                format!("unusable, attest will use TCG (much slower): {}", probe.detail),
                "on a host with KVM: load kvm_intel or kvm_amd and give this user rw access to /dev/kvm",
            ),
        });
    }
    checks.extend(check_kernel(args.kernel.as_deref(), &cache, &backend));
    checks.push(match attest_image::find_busybox() {
        Ok(path) => ok("busybox", format!("{} (static)", path.display())).at(&path),
        Err(err) => fail("busybox", err.to_string(), format!("{APT} busybox-static")),
    });
    checks.push(check_device("/dev/net/tun", "tun", "needed for TAP networking between machines", "modprobe tun"));
    checks.push(check_device(
        "/dev/vhost-vsock",
        "vhost-vsock",
        "needed for vsock command channels (Firecracker, Cloud Hypervisor)",
        "modprobe vhost_vsock",
    ));
    checks.push(match vhost_vsock::find() {
        Some(path) => ok("vsock daemon", path.display().to_string()).at(&path),
        None => warn(
            "vsock daemon",
            "vhost-device-vsock not found; needed for vsock guest channels (--channel vsock)",
            "cargo install vhost-device-vsock (scripts/setup does this), or set ATTEST_VHOST_VSOCK",
        ),
    });
    checks.push(check_tool("vde_switch", "needed for virtual networks between QEMU machines", "vde2"));
    checks.push(check_tool("tesseract", "needed for OCR of screenshots", "tesseract-ocr"));
    checks.push(check_tool("strace", "needed for `attest exec --strace`", "strace"));
    checks.push(check_disk(&cache));
    checks.push(check_memory());
    checks.push(check_socket_paths());

    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if args.json {
        match serde_json::to_string_pretty(&checks) {
            Ok(json) => out!("{json}"),
            Err(err) => return crate::exit_code::setup_error(&err),
        }
        return i32::from(failed > 0);
    }
    for check in &checks {
        let label = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out!("{label}  {:<12} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            out!("      {:<12} fix: {fix}", "");
        }
    }
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    out!("{} checks: {} ok, {warned} warnings, {failed} failed", checks.len(), checks.len() - warned - failed);
    i32::from(failed > 0)
}

fn check_qemu(qemu: Option<&Path>) -> Check {
    let fix = format!("{APT} qemu-system-x86 (or set ATTEST_QEMU)");
    let Some(qemu) = qemu else { return fail("qemu", "qemu-system-x86_64 not found on PATH", fix) };
    match Command::new(qemu).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
            ok("qemu", format!("{version} ({})", qemu.display())).at(qemu)
        }
        Ok(out) => fail(
            "qemu",
            format!("{} --version failed: {}", qemu.display(), String::from_utf8_lossy(&out.stderr).trim()),
            fix,
        ),
        Err(err) => fail("qemu", format!("cannot run {}: {err}", qemu.display()), fix),
    }
}

fn check_kernel(flag: Option<&Path>, cache: &Path, qemu: &Qemu) -> Vec<Check> {
    let kernel = match attest_image::kernel::locate(flag, cache) {
        Ok(kernel) => kernel,
        Err(err @ ImageError::NoKernel { .. }) => {
            return vec![fail("kernel", err.to_string(), "scripts/setup (fetches Debian's linux-image-cloud-amd64)")]
        }
        Err(err) => return vec![fail("kernel", err.to_string(), "pass a bzImage with --kernel or ATTEST_KERNEL")],
    };
    let mut checks = vec![ok("kernel", kernel.to_string()).at(&kernel.path)];
    let modules = match kernel.module_tree() {
        Ok(modules) => modules,
        Err(err) => return vec![fail("modules", err.to_string(), "check the kernel's lib/modules directory")],
    };
    let (required, devices) = driver_sets(qemu, &kernel);
    checks.push(match (&kernel.modules_dir, modules.resolve(&required)) {
        (None, _) => warn(
            "modules",
            format!("no lib/modules/{} found; virtio drivers must be built in", kernel.release),
            "use a kernel with virtio built in, or unpack its modules beside it (X/boot/vmlinuz, X/lib/modules)",
        ),
        (Some(dir), Ok(r)) if r.missing.is_empty() => ok(
            "modules",
            format!(
                "{}: {}: {} to load, {} built in",
                dir.display(),
                required.join(", "),
                r.load.len(),
                r.builtin.len()
            ),
        ),
        (Some(dir), Ok(r)) => fail(
            "modules",
            format!("{}: {} neither a module nor built in", dir.display(), r.missing.join(", ")),
            format!("use a kernel with {}", required.join(", ")),
        ),
        (Some(dir), Err(err)) => fail("modules", format!("{}: {err}", dir.display()), "reinstall the kernel's modules"),
    });
    if let (Some(dir), Ok(r)) = (&kernel.modules_dir, modules.resolve(&devices)) {
        checks.push(match r.missing.is_empty() {
            true => ok("drivers", format!("{} available", devices.join(", "))),
            false => warn(
                "drivers",
                format!(
                    "{}: {} missing; machines with such devices will not see them",
                    dir.display(),
                    r.missing.join(", ")
                ),
                "use a kernel that has them as modules or built in",
            ),
        });
    }
    let virtiofsd = virtiofsd::find();
    let supported: Vec<&str> = [ShareFs::Virtiofs, ShareFs::NineP]
        .into_iter()
        .filter(|fs| modules.provides(fs.guest_drivers()))
        .map(|fs| fs.guest_drivers()[0])
        .collect();
    checks.push(match share_fs::choose(None, |fs| modules.provides(fs.guest_drivers()), virtiofsd.is_some()) {
        Ok(ShareFs::Virtiofs) => ok(
            "file sharing",
            format!(
                "virtio-fs with {} (kernel has: {})",
                virtiofsd.unwrap_or_default().display(),
                supported.join(", ")
            ),
        ),
        Ok(ShareFs::NineP) => warn(
            "file sharing",
            format!("9p (kernel has: {}); virtiofsd not found, and virtio-fs is faster", supported.join(", ")),
            "cargo install virtiofsd (needs libseccomp-dev libcap-ng-dev), or set ATTEST_VIRTIOFSD",
        ),
        Err(err) => fail("file sharing", err.to_string(), "cargo install virtiofsd, or use a kernel with 9p"),
    });
    checks
}

fn check_device(path: &str, name: &'static str, why: &str, fix: &str) -> Check {
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => ok(name, format!("{path} usable")),
        Err(err) => warn(name, format!("{path}: {err}; {why}"), fix),
    }
}

fn check_tool(program: &'static str, why: &str, package: &str) -> Check {
    match which::which(program) {
        Ok(path) => ok(program, path.display().to_string()),
        Err(_) => warn(program, format!("not found; {why}"), format!("{APT} {package}")),
    }
}

fn check_disk(cache: &Path) -> Check {
    let mut lowest: Option<(u64, PathBuf)> = None;
    for dir in [state_dir::base_dir().ok(), Some(cache.to_path_buf())].into_iter().flatten() {
        let probe = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf();
        if let Ok(stat) = nix::sys::statvfs::statvfs(&probe) {
            let free = stat.blocks_available() * stat.fragment_size();
            if lowest.as_ref().is_none_or(|(f, _)| free < *f) {
                lowest = Some((free, probe));
            }
        }
    }
    let Some((free, dir)) = lowest else { return warn("disk", "could not read free space", "check df -h") };
    let mib = free / (1 << 20);
    let detail = format!("{mib} MiB free at {}", dir.display());
    match mib {
        0..=99 => fail("disk", detail, "free space: the initramfs cache and console logs need some 100 MiB"),
        100..=1023 => warn("disk", detail, "free at least 1 GiB for kernels and images"),
        _ => ok("disk", detail),
    }
}

fn check_memory() -> Check {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mib = available_kib / 1024;
    let detail = format!("{mib} MiB available (a default guest takes 512 MiB)");
    match mib {
        0..=639 => fail("memory", detail, "free memory or pass a smaller --memory"),
        640..=2047 => warn("memory", detail, "several machines at once need more"),
        _ => ok("memory", detail),
    }
}

fn check_socket_paths() -> Check {
    match state_dir::base_dir() {
        Ok(base) => match state_dir::socket_headroom(&base) {
            s if s < 0 => fail(
                "sockets",
                format!("{} is too long for unix socket paths", base.display()),
                "unset XDG_RUNTIME_DIR or shorten it",
            ),
            s => ok("sockets", format!("state under {}; socket paths have {s} bytes to spare", base.display())),
        },
        Err(err) => fail("sockets", err.to_string(), "fix the permissions of that directory"),
    }
}
