//! A machine's console: everything the VMM prints (the guest's serial port and the VMM's own messages),
//! kept in a log file, a tail for error reports and a history that [`Console::wait_for`] matches
//! as output arrives, optionally echoed live; and typing into the serial port ([`Console::send`]).
//!
//! The serial port is the VMM's stdio: QEMU, Firecracker and Cloud Hypervisor can all put it there
//! (Cloud Hypervisor cannot put it on a socket), so typing is writing to the VMM's stdin.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use regex::bytes::Regex;

const TAIL_LINES: usize = 200;
/// The history [`Console::wait_for`] searches keeps at most this much; older output is in the log.
const HISTORY_LIMIT: usize = 16 << 20;

#[derive(Clone)]
pub struct Console {
    state: Arc<Mutex<State>>,
    /// Signalled when output arrives or an attached source ends.
    changed: Arc<Condvar>,
    /// The serial port's input, when the VMM's stdin is ours.
    input: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
}

/// Where a console's output goes live, besides its log.
#[derive(Clone, Default)]
pub enum Echo {
    #[default]
    Off,
    /// Every byte to attest's stderr as it arrives (`attest exec --console`).
    Raw,
    /// Each complete line, cleaned of its line ending, to a callback (a test log's `name # line`).
    Lines(Arc<dyn Fn(&str) + Send + Sync>),
}

struct State {
    log: Option<File>,
    tail: VecDeque<String>,
    partial: Vec<u8>,
    echo: Echo,
    kernel_panic: Option<String>,
    open_sources: usize,
    /// Sources ever attached: once some were and none is open, no more output will come.
    attached: usize,
    /// Recent output, and how far [`Console::wait_for`] has matched into it.
    history: Vec<u8>,
    matched_to: usize,
}

/// A [`Console::wait_for`] that did not match before its deadline or the console's end.
#[derive(Debug, thiserror::Error)]
#[error("expected console output matching {pattern:?} within {waited:?}{}", if *.ended { ", but the console ended" } else { "" })]
pub struct ConsoleTimeout {
    pub pattern: String,
    pub waited: Duration,
    /// The VMM's output ended (it exited) before the deadline.
    pub ended: bool,
}

impl Console {
    /// `log` receives every byte; `echo` says where else the output goes as it arrives.
    pub fn new(log: Option<&Path>, echo: Echo) -> std::io::Result<Console> {
        // Appended to: a machine that starts again keeps one log.
        let log = log.map(|path| File::options().create(true).append(true).open(path)).transpose()?;
        let state = State {
            log,
            tail: VecDeque::new(),
            partial: Vec::new(),
            echo,
            kernel_panic: None,
            open_sources: 0,
            attached: 0,
            history: Vec::new(),
            matched_to: 0,
        };
        Ok(Console {
            state: Arc::new(Mutex::new(state)),
            changed: Arc::new(Condvar::new()),
            input: Arc::new(Mutex::new(None)),
        })
    }

