//! A command channel over a serial console, for guests with no backdoor (installer ISOs, boot
//! images): logging in at a getty (or noticing an autologin), becoming root with `sudo -i`, and
//! running commands whose output and exit status come back exactly.
//!
//! Each command is framed by markers unique to it (`ATTEST-B<n>-<nonce>`), typed so that the
//! echoed command line never matches them (`'ATTEST-B' '<id>'`). Its output is what lies between
//! them, so prompts, the echo and anything printed before can never be taken for it. After login
//! the shell is set to `stty -echo -onlcr` (no echo, no `\r` added to newlines) and kernel messages
//! are kept off the console (`dmesg -n 1`) where allowed.
//!
//! Every expectation is a console wait, so it decides on whole lines (`attest_machine::console::decide`):
//! a marker counts once its line has ended, and a prompt, which ends no line, once the console has
//! been quiet for a moment (the program printing it waits for input then).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use attest_machine::Console;
use regex::bytes::Regex;

/// The end of a prompt's line: its end, after any kernel messages printed onto it since. While
/// getty waits, before `dmesg -n 1` is typed, the kernel writes onto the prompt's line
/// (`(none) login: [    2.207306] tsc: Refined TSC clocksource …`), and the prompt still stands.
macro_rules! prompt_end {
    () => {
        r"(?:\[ *\d+\.\d+\] [^\n]*\n)*\r?$"
    };
}
/// The shell prompt of a login shell: a line ending in `$` or `#` and a space.
const PROMPT: &str = concat!(r"[$#] ?", prompt_end!());
/// What the shell is told after login, on one line: quiet, exact output, no prompts.
const SETUP: &str = "stty -echo -onlcr 2>/dev/null; PS1=''; PS2=''; unset HISTFILE; dmesg -n 1 2>/dev/null; \
     bind 'set enable-bracketed-paste off' 2>/dev/null; export SYSTEMD_COLORS=0 SYSTEMD_URLIFY=0; true";

/// Which step of reaching a shell failed, for the error's first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Login,
    Password,
    Sudo,
    Shell,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Login => "login",
            Step::Password => "login (password)",
            Step::Sudo => "sudo",
            Step::Shell => "shell",
        })
    }
}

/// Why the serial shell could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub struct SerialError {
    pub step: Step,
    pub message: String,
}

fn fail<T>(step: Step, message: impl Into<String>) -> Result<T, SerialError> {
    Err(SerialError { step, message: message.into() })
}

/// The shell on one machine's serial console.
pub struct SerialShell {
    console: Console,
    /// Makes markers unique across shells and runs, so stale output never matches.
    nonce: u64,
    sent: AtomicU64,
    /// The last login was refused: login(1) prints its own prompt again, and an empty line typed
    /// at that prompt would be taken as an empty user name (which gets a password prompt).
    refused: AtomicBool,
    /// Who logged in, once a login succeeded; then whether `sudo -i` made the shell root. Logging
    /// in or becoming root again is then a no-op (so conditions can be checked after a login).
    logged_in: std::sync::Mutex<Option<String>>,
    root: AtomicBool,
    /// Held for each whole login, sudo or command.
    busy: std::sync::Mutex<()>,
}

impl SerialShell {
    pub fn new(console: Console) -> SerialShell {
        static SHELLS: AtomicU64 = AtomicU64::new(0);
        let nonce = u64::from(std::process::id()) << 20 | SHELLS.fetch_add(1, Ordering::SeqCst);
        SerialShell {
            console,
            nonce,
            sent: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            logged_in: Default::default(),
            root: AtomicBool::new(false),
            busy: std::sync::Mutex::new(()),
        }
    }

