//! The QEMU backend: direct kernel boot, console on stdio, the agent on a virtio-serial port,
//! shares over virtio-fs (via virtiofsd) or 9p (built into QEMU).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::error::{MachineError, Result};

use super::{Backend, Capability, Prepared};
use crate::accel::Accel;
use crate::control::PendingControl;
use crate::disk::{DiskBus, Media};
use crate::events::EventSink;
use crate::network::{mac_text, NetBackend};
use crate::snapshot::RamBacking;
use crate::spec::{Boot, Firmware, GuestChannel, MachineSpec, ShareFs, StartScript};
use crate::state_dir::MachineDir;
use crate::transport::{ListeningSocket, Transport};
use crate::{vhost_vsock, virtiofsd};

pub mod control;
pub mod kvm_probe;
pub mod qmp;
pub mod version;

/// q35 for every VM attest starts, the KVM probe included.
pub const MACHINE_TYPE: &str = "q35";
/// The most vCPUs attest gives a q35 machine. QEMU 10's q35 takes up to 4096 (`query-machines`
/// says `cpu-max`), but x86 APIC IDs above 254 need x2APIC with interrupt remapping (an
/// `intel-iommu` with `eim=on`, and a split irqchip under KVM), which attest does not set up.
pub const MAX_CPUS: u32 = 255;

/// QEMU's accelerator and CPU model options. The KVM probe boots with exactly these, because
/// whether KVM works can depend on the CPU model (PVM hosts reject `-cpu host`'s MSRs).
pub fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
    }
}

pub struct Qemu {
    pub binary: PathBuf,
    /// Needed only for virtio-fs shares.
    pub virtiofsd: Option<PathBuf>,
    /// `vhost-device-vsock`, needed only for a vsock guest channel.
    pub vhost_vsock: Option<PathBuf>,
}

