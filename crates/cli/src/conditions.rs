//! `attest run TEST.toml` for a test without a script whose machines declare conditions (a
//! boot-image test): boot every machine, check each one's conditions in parallel, and report them
//! as a table on stdout, `conditions.json` in the output directory, and JUnit when asked.

use std::path::PathBuf;

use attest_driver::conditions::Report;
use attest_driver::{Driver, DriverError, DriverOptions, TestConfig};
use attest_machine::MachineError;

use crate::exit_code;

/// Exit 0 when every condition held, 1 when one did not, 2 when the test could not run.
pub fn run(config: TestConfig, out_dir: Option<PathBuf>, args: &crate::run::ScriptArgs) -> i32 {
    let options = DriverOptions { keep_vm_state: args.keep_vm_state, fresh: args.fresh, out_dir, ..Default::default() };
    let junit_xml = args.junit_xml.clone();
    let driver = match Driver::new(config, options) {
        Ok(driver) => driver,
        Err(e) => return exit_code::setup_error(&e),
    };
    if let Err(e) = driver.start_all() {
        return exit_code::setup_error(&e);
    }
    let (mut passed, mut could_not_run) = (true, false);
    let mut done = Vec::new();
    for (machine, report) in driver.check_conditions() {
        match report {
            Ok(report) => {
                println!("{}: conditions\n{}", machine.name(), report.text());
                passed &= report.passed();
                done.push(report);
            }
            // A VMM's refusal leads with its own words, as everywhere else.
            Err(e @ DriverError::Machine(MachineError::VmmRefused { .. })) => {
                println!("{e}\n{}: so its conditions could not be checked", machine.name());
                could_not_run = true;
            }
            Err(e) => {
                println!("{}: the conditions could not be checked: {e}", machine.name());
                could_not_run = true;
            }
        }
    }
    let json = driver.out_dir().join("conditions.json");
    let text = serde_json::to_string_pretty(&done).expect("reports serialize");
    if let Err(e) = std::fs::write(&json, text) {
        return exit_code::setup_error(&format!("writing {}: {e}", json.display()));
    }
    if let Some(path) = junit_xml {
        // One case per condition, named after its machine too.
        let results = done.iter().flat_map(|r| {
            r.results.iter().map(|c| attest_driver::conditions::ConditionResult {
                name: format!("{}: {}", r.machine, c.name),
                ..c.clone()
            })
        });
        let merged = Report { machine: "all".into(), results: results.collect() };
        if let Err(e) = merged.write_junit(&path) {
            return exit_code::setup_error(&format!("writing {}: {e}", path.display()));
        }
    }
    match (could_not_run, passed) {
        (true, _) => exit_code::SETUP,
        (false, true) => 0,
        (false, false) => 1,
    }
}