    /// Logs in as `user` at the console's getty, with `password` if one is asked for; a shell
    /// prompt that appears instead of `login:` is an autologin, accepted if it is `user`'s.
    /// A shell `user` logged into already (perhaps root through sudo since) is kept.
    pub fn login(&self, user: &str, password: Option<&str>, deadline: Instant) -> Result<(), SerialError> {
        let _turn = self.turn();
        match self.logged_in.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
            Some(current) if current == user => return Ok(()),
            Some(current) => {
                return fail(
                    Step::Login,
                    format!("{current} is logged in on this console already; restart the machine to log in as {user}"),
                )
            }
            None => {}
        }
        // A getty reprints its prompt on an empty line; a shell prints a new prompt. After a refusal
        // the prompt is on its way already.
        if !self.refused.swap(false, Ordering::SeqCst) {
            self.type_line("")?;
        }
        let first = self.expect(
            &format!(r"(?m)(login: ?{}|{PROMPT})", prompt_end!()),
            deadline,
            Step::Login,
            "a login prompt",
        )?;
        if first.trim_end().ends_with("login:") {
            self.type_line(user)?;
            let pattern = format!(r"(?mi)(password: ?{}|login incorrect|{PROMPT})", prompt_end!());
            let next = self.expect(&pattern, deadline, Step::Password, "a password prompt or a shell")?;
            if next.to_ascii_lowercase().starts_with("password") {
                let Some(password) = password else {
                    return fail(Step::Password, format!("{user} needs a password and the test gave none"));
                };
                self.type_line(password)?;
                let pattern = format!(r"(?mi)(login incorrect|{PROMPT})");
                let after = self.expect(&pattern, deadline, Step::Password, "a shell prompt")?;
                if after.to_ascii_lowercase().contains("incorrect") {
                    self.refused.store(true, Ordering::SeqCst);
                    return fail(
                        Step::Password,
                        format!("the guest refused the password of {user} (\"Login incorrect\")"),
                    );
                }
            } else if next.to_ascii_lowercase().contains("incorrect") {
                self.refused.store(true, Ordering::SeqCst);
                return fail(Step::Login, format!("the guest refused {user} (\"Login incorrect\")"));
            }
        }
        self.setup(deadline)?;
        let who = self.framed_succeed("id -un", deadline)?;
        if who.trim() != user {
            return fail(
                Step::Login,
                format!("expected a shell of {user}, but it is {}'s (an autologin?)", who.trim()),
            );
        }
        *self.logged_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(user.to_string());
        Ok(())
    }

    /// Becomes root with `sudo -i`, typing `password` if sudo asks for one.
    pub fn become_root(&self, password: Option<&str>, deadline: Instant) -> Result<(), SerialError> {
        let _turn = self.turn();
        if self.root.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.type_line("sudo -i")?;
        let pattern = format!(
            r"(?m)(\[sudo\] password for [^:]*: ?{end}|Password: ?{end}|{PROMPT}|not in the sudoers file.*$)",
            end = prompt_end!()
        );
        let first = self.expect(&pattern, deadline, Step::Sudo, "sudo's password prompt or a root shell")?;
        if first.contains("sudoers") {
            return fail(Step::Sudo, first.trim().to_string());
        }
        if first.contains("assword") {
            let Some(password) = password else {
                return fail(Step::Sudo, "sudo asks for a password and the test gave none");
            };
            self.type_line(password)?;
            let pattern = format!(r"(?m)(Sorry, try again\.|{PROMPT})");
            let after = self.expect(&pattern, deadline, Step::Sudo, "a root shell")?;
            if after.contains("Sorry") {
                self.console.send(b"\x03").ok();
                return fail(Step::Sudo, "sudo refused the password (\"Sorry, try again.\")");
            }
        }
        // A new login shell: tell it again.
        self.setup(deadline)?;
        match self.framed_succeed("id -u", deadline)?.trim() {
            "0" => {
                self.root.store(true, Ordering::SeqCst);
                Ok(())
            }
            uid => fail(Step::Sudo, format!("expected root after sudo -i, but the shell runs as uid {uid}")),
        }
    }

    /// Runs `command` in a subshell and returns its exit status and output, byte for byte. A
    /// command still running at `deadline` is interrupted (^C) and reported.
    pub fn execute(&self, command: &str, deadline: Instant) -> Result<(i32, Vec<u8>), SerialError> {
        let _turn = self.turn();
        self.framed(command, deadline)
    }

    /// [`SerialShell::execute`], which must exit 0; its output as text.
    pub fn succeed(&self, command: &str, deadline: Instant) -> Result<String, SerialError> {
        let _turn = self.turn();
        self.framed_succeed(command, deadline)
    }

    /// One caller at a time: a command typed while another runs would be read as its input.
    fn turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn framed(&self, command: &str, deadline: Instant) -> Result<(i32, Vec<u8>), SerialError> {
        let id = format!("{}-{}", self.sent.fetch_add(1, Ordering::SeqCst), self.nonce);
        let line = format!(
            "printf '%s%s\\n' 'ATTEST-B' '{id}'; ( {command}\n); printf '\\n%s%s %d\\n' 'ATTEST-E' '{id}' \"$?\""
        );
        self.type_line(&line)?;
        // The markers' own line ends may carry a `\r` until `stty -onlcr` applies; without Unicode,
        // `.` matches any byte, so output need not be UTF-8.
        let framed =
            Regex::new(&format!(r"(?s-u)ATTEST-B{id}\r?\n(.*?)\r?\n?ATTEST-E{id} (\d+)\r?\n")).expect("a valid regex");
        let matched = match self.console.wait_for_bytes(&framed, deadline) {
            Ok(matched) => matched,
            Err(e) => {
                // Leave the shell usable for the next command, which skips this one's output.
                self.console.send(b"\x03").ok();
                return fail(Step::Shell, format!("`{command}` did not finish: {e}"));
            }
        };
        let captures = framed.captures(&matched).expect("matched before");
        let status = std::str::from_utf8(&captures[2]).ok().and_then(|s| s.parse().ok()).unwrap_or(-1);
        Ok((status, captures[1].to_vec()))
    }

    fn framed_succeed(&self, command: &str, deadline: Instant) -> Result<String, SerialError> {
        match self.framed(command, deadline)? {
            (0, output) => Ok(String::from_utf8_lossy(&output).into_owned()),
            (status, output) => fail(
                Step::Shell,
                format!("`{command}` failed (exit code {status}): {}", String::from_utf8_lossy(&output).trim()),
            ),
        }
    }

    fn setup(&self, deadline: Instant) -> Result<(), SerialError> {
        self.type_line(SETUP)?;
        self.framed_succeed("true", deadline).map(drop)
    }

    fn type_line(&self, line: &str) -> Result<(), SerialError> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.console.send(&bytes).or_else(|e| fail(Step::Shell, format!("typing into the serial console: {e}")))
    }

    fn expect(&self, pattern: &str, deadline: Instant, step: Step, what: &str) -> Result<String, SerialError> {
        let regex = Regex::new(pattern).expect("a valid regex");
        match self.console.wait_for_bytes(&regex, deadline) {
            Ok(bytes) => Ok(without_kernel_messages(&String::from_utf8_lossy(&bytes))),
            Err(e) => fail(step, format!("expected {what}, but got none in {:.1?}{}", e.waited, ended(&e))),
        }
    }
}

