//! Turning a [`MachineConfig`] into what a backend boots: the built-in guests built or taken from
//! the cache, disk images behind copy-on-write overlays and blank disks created in the machine's
//! directory, the devices every test machine has (the backdoor's virtconsole, a display, an rng,
//! a user-mode network card), and its cards on the test's VLANs. The files a definition names are
//! checked here once ([`check_files`]), for this and for `attest preflight`, which checks the
//! devices of the very spec a run starts ([`planned_spec`]: the same one, without its files made).

use std::path::Path;

use attest_image::backdoor::{backdoor_initramfs, find_static_bash};
use attest_machine::network::user_mode;
use attest_machine::{
    disk, Accel, Backend, Boot, Disk, DiskFormat, Firmware, GuestChannel, MachineDir, MachineSpec, Media, StartScript,
    Uefi,
};
use attest_network::guest::{configure_script, GuestNic};
use attest_network::{Networks, VlanNic};

use crate::config::{BootConfig, BuiltinImage, FirmwareKind, MachineConfig, Problem};
use crate::error::Result;
use crate::log::Log;

/// What every machine of a test shares.
pub struct Context<'a> {
    pub backend: &'a dyn Backend,
    pub accel: Accel,
    pub cache: &'a Path,
    /// `SHARED_DIR` for start scripts.
    pub shared_dir: &'a Path,
    pub log: &'a Log,
    pub networks: &'a Networks,
}

/// Kernel parameters of attest's own guests: the serial console for the log and tty0 for typing
/// and screenshots (as NixOS has both), a panic that ends the VMM, and no crypto self-tests (a
/// quarter second under TCG).
const GUEST_PARAMS: &str = "console=tty0 console=ttyS0 panic=-1 cryptomgr.notests";
/// The minimal guest's own: its init is the initramfs's.
const MINIMAL_PARAMS: &str = "quiet rdinit=/init";

/// Whether a spec's files are made (a run) or only named where a run makes them (preflight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Files {
    Make,
    Name,
}

/// What a run of `config` boots, in `dir`: its overlays and blank disks made, a built-in guest built
/// or taken from the cache.
pub fn spec(config: &MachineConfig, cx: &Context, dir: &MachineDir) -> Result<MachineSpec> {
    if let Some(problem) = check_files(config).into_iter().next() {
        return Err(problem.into());
    }
    build(config, cx, dir, Files::Make)
}

/// The spec [`spec`] makes of `config`, device for device, without making a file: overlays and
/// blank disks are named where `spec` makes them, and a built-in guest boots the kernel `spec`
/// boots but without the initramfs or Debian image that only a run builds or takes from the cache
/// (a build can take minutes), and a Debian guest's command line without its machine's hostname
/// and id. For `attest preflight`, which checks the named files with [`check_files`].
pub fn planned_spec(config: &MachineConfig, cx: &Context, dir: &MachineDir) -> Result<MachineSpec> {
    build(config, cx, dir, Files::Name)
}

fn build(config: &MachineConfig, cx: &Context, dir: &MachineDir, files: Files) -> Result<MachineSpec> {
    let boot = match &config.boot {
        BootConfig::StartScript { path, qemu_opts, kernel_params } => Boot::StartScript(StartScript {
            path: path.clone(),
            shared_dir: cx.shared_dir.to_path_buf(),
            qemu_opts: qemu_opts.clone(),
            kernel_params: kernel_params.clone(),
            vde_sockets: cx.networks.vde_sockets(),
        }),
        BootConfig::Kernel { kernel, initrd, cmdline, .. } => Boot::kernel(kernel, initrd.clone(), cmdline),
        BootConfig::Disk(_) | BootConfig::Iso(_) => Boot::Firmware(match config.firmware {
            FirmwareKind::Bios => Firmware::Bios,
            FirmwareKind::Uefi => Firmware::Uefi(Uefi::find()?),
        }),
        // Filled in below, once the devices (and so the drivers the initramfs loads) are known.
        BootConfig::Image(_) => Boot::Firmware(Firmware::Bios),
    };
    let mut spec = MachineSpec {
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        accel: cx.accel,
        guest_channel: Some(GuestChannel::VirtConsole),
        display: true,
        rng: true,
        allow_reboot: config.allow_reboot,
        extra_args: config.qemu_args.clone(),
        ..MachineSpec::new(config.name.clone(), boot)
    };
    if !matches!(config.boot, BootConfig::StartScript { .. }) {
        // eth0 for guest-to-host traffic, as in NixOS; then the VLANs, in order.
        spec.nics.push(user_mode::nic());
        spec.nics.extend(cx.networks.nics(&config.name));
    }
    let root_image = match &config.boot {
        BootConfig::Kernel { disk: Some(image), .. } | BootConfig::Disk(image) => Some(image.clone()),
        _ => None,
    };
    if let Some(image) = root_image {
        spec.disks.push(overlay(&image, &dir.path().join("root-overlay.qcow2"), files)?);
    }
    if let BootConfig::Iso(iso) = &config.boot {
        spec.disks.push(Disk {
            path: iso.clone(),
            format: DiskFormat::Raw,
            media: Media::Cdrom,
            bus: Default::default(),
            read_only: true,
            backing: None,
        });
    }
    for (index, blank) in config.blank_disks.iter().enumerate() {
        let path = dir.path().join(format!("blank-{index}.{}", blank.format.name()));
        // A machine that starts again gets its disks as it left them, as real disks would be.
        if files == Files::Make && !path.exists() {
            disk::blank(&path, blank.size_mib, blank.format)?;
        }
        spec.disks.push(Disk {
            path,
            format: blank.format,
            media: Media::Disk,
            bus: blank.bus,
            read_only: false,
            backing: None,
        });
    }
    if let BootConfig::Image(image) = config.boot {
        builtin(image, &mut spec, cx, dir, files)?;
    }
    Ok(spec)
}

