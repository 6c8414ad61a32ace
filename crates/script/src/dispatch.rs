//! One request from a test script, run on the driver. The wire format is a JSON object per line
//! each way: `{"machine": NAME or null, "call": METHOD, "args": {KEYWORD: VALUE}}`, answered by
//! `{"ok": RESULT}` or `{"err": {"kind": "assertion" | "machine" | "timeout", "message": …}}`. Calls
//! and keywords are the NixOS driver's; the Python module passes every argument by keyword.

use std::time::{Duration, Instant};

use attest_driver::{BootConfig, Driver, DriverError, Machine, MachineConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

#[derive(Debug, Deserialize)]
pub struct Request {
    pub machine: Option<String>,
    pub call: String,
    #[serde(default)]
    pub args: Map<String, Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Ok(Value),
    Err { kind: &'static str, message: String },
}

/// One script thread's conversation: its open log blocks and subtests, closed in order.
pub struct Session<'a> {
    driver: &'a Driver,
    blocks: Vec<(String, Instant)>,
    subtests: Vec<(String, Instant)>,
}

impl<'a> Session<'a> {
    pub fn new(driver: &'a Driver) -> Session<'a> {
        Session { driver, blocks: Vec::new(), subtests: Vec::new() }
    }

    pub fn handle(&mut self, request: &Request) -> Reply {
        let args = Args(&request.args);
        let result = match &request.machine {
            None => self.driver_call(&request.call, &args),
            Some(name) => match self.driver.machine(name) {
                Ok(machine) => machine_call(&machine, &request.call, &args),
                Err(e) => Err(e.into()),
            },
        };
        match result {
            Ok(value) => Reply::Ok(value),
            Err(CallError::Driver(e)) => Reply::Err { kind: kind(&e), message: message(&e) },
            Err(CallError::Usage(message)) => Reply::Err { kind: "machine", message },
        }
    }

    fn driver_call(&mut self, call: &str, args: &Args) -> Result<Value, CallError> {
        let log = self.driver.log();
        match call {
            "machines" => Ok(json!(self.driver.machines().iter().map(|m| m.name()).collect::<Vec<_>>())),
            "vlans" => Ok(self.driver.with_networks(|networks| {
                let sockets = networks.vde_sockets();
                let socket = |vlan: u8| sockets.iter().find(|(v, _)| *v == vlan).map(|(_, path)| path.clone());
                json!(networks
                    .plan()
                    .vlans
                    .iter()
                    .map(|&nr| json!({ "nr": nr, "socket_dir": socket(nr) }))
                    .collect::<Vec<_>>())
            })),
            "start_all" => Ok(json!(self.driver.start_all()?)),
            "create_machine" => {
                // NixOS's start command is a `run-NAME-vm` script; `name` overrides the file's.
                let path = std::path::PathBuf::from(args.str("start_command")?);
                let config = match args.opt_str("name")? {
                    Some(name) => {
                        let boot = BootConfig::StartScript { path, qemu_opts: None, kernel_params: None };
                        MachineConfig::new(name, boot)
                    }
                    None => MachineConfig::start_script(path)?,
                };
                Ok(json!(self.driver.add_machine(config)?.name()))
            }
            "join_all" => Ok(json!(self.driver.join_all()?)),
            "log" => Ok(json!(log.info(None, args.str("message")?))),
            "serial_stdout" => Ok(json!(log.set_serial(args.bool("on")?))),
            "block_begin" => {
                let message = args.str("message")?;
                self.blocks.push((message.to_string(), log.begin(None, message)));
                Ok(Value::Null)
            }
            "block_end" => {
                if let Some((message, started)) = self.blocks.pop() {
                    log.end(&message, started);
                }
                Ok(Value::Null)
            }
            "subtest_begin" => {
                let name = args.str("name")?;
                self.subtests.push((name.to_string(), self.driver.begin_subtest(name)));
                Ok(Value::Null)
            }
            "subtest_end" => {
                if let Some((name, started)) = self.subtests.pop() {
                    self.driver.end_subtest(&name, started, args.opt_str("failure")?.map(str::to_string));
                }
                Ok(Value::Null)
            }
            other => Err(CallError::Usage(format!("the driver has no call {other:?}"))),
        }
    }
}

impl Drop for Session<'_> {
    /// A thread that went away mid-block (an exception, a killed script) still closes its blocks.
    fn drop(&mut self) {
        while let Some((message, started)) = self.blocks.pop() {
            self.driver.log().end(&message, started);
        }
        while let Some((name, started)) = self.subtests.pop() {
            self.driver.end_subtest(&name, started, Some("the script ended inside this subtest".into()));
        }
    }
}

fn machine_call(m: &Machine, call: &str, a: &Args) -> Result<Value, CallError> {
    let value = match call {
        // The module always sends `timeout` (NixOS's default is 900): null is an explicit None.
        "execute" => match a.secs("timeout")? {
            Some(timeout) => json!(m.execute(a.str("command")?, Some(timeout))?),
            None => json!(m.execute_without_timeout(a.str("command")?)?),
        },
        "succeed" => json!(m.succeed(a.str("command")?, a.secs("timeout")?)?),
        "fail" => json!(m.fail(a.str("command")?, a.secs("timeout")?)?),
        "wait_until_succeeds" => json!(m.wait_until_succeeds(a.str("command")?, a.secs("timeout")?)?),
        "wait_until_fails" => json!(m.wait_until_fails(a.str("command")?, a.secs("timeout")?)?),
        "sleep" => json!(m.sleep(a.secs("secs")?.unwrap_or_default())?),
        "systemctl" => json!(m.systemctl(a.str("q")?, a.opt_str("user")?)?),
        "start_job" => json!(m.start_job(a.str("jobname")?, a.opt_str("user")?)?),
        "stop_job" => json!(m.stop_job(a.str("jobname")?, a.opt_str("user")?)?),
        "get_unit_info" => json!(m.get_unit_info(a.str("unit")?, a.opt_str("user")?)?),
        "get_unit_property" => json!(m.get_unit_property(a.str("unit")?, a.str("property")?, a.opt_str("user")?)?),
        "require_unit_state" => json!(m.require_unit_state(a.str("unit")?, a.str("require_state")?)?),
        "wait_for_unit" => json!(m.wait_for_unit(a.str("unit")?, a.opt_str("user")?, a.secs("timeout")?)?),
        "wait_for_file" => json!(m.wait_for_file(a.str("filename")?, a.secs("timeout")?)?),
        "wait_for_open_port" => json!(m.wait_for_open_port(a.port("port")?, a.opt_str("addr")?, a.secs("timeout")?)?),
        "wait_for_closed_port" => {
            json!(m.wait_for_closed_port(a.port("port")?, a.opt_str("addr")?, a.secs("timeout")?)?)
        }
        "wait_for_open_unix_socket" => {
            json!(m.wait_for_open_unix_socket(a.str("addr")?, a.bool("is_datagram")?, a.secs("timeout")?)?)
        }
        "wait_for_console_text" => json!(m.wait_for_console_text(a.str("regex")?, a.secs("timeout")?)?),
        "get_console_log" => json!(m.get_console_log()),
        "get_tty_text" => json!(m.get_tty_text(a.u32("tty")?)?),
        "wait_until_tty_matches" => {
            json!(m.wait_until_tty_matches(a.u32("tty")?, a.str("regexp")?, a.secs("timeout")?)?)
        }
        "screenshot" => json!(m.screenshot(a.str("filename")?)?),
        "send_key" => json!(m.send_key(a.str("key")?)?),
        "send_chars" => json!(m.send_chars(a.str("chars")?)?),
        "send_console" => json!(m.send_console(a.str("chars")?)?),
        "login" => json!(m.login(a.str("user")?, a.opt_str("password")?, a.secs("timeout")?)?),
        "become_root" => json!(m.become_root(a.opt_str("password")?, a.secs("timeout")?)?),
        "serial_execute" => {
            let (status, output) = m.serial_execute(a.str("command")?, a.secs("timeout")?)?;
            json!([status, output])
        }
        "serial_succeed" => json!(m.serial_succeed(a.str("command")?, a.secs("timeout")?)?),
        "check_conditions" => {
            let report = m.check_conditions(&m.config().conditions)?;
            json!({ "report": report, "text": report.text(), "passed": report.passed() })
        }
        "send_monitor_command" => json!(m.send_monitor_command(a.str("command")?)?),
        "next_qmp_event" => {
            let event = m.wait_for_qmp_event(|_| true, a.secs("timeout")?)?;
            json!({ "event": event.name, "data": event.data })
        }
        "start" => json!(m.start_allowing_reboot(a.bool("allow_reboot")?)?),
        "connect" => json!(m.connect()?),
        "is_up" => json!(m.is_up()),
        "shutdown" => json!(m.shutdown()?),
        "crash" => json!(m.crash()?),
        "snapshot" => json!(m.snapshot(a.str("name")?)?),
        "restore" => json!(m.restore(a.str("name")?)?),
        "reboot" => json!(m.reboot()?),
        "wait_for_shutdown" => json!(m.wait_for_shutdown()?),
        "copy_from_host" => json!(m.copy_from_host(a.str("source")?.as_ref(), a.str("target")?)?),
        "copy_from_host_via_shell" => {
            json!(m.copy_from_host_via_shell(a.str("source")?.as_ref(), a.str("target")?)?)
        }
        "copy_from_machine" => json!(m.copy_from_machine(a.str("source")?, a.str("target_dir")?)?),
        "log" => json!(m.log(a.str("message")?)),
        "block" => json!(m.block(a.opt_u32("vlan")?)?),
        "unblock" => json!(m.unblock(a.opt_u32("vlan")?)?),
        "forward_port" => json!(m.forward_port(a.port("host_port")?, a.port("guest_port")?)?),
        other => return Err(CallError::Usage(format!("machines have no call {other:?}"))),
    };
    Ok(value)
}

/// A call's keyword arguments.
struct Args<'a>(&'a Map<String, Value>);