/// A prompt's match as the program printed it: without the kernel messages that [`prompt_end!`]
/// let it carry, so `login: [ 2.2] tsc: …` reads as `login: `.
fn without_kernel_messages(matched: &str) -> String {
    static KERNEL_MESSAGE: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"\[ *\d+\.\d+\] [^\n]*\n").expect("a valid regex"));
    KERNEL_MESSAGE.replace_all(matched, "").into_owned()
}

fn ended(e: &attest_machine::console::ConsoleTimeout) -> &'static str {
    if e.ended {
        " (the console ended)"
    } else {
        ""
    }
}

/// How far a guest got, judged from everything its serial console printed: for an error that
/// names the step a boot stopped at.
pub fn boot_stage(console_log: &str) -> &'static str {
    if console_log.trim().is_empty() {
        "firmware (nothing on the serial console: is the console on ttyS0?)"
    } else if console_log.contains("Linux version") {
        "kernel or init (the kernel started)"
    } else if ["GRUB", "SYSLINUX", "ISOLINUX", "Booting "].iter().any(|s| console_log.contains(s)) {
        "bootloader (no kernel output: is console=ttyS0 on its command line?)"
    } else {
        "firmware or bootloader (no kernel output)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel prints onto a getty's prompt line before `dmesg -n 1` can be typed; the prompt
    /// still stands, and reads as the prompt alone.
    #[test]
    fn a_prompt_stands_with_kernel_messages_printed_onto_its_line() {
        use attest_machine::console::{decide, Decision};
        let login = Regex::new(&format!(r"(?m)(login: ?{}|{PROMPT})", prompt_end!())).unwrap();
        let text = "serial-login-guest ready\r\n\r\r\n(none) login: [    2.207306] tsc: Refined TSC clocksource \
                    calibration: 2596.152 MHz\r\n[    2.208601] clocksource: Switched to clocksource tsc\r\n";
        let Decision::Matched(range) = decide(text.as_bytes(), &login, false) else { panic!("no prompt in {text:?}") };
        assert_eq!(without_kernel_messages(&text[range]).trim_end(), "login:");
        // Without kernel messages, and a prompt that is not one.
        assert_eq!(decide(b"(none) login: ", &login, true), Decision::Matched(7..14));
        assert_eq!(decide(b"Last login: Mon Dec  7 on ttyS0\r\n", &login, true), Decision::Waiting);
        let root = decide(b"login: [    3.1] x\r\nroot@host:~# ", &login, true);
        assert_eq!(root, Decision::Matched(0..20), "the first prompt, with the message after it");
    }

    #[test]
    fn the_boot_stage_follows_the_console() {
        assert!(boot_stage("").starts_with("firmware"));
        assert!(boot_stage("SeaBIOS\nBooting from DVD/CD...\n").starts_with("bootloader"));
        assert!(boot_stage("GRUB loading\n[    0.000000] Linux version 6.1").starts_with("kernel"));
        assert!(boot_stage("SeaBIOS (version 1.16)\n").starts_with("firmware or bootloader"));
    }
}
