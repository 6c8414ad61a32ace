//! The rules a definition's values must follow that reading it cannot see (a TOML file and the
//! builder make the same values): names, vCPUs, memory, disk sizes, timeouts and VLANs. Each broken
//! rule is a [`Problem`] naming the key and its fix; `attest preflight` lists them all as FAILs, and
//! [`crate::Driver`] refuses the first before anything boots. [`check_name`] is the one rule for
//! the names a test gives things (machines, snapshots).

use attest_machine::backend::qemu::{MACHINE_TYPE, MAX_CPUS};
use attest_machine::spec::MIN_MEMORY_MIB;
use attest_network::NetworkError;

use super::{MachineConfig, TestConfig};

/// One value of a definition that cannot work: where (the key), what is wrong, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}; fix: {fix}")]
pub struct Problem {
    /// The definition's key it is about (`cpus`, `memory`, `blank_disks`, `vlans`, a file's key…).
    pub key: &'static str,
    pub what: String,
    pub fix: String,
}

impl Problem {
    pub fn new(key: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Problem {
        Problem { key, what: what.into(), fix: fix.into() }
    }
}

/// Whether `name` may name a `kind` of thing (`"machine"`, `"snapshot"`): the message saying why
/// not, and what a name is, if it may not.
///
/// Names become file names (`<name>-console.log` in the output directory, a state directory) and
/// a test script's variables, so a name is an identifier: an ASCII letter or `_`, then ASCII
/// letters, digits, `_` or `-`. Nothing in it can leave a directory (`/`, `..`) or be read as an
/// option (a leading `-`). `-` is allowed, as NixOS allows it in node names (and a start script
/// `run-my-client-vm` names its machine `my-client`); a script knows that machine as `my_client`,
/// as NixOS's `pythonize_name` makes it.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    const RULE: &str = "a name is an ASCII letter or _, then letters, digits, _ or -";
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(format!("the {kind} name is empty: {RULE}"));
    };
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(format!("{kind} name {name:?} starts with {first:?}: {RULE}"));
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        Some(c) => Err(format!("{kind} name {name:?} has {c:?} in it: {RULE}")),
        None => Ok(()),
    }
}

/// A machine's name in a test script (NixOS's `pythonize_name`, for the names [`check_name`] allows).
fn python_name(name: &str) -> String {
    name.replace('-', "_")
}

impl TestConfig {
    /// Every rule the test's values break, the test's own and each machine's.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.global_timeout.is_zero() {
            problems.push(Problem::new(
                "global_timeout",
                "global_timeout = 0: the test would time out as it starts",
                "give the test's time limit in seconds, e.g. global_timeout = 600 (default 3600)",
            ));
        }
        // The very plan `Driver::new` makes: the same rule, not a copy of it.
        if let Err(e) = self.plan() {
            let fix = match e {
                NetworkError::VlanOutOfRange { .. } => "number the VLANs from 1 to 255",
                NetworkError::UndeclaredVlan { .. } => {
                    "declare the VLAN in the test's `vlans`, or drop it from the machine's"
                }
                NetworkError::DuplicateVlan { .. } => "list each VLAN once",
                _ => "put at most 254 machines on VLANs",
            };
            problems.push(Problem::new("vlans", e.to_string(), fix));
        }
        problems.extend(self.machines.iter().flat_map(MachineConfig::problems));
        // `a-b` and `a_b` would be one variable of the script: the second would hide the first.
        for (index, machine) in self.machines.iter().enumerate() {
            let python = python_name(&machine.name);
            if let Some(other) =
                self.machines[..index].iter().find(|m| m.name != machine.name && python_name(&m.name) == python)
            {
                problems.push(Problem::new(
                    "name",
                    format!("machines {} and {} are both `{python}` in a test script", other.name, machine.name),
                    "rename one of them",
                ));
            }
        }
        problems
    }

    /// The first rule the test breaks, as the error that stops it before anything boots.
    pub fn validate(&self) -> crate::Result<()> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem.into()),
            None => Ok(()),
        }
    }
}

impl MachineConfig {
    /// Every rule this machine's values break.
    pub fn problems(&self) -> Vec<Problem> {
        let name = &self.name;
        let mut problems = Vec::new();
        if let Err(what) = check_name("machine", name) {
            problems.push(Problem::new("name", what, "rename the machine, e.g. web_server or web-server"));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            problems.push(Problem::new(
                "cpus",
                format!(
                    "machine {name}: cpus = {}, but a {MACHINE_TYPE} machine takes 1 to {MAX_CPUS} vCPUs",
                    self.cpus
                ),
                format!("set cpus between 1 and {MAX_CPUS}"),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            problems.push(Problem::new(
                "memory",
                format!(
                    "machine {name}: memory = {} MiB, but a guest kernel needs at least {MIN_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
                format!("set memory to {MIN_MEMORY_MIB} or more (MiB; the default is 1024)"),
            ));
        }
        for (index, disk) in self.blank_disks.iter().enumerate().filter(|(_, d)| d.size_mib == 0) {
            problems.push(Problem::new(
                "blank_disks",
                format!(
                    "machine {name}: blank disk {} has size {}: a disk holds at least 1 MiB",
                    index + 1,
                    disk.size_mib
                ),
                "give it a size, e.g. { size = \"8G\" }",
            ));
        }
        if self.boot_timeout.is_zero() {
            problems.push(Problem::new(
                "boot_timeout",
                format!("machine {name}: boot_timeout = 0: no guest boots in no time"),
                "give the seconds its boot may take, e.g. boot_timeout = 120 (default 600)",
            ));
        }
        problems
    }
}
