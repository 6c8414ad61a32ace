//! The host terminal of `attest exec --tty`: whether the program gets a terminal, the window size,
//! raw mode while the program runs (restored on every way out, panics included), and the screen
//! modes a program killed mid-run would otherwise leave behind.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use attest_protocol::WindowSize;
use nix::libc;
use nix::pty::Winsize;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

nix::ioctl_read_bad!(get_window_size_ioctl, libc::TIOCGWINSZ, Winsize);

/// Whether the program runs on a terminal: `-t` asks for one (stdin must be a terminal), `-T`
/// refuses one, and by default it gets one when attest's stdin and stdout are both terminals and
/// attest is not a background job (which may not take the terminal over).
pub fn wanted(force: bool, refuse: bool) -> Result<bool, String> {
    let (stdin, stdout) = (io::stdin().is_terminal(), io::stdout().is_terminal());
    match (force, refuse) {
        (_, true) => Ok(false),
        (true, _) if !stdin => Err("--tty needs a terminal on stdin (use -T/--no-tty for pipes)".into()),
        (true, _) => Ok(true),
        (false, false) => Ok(stdin && stdout && !is_background_job()),
    }
}

/// attest's stdin is a terminal whose foreground is another process group: reading it, or changing
/// its mode, would stop attest (SIGTTIN, SIGTTOU).
pub fn is_background_job() -> bool {
    let stdin = io::stdin();
    stdin.is_terminal() && nix::unistd::tcgetpgrp(&stdin).is_ok_and(|foreground| foreground != nix::unistd::getpgrp())
}

/// The size of attest's terminal (stdout's, else stdin's); 24x80 when neither says.
pub fn window_size() -> WindowSize {
    let ask = |fd: i32| {
        let mut size = Winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, which outlives the call; a bad fd
        // only makes the ioctl fail.
        let ok = unsafe { get_window_size_ioctl(fd, &mut size) }.is_ok();
        (ok && size.ws_row > 0 && size.ws_col > 0).then_some(WindowSize { rows: size.ws_row, cols: size.ws_col })
    };
    ask(libc::STDOUT_FILENO).or_else(|| ask(libc::STDIN_FILENO)).unwrap_or(WindowSize { rows: 24, cols: 80 })
}

/// attest's stdin terminal in raw mode: keys (^C, ^Z, ^D included) go to the program's terminal,
/// whose own line discipline interprets them. Dropping it restores the saved mode.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> nix::Result<RawMode> {
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved).ok();
    }
}

/// Screen modes the program switched on and not yet off, read from its output as it passes. A
/// program killed by `--timeout` or a dying guest cannot switch them off itself.
#[derive(Default)]
pub struct ScreenModes {
    alternate_screen: bool,
    cursor_hidden: bool,
    /// The end of the previous chunk, where a sequence may have been cut in two.
    carry: Vec<u8>,
}

/// Each sequence, the mode it switches and whether it switches it on.
const SEQUENCES: [(&[u8], Mode, bool); 8] = [
    (b"\x1b[?1049h", Mode::AlternateScreen, true),
    (b"\x1b[?1049l", Mode::AlternateScreen, false),
    (b"\x1b[?1047h", Mode::AlternateScreen, true),
    (b"\x1b[?1047l", Mode::AlternateScreen, false),
    (b"\x1b[?47h", Mode::AlternateScreen, true),
    (b"\x1b[?47l", Mode::AlternateScreen, false),
    (b"\x1b[?25l", Mode::HiddenCursor, true),
    (b"\x1b[?25h", Mode::HiddenCursor, false),
];
const LONGEST: usize = 8;

#[derive(Clone, Copy)]
enum Mode {
    AlternateScreen,
    HiddenCursor,
}

pub type SharedScreenModes = Arc<Mutex<ScreenModes>>;

impl ScreenModes {
    pub fn observe(&mut self, data: &[u8]) {
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(data);
        // Later sequences win; one seen again from the carry only repeats its own effect.
        for start in 0..window.len() {
            if window[start] != 0x1b {
                continue;
            }
            for (sequence, mode, on) in SEQUENCES {
                if window[start..].starts_with(sequence) {
                    match mode {
                        Mode::AlternateScreen => self.alternate_screen = on,
                        Mode::HiddenCursor => self.cursor_hidden = on,
                    }
                }
            }
        }
        self.carry = window[window.len().saturating_sub(LONGEST - 1)..].to_vec();
    }

    /// Escape sequences that switch off what the program left on.
    pub fn undo(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.alternate_screen {
            out.extend_from_slice(b"\x1b[?1049l");
        }
        if self.cursor_hidden {
            out.extend_from_slice(b"\x1b[?25h");
        }
        out
    }

    /// Writes [`Self::undo`] to attest's stdout (the program's terminal).
    pub fn restore(&self) {
        let undo = self.undo();
        if !undo.is_empty() {
            let mut stdout = io::stdout();
            stdout.write_all(&undo).and_then(|()| stdout.flush()).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screen_modes_follow_the_last_sequence_even_across_chunks() {
        let mut modes = ScreenModes::default();
        modes.observe(b"hello \x1b[?10");
        modes.observe(b"49h\x1b[?25l drawing");
        assert_eq!(modes.undo(), b"\x1b[?1049l\x1b[?25h");
        modes.observe(b"\x1b[?25h");
        assert_eq!(modes.undo(), b"\x1b[?1049l");
        modes.observe(b"bye\x1b[?1049l");
        modes.observe(b"plain text");
        assert!(modes.undo().is_empty());
    }

    #[test]
    fn refusing_a_terminal_always_wins() {
        assert_eq!(wanted(true, true), Ok(false));
        assert_eq!(wanted(false, true), Ok(false));
    }
}
