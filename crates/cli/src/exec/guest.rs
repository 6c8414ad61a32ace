//! The default `attest exec` guest: needs no configuration. Finds a kernel, packs attest's guest init,
//! busybox and the needed driver modules into a cached initramfs, picks the file-sharing filesystem
//! and the accelerator, and describes the machine and the start request.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use attest_image::Kernel;
use attest_machine::accel::{Accel, AccelChoice, AccelRequest};
use attest_machine::backend::qemu::kvm_probe;
use attest_machine::network::user_mode;
use attest_machine::{share_fs, vhost_vsock, virtiofsd, Backend, Boot, GuestChannel, MachineSpec, Qemu};
use attest_machine::{Share, ShareFs};
use attest_protocol::{
    Frame, HostMessage, Mount, Network, Scratch, Start, AGENT_PORT, AGENT_VSOCK_PORT, CHANNEL_PARAM,
};

use super::{AccelArg, ChannelArg, ExecArgs, NetArg};

/// Privately writable directories: (path, whether the host's files show through an overlay).
/// /run stays empty: the host's sockets and pid files there mean nothing inside the guest.
const SCRATCH_DIRS: [(&str, bool); 3] = [("/tmp", true), ("/var/tmp", true), ("/run", false)];
/// Filesystems the agent itself mounts, beyond the shares' drivers.
const AGENT_DRIVERS: [&str; 1] = ["overlay"];
/// What `--net none` routes into: the module makes `dummy0` as it loads.
const NOWHERE_DRIVER: &str = "dummy";

pub struct PreparedGuest {
    pub qemu: Qemu,
    pub spec: MachineSpec,
    pub start: Start,
    pub accel: AccelChoice,
    pub kernel: Kernel,
}

