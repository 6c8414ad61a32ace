//! What a machine is: the backend-independent description every backend turns into a running VM.

use std::path::PathBuf;

pub use attest_protocol::ShareFs;

use crate::snapshot::RamBacking;

use crate::accel::Accel;
use crate::disk::Disk;
use crate::network::Nic;

/// The least memory a machine is given: below it a guest kernel has no room to unpack itself.
pub const MIN_MEMORY_MIB: u64 = 64;

#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub name: String,
    pub boot: Boot,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub shares: Vec<Share>,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    /// How the host reaches the command channel in the guest, if the guest has one.
    pub guest_channel: Option<GuestChannel>,
    /// A graphics card, for screenshots and typing on the guest's virtual terminals.
    pub display: bool,
    /// A virtio random number generator, so early boot does not block on entropy.
    pub rng: bool,
    /// Whether a guest reboot restarts the machine; otherwise it ends the VMM, as a power-off does.
    pub allow_reboot: bool,
    /// Arguments passed to the VMM as they are, after attest's own.
    pub extra_args: Vec<String>,
    /// What the guest's RAM is: set per start by [`crate::Machine`] for templates and clones.
    pub ram: RamBacking,
    /// Whether the VMM starts paused, waiting to load a snapshot ([`crate::control::VmControl::load_snapshot`]).
    pub receive_snapshot: bool,
}

impl MachineSpec {
    /// A machine with nothing but `boot`: 512 MiB, one vCPU under TCG, no devices.
    pub fn new(name: impl Into<String>, boot: Boot) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            boot,
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Tcg,
            shares: Vec::new(),
            nics: Vec::new(),
            disks: Vec::new(),
            guest_channel: None,
            display: false,
            rng: false,
            allow_reboot: false,
            extra_args: Vec::new(),
            ram: RamBacking::Anonymous,
            receive_snapshot: false,
        }
    }

    /// The kernel of a direct kernel boot.
    pub fn kernel_boot(&self) -> Option<&KernelBoot> {
        match &self.boot {
            Boot::Kernel(kernel) => Some(kernel),
            _ => None,
        }
    }
}

/// How the machine gets to a running guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// The VMM loads a kernel (and initrd) itself.
    Kernel(KernelBoot),
    /// Firmware boots from the machine's disks or cdrom.
    Firmware(Firmware),
    /// A NixOS `run-<name>-vm` script, which sets up the machine and execs QEMU with the arguments
    /// attest appends. QEMU only.
    StartScript(StartScript),
}

/// The firmware of a machine that boots from its disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    Uefi(Uefi),
}

/// OVMF's code (read-only) and the template of its variable store (each machine writes a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

impl Uefi {
    /// `$ATTEST_OVMF_CODE` and `$ATTEST_OVMF_VARS`, else Debian's `ovmf` (4 MiB flash images).
    pub fn find() -> Result<Uefi, crate::MachineError> {
        let path =
            |var: &str, default: &str| std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| default.into());
        let uefi = Uefi {
            code: path("ATTEST_OVMF_CODE", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
            vars_template: path("ATTEST_OVMF_VARS", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        };
        let missing = [&uefi.code, &uefi.vars_template].into_iter().find(|p| !p.is_file()).cloned();
        match missing {
            None => Ok(uefi),
            Some(missing) => Err(crate::MachineError::MissingHelper {
                program: "OVMF",
                purpose: format!("to boot with UEFI ({} is missing)", missing.display()),
                fix: "install Debian's ovmf (scripts/setup does), or set ATTEST_OVMF_CODE and ATTEST_OVMF_VARS",
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

impl Boot {
    /// A direct kernel boot.
    pub fn kernel(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>, cmdline: impl Into<String>) -> Boot {
        Boot::Kernel(KernelBoot { kernel: kernel.into(), initrd, cmdline: cmdline.into() })
    }
}

/// A NixOS start script and the parts of its environment contract that the test decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartScript {
    pub path: PathBuf,
    /// `SHARED_DIR`: the directory every machine of a test sees at /tmp/shared.
    pub shared_dir: PathBuf,
    /// `QEMU_OPTS`, added by the script to QEMU's arguments.
    pub qemu_opts: Option<String>,
    /// `QEMU_KERNEL_PARAMS`, added by the script to the kernel command line.
    pub kernel_params: Option<String>,
    /// `QEMU_VDE_SOCKET_<vlan>`: the switches the script's VLAN cards join.
    pub vde_sockets: Vec<(u8, PathBuf)>,
}

impl StartScript {
    /// The machine name a NixOS start script carries in its file name: `run-<name>-vm`.
    pub fn machine_name(path: &std::path::Path) -> Option<String> {
        let file = path.file_name()?.to_str()?;
        let name = file.strip_prefix("run-")?.strip_suffix("-vm")?;
        (!name.is_empty()).then(|| name.to_string())
    }
}

/// The guest side of a command channel, independent of the VMM. Each backend offers what its
/// devices can carry: QEMU all but vsock today; Firecracker and Cloud Hypervisor only vsock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestChannel {
    /// A named virtio-serial port (attest's agent: [`attest_protocol::AGENT_PORT`]).
    VirtioSerialPort(String),
    /// A virtio console (`/dev/hvc0`), where a NixOS guest's backdoor shell listens.
    VirtConsole,
    /// A vsock port in the guest.
    Vsock { port: u32 },
}

/// A host directory exported to the guest under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    pub fs: ShareFs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_scripts_name_their_machine_as_nixos_does() {
        let name = |p: &str| StartScript::machine_name(p.as_ref());
        assert_eq!(name("/nix/store/abc-nixos-vm/bin/run-server-vm").as_deref(), Some("server"));
        assert_eq!(name("run-my-client-vm").as_deref(), Some("my-client"));
        assert_eq!(name("/bin/run--vm"), None);
        assert_eq!(name("/bin/start-server"), None);
    }
}
