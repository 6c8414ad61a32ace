//! Type-checking a test script before anything boots, as NixOS does with mypy: the script is
//! checked after a prelude that declares its globals (NixOS's `test-script-prepend.py`: the
//! machine names, `machines`, `driver`, `vlans`…) against the Python module's own annotations,
//! and mypy's findings are reported at the script's own lines.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{ScriptError, PYTHON_MODULE};

/// What mypy found: empty when the script checks clean.
pub struct CheckReport {
    pub findings: Vec<String>,
}

/// Checks `script`, whose machines are `machines`, with mypy (`$ATTEST_MYPY`, else `mypy`).
pub fn check_script(
    script: &Path,
    machines: &[String],
    vlans: &[u32],
    scratch: &Path,
) -> Result<CheckReport, ScriptError> {
    let mypy = std::env::var_os("ATTEST_MYPY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("mypy"));
    let source = std::fs::read_to_string(script).map_err(ScriptError::io(format!("reading {}", script.display())))?;
    let module = scratch.join("attest_driver.py");
    std::fs::write(&module, PYTHON_MODULE).map_err(ScriptError::io(format!("writing {}", module.display())))?;
    let prelude = prelude(machines, vlans);
    let checked = scratch.join(CHECKED);
    std::fs::write(&checked, format!("{prelude}{source}")).map_err(ScriptError::io("writing the script to check"))?;
    let output = Command::new(&mypy)
        .args(["--no-error-summary", "--hide-error-context", "--no-color-output", "--show-column-numbers"])
        .args(["--cache-dir", "/dev/null", "--ignore-missing-imports"])
        .arg(CHECKED)
        .current_dir(scratch)
        .env("MYPYPATH", scratch)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ScriptError::NoMypy,
            _ => ScriptError::Io { what: "running mypy".into(), source: e },
        })?;
    let offset = prelude.lines().count();
    let findings = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| at_script_line(line, script, offset))
        .collect();
    Ok(CheckReport { findings })
}

/// Writes type stubs for editors and type checkers into `dir`: `attest_driver.pyi` (the module's
/// API, made by mypy's `stubgen` from its annotations, so it cannot drift from the module) and
/// `__builtins__.pyi` (a script's globals: its machines, `start_all`, `t`…, which pyright and
/// editors built on it read from a project's root).
pub fn write_stubs(dir: &Path, machines: &[String], vlans: &[u32], scratch: &Path) -> Result<(), ScriptError> {
    let stubgen = std::env::var_os("ATTEST_STUBGEN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("stubgen"));
    let module = scratch.join("attest_driver.py");
    std::fs::write(&module, PYTHON_MODULE).map_err(ScriptError::io(format!("writing {}", module.display())))?;
    std::fs::create_dir_all(dir).map_err(ScriptError::io(format!("creating {}", dir.display())))?;
    let output =
        Command::new(&stubgen).arg("--quiet").arg(&module).arg("-o").arg(dir).output().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ScriptError::NoMypy,
            _ => ScriptError::Io { what: "running stubgen".into(), source: e },
        })?;
    if !output.status.success() {
        let why = std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string());
        return Err(ScriptError::Io { what: "stubgen failed".into(), source: why });
    }
    let builtins = dir.join("__builtins__.pyi");
    std::fs::write(&builtins, prelude(machines, vlans))
        .map_err(ScriptError::io(format!("writing {}", builtins.display())))
}

/// The globals a script has, for mypy.
fn prelude(machines: &[String], vlans: &[u32]) -> String {
    let mut text = String::from(
        "from attest_driver import *  # noqa\nfrom attest_driver import Machine, Driver, VLan, log, t\n\
         import os\nfrom typing import Any, List\nmachines: List[Machine]\nmachines_qemu: List[Machine]\n\
         vlans: List[VLan]\ndriver: Driver\n",
    );
    for vlan in vlans {
        text.push_str(&format!("vlan{vlan}: VLan\n"));
    }
    for name in machines {
        text.push_str(&format!("{}: Machine\n", python_name(name)));
    }
    if machines.len() == 1 {
        text.push_str("machine: Machine\n");
    }
    text
}

/// A machine name as a Python identifier, as NixOS makes it (and `attest_driver.pythonize_name`).
fn python_name(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| if c.is_ascii_alphanumeric() && !(i == 0 && c.is_ascii_digit()) || c == '_' { c } else { '_' })
        .collect()
}

/// The prelude and the script, as mypy is given them (relative to the scratch directory).
const CHECKED: &str = "checked_script.py";

/// A mypy line about the checked file, at the script's own path and line; `None` for the prelude.
fn at_script_line(line: &str, script: &Path, offset: usize) -> Option<String> {
    let rest = line.strip_prefix(CHECKED)?.strip_prefix(':')?;
    let (number, rest) = rest.split_once(':')?;
    let number: usize = number.parse().ok()?;
    let number = number.checked_sub(offset).filter(|n| *n > 0)?;
    Some(format!("{}:{number}:{rest}", script.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lines_are_the_scripts() {
        assert_eq!(python_name("my-client.1"), "my_client_1");
        assert_eq!(python_name("1st"), "_st");
        let line = "checked_script.py:12:5: error: \"Machine\" has no attribute \"succed\"";
        assert_eq!(
            at_script_line(line, Path::new("test.py"), 10).as_deref(),
            Some("test.py:2:5: error: \"Machine\" has no attribute \"succed\"")
        );
        assert_eq!(at_script_line("checked_script.py:3: note: x", Path::new("t.py"), 10), None);
    }
}