pub fn prepare(args: &ExecArgs) -> Result<PreparedGuest> {
    let qemu_binary = Qemu::find_binary()
        .context("qemu-system-x86_64 not found on PATH: install Debian's qemu-system-x86 (or set ATTEST_QEMU)")?;
    let cache = attest_image::cache_dir();
    let kernel = attest_image::kernel::locate(args.kernel.as_deref(), &cache)?;
    let modules = kernel.module_tree()?;
    let virtiofsd = virtiofsd::find();
    let fs = share_fs::choose(args.fs.into(), |fs| modules.provides(fs.guest_drivers()), virtiofsd.is_some())?;

    let request = match args.accel {
        AccelArg::Auto => AccelRequest::Auto,
        AccelArg::Kvm => AccelRequest::Kvm,
        AccelArg::Tcg => AccelRequest::Tcg,
    };
    let accel = kvm_probe::choose(request, &qemu_binary, &cache)?;

    // An empty stdin (-n) is not a terminal, as with `ssh -n`: a raw terminal nobody reads would swallow ^C.
    let terminal = super::terminal::wanted(args.tty, args.no_tty || args.no_stdin).map_err(anyhow::Error::msg)?;
    let (nics, network) = match args.net {
        NetArg::None => (Vec::new(), Network::default()),
        NetArg::User => (
            vec![user_mode::nic()],
            Network { interfaces: vec![user_mode::guest_interface()], nameservers: vec![user_mode::DNS.into()] },
        ),
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let (shares, mounts) = shares_and_mounts(args, &cwd, fs);
    // An uncompressed vmlinux boots faster (no in-guest decompression); else the bzImage itself.
    let boot_image = attest_image::vmlinux::pvh_vmlinux(&kernel.path, &cache.join("vmlinux"))?;
    let boot_image = boot_image.unwrap_or_else(|| kernel.path.clone());
    // panic=-1 with QEMU's -no-reboot turns a guest panic into a prompt VMM exit.
    // cryptomgr.notests: the boot-time self-tests of every crypto algorithm take ~0.25 s under TCG.
    let cmdline = format!(
        "console=ttyS0 panic=-1 {} cryptomgr.notests rdinit=/init attest.guest=exec{}",
        if args.console { "loglevel=7" } else { "quiet loglevel=4" },
        match args.channel {
            ChannelArg::VirtioSerial => String::new(),
            ChannelArg::Vsock => format!(" {CHANNEL_PARAM}=vsock:{AGENT_VSOCK_PORT}"),
        }
    );
    let mut spec = MachineSpec {
        memory_mib: args.memory,
        cpus: args.cpus.unwrap_or(match accel.accel {
            Accel::Kvm => 2,
            Accel::Tcg => 1,
        }),
        accel: accel.accel,
        shares,
        nics,
        guest_channel: Some(match args.channel {
            ChannelArg::VirtioSerial => GuestChannel::VirtioSerialPort(AGENT_PORT.into()),
            ChannelArg::Vsock => GuestChannel::Vsock { port: AGENT_VSOCK_PORT },
        }),
        ..MachineSpec::new("exec", Boot::kernel(&boot_image, None, cmdline.clone()))
    };
    let qemu = Qemu { binary: qemu_binary, virtiofsd, vhost_vsock: vhost_vsock::find() };
    let nowhere = (args.net == NetArg::None).then_some(NOWHERE_DRIVER);
    let drivers: Vec<&str> = qemu.guest_drivers(&spec).into_iter().chain(AGENT_DRIVERS).chain(nowhere).collect();
    let resolution = modules.resolve(&drivers)?;
    if modules.dir().is_some() && !resolution.missing.is_empty() {
        tracing::info!(missing = ?resolution.missing, "drivers neither modules nor listed as built in");
    }
    let busybox = attest_image::find_busybox()?;
    let unsigned_modules = kernel.accepts_unsigned_modules();
    let initramfs =
        attest_image::exec_initramfs(attest_image::GUEST_INIT, &busybox, &resolution.load, unsigned_modules)?
            .write_cached(&cache.join("initramfs"))?;
    spec.boot = Boot::kernel(boot_image, Some(initramfs), cmdline);

    let start = Start {
        argv: program_argv(args).into_iter().map(OsStringExt::into_vec).collect(),
        env: program_env(args),
        cwd: cwd.into_os_string().into_vec(),
        mounts,
        scratch: SCRATCH_DIRS
            .iter()
            .map(|(path, over_host)| Scratch { path: path.as_bytes().to_vec(), over_host: *over_host })
            .collect(),
        hostname: nix::unistd::gethostname().map(OsString::into_vec).unwrap_or_default(),
        network,
        terminal: terminal.then(super::terminal::window_size),
    };
    let encoded = Frame::Host(HostMessage::Start(start.clone())).write_to(&mut std::io::sink());
    encoded.context("the program's arguments and environment are too large to send to the guest")?;
    Ok(PreparedGuest { qemu, spec, start, accel, kernel })
}

/// The host root (read-only), the current directory (read-write, same path) and each `--share`.
fn shares_and_mounts(args: &ExecArgs, cwd: &Path, fs: ShareFs) -> (Vec<Share>, Vec<Mount>) {
    let mut wanted: Vec<(PathBuf, PathBuf, bool)> = vec![(PathBuf::from("/"), PathBuf::from("/"), true)];
    if cwd != Path::new("/") {
        wanted.push((cwd.to_path_buf(), cwd.to_path_buf(), false));
    }
    wanted.extend(args.shares.iter().map(|s| (s.host.clone(), s.guest.clone(), s.read_only)));
    // Parents before children, so a share inside another share's mount point lands on top of it.
    wanted[1..].sort_by_key(|(_, guest, _)| guest.components().count());

    wanted
        .into_iter()
        .enumerate()
        .map(|(index, (host_path, guest, read_only))| {
            let tag = format!("attest{index}");
            let share = Share { tag: tag.clone(), host_path, read_only, fs };
            let mount = Mount { tag, fs, guest_path: guest.into_os_string().into_vec(), read_only };
            (share, mount)
        })
        .unzip()
}

fn program_argv(args: &ExecArgs) -> Vec<OsString> {
    let strace = ["strace", "-f", "--"].map(OsString::from);
    let prefix: &[OsString] = if args.strace { &strace } else { &[] };
    prefix.iter().chain(&args.command).cloned().collect()
}

/// attest's own environment, with `--env` on top.
fn program_env(args: &ExecArgs) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (key, value) in &args.env {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env.into_iter().map(|(k, v)| (k.into_vec(), v.into_vec())).collect()
}
