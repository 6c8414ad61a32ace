//! `attest exec` on a terminal, driven through a real pseudo-terminal as a person at a keyboard
//! would: prompt, tty, window size and resizes, ^C, exit status, and the terminal's mode afterwards.

mod common;

use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use expectrl::process::unix::{UnixProcess, WaitStatus};
use expectrl::{ControlCode, Expect, Regex, Session};
use nix::sys::termios::{tcgetattr, Termios};

const PROMPT: &str = "attest-test-prompt> ";

type PtySession = expectrl::session::OsSession;

/// attest on a fresh pseudo-terminal (attest's stdin, stdout and stderr, and its controlling
/// terminal), with a recognisable prompt for shells that honour `PS1`.
fn spawn(args: &[&str]) -> PtySession {
    let mut command = Command::new(attest_bin());
    command.args(args).env("PS1", PROMPT).env("TERM", "xterm-256color");
    let mut session = Session::spawn(command).expect("spawning attest on a pty");
    session.set_expect_timeout(Some(Duration::from_secs(90)));
    session
}

/// The terminal's mode as the program on it sees it (a pty's master reports its slave's).
fn mode(session: &PtySession) -> (String, String, String, String, Vec<u8>) {
    let master = session.get_process().get_raw_handle().unwrap();
    let t: Termios = tcgetattr(master.as_fd()).unwrap();
    (
        format!("{:?}", t.input_flags),
        format!("{:?}", t.output_flags),
        format!("{:?}", t.control_flags),
        format!("{:?}", t.local_flags),
        t.control_chars.to_vec(),
    )
}

fn exit_code(process: &UnixProcess) -> i32 {
    match process.wait().unwrap() {
        WaitStatus::Exited(_, code) => code,
        other => panic!("attest did not exit normally: {other:?}"),
    }
}

#[test]
fn a_shell_on_a_terminal_behaves_as_on_a_local_one() {
    let mut session = spawn(&["exec", "--", "bash", "--norc", "--noprofile"]);
    let before = mode(&session);
    session.expect(PROMPT).expect("a prompt");

    session.send_line("tty; stty size; echo \"TERM=$TERM\"").unwrap();
    session.expect(Regex(r"/dev/pts/\d+\r\n")).expect("tty names a pseudo-terminal");
    let (cols, rows) = session.get_process().get_window_size().unwrap();
    session.expect(format!("{rows} {cols}\r\n").as_str()).expect("stty size shows the size attest was started with");
    session.expect("TERM=xterm-256color").expect("TERM passes through");

    // A resize reaches the foreground program as SIGWINCH, with the new size.
    session.send_line("sh -c 'trap \"stty size; exit 0\" WINCH; echo waiting; while sleep 0.1; do :; done'").unwrap();
    session.expect("waiting\r\n").expect("the loop started");
    session.get_process_mut().set_window_size(132, 43).unwrap();
    session.expect("43 132\r\n").expect("the program saw the new size");
    session.expect(PROMPT).unwrap();

    // ^C reaches the program on the guest terminal, not attest.
    // "started" comes from inside the job, so the job already owns the terminal when ^C is typed.
    session.send_line("sh -c 'echo started; exec sleep 100'").unwrap();
    session.expect(Regex("\rstarted\r\n")).unwrap();
    let interrupted_at = Instant::now();
    session.send(ControlCode::EndOfText).unwrap();
    session.expect(PROMPT).expect("^C ended the program and the shell prompts again");
    assert!(interrupted_at.elapsed() < Duration::from_secs(30), "^C did not stop sleep");
    session.send_line("echo \"status=$?\"; exit 7").unwrap();
    let status = session.expect(Regex(r"status=\d+")).expect("a status line");
    assert_eq!(String::from_utf8_lossy(&status[0]), "status=130", "the program died of SIGINT");

    assert_eq!(exit_code(session.get_process()), 7, "the shell's exit status passes through");
    assert_eq!(mode(&session), before, "the terminal's mode is restored");
}

