//! The screen, the keyboard and the VMM's monitor: `screenshot` (QMP `screendump`, converted to PNG
//! with the `image` crate), `send_key`/`send_chars` (US keymap, as NixOS maps characters),
//! `get_tty_text`/`wait_until_tty_matches` (the guest's `/dev/vcsN`), `send_console`,
//! `send_monitor_command` and `wait_for_qmp_event`.

use std::panic::Location;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use attest_machine::backend::{require, Capability};
use attest_machine::VmmEvent;
use regex::Regex;

use super::commands::DEFAULT_TIMEOUT;
use super::Machine;
use crate::error::{DriverError, Result};

/// How long one monitor command may take.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);

impl Machine {
    /// Saves the screen as `<output directory>/<name>.png` (`name` may carry its own extension or
    /// be a path) and returns the file's path.
    #[track_caller]
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let at = Location::caller();
        self.capable(at, Capability::Screenshot)?;
        // NixOS's rules: `.png` unless the name has a dot; the output directory unless it has a slash.
        let mut path = PathBuf::from(if name.contains('.') { name.to_string() } else { format!("{name}.png") });
        if !name.contains('/') {
            path = self.out_dir().join(path);
        }
        self.shared.log.nested(Some(&self.name), &format!("making screenshot {}", path.display()), || {
            let ppm = self.shared.scratch.join(format!("{}-screen.ppm", self.name));
            self.control(at)?
                .screendump(&ppm, self.monitor_deadline())
                .map_err(|e| self.broken(at, format!("screendump failed: {e}")))?;
            let image = image::open(&ppm).map_err(|e| self.broken(at, format!("reading the screen dump: {e}")))?;
            std::fs::remove_file(&ppm).ok();
            image.save_with_format(&path, image::ImageFormat::Png).map_err(|e| DriverError::Io {
                what: format!("writing {}", path.display()),
                source: std::io::Error::other(e),
            })?;
            Ok(path.clone())
        })
    }

    /// Presses a key or a combination, in QEMU's names (`ctrl-alt-delete`, `shift-a`, `ret`).
    #[track_caller]
    pub fn send_key(&self, key: &str) -> Result<()> {
        self.send_key_at(Location::caller(), key)
    }

    pub(super) fn send_key_at(&self, at: &'static Location<'static>, key: &str) -> Result<()> {
        self.capable(at, Capability::SendKeys)?;
        // A single character goes through the keymap, as in NixOS: "A" is shift-a, "\n" is ret.
        let mut chars = key.chars();
        let key = match (chars.next(), chars.next()) {
            (Some(c), None) => key_for_char(c),
            _ => key.to_string(),
        };
        let keys: Vec<&str> = key.split('-').collect();
        self.control(at)?
            .send_keys(&keys, self.monitor_deadline())
            .map_err(|e| self.broken(at, format!("sending key {key:?}: {e}")))
    }

    /// Types `chars` on the guest's keyboard, one key per character (US layout).
    #[track_caller]
    pub fn send_chars(&self, chars: &str) -> Result<()> {
        let at = Location::caller();
        self.shared.log.nested(Some(&self.name), &format!("sending keys {chars:?}"), || {
            chars.chars().try_for_each(|c| self.send_key_at(at, &key_for_char(c)))
        })
    }

    /// Types `chars` into the serial console.
    #[track_caller]
    pub fn send_console(&self, chars: &str) -> Result<()> {
        let at = Location::caller();
        self.start_at(at)?;
        let console = self.console().expect("started");
        console.send(chars.as_bytes()).map_err(|e| self.broken(at, format!("typing into the serial console: {e}")))
    }

    /// Runs a human monitor (HMP) command and returns its output.
    #[track_caller]
    pub fn send_monitor_command(&self, command: &str) -> Result<String> {
        self.monitor(Location::caller(), command)
    }

    pub(super) fn monitor(&self, at: &'static Location<'static>, command: &str) -> Result<String> {
        self.control(at)?
            .monitor_command(command, self.monitor_deadline())
            .map_err(|e| self.broken(at, format!("monitor command {command:?} failed: {e}")))
    }

    /// Waits for the first QMP event (since the last one taken) that `filter` accepts.
    #[track_caller]
    pub fn wait_for_qmp_event(
        &self,
        filter: impl Fn(&VmmEvent) -> bool,
        timeout: Option<Duration>,
    ) -> Result<VmmEvent> {
        let at = Location::caller();
        let timeout = timeout.unwrap_or(Duration::from_secs(600));
        let control = self.control(at)?;
        let deadline = self.shared.wait_deadline().min(Instant::now() + timeout);
        control.wait_for_event(&filter, deadline).map_err(|e| self.assertion(at, e.to_string(), true))
    }

    /// The text on virtual terminal `tty`, wrapped at its width.
    #[track_caller]
    pub fn get_tty_text(&self, tty: u32) -> Result<String> {
        let at = Location::caller();
        let command = format!("fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}");
        // Whatever the command printed, as NixOS returns it (a tty without a console yet is empty).
        let (_, text) = self.run(at, &command, Some(DEFAULT_TIMEOUT))?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Waits until the text on `tty` matches `regex`, checking every 100 ms.
    #[track_caller]
    pub fn wait_until_tty_matches(&self, tty: u32, regex: &str, timeout: Option<Duration>) -> Result<String> {
        let at = Location::caller();
        let pattern = Regex::new(regex).map_err(|e| self.assertion(at, format!("bad regex {regex:?}: {e}"), false))?;
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        let deadline = Instant::now() + timeout;
        self.shared.log.nested(Some(&self.name), &format!("waiting for {regex:?} to appear on tty {tty}"), || loop {
            let text = self.get_tty_text(tty)?;
            if pattern.is_match(&text) {
                return Ok(text);
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(
                    at,
                    &format!("{regex:?} on tty{tty}; it shows:\n{}", text.trim_end()),
                    timeout,
                ));
            }
            // A pacing: a tty's change is an event only to a poll(2) in the guest, which the
            // backdoor's bash cannot make. A machine that stopped would boot anew on the next read.
            if self.pace(Duration::from_millis(100), deadline) {
                let message =
                    format!("waiting for {regex:?} on tty{tty}: the machine stopped; it showed:\n{}", text.trim_end());
                return Err(self.broken(at, message));
            }
        })
    }

    pub(super) fn capable(&self, at: &'static Location<'static>, capability: Capability) -> Result<()> {
        require(self.shared.backend.as_ref(), capability).map_err(|e| self.broken(at, e.to_string()))
    }

    pub(super) fn monitor_deadline(&self) -> Instant {
        self.shared.wait_deadline().min(Instant::now() + MONITOR_TIMEOUT)
    }
}