impl Qemu {
    /// `$ATTEST_QEMU`, else `qemu-system-x86_64` on PATH.
    pub fn find_binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("ATTEST_QEMU") {
            return Some(PathBuf::from(path));
        }
        which::which("qemu-system-x86_64").ok()
    }
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn vmm_name(&self) -> &'static str {
        "QEMU"
    }

    fn vmm_binary(&self) -> &Path {
        &self.binary
    }

    /// All of them, through QMP and the monitor.
    fn supports(&self, _: Capability) -> bool {
        true
    }

    fn guest_drivers(&self, spec: &MachineSpec) -> Vec<&'static str> {
        let mut drivers = vec!["virtio_pci"];
        match spec.guest_channel {
            Some(GuestChannel::VirtioSerialPort(_) | GuestChannel::VirtConsole) => drivers.push("virtio_console"),
            Some(GuestChannel::Vsock { .. }) => drivers.extend(["vsock", "vmw_vsock_virtio_transport"]),
            None => {}
        }
        if !spec.nics.is_empty() {
            drivers.push("virtio_net");
        }
        if spec.rng {
            drivers.push("virtio_rng");
        }
        for disk in &spec.disks {
            let needs: &[&'static str] = match (disk.media, disk.bus) {
                (Media::Disk, DiskBus::Virtio) => &["virtio_blk"],
                (Media::Disk, DiskBus::Scsi) => &["virtio_scsi", "sd_mod"],
                (Media::Cdrom, DiskBus::Virtio) => &["ahci", "sr_mod"],
                (Media::Cdrom, DiskBus::Scsi) => &["virtio_scsi", "sr_mod"],
            };
            for driver in needs {
                if !drivers.contains(driver) {
                    drivers.push(driver);
                }
            }
        }
        for fs in [ShareFs::Virtiofs, ShareFs::NineP] {
            if spec.shares.iter().any(|s| s.fs == fs) {
                drivers.extend(fs.guest_drivers());
            }
        }
        drivers
    }

    fn prepare(&self, spec: &MachineSpec, dir: &MachineDir, events: &EventSink) -> Result<Prepared> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
        let script = match &spec.boot {
            Boot::StartScript(script) => Some(script),
            _ => None,
        };
        // A start script chooses the machine, its memory and its kernel; attest only adds its channels.
        if script.is_none() {
            push(&["-name", &spec.name, "-nodefaults", "-no-user-config", "-display", "none"]);
            push(&["-machine", MACHINE_TYPE]);
            push(&accel_args(spec.accel));
            push(&["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()]);
            if spec.display {
                push(&["-vga", "std"]);
            }
        }
        if script.is_some() {
            // NixOS adds `-nographic` without a display: no window, whatever the script chose.
            push(&["-display", "none"]);
        }
        if let Boot::Kernel(boot) = &spec.boot {
            push(&["-kernel", path_str(&boot.kernel)?, "-append", &boot.cmdline]);
            if let Some(initrd) = &boot.initrd {
                push(&["-initrd", path_str(initrd)?]);
            }
        }
        if let Boot::Firmware(Firmware::Uefi(uefi)) = &spec.boot {
            // The variable store is the machine's own, kept across its starts as a real one is.
            let vars = dir.path().join("uefi-vars.fd");
            if !vars.exists() {
                std::fs::copy(&uefi.vars_template, &vars)
                    .map_err(MachineError::io(format!("copying {}", uefi.vars_template.display())))?;
            }
            push(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", option_path(&uefi.code)?)]);
            push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", option_path(&vars)?)]);
        }
        if !spec.allow_reboot {
            push(&["-no-reboot"]);
        }
        // The serial console is QEMU's stdout, which the Vm reads into the console log.
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        if spec.rng || script.is_some() {
            push(&["-device", "virtio-rng-pci"]);
        }
        push_disks(&mut push, spec)?;

        // The guest channel's socket: attest listens and the VMM (or the vsock daemon) connects, as
        // the NixOS driver does.
        let mut helpers = Vec::new();
        let mut agent: Option<Box<dyn Transport>> = None;
        let serial_port = match &spec.guest_channel {
            None => None,
            Some(GuestChannel::VirtioSerialPort(name)) => {
                Some(format!("virtserialport,bus=channelbus.0,chardev=channel,name={name}"))
            }
            Some(GuestChannel::VirtConsole) => Some("virtconsole,bus=channelbus.0,chardev=channel".to_string()),
            Some(GuestChannel::Vsock { port }) => {
                let Some(binary) = &self.vhost_vsock else {
                    return Err(MachineError::MissingHelper {
                        program: "vhost-device-vsock",
                        purpose: "for a vsock guest channel".into(),
                        fix: "`cargo install vhost-device-vsock` (scripts/setup does this) or set ATTEST_VHOST_VSOCK",
                    });
                };
                // The guest's connection to host port P arrives on `<uds>_P`: bound before the daemon starts.
                let path = dir.socket(&format!("vsock.sock_{port}"))?;
                agent = Some(Box::new(ListeningSocket::bind(&path)?));
                let (vhost_user, uds) = (dir.socket("vsock-vu.sock")?, dir.socket("vsock.sock")?);
                let log = dir.path().join("vhost-device-vsock.log");
                helpers.push(vhost_vsock::spawn(binary, &vhost_user, &uds, &log, events.clone())?);
                push(&["-chardev", &format!("socket,id=vsock,path={}", option_path(&vhost_user)?)]);
                push(&["-device", "vhost-user-vsock-pci,chardev=vsock"]);
                None
            }
        };
        if let Some(port) = serial_port {
            let path = dir.socket("channel.sock")?;
            let socket = ListeningSocket::bind(&path)?;
            push(&["-device", "virtio-serial-pci,id=channelbus"]);
            push(&["-chardev", &format!("socket,id=channel,path={}", option_path(socket.path())?)]);
            push(&["-device", &port]);
            agent = Some(Box::new(socket));
        }

        let mut tap_fds = Vec::new();
        for nic in &spec.nics {
            let (id, netdev_id) = (&nic.id, nic.netdev_id());
            let netdev = match &nic.backend {
                NetBackend::User => format!("user,id={netdev_id}"),
                NetBackend::Vde(socket) => format!("vde,id={netdev_id},sock={}", option_path(socket)?),
                NetBackend::Tap(fd) => {
                    tap_fds.push(fd.clone());
                    format!("tap,id={netdev_id},fd={}", fd.as_raw_fd())
                }
            };
            // No option ROM: attest boots the kernel directly, never over the network.
            push(&["-netdev", &netdev]);
            let mac = mac_text(&nic.mac);
            push(&["-device", &format!("virtio-net-pci,id={id},netdev={netdev_id},mac={mac},romfile=")]);
        }

        // QMP: attest listens, QEMU connects at start-up, so nothing waits for a socket to appear.
        let qmp = ListeningSocket::bind(&dir.socket("qmp.sock")?)?;
        push(&["-chardev", &format!("socket,id=qmp,path={}", option_path(qmp.path())?)]);
        push(&["-mon", "chardev=qmp,mode=control"]);

        let vhost_user_vsock = matches!(spec.guest_channel, Some(GuestChannel::Vsock { .. }));
        let vhost_user = vhost_user_vsock || spec.shares.iter().any(|s| s.fs == ShareFs::Virtiofs);
        match &spec.ram {
            RamBacking::File { path, shared } => {
                if script.is_some() || (vhost_user && !shared) {
                    let why = if script.is_some() { "a start script's machine" } else { "vhost-user devices" };
                    return Err(MachineError::Unsupported {
                        backend: "qemu",
                        what: format!("file-backed RAM for {why}"),
                    });
                }
                // `pc.ram` is the id of q35's own RAM: a VM with it migrates to and from one without.
                let share = if *shared { "on" } else { "off" };
                let mem_path = option_path(path)?;
                push(&[
                    "-object",
                    &format!(
                        "memory-backend-file,id=pc.ram,size={}M,mem-path={mem_path},share={share}",
                        spec.memory_mib
                    ),
                ]);
                push(&["-machine", "memory-backend=pc.ram"]);
            }
            RamBacking::Anonymous if vhost_user => {
                // vhost-user devices need guest RAM the daemon can map.
                push(&["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib)]);
                push(&["-numa", "node,memdev=mem"]);
            }
            RamBacking::Anonymous => {}
        }
        // A new generation ID on every start, restores included: Linux (≥ 5.18, with its vmgenid
        // driver) reseeds its random number generator when it changes, so clones do not share it.
        push(&["-device", "vmgenid,guid=auto"]);
        if spec.receive_snapshot {
            push(&["-incoming", "defer"]);
        }
        for (index, share) in spec.shares.iter().enumerate() {
            let id = format!("fs{index}");
            match share.fs {
                ShareFs::Virtiofs => {
                    let Some(binary) = &self.virtiofsd else {
                        return Err(MachineError::MissingHelper {
                            program: "virtiofsd",
                            purpose: format!("to share {} over virtio-fs", share.host_path.display()),
                            fix: "`cargo install virtiofsd` (scripts/setup does this) or set ATTEST_VIRTIOFSD",
                        });
                    };
                    let socket = dir.socket(&format!("virtiofs-{index}.sock"))?;
                    let log = dir.path().join(format!("virtiofsd-{index}.log"));
                    helpers.push(virtiofsd::spawn(binary, share, &socket, &log, events.clone())?);
                    push(&["-chardev", &format!("socket,id={id},path={}", option_path(&socket)?)]);
                    push(&["-device", &format!("vhost-user-fs-pci,chardev={id},tag={}", share.tag)]);
                }
                ShareFs::NineP => {
                    let ro = if share.read_only { ",readonly=on" } else { "" };
                    let path = option_path(&share.host_path)?;
                    // remap: the host's mounts below the share (e.g. /proc and /sys under /) have
                    // colliding inode numbers, which 9p clients would otherwise merge.
                    push(&["-fsdev", &format!("local,id={id},path={path},security_model=none,multidevs=remap{ro}")]);
                    push(&["-device", &format!("virtio-9p-pci,fsdev={id},mount_tag={}", share.tag)]);
                }
            }
        }

        args.extend(spec.extra_args.iter().cloned());
        let mut command = match script {
            None => Command::new(&self.binary),
            Some(script) => start_script_command(script, dir),
        };
        command.args(&args).current_dir(dir.path());
        inherit_fds(&mut command, tap_fds);
        Ok(Prepared { command, helpers, agent, control: Some(qmp_control(qmp)), after_spawn: None })
    }
}

/// QMP as the machine's [`PendingControl`]: QEMU connects to `socket` as it starts.
fn qmp_control(mut socket: ListeningSocket) -> PendingControl {
    Box::new(move |deadline, unless| {
        let stream = socket.connect(deadline, unless).map_err(MachineError::io("waiting for QEMU's QMP connection"))?;
        let control: Arc<dyn crate::control::VmControl> =
            Arc::new(control::QemuControl::new(qmp::Qmp::handshake(stream, deadline)?));
        Ok(control)
    })
}

/// The block devices, in boot order when firmware boots the machine.
fn push_disks(push: &mut impl FnMut(&[&str]), spec: &MachineSpec) -> Result<()> {
    if spec.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=scsi"]);
    }
    let firmware_boot = matches!(spec.boot, Boot::Firmware(_));
    for (index, disk) in spec.disks.iter().enumerate() {
        let id = control::drive_id(index);
        let mut drive = format!("file={},format={},if=none,id={id}", option_path(&disk.path)?, disk.format.name());
        if disk.media == Media::Cdrom {
            drive.push_str(",media=cdrom");
        }
        if disk.read_only || disk.media == Media::Cdrom {
            drive.push_str(",readonly=on");
        }
        let device = match (disk.media, disk.bus) {
            (Media::Disk, DiskBus::Virtio) => "virtio-blk-pci",
            (Media::Disk, DiskBus::Scsi) => "scsi-hd,bus=scsi.0",
            // q35's built-in AHCI controller, where firmware looks for a boot cdrom.
            (Media::Cdrom, DiskBus::Virtio) => "ide-cd",
            (Media::Cdrom, DiskBus::Scsi) => "scsi-cd,bus=scsi.0",
        };
        let boot_index = if firmware_boot { format!(",bootindex={index}") } else { String::new() };
        push(&["-drive", &drive, "-device", &format!("{device},drive={id}{boot_index}")]);
    }
    Ok(())
}

/// Lets the VMM inherit `fds` under their own numbers (`-netdev tap,fd=N`). Cleared in the child
/// only, so no other process this one spawns meanwhile inherits them.
fn inherit_fds(command: &mut Command, fds: Vec<Arc<OwnedFd>>) {
    if fds.is_empty() {
        return;
    }
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: between fork and exec the hook only calls fcntl on descriptors that the Arcs it
    // holds keep open, and returns a bare errno: async-signal-safe, no allocation, no locks.
    unsafe {
        command.pre_exec(move || {
            let _keep_open = &fds;
            for &fd in &raw {
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
            }
            Ok(())
        });
    }
}

/// A NixOS start script, run directly (not through `sh -c`) so that the QEMU it `exec`s is attest's
/// child and gets its parent-death signal, with the environment contract of the NixOS driver.
fn start_script_command(script: &StartScript, dir: &MachineDir) -> Command {
    let mut command = Command::new(&script.path);
    command.env("TMPDIR", dir.path()).env("USE_TMPDIR", "1").env("SHARED_DIR", &script.shared_dir);
    if let Some(opts) = &script.qemu_opts {
        command.env("QEMU_OPTS", opts);
    }
    if let Some(params) = &script.kernel_params {
        command.env("QEMU_KERNEL_PARAMS", params);
    }
    for (vlan, socket) in &script.vde_sockets {
        command.env(format!("QEMU_VDE_SOCKET_{vlan}"), socket);
    }
    command
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| MachineError::UnrepresentablePath { path: path.to_path_buf(), vmm: "QEMU" })
}

/// A path as a QEMU option value (`key=value,…`), where a literal comma is written doubled.
fn option_path(path: &Path) -> Result<String> {
    Ok(path_str(path)?.replace(',', ",,"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::user_mode;
    use crate::spec::Share;
    use crate::StateDir;

    fn spec(shares: Vec<Share>) -> MachineSpec {
        MachineSpec {
            memory_mib: 256,
            shares,
            nics: vec![user_mode::nic()],
            guest_channel: Some(GuestChannel::VirtioSerialPort("attest.agent".into())),
            ..MachineSpec::new("m", Boot::kernel("/boot/k", Some("/boot/i".into()), "console=ttyS0 quiet"))
        }
    }

    fn prepare(qemu: &Qemu, spec: &MachineSpec) -> (Result<Prepared>, StateDir) {
        let state = StateDir::create(false).unwrap();
        let dir = state.machine_dir(0, &spec.name).unwrap();
        let events: EventSink = Arc::new(|_| {});
        (qemu.prepare(spec, &dir, &events), state)
    }

    #[test]
    fn the_argument_set_follows_the_spec_and_escapes_commas_in_paths() {
        let shared = tempfile::Builder::new().prefix("with,comma").tempdir().unwrap();
        let share =
            Share { tag: "attest0".into(), host_path: shared.path().into(), read_only: true, fs: ShareFs::NineP };
        let qemu = Qemu { binary: "/usr/bin/qemu-system-x86_64".into(), virtiofsd: None, vhost_vsock: None };
        let (prepared, _state) = prepare(&qemu, &spec(vec![share]));
        let prepared = prepared.unwrap();
        let args: Vec<String> = prepared.command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let escaped = shared.path().to_str().unwrap().replace(',', ",,");
        for pair in [
            ["-machine", "q35"],
            ["-accel", "tcg"],
            ["-cpu", "max"],
            ["-m", "256"],
            ["-smp", "1"],
            ["-kernel", "/boot/k"],
            ["-initrd", "/boot/i"],
            ["-append", "console=ttyS0 quiet"],
            ["-netdev", "user,id=user.net"],
            ["-device", "virtio-net-pci,id=user,netdev=user.net,mac=52:54:00:12:34:56,romfile="],
            ["-device", "virtserialport,bus=channelbus.0,chardev=channel,name=attest.agent"],
            ["-fsdev", &format!("local,id=fs0,path={escaped},security_model=none,multidevs=remap,readonly=on")],
            ["-device", "virtio-9p-pci,fsdev=fs0,mount_tag=attest0"],
        ] {
            assert!(args.windows(2).any(|w| w == pair), "{pair:?} missing from {args:?}");
        }
        assert!(!args.iter().any(|a| a.contains("memfd")), "shared memory is for vhost-user devices only: {args:?}");
        assert!(prepared.helpers.is_empty() && prepared.agent.is_some());
        assert_eq!(qemu.guest_drivers(&spec(Vec::new())), ["virtio_pci", "virtio_console", "virtio_net"]);
    }

    #[test]
    fn virtio_fs_without_virtiofsd_names_the_missing_helper() {
        let share = Share { tag: "attest0".into(), host_path: "/".into(), read_only: true, fs: ShareFs::Virtiofs };
        let qemu = Qemu { binary: "/usr/bin/qemu-system-x86_64".into(), virtiofsd: None, vhost_vsock: None };
        let (prepared, _state) = prepare(&qemu, &spec(vec![share]));
        assert!(matches!(prepared, Err(MachineError::MissingHelper { program: "virtiofsd", .. })));
    }

    #[test]
    fn guest_channels_become_devices_or_say_they_cannot() {
        let qemu = Qemu { binary: "/usr/bin/qemu-system-x86_64".into(), virtiofsd: None, vhost_vsock: None };
        let mut nixos = spec(Vec::new());
        nixos.guest_channel = Some(GuestChannel::VirtConsole);
        let (prepared, _state) = prepare(&qemu, &nixos);
        let args: Vec<String> =
            prepared.unwrap().command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.iter().any(|a| a == "virtconsole,bus=channelbus.0,chardev=channel"), "{args:?}");

        let mut vsock = spec(Vec::new());
        vsock.guest_channel = Some(GuestChannel::Vsock { port: 1024 });
        assert!(qemu.guest_drivers(&vsock).contains(&"vmw_vsock_virtio_transport"));
        let (prepared, _state) = prepare(&qemu, &vsock);
        assert!(matches!(prepared, Err(MachineError::MissingHelper { program: "vhost-device-vsock", .. })));
    }

    #[test]
    fn kvm_runs_the_hosts_cpu_model() {
        assert_eq!(accel_args(Accel::Kvm), ["-accel", "kvm", "-cpu", "host"]);
        assert_eq!(accel_args(Accel::Tcg), ["-accel", "tcg", "-cpu", "max"]);
    }
}
