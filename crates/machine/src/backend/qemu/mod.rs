//! The QEMU backend: direct kernel boot, console on stdio, the agent on a virtio-serial port,
//! shares over virtio-fs (via virtiofsd) or 9p (built into QEMU).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{MachineError, Result};

use super::{Backend, Capability, PendingControl, Prepared};
use crate::accel::Accel;
use crate::events::EventSink;
use crate::network::{mac_text, NetBackend};
use crate::spec::{GuestChannel, MachineSpec, ShareFs};
use crate::state_dir::MachineDir;
use crate::transport::{ListeningSocket, Transport};
use crate::{vhost_vsock, virtiofsd};

pub mod kvm_probe;

/// q35 for every VM attest starts, the KVM probe included.
pub const MACHINE_TYPE: &str = "q35";

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
        push(&["-name", &spec.name, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        push(&["-machine", MACHINE_TYPE]);
        push(&accel_args(spec.accel));
        push(&["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()]);
        push(&["-kernel", path_str(&spec.kernel)?, "-append", &spec.cmdline]);
        if let Some(initrd) = &spec.initrd {
            push(&["-initrd", path_str(initrd)?]);
        }
        // The serial console is QEMU's stdout, which the Vm reads into the console log.
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);

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

        for (index, nic) in spec.nics.iter().enumerate() {
            let id = format!("net{index}");
            match nic.backend {
                NetBackend::User => push(&["-netdev", &format!("user,id={id}")]),
            }
            // No option ROM: attest boots the kernel directly, never over the network.
            push(&["-device", &format!("virtio-net-pci,netdev={id},mac={},romfile=", mac_text(&nic.mac))]);
        }

        // QMP: attest listens, QEMU connects at start-up, so nothing waits for a socket to appear.
        let qmp = ListeningSocket::bind(&dir.socket("qmp.sock")?)?;
        push(&["-chardev", &format!("socket,id=qmp,path={}", option_path(qmp.path())?)]);
        push(&["-mon", "chardev=qmp,mode=control"]);

        let vhost_user_vsock = matches!(spec.guest_channel, Some(GuestChannel::Vsock { .. }));
        if vhost_user_vsock || spec.shares.iter().any(|s| s.fs == ShareFs::Virtiofs) {
            // vhost-user devices need guest RAM the daemon can map.
            push(&["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib)]);
            push(&["-numa", "node,memdev=mem"]);
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

        let mut command = Command::new(&self.binary);
        command.args(&args).current_dir(dir.path());
        Ok(Prepared { command, helpers, agent, control: Some(PendingControl::Qmp(qmp)), after_spawn: None })
    }
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
    use std::sync::Arc;

    fn spec(shares: Vec<Share>) -> MachineSpec {
        MachineSpec {
            name: "m".into(),
            kernel: "/boot/k".into(),
            initrd: Some("/boot/i".into()),
            cmdline: "console=ttyS0 quiet".into(),
            memory_mib: 256,
            cpus: 1,
            accel: Accel::Tcg,
            shares,
            nics: vec![user_mode::nic()],
            guest_channel: Some(GuestChannel::VirtioSerialPort("attest.agent".into())),
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
            ["-netdev", "user,id=net0"],
            ["-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile="],
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