/// The overlay of `image` at `path`, made for a run.
fn overlay(image: &Path, path: &Path, files: Files) -> Result<Disk> {
    Ok(match files {
        Files::Make => disk::overlay(image, path)?,
        // The same backing as a made overlay records, so both specs say what the disk holds.
        Files::Name => {
            Disk { backing: Some(image.canonicalize().unwrap_or_else(|_| image.into())), ..disk::overlay_disk(path) }
        }
    })
}

/// Boots `spec` as one of attest's own guests, with exactly the drivers its devices need.
fn builtin(image: BuiltinImage, spec: &mut MachineSpec, cx: &Context, dir: &MachineDir, files: Files) -> Result<()> {
    let kernel = attest_image::kernel::locate(None, cx.cache)?;
    let root = dir.path().join("root-overlay.qcow2");
    match (image, files) {
        (BuiltinImage::Minimal, Files::Make) => {
            let modules = kernel.module_tree()?.resolve(&cx.backend.guest_drivers(spec))?.load;
            let initramfs = backdoor_initramfs(&attest_image::find_busybox()?, &find_static_bash()?, &modules)?
                .write_cached(&cx.cache.join("initramfs"))?;
            spec.boot = Boot::kernel(&kernel.path, Some(initramfs), format!("{GUEST_PARAMS} {MINIMAL_PARAMS}"));
        }
        (BuiltinImage::Minimal, Files::Name) => {
            spec.boot = Boot::kernel(&kernel.path, None, format!("{GUEST_PARAMS} {MINIMAL_PARAMS}"));
        }
        (BuiltinImage::Debian, Files::Make) => {
            // virtio_blk for the root disk is among the image's own boot drivers.
            let name = spec.name.clone();
            let mut progress = |step: &str| cx.log.info(Some(&name), step);
            let guest =
                attest_image::debian::ensure(cx.cache, &kernel, &cx.backend.guest_drivers(spec), &mut progress)?;
            // The root disk comes first: the guest mounts /dev/vda.
            spec.disks.insert(0, disk::overlay(&guest.disk, &root)?);
            spec.boot = Boot::kernel(&guest.kernel, Some(guest.initrd.clone()), guest.cmdline_for(&spec.name));
        }
        (BuiltinImage::Debian, Files::Name) => {
            spec.disks.insert(0, disk::overlay_disk(&root));
            spec.boot = Boot::kernel(&kernel.path, None, attest_image::debian::CMDLINE);
        }
    }
    Ok(())
}

/// The machine's VLAN cards, and the commands that give one of attest's guests (or a kernel +
/// initrd machine, which speaks the backdoor protocol too) its addresses; other machines configure
/// their own networks.
/// A machine's place on the test's VLANs.
pub(crate) struct MachineNetwork {
    /// Its VLAN cards (none for a start script's machine, whose script chose them).
    pub vlans: Vec<VlanNic>,
    /// Commands that give an attest guest its addresses, run on each new shell.
    pub guest_script: Option<String>,
}

pub(crate) fn network(config: &MachineConfig, networks: &Networks) -> MachineNetwork {
    let vlans = networks.plan().machine(&config.name).map(|m| m.nics.clone()).unwrap_or_default();
    MachineNetwork { vlans, guest_script: guest_script(config, networks) }
}

