//! Waiting for the guest: files, TCP ports and unix sockets (each checked in a loop inside the
//! guest, so the wait returns within one guest poll and one round trip of the condition, where
//! NixOS polls from the host once a second), and console text, woken by the console's output.

use std::panic::Location;
use std::time::{Duration, Instant};

use attest_shell::quote;
use regex::bytes::Regex;

use super::commands::{guest_poll_loop, DEFAULT_TIMEOUT};
use super::Machine;
use crate::error::{DriverError, Result};

impl Machine {
    #[track_caller]
    pub fn wait_for_file(&self, path: &str, timeout: Option<Duration>) -> Result<()> {
        let at = Location::caller();
        self.wait_in_guest(at, &format!("file {path} to exist"), &format!("test -e {}", quote(path)), timeout)
    }

    /// Waits until something listens on `addr:port` (`addr` defaults to localhost).
    #[track_caller]
    pub fn wait_for_open_port(&self, port: u16, addr: Option<&str>, timeout: Option<Duration>) -> Result<()> {
        let at = Location::caller();
        let addr = addr.unwrap_or("localhost");
        self.wait_in_guest(at, &format!("TCP port {addr}:{port} to open"), &port_open(addr, port), timeout)
    }

    #[track_caller]
    pub fn wait_for_closed_port(&self, port: u16, addr: Option<&str>, timeout: Option<Duration>) -> Result<()> {
        let at = Location::caller();
        let addr = addr.unwrap_or("localhost");
        let check = format!("! {{ {}; }}", port_open(addr, port));
        self.wait_in_guest(at, &format!("TCP port {addr}:{port} to close"), &check, timeout)
    }

    #[track_caller]
    pub fn wait_for_open_unix_socket(&self, path: &str, is_datagram: bool, timeout: Option<Duration>) -> Result<()> {
        let at = Location::caller();
        let flags = if is_datagram { "-uU" } else { "-U" };
        let check = format!("nc -z {flags} {}", quote(path));
        self.wait_in_guest(at, &format!("unix socket {path} to accept connections"), &check, timeout)
    }

    /// Waits until the console (everything since the machine started, not matched by an earlier
    /// wait) matches `regex`, and returns the matching text. Woken by new output, not polled; no
    /// timeout by default, as in NixOS (the global timeout still ends it).
    #[track_caller]
    pub fn wait_for_console_text(&self, regex: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        let pattern = Regex::new(regex).map_err(|e| self.assertion(at, format!("bad regex {regex:?}: {e}"), false))?;
        self.start_at(at)?;
        let deadline =
            timeout.map_or(self.shared.wait_deadline(), |t| self.shared.wait_deadline().min(Instant::now() + t));
        let console = self.console().expect("started");
        self.shared.log.nested(Some(&self.name), &format!("waiting for {regex:?} to appear on the console"), || {
            console.wait_for(&pattern, deadline).map_err(|e| self.assertion(at, e.to_string(), true))
        })
    }

    /// Runs `until CHECK; do sleep; done` in the guest, limited by `timeout` (default 900 s).
    fn wait_in_guest(
        &self,
        at: &'static Location<'static>,
        what: &str,
        check: &str,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        self.shared.log.nested(Some(&self.name), &format!("waiting for {what}"), || {
            // Quiet while it waits: a check that fails every 50 ms would flood the console.
            let script = guest_poll_loop(&format!("if {{ {check}; }} 2>/dev/null; then exit 0; fi"), timeout);
            match self.run_loop(at, &format!("waiting for {what}"), &script, timeout)? {
                (0, _) => Ok(()),
                (124, _) => {
                    // What the check says, once, to show why it never passed.
                    let last = self.run(at, &format!("{{ {check}; }} 2>&1"), Some(Duration::from_secs(30)));
                    let said =
                        last.map(|(_, out)| String::from_utf8_lossy(&out).trim_end().to_string()).unwrap_or_default();
                    let what = if said.is_empty() {
                        what.to_string()
                    } else {
                        format!("{what} (the check `{check}` says: {said})")
                    };
                    Err(self.timed_out(at, &what, timeout))
                }
                (status, output) => Err(self.assertion(
                    at,
                    format!("waiting for {what} failed (exit code {status}): {}", String::from_utf8_lossy(&output)),
                    false,
                )),
            }
        })
    }

    pub(super) fn timed_out(&self, at: &'static Location<'static>, what: &str, timeout: Duration) -> DriverError {
        self.assertion(at, format!("timed out after {timeout:?} waiting for {what}"), true)
    }
}

/// Whether something accepts TCP connections at `addr:port`. On loopback, with bash's own
/// `/dev/tcp` (a fork, no exec; every backdoor guest has bash; a static bash cannot resolve names,
/// so localhost is tried as both of its addresses). Elsewhere with NixOS's `nc -z`, bounded to a
/// second, since a peer that drops packets would hold a connect for minutes.
fn port_open(addr: &str, port: u16) -> String {
    let connect = |host: &str| format!("(exec 3<>{})", quote(&format!("/dev/tcp/{host}/{port}")));
    match addr.parse::<std::net::IpAddr>() {
        _ if addr == "localhost" => format!("{} || {}", connect("127.0.0.1"), connect("::1")),
        Ok(ip) if ip.is_loopback() => connect(addr),
        _ => format!("nc -z -w 1 {} {port}", quote(addr)),
    }
}