/// QEMU's key for a character on a US keyboard, as the NixOS driver maps it.
pub fn key_for_char(c: char) -> String {
    let shifted = |key: &str| format!("shift-{key}");
    match c {
        'A'..='Z' => shifted(&c.to_ascii_lowercase().to_string()),
        '!' => shifted("0x02"),
        '@' => shifted("0x03"),
        '#' => shifted("0x04"),
        '$' => shifted("0x05"),
        '%' => shifted("0x06"),
        '^' => shifted("0x07"),
        '&' => shifted("0x08"),
        '*' => shifted("0x09"),
        '(' => shifted("0x0A"),
        ')' => shifted("0x0B"),
        '-' => "0x0C".into(),
        '_' => shifted("0x0C"),
        '=' => "0x0D".into(),
        '+' => shifted("0x0D"),
        '[' => "0x1A".into(),
        '{' => shifted("0x1A"),
        ']' => "0x1B".into(),
        '}' => shifted("0x1B"),
        ';' => "0x27".into(),
        ':' => shifted("0x27"),
        '\'' => "0x28".into(),
        '"' => shifted("0x28"),
        '`' => "0x29".into(),
        '~' => shifted("0x29"),
        '\\' => "0x2B".into(),
        '|' => shifted("0x2B"),
        ',' => "0x33".into(),
        '<' => shifted("0x33"),
        '.' => "0x34".into(),
        '>' => shifted("0x34"),
        '/' => "0x35".into(),
        '?' => shifted("0x35"),
        ' ' => "spc".into(),
        '\n' => "ret".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::key_for_char;

    #[test]
    fn characters_map_to_us_keys_as_in_nixos() {
        let keys: Vec<String> = "aZ9 !_\n?".chars().map(key_for_char).collect();
        assert_eq!(keys, ["a", "shift-z", "9", "spc", "shift-0x02", "shift-0x0C", "ret", "shift-0x35"]);
    }
}
