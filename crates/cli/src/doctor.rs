//! `attest doctor`: checks every prerequisite in about a second and says how to fix what is missing,
//! so a missing piece is found before a long run rather than by its timeout.

use std::path::{Path, PathBuf};

use crate::checks::{check_device, check_disk, check_memory, check_qemu, check_tool, fail, ok, warn, Check, APT};
use attest_image::{ImageError, Kernel};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::network::user_mode;
use attest_machine::{share_fs, state_dir, vhost_vsock, Backend, Boot, GuestChannel, MachineSpec};
use attest_machine::{virtiofsd, Qemu, ShareFs};
use attest_protocol::AGENT_PORT;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Check this kernel instead of the one `attest exec` would pick.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Print the checks as JSON (status, name, detail, fix, and the path found, if any).
    #[arg(long)]
    pub json: bool,
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
    checks.push(check_snapshot_cache(&cache));
    checks.push(check_memory());
    checks.push(check_socket_paths());

    crate::checks::report(&checks, args.json)
}

/// Where ready machines are cached (`ready = …`), what it holds, and whether it can take more.
fn check_snapshot_cache(cache: &Path) -> Check {
    let snapshots = attest_machine::snapshot::cache::SnapshotCache::new(cache);
    let dir = snapshots.dir();
    let writable = std::fs::create_dir_all(dir).and_then(|()| tempfile::tempfile_in(dir)).map(drop);
    if let Err(e) = writable {
        return warn(
            "snapshot cache",
            format!("{} is not writable ({e}): machines with `ready` boot cold every run", dir.display()),
            "make it writable, or set ATTEST_SNAPSHOT_CACHE to a directory that is",
        );
    }
    let entries = snapshots.list();
    let bytes: u64 = entries.iter().map(|(_, size)| size).sum();
    ok("snapshot cache", format!("{}: {} cached machine(s), {} MiB", dir.display(), entries.len(), bytes >> 20)).at(dir)
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
