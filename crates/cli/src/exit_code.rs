//! attest's exit codes. `attest exec` passes the program's own status through; these are the rest.

use attest_protocol::ExitStatus;

/// Usage or host setup errors (bad option, missing kernel, QEMU, busybox…). clap uses 2 as well.
pub const SETUP: i32 = 2;
/// The `--timeout` ran out (as GNU timeout).
pub const TIMEOUT: i32 = 124;
/// The guest failed: kernel panic, init failure, or the VM died or never booted before the program ended.
pub const GUEST_FAILURE: i32 = 125;

/// The program's status as a shell would report it: its exit code, or 128+N when killed by signal N.
pub fn of_program(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal(signal) => 128 + signal,
    }
}

/// Prints a setup error and returns [`SETUP`].
pub fn setup_error(err: &dyn std::fmt::Display) -> i32 {
    say!("attest: error: {err:#}");
    SETUP
}
