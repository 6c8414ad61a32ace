//! `attest image`: builds guest images for system tests and prints where they are.
//! `attest image debian` is the Debian bookworm systemd guest that speaks the NixOS backdoor protocol;
//! `attest image installer` is the test installer ISO standing in for a NixOS installer.

use std::path::PathBuf;

use crate::exit_code;

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand)]
enum ImageCommand {
    /// Build (unless cached) the Debian bookworm qcow2 with systemd and NixOS's backdoor shell, and
    /// its boot initramfs; print the qcow2's path. Needs root or sudo and network access to
    /// deb.debian.org. Boot it through an overlay: the cached image must stay unmodified.
    Debian(DebianArgs),
    /// Build (unless cached) the test installer ISO: a hybrid BIOS/UEFI GRUB ISO whose initrd is a
    /// Debian systemd root filesystem with a serial getty, user tester (password tester, sudo) and a
    /// provision.service that puts LVM (VG main, LV slash) on /dev/vda; print the ISO's path. The
    /// first build needs root or sudo and network access to deb.debian.org.
    Installer(InstallerArgs),
}

#[derive(clap::Args)]
struct InstallerArgs {
    /// good; no-serial-console (no console=ttyS0 on the kernel line); provisions-sda (its
    /// provisioning looks for /dev/sda, so it fails on a virtio disk).
    #[arg(long, default_value = "good", value_parser = |s: &str| s.parse::<attest_image::installer::Variant>())]
    variant: attest_image::installer::Variant,
    /// Build the root filesystem again even if it is cached.
    #[arg(long)]
    rebuild: bool,
    /// The guest kernel (default: as `attest exec` picks it).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DebianArgs {
    /// Build again even if the image is cached.
    #[arg(long)]
    rebuild: bool,
    /// The guest kernel whose modules go into the image (default: as `attest exec` picks it).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

/// The drivers of a QEMU machine with a virtconsole, a NIC and an RNG: the boot initramfs loads them
/// early, so `attest image debian` leaves the usual one cached too.
const DRIVERS: &[&str] = &["virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "virtio_rng"];

pub fn run(args: ImageArgs) -> i32 {
    match args.command {
        ImageCommand::Debian(args) => debian(args),
        ImageCommand::Installer(args) => installer(args),
    }
}

fn installer(args: InstallerArgs) -> i32 {
    use attest_image::installer;
    let cache = attest_image::cache_dir();
    let kernel = match attest_image::kernel::locate(args.kernel.as_deref(), &cache) {
        Ok(kernel) => kernel,
        Err(err) => return exit_code::setup_error(&err),
    };
    let mut progress = |line: &str| say!("attest: {line}");
    if args.rebuild {
        if let Err(err) = installer::rootfs(&cache, &kernel, true, &mut progress) {
            return exit_code::setup_error(&err);
        }
    }
    match installer::ensure(&cache, &kernel, args.variant, &mut progress) {
        Ok(iso) => {
            say!("attest: variant {}, kernel command line: {}", args.variant, args.variant.cmdline());
            out!("{}", iso.display());
            0
        }
        Err(err) => exit_code::setup_error(&err),
    }
}

fn debian(args: DebianArgs) -> i32 {
    let cache = attest_image::cache_dir();
    let kernel = match attest_image::kernel::locate(args.kernel.as_deref(), &cache) {
        Ok(kernel) => kernel,
        Err(err) => return exit_code::setup_error(&err),
    };
    let mut progress = |line: &str| say!("attest: {line}");
    if args.rebuild {
        if let Err(err) = attest_image::debian::image(&cache, &kernel, true, &mut progress) {
            return exit_code::setup_error(&err);
        }
    }
    match attest_image::debian::ensure(&cache, &kernel, DRIVERS, &mut progress) {
        Ok(guest) => {
            say!(
                "attest: kernel {}\nattest: initrd {}\nattest: cmdline {}",
                guest.kernel.display(),
                guest.initrd.display(),
                guest.cmdline
            );
            out!("{}", guest.disk.display());
            0
        }
        Err(err) => exit_code::setup_error(&err),
    }
}
