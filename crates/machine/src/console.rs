//! A machine's console: everything the VMM prints (the guest's serial port and the VMM's own messages),
//! kept in a log file, a tail for error reports and a history that [`Console::wait_for`] matches
//! as output arrives, optionally echoed live; and typing into the serial port ([`Console::send`]).
//!
//! Every wait on the console decides by one rule ([`decide`]): a match must not end in a line the
//! guest has not finished, since the rest of the line may change it (`late console \w+` against
//! `late console l`, then `ine`). Complete lines decide at once; the unfinished last line counts
//! once the console has been quiet for [`QUIET`], which is how a prompt (`login: `, `# `), printed
//! last and never ended by a newline, is told from the start of a longer line (`Last login: …`).
//!
//! The serial port is the VMM's stdio: QEMU, Firecracker and Cloud Hypervisor can all put it there
//! (Cloud Hypervisor cannot put it on a socket), so typing is writing to the VMM's stdin.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use regex::bytes::Regex;

const TAIL_LINES: usize = 200;
/// The history [`Console::wait_for`] searches keeps at most this much; older output is in the log.
const HISTORY_LIMIT: usize = 16 << 20;
/// How long the console must have printed nothing before its unfinished last line counts for a
/// match: a program that prints a prompt then waits for input, and output that arrives in pieces
/// (a serial port under TCG) pauses for milliseconds between them.
pub const QUIET: Duration = Duration::from_millis(200);

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
    /// When output last arrived, for [`QUIET`].
    last_output: Instant,
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
            last_output: Instant::now(),
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
    /// returns the matching text. Woken by each new output (or when the console has been quiet
    /// long enough to decide on an unfinished line), not polled; output that arrived before the
    /// call counts, and each match consumes the output up to its end. Decided by [`decide`].
    pub fn wait_for(&self, pattern: &Regex, deadline: Instant) -> Result<String, ConsoleTimeout> {
        self.wait_for_bytes(pattern, deadline).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// [`Console::wait_for`], returning the matching bytes as they came.
    pub fn wait_for_bytes(&self, pattern: &Regex, deadline: Instant) -> Result<Vec<u8>, ConsoleTimeout> {
        self.wait_matching(pattern, deadline, true)
    }

    /// Waits until anything this console printed, matched before or not, matches `pattern`
    /// (e.g. a declared condition: "the console printed it since the machine started"), and
    /// returns the matching text; consumes nothing. Decided as [`Console::wait_for`], on the
    /// history (the last [`HISTORY_LIMIT`] bytes at most; a console that printed more keeps the
    /// rest in its log only).
    pub fn wait_printed(&self, pattern: &Regex, deadline: Instant) -> Result<String, ConsoleTimeout> {
        self.wait_matching(pattern, deadline, false).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The one wait loop: [`decide`] on what arrived, then sleep until new output, the moment the
    /// console counts as quiet (only when that would decide), the deadline or the console's end.
    fn wait_matching(&self, pattern: &Regex, deadline: Instant, consume: bool) -> Result<Vec<u8>, ConsoleTimeout> {
        let started = Instant::now();
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            // Once every source has ended, the last line is as complete as it will ever be.
            let ended = state.attached > 0 && state.open_sources == 0;
            let quiet_at = state.last_output + QUIET;
            let from = if consume { state.matched_to } else { 0 };
            let wake = match decide(&state.history[from..], pattern, ended || now >= quiet_at) {
                Decision::Matched(range) => {
                    let text = state.history[from + range.start..from + range.end].to_vec();
                    if consume {
                        state.matched_to = from + range.end;
                    }
                    return Ok(text);
                }
                Decision::WhenQuiet => quiet_at.min(deadline),
                Decision::Waiting => deadline,
            };
            if now >= deadline || ended {
                let pattern = pattern.as_str().to_string();
                return Err(ConsoleTimeout { pattern, waited: started.elapsed(), ended });
            }
            // A wake at `quiet_at` that finds new output just decides again.
            let left = wake.saturating_duration_since(now).max(Duration::from_millis(1));
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Writes a line of attest's own into the log, as if the console had printed it (a restore's
    /// mark, say), so the log tells what happened where.
    pub fn note(&self, line: &str) {
        self.record(format!("{line}\n").as_bytes());
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
        state.last_output = Instant::now();
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

/// What a wait on a stream can decide from the output it has, `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The pattern matches `text` here, and more output cannot change that.
    Matched(Range<usize>),
    /// It matches only into the unfinished last line: decided once the stream is quiet.
    WhenQuiet,
    /// It does not match yet.
    Waiting,
}

/// The rule for every wait on a stream, kept apart from the waiting: a match is searched in the
/// complete lines of `text` (up to its last newline), so it never ends where the guest is still
/// writing; the unfinished last line joins them only when `settled` (the stream has been quiet
/// for [`QUIET`], or ended). Lines are whole, as NixOS matches them, and a prompt, which ends no
/// line, is still found once the program printing it waits for input.
pub fn decide(text: &[u8], pattern: &Regex, settled: bool) -> Decision {
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |newline| newline + 1);
    if let Some(found) = pattern.find(&text[..complete]) {
        return Decision::Matched(found.range());
    }
    if complete == text.len() {
        return Decision::Waiting;
    }
    match pattern.find(text) {
        Some(found) if settled => Decision::Matched(found.range()),
        Some(_) => Decision::WhenQuiet,
        None => Decision::Waiting,
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

    fn decided(chunks: &[&[u8]], pattern: &str, settled: bool) -> Decision {
        decide(&chunks.concat(), &Regex::new(pattern).unwrap(), settled)
    }

    #[test]
    fn a_match_waits_for_its_line_to_end() {
        let late = r"late console \w+";
        for cut in ["late console l", "late console lin", "late console line", "late console line\r"] {
            assert_eq!(decided(&[b"boot\n", cut.as_bytes()], late, false), Decision::WhenQuiet, "{cut:?}");
        }
        let text = b"boot\nlate console line\r\nmore";
        assert_eq!(decided(&[b"boot\nlate console l", b"ine\r\n", b"more"], late, false), Decision::Matched(5..22));
        assert_eq!(&text[5..22], b"late console line");
        assert_eq!(decided(&[b"boot\n"], late, true), Decision::Waiting);
        assert_eq!(decided(&[b"boot\nlate"], late, false), Decision::Waiting, "no match at all needs no quiet");
    }

    #[test]
    fn a_prompt_is_decided_once_the_console_is_quiet() {
        let login = r"(?m)(login: ?\r?$|[$#] ?\r?$)";
        assert_eq!(decided(&[b"\r\nhost login: "], login, false), Decision::WhenQuiet);
        assert_eq!(decided(&[b"\r\nhost login: "], login, true), Decision::Matched(7..14));
        // The start of a longer line that looks like a prompt, cut where a chunk ended.
        assert_eq!(decided(&[b"Last login:"], login, false), Decision::WhenQuiet);
        assert_eq!(decided(&[b"Last login:", b" Mon Jan  1 on ttyS0\r\n"], login, false), Decision::Waiting);
        assert_eq!(decided(&[b"Last login:", b" Mon\r\n", b"tester@host:~$ "], login, true), Decision::Matched(30..32));
    }

    #[test]
    fn a_serial_frame_is_decided_on_its_final_newline() {
        let frame = r"(?s-u)ATTEST-B1\r?\n(.*?)\r?\n?ATTEST-E1 (\d+)\r?\n";
        let chunks: [&[u8]; 3] = [b"ATTEST-B1\nout\nATTEST-E1 1", b"27", b"\n"];
        assert_eq!(decided(&chunks[..2], frame, true), Decision::Waiting);
        let Decision::Matched(range) = decided(&chunks, frame, false) else { panic!() };
        assert!(chunks.concat()[range].ends_with(b"ATTEST-E1 127\n"));
    }

    #[test]
    fn a_match_split_across_chunks_is_the_whole_line() {
        let console = Console::new(None, Echo::Off).unwrap();
        console.record(b"late console l");
        let writer = console.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.record(b"ine\n");
        });
        let soon = Instant::now() + Duration::from_secs(10);
        assert_eq!(console.wait_for(&Regex::new(r"late console \w+").unwrap(), soon).unwrap(), "late console line");
    }

    #[test]
    fn an_unfinished_line_counts_once_the_console_is_quiet() {
        let console = Console::new(None, Echo::Off).unwrap();
        console.record(b"host login: ");
        let asked = Instant::now();
        let soon = asked + Duration::from_secs(10);
        assert_eq!(console.wait_for(&Regex::new(r"login: $").unwrap(), soon).unwrap(), "login: ");
        assert!(asked.elapsed() < QUIET + Duration::from_secs(1), "woken when quiet: {:?}", asked.elapsed());
        let printed = Regex::new("(?m)^host").unwrap();
        assert_eq!(console.wait_printed(&printed, soon).unwrap(), "host", "wait_printed consumes nothing");
        assert_eq!(console.wait_printed(&printed, soon).unwrap(), "host");
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
