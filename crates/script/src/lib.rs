//! Running NixOS Python test scripts on attest's Rust driver. The Python side is a small module
//! (`python/attest_driver.py`, embedded here and written next to the run's state) that gives the
//! script NixOS's globals; each machine call goes as one JSON line over a unix socket to this
//! process ([`server`]), which runs it on the driver ([`dispatch`]). [`runner`] starts `python3`,
//! forwards Ctrl-C to it, bounds it by the global timeout and tears the machines down after it.

pub mod check;
pub mod dispatch;
pub mod runner;
pub mod server;

pub use check::{check_script, write_stubs, CheckReport};
pub use runner::{run_script, ScriptOptions};

/// The Python module a script runs under.
pub const PYTHON_MODULE: &str = include_str!("python/attest_driver.py");

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error(transparent)]
    Driver(#[from] attest_driver::DriverError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("python3 is needed to run test scripts, but was not found: install Debian's python3 (scripts/setup does) or set ATTEST_PYTHON")]
    NoPython,
    #[error("mypy is needed to check test scripts, but was not found: install Debian's mypy (scripts/setup does) or set ATTEST_MYPY")]
    NoMypy,
}

impl ScriptError {
    pub fn io(what: impl Into<String>) -> impl Fn(std::io::Error) -> ScriptError {
        let what = what.into();
        move |source| ScriptError::Io { what: what.clone(), source }
    }
}
