//! `attest exec`: run one program as root in a fresh VM that sees the host's files, with its
//! streams and exit status passed through. Usable as a cargo runner.

pub mod guest;
mod session;
mod stdio;
mod terminal;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::exit_code;

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct ExecArgs {
    /// Guest kernel (bzImage). Default: the setup script's cached Debian cloud kernel, then /boot/vmlinuz-$(uname -r).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = parse_memory_mib, value_name = "SIZE")]
    pub memory: u64,
    /// Guest vCPUs. Default: 2 under KVM, 1 under TCG (where each vCPU is a host thread emulating
    /// a CPU, and a second one slows the boot more than it helps).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub cpus: Option<u32>,
    /// Accelerator: auto tries KVM for real and falls back to TCG.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Filesystem for host shares: auto prefers virtio-fs when virtiofsd and the kernel allow it.
    #[arg(long, value_enum, default_value_t = FsArg::Auto)]
    pub fs: FsArg,
    /// Give up after SECS (boot included) and exit 124.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub timeout: Option<f64>,
    /// Give up if the guest has not booted after SECS and exit 125. TCG boots take seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120.0, value_parser = parse_seconds)]
    pub boot_timeout: f64,
    /// Share a host directory: HOST[:GUEST][:ro|rw] (default: same path, rw). Repeatable.
    #[arg(long = "share", value_name = "HOST[:GUEST][:ro|rw]", value_parser = parse_share)]
    pub shares: Vec<ShareArg>,
    /// Set KEY=VALUE in the program's environment (which otherwise is attest's). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(OsString, OsString)>,
    /// Give the program an empty stdin instead of attest's (like ssh -n), e.g. inside `while read`.
    #[arg(short = 'n', long)]
    pub no_stdin: bool,
    /// Run the program on a terminal in the guest (default when stdin and stdout are terminals).
    #[arg(short = 't', long, conflicts_with_all = ["no_tty", "no_stdin"])]
    pub tty: bool,
    /// Never give the program a terminal: plain pipes, stderr kept apart from stdout.
    #[arg(short = 'T', long)]
    pub no_tty: bool,
    /// The agent's channel: virtio-serial (default) or vsock (through vhost-device-vsock, the
    /// channel Firecracker and Cloud Hypervisor guests use).
    #[arg(long, value_enum, default_value_t = ChannelArg::VirtioSerial)]
    pub channel: ChannelArg,
    /// Network: none (default, hermetic) or user (NAT; the host's 127.0.0.1 is 10.0.2.2).
    #[arg(long, value_enum, default_value_t = NetArg::None)]
    pub net: NetArg,
    /// Run the program under strace -f; the trace goes to stderr.
    #[arg(long)]
    pub strace: bool,
    /// Show the guest console live on stderr, with the kernel's boot messages.
    #[arg(long)]
    pub console: bool,
    /// Keep the run's state directory (console log, sockets) and print its path.
    #[arg(long)]
    pub keep_state: bool,
    /// Print the time spent in each phase to stderr (-v does too).
    #[arg(long)]
    pub timings: bool,
    /// Never announce the accelerator, not even a newly made choice.
    #[arg(short, long)]
    pub quiet: bool,
    /// The program and its arguments; without them, an interactive shell ($SHELL, else bash, else sh).
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    pub command: Vec<OsString>,
}

