//! The driver's errors, in the kinds a test tells apart: the test's own expectation failing
//! ([`DriverError::Assertion`], NixOS's `RequestedAssertionFailed`), a machine breaking under it
//! ([`DriverError::Broken`]), and everything that stops a test before it runs. Errors about a
//! machine carry the test line that made the call and the machine's console tail.

use std::fmt;
use std::panic::Location;
use std::time::Duration;

use attest_image::ImageError;
use attest_machine::MachineError;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The test definition is wrong: what, where, and how to fix it.
    #[error("{0}")]
    Config(String),
    /// A value of the definition, or a file it names, cannot work: what, and the fix.
    #[error(transparent)]
    Invalid(#[from] crate::config::Problem),
    /// Also a VMM that refused to start a machine ([`MachineError::VmmRefused`]): its own
    /// message, not a wait for a guest that was never coming.
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Image(#[from] ImageError),
    /// What the test expected did not happen: a command failed, or a wait ran out of time.
    #[error("{0}")]
    Assertion(Box<Failure>),
    /// The machine could not do what was asked: it died, never booted, or its shell broke.
    #[error("{0}")]
    Broken(Box<Failure>),
    #[error("the test's global timeout of {0:?} expired; every machine was stopped")]
    GlobalTimeout(Duration),
    /// A declared network is wrong or cannot be set up on this host.
    #[error(transparent)]
    Network(#[from] attest_network::NetworkError),
    /// A network died while the test ran (a switch exited); every machine was stopped.
    #[error("{0}; every machine was stopped")]
    NetworkFailed(String),
    #[error("no machine named {name:?} (the test has: {known})")]
    NoSuchMachine { name: String, known: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// One machine call that failed, and what there is to show for it.
#[derive(Debug)]
pub struct Failure {
    pub machine: String,
    pub message: String,
    /// The test's line that made the call.
    pub location: &'static Location<'static>,
    /// The machine's last console lines, when they explain the failure.
    pub console_tail: Vec<String>,
}

impl Failure {
    /// The failure as text, with the caller's location or without it (when the caller is not the
    /// test's own code, e.g. a Python script's bridge, whose traceback gives the line).
    pub fn describe(&self, with_location: bool) -> String {
        let mut text = format!("{}: {}", self.machine, self.message);
        if with_location {
            text.push_str(&format!(" (at {})", self.location));
        }
        if !self.console_tail.is_empty() {
            text.push_str(&format!("\n--- last lines of {}'s console ---", self.machine));
            for line in &self.console_tail {
                text.push('\n');
                text.push_str(line);
            }
        }
        text
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(true))
    }
}

impl DriverError {
    /// Whether the test's expectation failed (as opposed to the machinery under it).
    pub fn is_assertion(&self) -> bool {
        matches!(self, DriverError::Assertion(_))
    }

    pub fn io(what: impl Into<String>) -> impl Fn(std::io::Error) -> DriverError {
        let what = what.into();
        move |source| DriverError::Io { what: what.clone(), source }
    }
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;
