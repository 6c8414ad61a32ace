//! The test log, as NixOS's terminal logger shows it: nested blocks that end with their duration,
//! messages prefixed by the machine they concern, and console lines as `name # line` (which
//! [`Log::serial`] can turn off). Subtests are recorded for the JUnit report.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

thread_local! {
    /// How deep the current thread is in nested blocks (machines may log from several threads).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// One subtest's outcome, for the JUnit report.
#[derive(Debug, Clone)]
pub struct SubtestRecord {
    pub name: String,
    pub duration: Duration,
    /// The error message when it failed.
    pub failure: Option<String>,
}

#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    out: Mutex<Box<dyn Write + Send>>,
    serial: AtomicBool,
    subtests: Mutex<Vec<SubtestRecord>>,
}

impl Log {
    /// A log on stderr, through `eprint!` so that `cargo test` captures it with the test's output
    /// (shown only when the test fails), from the machines' console threads too.
    pub fn stderr() -> Log {
        struct Eprint;
        impl Write for Eprint {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                eprint!("{}", String::from_utf8_lossy(buf));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        Log::to(Box::new(Eprint))
    }

    pub fn to(out: Box<dyn Write + Send>) -> Log {
        let inner = Inner { out: Mutex::new(out), serial: AtomicBool::new(true), subtests: Mutex::new(Vec::new()) };
        Log { inner: Arc::new(inner) }
    }

    /// A message, indented to the current block, prefixed with `machine: ` when it is about one.
    pub fn info(&self, machine: Option<&str>, message: &str) {
        let indent = "  ".repeat(DEPTH.get());
        let prefix = machine.map(|m| format!("{m}: ")).unwrap_or_default();
        self.write(&format!("{indent}{prefix}{message}"));
    }

    /// Runs `body` in a nested block: a header, then `(finished: …, in N seconds)`.
    pub fn nested<T>(&self, machine: Option<&str>, message: &str, body: impl FnOnce() -> T) -> T {
        let started = self.begin(machine, message);
        let result = body();
        self.end(message, started);
        result
    }

    /// Opens a block on this thread (for callers that cannot pass a closure, such as a script's
    /// `with log.nested(…)`); [`Log::end`] closes it.
    pub fn begin(&self, machine: Option<&str>, message: &str) -> Instant {
        self.info(machine, message);
        DEPTH.set(DEPTH.get() + 1);
        Instant::now()
    }

    pub fn end(&self, message: &str, started: Instant) {
        DEPTH.set(DEPTH.get().saturating_sub(1));
        self.info(None, &format!("(finished: {message}, in {:.2} seconds)", started.elapsed().as_secs_f64()));
    }

    /// A line from a machine's console.
    pub fn serial(&self, machine: &str, line: &str) {
        if self.inner.serial.load(Ordering::Relaxed) {
            self.write(&format!("{machine} # {line}"));
        }
    }

    /// Whether console lines are shown (NixOS's `serial_stdout_on`/`off`).
    pub fn set_serial(&self, on: bool) {
        self.inner.serial.store(on, Ordering::Relaxed);
    }

    /// Records a subtest's outcome for the report.
    pub fn record_subtest(&self, record: SubtestRecord) {
        self.inner.subtests.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    }

    pub fn subtests(&self) -> Vec<SubtestRecord> {
        self.inner.subtests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn write(&self, line: &str) {
        let mut out = self.inner.out.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(out, "{line}").ok();
    }
}

/// Writes the JUnit XML report: one test case per subtest, or one named `main` for a test without
/// subtests; `failure` is the test's own error, if it failed outside every subtest.
pub fn write_junit(
    path: &std::path::Path,
    suite: &str,
    subtests: &[SubtestRecord],
    failure: Option<&str>,
) -> std::io::Result<()> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut cases: Vec<SubtestRecord> = subtests.to_vec();
    if cases.is_empty() || (failure.is_some() && subtests.iter().all(|s| s.failure.is_none())) {
        cases.push(SubtestRecord {
            name: "main".into(),
            duration: Duration::ZERO,
            failure: failure.map(str::to_string),
        });
    }
    let mut test_suite = TestSuite::new(suite);
    for case in cases {
        let status = match &case.failure {
            None => TestCaseStatus::success(),
            Some(message) => {
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                status.set_message(message.lines().next().unwrap_or_default());
                status.set_description(message.as_str());
                status
            }
        };
        let mut test_case = TestCase::new(case.name.as_str(), status);
        test_case.set_time(case.duration);
        test_suite.add_test_case(test_case);
    }
    let mut report = Report::new("attest");
    report.add_test_suite(test_suite);
    let file = std::fs::File::create(path)?;
    report.serialize(file).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log whose output the test can read.
    fn captured() -> (Log, Arc<Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Arc::new(Mutex::new(Vec::new()));
        (Log::to(Box::new(Shared(buffer.clone()))), buffer)
    }

    #[test]
    fn blocks_nest_and_end_with_their_duration() {
        let (log, buffer) = captured();
        log.nested(Some("server"), "must succeed: true", || {
            log.serial("server", "booting");
            log.set_serial(false);
            log.serial("server", "hidden");
            log.info(None, "inside");
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], ["server: must succeed: true", "server # booting", "  inside"]);
        assert!(lines[3].starts_with("(finished: must succeed: true, in 0.0"), "{}", lines[3]);
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn the_junit_report_lists_subtests_and_a_failure_outside_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junit.xml");
        let subtests = [
            SubtestRecord { name: "boots".into(), duration: Duration::from_millis(1500), failure: None },
            SubtestRecord {
                name: "serves".into(),
                duration: Duration::ZERO,
                failure: Some("server: `curl` failed".into()),
            },
        ];
        write_junit(&path, "my test", &subtests, None).unwrap();
        let xml = std::fs::read_to_string(&path).unwrap();
        assert!(xml.contains(r#"<testsuite name="my test" tests="2" disabled="0" errors="0" failures="1""#), "{xml}");
        assert!(xml.contains(r#"<testcase name="boots" time="1.500">"#), "{xml}");
        assert!(xml.contains("server: `curl` failed"), "{xml}");

        write_junit(&path, "t", &[], Some("global timeout")).unwrap();
        let xml = std::fs::read_to_string(&path).unwrap();
        assert!(xml.contains(r#"<testcase name="main""#) && xml.contains("global timeout"), "{xml}");
    }
}