    /// Makes `input` (the VMM's stdin) the serial port's input for [`Console::send`].
    pub fn attach_input(&self, input: impl Write + Send + 'static) {
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(input));
    }

    /// Types `bytes` into the serial port.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        let input = input.as_mut().ok_or_else(|| io::Error::other("this console takes no input"))?;
        input.write_all(bytes)?;
        input.flush()
    }

    /// Waits until output not matched before matches `pattern`, at most until `deadline`, and
    /// returns the matching text. Woken by each new output, not polled; output that arrived before
    /// the call counts, and each match consumes the output up to its end.
    pub fn wait_for(&self, pattern: &Regex, deadline: Instant) -> Result<String, ConsoleTimeout> {
        self.wait_for_bytes(pattern, deadline).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// [`Console::wait_for`], returning the matching bytes as they came.
    pub fn wait_for_bytes(&self, pattern: &Regex, deadline: Instant) -> Result<Vec<u8>, ConsoleTimeout> {
        let started = Instant::now();
        let mut state = self.lock();
        loop {
            let from = state.matched_to;
            let found = pattern.find(&state.history[from..]).map(|m| (m.end(), m.as_bytes().to_vec()));
            if let Some((end, text)) = found {
                state.matched_to = from + end;
                return Ok(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ended = state.attached > 0 && state.open_sources == 0;
            if left.is_zero() || ended {
                let pattern = pattern.as_str().to_string();
                return Err(ConsoleTimeout { pattern, waited: started.elapsed(), ended });
            }
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Reads `source` on a thread until it ends.
    pub fn attach(&self, mut source: impl Read + Send + 'static) {
        {
            let mut state = self.lock();
            state.open_sources += 1;
            state.attached += 1;
        }
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
            console.changed.notify_all();
        });
    }

    /// Waits, at most `timeout`, until every attached source has ended (e.g. after the VMM died),
    /// so that the tail includes its last words.
    pub fn wait_closed(&self, timeout: Duration) {
        let state = self.lock();
        drop(self.changed.wait_timeout_while(state, timeout, |s| s.open_sources > 0));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if let Echo::Raw = state.echo {
            std::io::stderr().write_all(bytes).ok();
        }
        if let Some(log) = state.log.as_mut() {
            log.write_all(bytes).ok();
        }
        state.history.extend_from_slice(bytes);
        if state.history.len() > HISTORY_LIMIT {
            let drop_len = state.history.len() - HISTORY_LIMIT / 2;
            state.history.drain(..drop_len);
            state.matched_to = state.matched_to.saturating_sub(drop_len);
        }
        state.partial.extend_from_slice(bytes);
        while let Some(pos) = state.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = state.partial.drain(..=pos).collect();
            state.push_line(&line);
        }
        drop(state);
        self.changed.notify_all();
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
        if let Echo::Lines(sink) = &self.echo {
            sink(&line);
        }
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
    fn wait_for_wakes_on_new_output_and_consumes_what_it_matched() {
        let console = Console::new(None, Echo::Off).unwrap();
        console.record(b"early: login: ");
        let soon = || Instant::now() + Duration::from_secs(10);
        let login = Regex::new("login: ").unwrap();
        assert_eq!(console.wait_for(&login, soon()).unwrap(), "login: ", "output before the call counts");
        let quick = console.wait_for(&login, Instant::now() + Duration::from_millis(50));
        assert!(matches!(quick, Err(ConsoleTimeout { ended: false, .. })), "a match is consumed: {quick:?}");

        let writer = console.clone();
        let sent = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer.record(b"Welcome\r\nsecond login: ");
        });
        assert_eq!(console.wait_for(&Regex::new(r"\w+ login: ").unwrap(), soon()).unwrap(), "second login: ");
        assert!(sent.elapsed() < Duration::from_secs(2), "woken by the output, not by a poll");
    }

    #[test]
    fn wait_for_gives_up_when_the_console_ends() {
        let console = Console::new(None, Echo::Off).unwrap();
        console.attach(&b"booting\n"[..]);
        let waited = console.wait_for(&Regex::new("never").unwrap(), Instant::now() + Duration::from_secs(30));
        let err = waited.unwrap_err();
        assert!(err.ended && err.waited < Duration::from_secs(10), "{err}");
        assert!(err.to_string().contains("but the console ended"), "{err}");
    }

    #[test]
    fn send_types_into_the_input() {
        let console = Console::new(None, Echo::Off).unwrap();
        assert!(console.send(b"x").is_err(), "no input attached");
        let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        console.attach_input(writer);
        console.send(b"root\n").unwrap();
        let mut got = [0u8; 5];
        (&reader).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"root\n");
    }

    #[test]
    fn lines_reach_the_echo_callback_whole_and_clean() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let echo = Echo::Lines(Arc::new(move |line: &str| tx.lock().unwrap().send(line.to_string()).unwrap()));
        let console = Console::new(None, echo).unwrap();
        console.record(b"one\r\ntw");
        console.record(b"o\nunfinished");
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["one", "two"]);
    }

    #[test]
    fn tail_keeps_last_lines_and_partial() {
        let console = Console::new(None, Echo::Off).unwrap();
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
        let console = Console::new(None, Echo::Off).unwrap();
        console.record(b"[    2.0] Kernel panic - not syncing: sysrq triggered crash\n");
        for i in 0..300 {
            console.record(format!("[    2.1] trace {i}\n").as_bytes());
        }
        assert_eq!(console.kernel_panic().unwrap(), "[    2.0] Kernel panic - not syncing: sysrq triggered crash");
    }
}
