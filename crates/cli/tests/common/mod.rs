//! Helpers for the integration tests, which run the real `attest` binary against real VMs.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// attest's cache, where scripts/setup put the kernels.
pub fn cache_dir() -> PathBuf {
    attest_image::cache_dir()
}

pub fn attest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_attest"))
}

/// `attest exec OPTIONS -- PROGRAM...`, ready to adjust and run.
pub fn exec_command<S: AsRef<OsStr>>(options: &[&str], program: &[S]) -> Command {
    let mut command = Command::new(attest_bin());
    command.arg("exec").args(options).arg("--").args(program);
    command.stdin(Stdio::null());
    command
}

pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed,
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(4000)]),
            self.stderr
        )
    }
}

pub fn run_command(command: &mut Command) -> Run {
    let started = Instant::now();
    let Output { status, stdout, stderr } = command.output().expect("running attest");
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

pub fn exec<S: AsRef<OsStr>>(options: &[&str], program: &[S]) -> Run {
    run_command(&mut exec_command(options, program))
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every live (non-zombie) process on the host.
pub fn live_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| is_alive(*pid))
        .collect()
}

/// Live processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    live_pids().into_iter().filter(|child| ppid_and_state(*child).is_some_and(|(ppid, _)| ppid == pid)).collect()
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    ppid_and_state(pid).is_some_and(|(_, state)| state != 'Z')
}

fn ppid_and_state(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Waits (bounded) until `condition` holds; used where the kernel offers no event to wait on.
pub fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "expected {what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The state directory of a running attest, read from its QEMU's command line.
pub fn state_dir_of(qemu_cmdline: &str) -> Option<PathBuf> {
    let start = qemu_cmdline.find("path=")? + "path=".len();
    let socket = qemu_cmdline[start..].split([' ', ',']).next()?;
    Path::new(socket).parent().map(Path::to_path_buf)
}
