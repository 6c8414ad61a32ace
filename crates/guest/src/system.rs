//! Early system bring-up inside the guest: kernel filesystems, driver modules, finding the agent port, power-off.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use attest_protocol::{AGENT_PORT, CHANNEL_PARAM, MODULE_LIST};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::libc;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::socket::{
    bind, connect, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, VsockAddr,
};

/// The port appears asynchronously once virtio_console has talked to the device; this bounds the wait.
const PORT_DEADLINE: Duration = Duration::from_secs(30);

pub fn mount_kernel_filesystems() -> Result<()> {
    for (fs, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        fs::create_dir_all(target)?;
        mount(Some(fs), target, Some(fs), MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting {fs} on {target}"))?;
    }
    Ok(())
}

/// Loads every module the host packed. Failures are reported on the console but are not fatal:
/// a driver that is built in, or one this run does not use, must not stop the boot.
pub fn load_modules() {
    let Ok(list) = fs::read_to_string(MODULE_LIST) else { return };
    for path in list.lines().filter(|l| !l.is_empty()) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                println!("attest-init: opening {path}: {e}");
                continue;
            }
        };
        match finit_module(&file, &CString::default(), ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => println!("attest-init: loading {path}: {e}"),
        }
    }
}

/// Finds `/dev/vportNpM` whose sysfs name is the agent port, waiting until the driver has announced
/// it. The port and its name arrive asynchronously from the device; each step raises a kernel uevent,
/// so the wait sleeps on the uevent socket and rescans sysfs only when something changed.
pub fn find_agent_port() -> Result<PathBuf> {
    let deadline = Instant::now() + PORT_DEADLINE;
    // Subscribe before the first scan, so an announcement between scan and wait is not missed.
    let uevents =
        socket(AddressFamily::Netlink, SockType::Datagram, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkKObjectUEvent)
            .context("opening the kernel uevent socket")?;
    bind(uevents.as_raw_fd(), &NetlinkAddr::new(0, 1)).context("subscribing to kernel uevents")?;
    let mut buf = vec![0u8; 8192];
    loop {
        if let Some(port) = scan_for_agent_port() {
            return Ok(port);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(uevents.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => bail!(
                "virtio-serial port {AGENT_PORT:?} did not appear within {PORT_DEADLINE:?} \
                 (is virtio_console loaded? see the module messages above)"
            ),
            Ok(_) => while recv(uevents.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {},
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e).context("waiting for kernel uevents"),
        }
    }
}

fn scan_for_agent_port() -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        let dev = PathBuf::from("/dev").join(entry.file_name());
        if name.trim_end() == AGENT_PORT && dev.exists() {
            return Some(dev);
        }
    }
    None
}

/// The agent's channel: a vsock connection to the host when the kernel command line says
/// `attest.channel=vsock:PORT` (VMMs without virtio-serial), else the virtio-serial port.
pub fn open_channel() -> Result<File> {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match vsock_port(&cmdline)? {
        Some(port) => connect_vsock(port),
        None => {
            let port = find_agent_port()?;
            let open = File::options().read(true).write(true).open(&port);
            open.with_context(|| format!("opening agent port {}", port.display()))
        }
    }
}

fn vsock_port(cmdline: &str) -> Result<Option<u32>> {
    let prefix = format!("{CHANNEL_PARAM}=");
    let Some(value) = cmdline.split_whitespace().find_map(|word| word.strip_prefix(prefix.as_str())) else {
        return Ok(None);
    };
    match value.strip_prefix("vsock:").map(str::parse) {
        Some(Ok(port)) => Ok(Some(port)),
        _ => bail!("{CHANNEL_PARAM}={value} is not vsock:PORT"),
    }
}

fn connect_vsock(port: u32) -> Result<File> {
    let socket = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .context("opening a vsock socket (is the vsock driver loaded?)")?;
    connect(socket.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_HOST, port))
        .with_context(|| format!("connecting to the host on vsock port {port}"))?;
    Ok(File::from(socket))
}

pub fn uptime_ms() -> u64 {
    let text = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = text.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (secs * 1000.0) as u64
}

pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        nix::unistd::pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_chooses_the_channel() {
        assert_eq!(vsock_port("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(vsock_port("quiet attest.channel=vsock:1024 rdinit=/init").unwrap(), Some(1024));
        assert!(vsock_port("attest.channel=serial").is_err());
        assert!(vsock_port("attest.channel=vsock:big").is_err());
    }
}
