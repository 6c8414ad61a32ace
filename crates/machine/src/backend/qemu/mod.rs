//! The QEMU backend: direct kernel boot, console on stdio, the agent on a virtio-serial port,
//! shares over virtio-fs (via virtiofsd) or 9p (built into QEMU).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{MachineError, Result};

use super::{Backend, Prepared};
use crate::accel::Accel;
use crate::events::EventSink;
use crate::network::{mac_text, NetBackend};
use crate::spec::{MachineSpec, ShareFs};
use crate::state_dir::StateDir;
use crate::transport::{Transport, VirtioSerialSocket};
use crate::virtiofsd;

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

    fn guest_drivers(&self, spec: &MachineSpec) -> Vec<&'static str> {
        let mut drivers = vec!["virtio_pci"];
        if spec.agent_port.is_some() {
            drivers.push("virtio_console");
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

    fn prepare(&self, spec: &MachineSpec, dir: &StateDir, events: &EventSink) -> Result<Prepared> {
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

        let mut agent: Option<Box<dyn Transport>> = None;
        if let Some(port) = &spec.agent_port {
            let path = dir.socket("agent.sock")?;
            let socket =
                VirtioSerialSocket::bind(&path).map_err(MachineError::io(format!("binding {}", path.display())))?;
            push(&["-device", "virtio-serial-pci,id=agentbus"]);
            push(&["-chardev", &format!("socket,id=agent,path={}", option_path(socket.path())?)]);
            push(&["-device", &format!("virtserialport,bus=agentbus.0,chardev=agent,name={port}")]);
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

        let mut helpers = Vec::new();
        if spec.shares.iter().any(|s| s.fs == ShareFs::Virtiofs) {
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
        Ok(Prepared { command, helpers, agent })
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| MachineError::UnrepresentablePath { path: path.to_path_buf(), vmm: "QEMU" })
}

/// A path as a QEMU option value (`key=value,…`), where a literal comma is written doubled.
fn option_path(path: &Path) -> Result<String> {
    Ok(path_str(path)?.replace(',', ",,"))
}