const EXIT_CODES: &str = "\
Exit status: the program's own; 128+N if a signal N killed it.
  2    usage or host setup error (nothing was run)
  124  --timeout ran out
  125  the guest failed: kernel panic, init failure, or the VM died or never booted
  126  the program was found but could not be executed
  127  the program was not found in the guest
  130  interrupted (SIGINT; 143 for SIGTERM, 129 for SIGHUP)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChannelArg {
    VirtioSerial,
    Vsock,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetArg {
    None,
    User,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FsArg {
    Auto,
    Virtiofs,
    #[value(name = "9p")]
    NineP,
}

impl From<FsArg> for Option<attest_machine::ShareFs> {
    fn from(arg: FsArg) -> Self {
        match arg {
            FsArg::Auto => None,
            FsArg::Virtiofs => Some(attest_machine::ShareFs::Virtiofs),
            FsArg::NineP => Some(attest_machine::ShareFs::NineP),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareArg {
    pub host: PathBuf,
    pub guest: PathBuf,
    pub read_only: bool,
}

/// Runs the program; `verbose` also reports the accelerator and the phase timings.
pub fn run(args: ExecArgs, verbose: bool) -> i32 {
    // --timeout counts from here: building or finding the guest is part of the run.
    let started = std::time::Instant::now();
    let guest = match guest::prepare(&args) {
        Ok(guest) => guest,
        Err(err) => return exit_code::setup_error(&err),
    };
    announce_accel(&guest.accel, &args, verbose);
    session::run(guest, &args, verbose, started)
}

/// The program's streams are the program's: the accelerator line goes to stderr only with -v. A
/// choice made afresh (the KVM probe ran, once per host boot) is news, so it is also told to the
/// user's terminal, not to a stderr that may be captured.
fn announce_accel(choice: &attest_machine::AccelChoice, args: &ExecArgs, verbose: bool) {
    if verbose {
        say!("attest: accel: {choice}");
    } else if !args.quiet && attest_machine::accel::first_announcement(choice, &attest_image::cache_dir()) {
        if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
            use std::io::Write as _;
            writeln!(tty, "attest: accel: {choice} [shown once per host boot; -v shows it on every run]").ok();
        }
    }
}

fn parse_memory_mib(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size like 512M or 2G"))?;
    let mib = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => value,
        "G" | "GB" | "GIB" => value * 1024,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use M or G")),
    };
    if mib < attest_machine::spec::MIN_MEMORY_MIB {
        let least = attest_machine::spec::MIN_MEMORY_MIB;
        return Err(format!("{text} is too little memory for a guest; use at least {least}M"));
    }
    Ok(mib)
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(secs),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn parse_share(text: &str) -> Result<ShareArg, String> {
    let mut parts: Vec<&str> = text.split(':').collect();
    let read_only = match parts.last() {
        Some(&"ro") if parts.len() > 1 => true,
        Some(&"rw") if parts.len() > 1 => false,
        _ => {
            parts.push("rw");
            false
        }
    };
    parts.pop();
    let (host, guest) = match parts.as_slice() {
        [host] => (*host, None),
        [host, guest] => (*host, Some(*guest)),
        _ => return Err(format!("{text:?} is not HOST[:GUEST][:ro|rw]")),
    };
    let host = std::fs::canonicalize(host).map_err(|e| format!("share {host:?}: {e}"))?;
    if !host.is_dir() {
        return Err(format!("share {} is not a directory", host.display()));
    }
    let guest = guest.map(PathBuf::from).unwrap_or_else(|| host.clone());
    if !guest.is_absolute() || guest.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("guest path {} must be absolute, without ..", guest.display()));
    }
    Ok(ShareArg { host, guest, read_only })
}

fn parse_env(text: &str) -> Result<(OsString, OsString), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert!(parse_memory_mib("12X").is_err());
        assert!(parse_memory_mib("1M").is_err());
        assert!(parse_memory_mib("lots").is_err());
    }

    #[test]
    fn share_forms() {
        let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        let t = tmp.to_str().unwrap();
        assert_eq!(parse_share(t).unwrap(), ShareArg { host: tmp.clone(), guest: tmp.clone(), read_only: false });
        assert_eq!(
            parse_share(&format!("{t}:/data:ro")).unwrap(),
            ShareArg { host: tmp.clone(), guest: "/data".into(), read_only: true }
        );
        assert!(parse_share(&format!("{t}:ro")).unwrap().read_only);
        assert!(parse_share(&format!("{t}:relative")).is_err());
        assert!(parse_share(&format!("{t}:/tmp/../etc")).is_err());
        assert!(parse_share("/definitely/not/here").is_err());
        assert!(parse_share(&format!("{t}:/a:/b:ro")).is_err());
    }

    #[test]
    fn env_pairs_keep_everything_after_the_first_equals() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), "".into())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