fn guest_script(config: &MachineConfig, networks: &Networks) -> Option<String> {
    if !matches!(config.boot, BootConfig::Image(_) | BootConfig::Kernel { .. }) {
        return None;
    }
    let user = user_mode::guest_interface();
    let mut nics = vec![GuestNic {
        mac: user.mac,
        name: "eth0".into(),
        addresses: user.addresses.iter().map(|a| (a.addr, a.len)).collect(),
    }];
    let plan = networks.plan();
    nics.extend(plan.machine(&config.name).map(GuestNic::vlans).unwrap_or_default());
    Some(configure_script(&nics, &plan.hosts_for(&config.name)))
}

/// The files `config` names, by the key that names them: what [`check_file`] checks.
pub fn named_files(config: &MachineConfig) -> Vec<(&'static str, &Path)> {
    match &config.boot {
        BootConfig::StartScript { path, .. } => vec![("start_script", path.as_path())],
        BootConfig::Kernel { kernel, initrd, disk, .. } => {
            [("kernel", Some(kernel)), ("initrd", initrd.as_ref()), ("disk", disk.as_ref())]
                .into_iter()
                .filter_map(|(key, path)| Some((key, path?.as_path())))
                .collect()
        }
        BootConfig::Disk(path) => vec![("disk", path.as_path())],
        BootConfig::Iso(path) => vec![("iso", path.as_path())],
        BootConfig::Image(_) => Vec::new(),
    }
}

/// Every file `config` names that [`spec`] could not use, one [`Problem`] each: what `spec` refuses
/// first and `attest preflight` lists in full.
pub fn check_files(config: &MachineConfig) -> Vec<Problem> {
    named_files(config).into_iter().filter_map(|(key, path)| check_file(&config.name, key, path).err()).collect()
}

/// Whether the file that machine `machine`'s `key` names can be what [`spec`] makes of it: a file
/// this user can read, and for `kernel` one QEMU boots (a bzImage, or an ELF vmlinux with the PVH
/// entry note).
fn check_file(machine: &str, key: &'static str, path: &Path) -> std::result::Result<(), Problem> {
    let fix = "give the path of an existing file (a relative path starts at the test file's directory)";
    let at = format!("machine {machine}: {key} {}", path.display());
    match std::fs::File::open(path).and_then(|file| file.metadata()) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(Problem::new(key, format!("{at} is not a file"), fix)),
        Err(e) => return Err(Problem::new(key, format!("{at} cannot be read: {e}"), fix)),
    }
    if key == "kernel" {
        attest_image::kernel::bootable(path).map_err(|e| {
            Problem::new(
                key,
                format!("machine {machine}: {e}"),
                "give a bzImage (such as /boot/vmlinuz-*) or an ELF vmlinux with the PVH entry note",
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use attest_machine::{Qemu, StateDir};
    use attest_network::{Mode, Plan};

    use super::*;

    /// A planned spec is the run's, but for the files: the same disks at the same paths, and
    /// nothing made.
    #[test]
    fn a_planned_spec_is_the_spec_without_its_files_made() {
        if disk::qemu_img().is_err() {
            return eprintln!("SKIP: qemu-img is missing");
        }
        let files = tempfile::tempdir().unwrap();
        let (image, iso) = (files.path().join("root.raw"), files.path().join("boot.iso"));
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
        std::fs::write(&iso, b"an ISO as far as check_files goes").unwrap();
        let state = StateDir::create(false).unwrap();
        let networks = Networks::start(Plan::new(&[], []).unwrap(), Mode::Switch, state.path(), |_| {}).unwrap();
        let backend = Qemu { binary: "/usr/bin/qemu-system-x86_64".into(), virtiofsd: None, vhost_vsock: None };
        let log = Log::to(Box::new(std::io::sink()));
        let cx = Context {
            backend: &backend,
            accel: Accel::Tcg,
            cache: files.path(),
            shared_dir: files.path(),
            log: &log,
            networks: &networks,
        };
        let mut installer = MachineConfig::iso("installer", &iso).qemu_args(["-device", "virtio-balloon"]);
        installer.blank_disks.push(crate::config::BlankDisk {
            size_mib: 8,
            format: DiskFormat::Raw,
            bus: Default::default(),
        });
        installer.blank_disks.push(crate::config::BlankDisk {
            size_mib: 8,
            format: DiskFormat::Qcow2,
            bus: attest_machine::DiskBus::Scsi,
        });
        for (index, config) in [installer, MachineConfig::disk("legacy", &image)].iter().enumerate() {
            let dir = state.machine_dir(index, &config.name).unwrap();
            let planned = planned_spec(config, &cx, &dir).unwrap();
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "{}: a planned spec makes no file",
                config.name
            );
            let made = spec(config, &cx, &dir).unwrap();
            assert_eq!(format!("{planned:?}"), format!("{made:?}"), "{}", config.name);
            assert!(made.disks.iter().all(|d| d.path.exists()), "{made:?}");
        }
    }
}
