//! A machine's console: everything the VMM prints (the guest's serial port and the VMM's own messages),
//! kept in a log file and a tail for error reports, and optionally echoed live.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const TAIL_LINES: usize = 200;

#[derive(Clone)]
pub struct Console {
    state: Arc<Mutex<State>>,
    /// Signalled when an attached source ends.
    closed: Arc<Condvar>,
}

struct State {
    log: Option<File>,
    tail: VecDeque<String>,
    partial: Vec<u8>,
    echo: bool,
    kernel_panic: Option<String>,
    open_sources: usize,
}

impl Console {
    /// `log` receives every byte; `echo` also copies them to attest's stderr as they arrive.
    pub fn new(log: Option<&Path>, echo: bool) -> std::io::Result<Console> {
        let log = log.map(File::create).transpose()?;
        let state =
            State { log, tail: VecDeque::new(), partial: Vec::new(), echo, kernel_panic: None, open_sources: 0 };
        Ok(Console { state: Arc::new(Mutex::new(state)), closed: Arc::new(Condvar::new()) })
    }

    /// Reads `source` on a thread until it ends.
    pub fn attach(&self, mut source: impl Read + Send + 'static) {
        self.lock().open_sources += 1;
        let console = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = source.read(&mut buf) {
                if n == 0 {
                    break;
                }
                console.record(&buf[..n]);
            }
            console.lock().open_sources -= 1;
            console.closed.notify_all();
        });
    }

    /// Waits, at most `timeout`, until every attached source has ended (e.g. after the VMM died),
    /// so that the tail includes its last words.
    pub fn wait_closed(&self, timeout: Duration) {
        let state = self.lock();
        drop(self.closed.wait_timeout_while(state, timeout, |s| s.open_sources > 0));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if state.echo {
            std::io::stderr().write_all(bytes).ok();
        }
        if let Some(log) = state.log.as_mut() {
            log.write_all(bytes).ok();
        }
        state.partial.extend_from_slice(bytes);
        while let Some(pos) = state.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = state.partial.drain(..=pos).collect();
            state.push_line(&line);
        }
    }

    /// The guest kernel's panic line, if it panicked. Kept apart from the tail, which a long
    /// backtrace pushes it out of.
    pub fn kernel_panic(&self) -> Option<String> {
        self.lock().kernel_panic.clone()
    }

    /// The last `n` complete lines, plus any unterminated last line.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let state = self.lock();
        let mut lines: Vec<String> = state.tail.iter().cloned().collect();
        if !state.partial.is_empty() {
            lines.push(clean(&state.partial));
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }
}

impl State {
    fn push_line(&mut self, line: &[u8]) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        let line = clean(line);
        if self.kernel_panic.is_none() && line.contains("Kernel panic - not syncing") {
            self.kernel_panic = Some(line.trim().to_string());
        }
        self.tail.push_back(line);
    }
}

fn clean(line: &[u8]) -> String {
    String::from_utf8_lossy(line).trim_end_matches(['\n', '\r']).replace('\r', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines_and_partial() {
        let console = Console::new(None, false).unwrap();
        for i in 0..300 {
            console.record(format!("line {i}\r\n").as_bytes());
        }
        console.record(b"no newline yet");
        let tail = console.tail(3);
        assert_eq!(tail, ["line 298", "line 299", "no newline yet"]);
        assert_eq!(console.kernel_panic(), None);
    }

    #[test]
    fn a_panic_line_is_kept_after_it_leaves_the_tail() {
        let console = Console::new(None, false).unwrap();
        console.record(b"[    2.0] Kernel panic - not syncing: sysrq triggered crash\n");
        for i in 0..300 {
            console.record(format!("[    2.1] trace {i}\n").as_bytes());
        }
        assert_eq!(console.kernel_panic().unwrap(), "[    2.0] Kernel panic - not syncing: sysrq triggered crash");
    }
}
