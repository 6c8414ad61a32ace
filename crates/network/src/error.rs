//! The network crate's errors: each says what was expected, what happened, and the fix.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "VLAN {vlan} is out of range: VLAN numbers are 1 to {max} (they are a byte of the MAC and of 192.168.V.N)"
    )]
    VlanOutOfRange { vlan: u32, max: u8 },
    #[error("machine {machine} joins VLAN {vlan}, which the test does not declare (declared: {declared}); add it to the test's `vlans`")]
    UndeclaredVlan { machine: String, vlan: u32, declared: String },
    #[error("machine {machine} lists VLAN {vlan} twice")]
    DuplicateVlan { machine: String, vlan: u32 },
    #[error("the test has {count} machines on VLANs, but a VLAN has room for node numbers 1 to 254 only")]
    TooManyNodes { count: usize },
    #[error("{program} not found, needed {purpose}: {fix}")]
    MissingProgram { program: &'static str, purpose: String, fix: &'static str },
    #[error("the switch for VLAN {vlan} did not start: {reason}")]
    SwitchStart { vlan: u8, reason: String },
    #[error("TAP networking needs an unprivileged user and network namespace, which this host refused ({source}); allow them (`sysctl -w kernel.unprivileged_userns_clone=1`, `sysctl -w user.max_user_namespaces=15000`, on Ubuntu `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), or use the switch network")]
    NoNamespaces { source: io::Error },
    #[error("machine {machine} joins a VLAN after the test started, which TAP mode cannot add; declare it in the test or use network = \"switch\"")]
    LateTapMachine { machine: String },
    #[error("TAP networking needs /dev/net/tun, which could not be opened ({source}); load the tun module (`modprobe tun`) and let this user read and write the device (it is usually mode 0666), or use the switch network")]
    NoTunDevice { source: io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl NetworkError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
        let what = what.into();
        move |source| NetworkError::Io { what, source }
    }
}

pub type Result<T, E = NetworkError> = std::result::Result<T, E>;