#[test]
fn no_program_opens_the_shell_named_by_shell() {
    let mut command = Command::new(attest_bin());
    command.args(["exec"]).env("PS1", PROMPT).env("SHELL", "/bin/sh");
    let mut session = Session::spawn(command).unwrap();
    session.set_expect_timeout(Some(Duration::from_secs(90)));
    session.expect(PROMPT).expect("a prompt from $SHELL");
    session.send_line("echo \"shell=$0\"; [ -t 0 ] && echo on-a-terminal; exit 5").unwrap();
    session.expect("shell=/bin/sh").unwrap();
    session.expect("on-a-terminal").unwrap();
    assert_eq!(exit_code(session.get_process()), 5);
}

#[test]
fn a_timeout_restores_a_terminal_left_raw_on_the_alternate_screen() {
    let program = "printf 'fullscreen\\033[?1049h\\033[?25l'; stty raw -echo; sleep 100";
    let mut session = spawn(&["exec", "--timeout", "15", "--", "sh", "-c", program]);
    let before = mode(&session);
    session.expect("fullscreen").unwrap();
    let ending = session.expect(Regex("timed out")).expect("a timeout report");
    let restored = String::from_utf8_lossy(ending.before()).into_owned();
    assert!(restored.contains("\x1b[?1049l\x1b[?25h"), "alternate screen and cursor not restored: {restored:?}");
    assert_eq!(exit_code(session.get_process()), 124);
    assert_eq!(mode(&session), before, "the terminal's mode is restored");
}

#[test]
fn sigterm_to_attest_restores_the_terminal() {
    let mut session = spawn(&["exec", "--", "sh", "-c", "echo running; stty raw; sleep 100"]);
    let before = mode(&session);
    session.expect("running").unwrap();
    session.get_process_mut().signal(expectrl::process::unix::Signal::SIGTERM).unwrap();
    assert_eq!(exit_code(session.get_process()), 143);
    assert_eq!(mode(&session), before, "the terminal's mode is restored");
}

#[test]
fn tty_without_a_terminal_is_a_clear_usage_error() {
    let run = exec(&["--tty"], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--tty needs a terminal"), "{run:?}");
}

#[test]
fn without_a_terminal_the_shell_reads_commands_from_stdin() {
    let mut command = exec_command::<&str>(&[], &[]);
    command.env("SHELL", "/bin/sh").stdin(std::process::Stdio::piped());
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"echo \"from $0\"; [ -t 1 ] || echo pipes\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "from /bin/sh\npipes\n", "{output:?}");
}

#[test]
fn a_newly_made_accelerator_verdict_is_told_to_the_terminal_once() {
    // A cache of its own, so the first run really makes the KVM verdict.
    let cache = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache_dir().join("kernels"), cache.path().join("kernels")).unwrap();
    for (run, announced) in [("first run", true), ("second run", false)] {
        let mut command = Command::new(attest_bin());
        command.args(["exec", "--", "echo", "program-ran"]).env("ATTEST_CACHE_DIR", cache.path());
        let mut session = Session::spawn(command).unwrap();
        session.set_expect_timeout(Some(Duration::from_secs(90)));
        let seen = session.expect("program-ran").unwrap();
        let before = String::from_utf8_lossy(seen.before()).into_owned();
        assert_eq!(before.contains("attest: accel: "), announced, "{run}: {before:?}");
        assert_eq!(exit_code(session.get_process()), 0);
    }
}

#[test]
fn no_stdin_on_a_terminal_means_no_terminal_for_the_program() {
    let mut session = spawn(&["exec", "-n", "--", "sh", "-c", "[ -t 0 ] || [ -t 1 ] || echo on-pipes"]);
    session.expect("on-pipes").expect("-n: the program runs on pipes, and ^C stays attest's");
    assert_eq!(exit_code(session.get_process()), 0);
}
