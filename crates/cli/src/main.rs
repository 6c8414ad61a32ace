//! The `attest` command line: `exec` runs one program in a fresh VM; `run` a system test (its
//! script, or its machines' declared `conditions`) and `driver` one given as the NixOS test
//! driver's command line; `doctor` checks the host and `preflight` a test before it boots (with the
//! `checks` they share); `image` builds guest images. `exit_code` holds the statuses of them all.

/// Like eprintln!, but a closed stderr must not turn a report into a panic (and exit 101).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stderr(), $($arg)*).ok();
    }};
}

/// println!, but a closed stdout (`attest doctor | head`) ends the output instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).ok();
    }};
}

mod cache;
mod checks;
mod conditions;
mod doctor;
mod exec;
mod exit_code;
mod image;
mod preflight;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "attest",
    version,
    about = "Boot real VMs, get a root command channel into each, and drive them from tests"
)]
struct Cli {
    /// More on stderr: -v the accelerator and phase timings of each run, -vv debug logs, -vvv trace.
    /// ATTEST_LOG takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PROGRAM as root in a fresh VM that sees the host's files; exit with its status.
    Exec(exec::ExecArgs),
    /// Run a system test: its machines (TOML) and its NixOS Python testScript.
    Run(run::RunArgs),
    /// The NixOS test driver's command line (start scripts, testScript), run on attest's driver.
    Driver(run::DriverArgs),
    /// Check every prerequisite and say how to fix what is missing.
    Doctor(doctor::DoctorArgs),
    /// Check a test before booting it (host, devices, firmware, ISOs, declarations), in a second.
    Preflight(preflight::PreflightArgs),
    /// Build guest images for system tests (cached) and print their paths.
    Image(image::ImageArgs),
    /// The cache of ready machines (`ready = …`): list or clear it.
    Cache(cache::CacheArgs),
    /// Print the path of the benchmark floor initramfs (busybox init that powers off at once).
    #[command(hide = true, name = "bench-floor-initramfs")]
    BenchFloorInitramfs,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let code = match cli.command {
        Command::Exec(args) => exec::run(args, cli.verbose > 0),
        Command::Run(args) => run::run(args),
        Command::Driver(args) => run::driver(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Preflight(args) => preflight::run(args),
        Command::Image(args) => image::run(args),
        Command::Cache(args) => cache::run(args),
        Command::BenchFloorInitramfs => bench_floor_initramfs(),
    };
    std::process::exit(code);
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().init();
}

fn bench_floor_initramfs() -> i32 {
    let built = attest_image::find_busybox()
        .and_then(|busybox| attest_image::poweroff_initramfs(&busybox))
        .and_then(|image| image.write_cached(&attest_image::cache_dir().join("initramfs")));
    match built {
        Ok(path) => {
            out!("{}", path.display());
            0
        }
        Err(err) => exit_code::setup_error(&err),
    }
}