impl Args<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn str(&self, name: &str) -> Result<&str, CallError> {
        self.opt_str(name)?.ok_or_else(|| CallError::Usage(format!("missing argument {name:?}")))
    }

    fn opt_str(&self, name: &str) -> Result<Option<&str>, CallError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(CallError::Usage(format!("argument {name:?} must be a string, not {other}"))),
        }
    }

    fn bool(&self, name: &str) -> Result<bool, CallError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(CallError::Usage(format!("argument {name:?} must be a bool, not {other}"))),
        }
    }

    fn u32(&self, name: &str) -> Result<u32, CallError> {
        let number = self.get(name).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
        number.ok_or_else(|| CallError::Usage(format!("argument {name:?} must be a small whole number")))
    }

    fn opt_u32(&self, name: &str) -> Result<Option<u32>, CallError> {
        self.get(name).map(|_| self.u32(name)).transpose()
    }

    fn port(&self, name: &str) -> Result<u16, CallError> {
        let port = self.get(name).and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok());
        port.ok_or_else(|| CallError::Usage(format!("argument {name:?} must be a port number")))
    }

    /// Seconds (a whole or fractional number) as a duration; absent or null is `None`.
    fn secs(&self, name: &str) -> Result<Option<Duration>, CallError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Some(Duration::from_secs_f64(s)))
                .ok_or_else(|| CallError::Usage(format!("argument {name:?} must be a number of seconds, not {value}"))),
        }
    }
}

enum CallError {
    Driver(DriverError),
    /// The request itself is wrong: a bug in the Python module or a misuse it let through.
    Usage(String),
}

impl From<DriverError> for CallError {
    fn from(error: DriverError) -> Self {
        CallError::Driver(error)
    }
}

fn kind(error: &DriverError) -> &'static str {
    match error {
        DriverError::Assertion(_) => "assertion",
        DriverError::GlobalTimeout(_) => "timeout",
        _ => "machine",
    }
}

/// The error as a script sees it: the Python traceback gives the script's line, so the Rust
/// caller's location is left out.
fn message(error: &DriverError) -> String {
    match error {
        DriverError::Assertion(failure) | DriverError::Broken(failure) => failure.describe(false),
        other => other.to_string(),
    }
}
