//! `attest run TEST.toml` and `attest driver` (the NixOS test driver's command line, environment
//! fallbacks included, so the Nix side can swap the Python driver for attest): a test's machines
//! and its Python testScript, run on attest's driver.

use std::path::{Path, PathBuf};
use std::time::Duration;

use attest_driver::{Driver, DriverOptions, MachineConfig, TestConfig};
use attest_script::{check_script, run_script, write_stubs, ScriptOptions};

use crate::exit_code;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The test: its machines, `global_timeout` and `script` (TOML; see README).
    test: PathBuf,
    /// Where screenshots, copied files and console logs go.
    #[arg(short = 'o', long, value_name = "DIR")]
    output_directory: Option<PathBuf>,
    #[command(flatten)]
    script: ScriptArgs,
}

/// What `attest run` and `attest driver` share: what to do with the script, and how.
#[derive(clap::Args)]
pub(crate) struct ScriptArgs {
    /// Keep the machines' state directories.
    #[arg(short = 'K', long, alias = "keep-machine-state")]
    pub(crate) keep_vm_state: bool,
    /// Boot every machine cold, ignoring (and not filling) the cache of ready machines.
    #[arg(long)]
    pub(crate) fresh: bool,
    /// Write a JUnit report here: one case per subtest.
    #[arg(long, value_name = "PATH")]
    pub(crate) junit_xml: Option<PathBuf>,
    /// Only type-check the script (mypy, as NixOS does), booting nothing.
    #[arg(long)]
    check: bool,
    /// A Python REPL with the script's globals (`test_script()` runs the script) instead.
    #[arg(short = 'I', long)]
    interactive: bool,
    /// Only write type stubs for editors into DIR (attest_driver.pyi, __builtins__.pyi), booting nothing.
    #[arg(long, value_name = "DIR")]
    stubs: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DriverArgs {
    /// NixOS start scripts (`run-NAME-vm`), one machine each.
    #[arg(long, num_args = 0.., value_delimiter = ' ', env = "startScripts", value_name = "SCRIPT")]
    start_scripts: Vec<PathBuf>,
    /// VLAN numbers: a vde_switch each, which the start scripts join through QEMU_VDE_SOCKET_N.
    #[arg(long, num_args = 0.., value_delimiter = ' ', env = "vlans", value_name = "N")]
    vlans: Vec<u32>,
    /// Seconds before everything is stopped.
    #[arg(long, env = "globalTimeout", default_value_t = 3600, value_name = "SECS")]
    global_timeout: u64,
    /// Where screenshots, copied files and console logs go.
    #[arg(short = 'o', long, env = "out", default_value = ".", value_name = "DIR")]
    output_directory: PathBuf,
    #[command(flatten)]
    script: ScriptArgs,
    /// The test as JSON (NixOS HEAD): vms, vlans, global_timeout, test_script.
    #[arg(long, value_name = "JSON")]
    config: Option<PathBuf>,
    /// The test script.
    #[arg(env = "testScript", value_name = "SCRIPT")]
    test_script: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> i32 {
    let config = match TestConfig::from_toml_file(&args.test) {
        Ok(config) => config,
        Err(e) => return exit_code::setup_error(&e),
    };
    if let Err(code) = crate::preflight::gate(&config) {
        return code;
    }
    let has_conditions = config.machines.iter().any(|m| !m.conditions.is_empty());
    if has_conditions && !config.extra.contains_key("script") {
        return match script_of(&config, &args.test, false) {
            Ok(_) => crate::conditions::run(config, args.output_directory, &args.script),
            Err(e) => exit_code::setup_error(&e),
        };
    }
    let script = match script_of(&config, &args.test, true) {
        Ok(script) => script.expect("required"),
        Err(e) => return exit_code::setup_error(&e),
    };
    run_test(config, script, args.output_directory, args.script)
}

/// A test as the NixOS driver is given it, by flags, environment or `--config`.
struct NixosTest {
    start_scripts: Vec<PathBuf>,
    vlans: Vec<u32>,
    global_timeout: u64,
    test_script: Option<PathBuf>,
}

pub fn driver(args: DriverArgs) -> i32 {
    let test = match &args.config {
        Some(path) => match json_config(path) {
            Ok(test) => test,
            Err(e) => return exit_code::setup_error(&e),
        },
        None => NixosTest {
            start_scripts: args.start_scripts.clone(),
            vlans: args.vlans.clone(),
            global_timeout: args.global_timeout,
            test_script: args.test_script.clone(),
        },
    };
    let NixosTest { start_scripts: machines, vlans, global_timeout, test_script: script } = test;
    let Some(script) = script else {
        return exit_code::setup_error(&"no test script: pass it as the argument, or set testScript");
    };
    let machines: Result<Vec<MachineConfig>, _> = machines.iter().map(MachineConfig::start_script).collect();
    let mut config = match machines {
        Ok(machines) if !machines.is_empty() => TestConfig::new(machines),
        Ok(_) => return exit_code::setup_error(&"no machines: pass --start-scripts or set startScripts"),
        Err(e) => return exit_code::setup_error(&e),
    };
    config.global_timeout = Duration::from_secs(global_timeout);
    // The start scripts join the switches through QEMU_VDE_SOCKET_<n>, as in NixOS.
    config.vlans = vlans;
    run_test(config, script, Some(args.output_directory), args.script)
}

/// Writes the stubs, checks the script, or runs the test, as `args` asks.
fn run_test(config: TestConfig, script: PathBuf, out_dir: Option<PathBuf>, args: ScriptArgs) -> i32 {
    if let Some(dir) = &args.stubs {
        return stubs(&config, dir);
    }
    if args.check {
        return check(&config, &script);
    }
    if !script.is_file() {
        return exit_code::setup_error(&format!("the test script {} cannot be read", script.display()));
    }
    let options = DriverOptions { keep_vm_state: args.keep_vm_state, fresh: args.fresh, out_dir, ..Default::default() };
    let script = ScriptOptions { script, junit_xml: args.junit_xml, interactive: args.interactive };
    let driver = match Driver::new(config, options) {
        Ok(driver) => driver,
        Err(e) => return exit_code::setup_error(&e),
    };
    match run_script(driver, &script) {
        Ok(code) => code,
        Err(e) => exit_code::setup_error(&e),
    }
}

/// Type-checks `script` against the globals `config` gives it: exit 0 when clean, 1 with mypy's
/// findings at the script's lines.
fn check(config: &TestConfig, script: &Path) -> i32 {
    let names: Vec<String> = config.machines.iter().map(|m| m.name.clone()).collect();
    let scratch = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => return exit_code::setup_error(&format!("creating a scratch directory: {e}")),
    };
    match check_script(script, &names, &config.vlans, scratch.path()) {
        Ok(report) if report.findings.is_empty() => 0,
        Ok(report) => {
            for finding in &report.findings {
                say!("{finding}");
            }
            1
        }
        Err(e) => exit_code::setup_error(&e),
    }
}

/// Writes the type stubs of `config`'s scripts into `dir`.
fn stubs(config: &TestConfig, dir: &Path) -> i32 {
    let names: Vec<String> = config.machines.iter().map(|m| m.name.clone()).collect();
    let written = tempfile::tempdir()
        .map_err(|e| attest_script::ScriptError::Io { what: "creating a scratch directory".into(), source: e })
        .and_then(|scratch| write_stubs(dir, &names, &config.vlans, scratch.path()));
    match written {
        Ok(()) => 0,
        Err(e) => exit_code::setup_error(&e),
    }
}

/// The `script` key of a TOML test, relative to the file (which a test without conditions must
/// have); and no key attest does not know.
fn script_of(config: &TestConfig, test: &Path, required: bool) -> Result<Option<PathBuf>, String> {
    let at = test.display();
    if let Some(key) = config.extra.keys().find(|k| k.as_str() != "script") {
        return Err(format!("{at}: unknown key `{key}` (expected machines, global_timeout, script, vlans, network)"));
    }
    let Some(script) = config.extra.get("script") else {
        return match required {
            true => Err(format!("{at}: no `script = \"test.py\"` and no machine with conditions: nothing to test")),
            false => Ok(None),
        };
    };
    let script = script.as_str().ok_or_else(|| format!("{at}: `script` must be a path"))?;
    Ok(Some(test.parent().unwrap_or(Path::new(".")).join(script)))
}

/// NixOS HEAD's `--config` JSON: start scripts, VLANs, the global timeout and the script.
fn json_config(path: &Path) -> Result<NixosTest, String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        vms: Vec<Vm>,
        #[serde(default)]
        vlans: Vec<u32>,
        global_timeout: Option<u64>,
        test_script: Option<PathBuf>,
    }
    #[derive(serde::Deserialize)]
    struct Vm {
        start_command: PathBuf,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let config: Config = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(NixosTest {
        start_scripts: config.vms.into_iter().map(|vm| vm.start_command).collect(),
        vlans: config.vlans,
        global_timeout: config.global_timeout.unwrap_or(3600),
        test_script: config.test_script,
    })
}
