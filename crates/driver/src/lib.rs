//! attest's system-test driver: a test's named machines ([`Driver`]), each with the NixOS test
//! driver's machine API over the guest's backdoor shell ([`Machine`]), definitions in Rust or TOML
//! ([`config`]), the test log and the JUnit report ([`log`]), and a shell on the serial console
//! for guests without a backdoor ([`serial`]).
//!
//! A system test is an ordinary `#[test]`:
//!
//! ```no_run
//! use attest_driver::{BuiltinImage, Driver, DriverOptions, MachineConfig, TestConfig};
//!
//! let test = TestConfig::new(vec![MachineConfig::image("server", BuiltinImage::Debian)]);
//! let driver = Driver::new(test, DriverOptions::default()).unwrap();
//! let server = driver.machine("server").unwrap();
//! server.wait_for_unit("multi-user.target", None, None).unwrap();
//! assert_eq!(server.succeed("echo hi", None).unwrap(), "hi\n");
//! ```

pub mod conditions;
pub mod config;
pub mod driver;
pub mod error;
pub mod log;
pub mod machine;
pub mod prepare;
pub mod serial;
mod shared;

pub use config::{
    BackendKind, BootConfig, BuiltinImage, FirmwareKind, Login, MachineConfig, NetworkMode, Ready, ReadyWord,
    TestConfig,
};
pub use driver::{Driver, DriverOptions};
pub use error::{DriverError, Failure, Result};
pub use log::Log;
pub use machine::Machine;
