//! attest's own stdio during `exec`: program output goes to fds 1 and 2 unbuffered and byte-exact,
//! and attest's stdin is forwarded to the program as it arrives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, FromRawFd};

use attest_protocol::{Frame, CHUNK};
use attest_session::AgentWriter;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Writes straight to a file descriptor attest does not own (no buffering, never closed).
pub struct RawOut {
    file: ManuallyDrop<File>,
    broken: bool,
}

impl RawOut {
    pub fn stdout() -> Self {
        // SAFETY: fd 1 is open for the life of the process; ManuallyDrop never closes it, so the
        // File does not own it in any way that matters.
        RawOut { file: ManuallyDrop::new(unsafe { File::from_raw_fd(1) }), broken: false }
    }

    pub fn stderr() -> Self {
        // SAFETY: as for stdout, with fd 2.
        RawOut { file: ManuallyDrop::new(unsafe { File::from_raw_fd(2) }), broken: false }
    }

    /// Once the reader has gone (EPIPE, or any other hard error), further output is dropped rather
    /// than failing the run. A non-blocking descriptor inherited from the caller is waited on, not
    /// mistaken for a closed one. Returns true exactly once: on the write that found the reader gone.
    pub fn write(&mut self, mut data: &[u8]) -> bool {
        while !self.broken && !data.is_empty() {
            match self.file.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
                    poll(&mut fds, PollTimeout::NONE).ok();
                }
                Err(_) => {
                    self.broken = true;
                    return true;
                }
            }
        }
        false
    }
}

/// Forwards attest's stdin to the program on a thread, ending with an EOF marker, never more than
/// the credit window ahead of what the program has read. A program that never reads stdin leaves
/// this thread waiting, which is harmless: attest exits when the program does.
///
/// The thread first sends `start`, the request that makes the guest run the program.
///
/// With `forward` false, or when stdin is a terminal attest does not own (a background job, which
/// would be stopped by SIGTTIN on reading), the program gets an empty stdin instead.
pub fn forward_stdin(channel: AgentWriter, start: Frame, forward: bool) {
    std::thread::spawn(move || {
        if channel.send(&start).is_err() {
            return; // the guest is going away; its other signs will say why
        }
        if !forward || super::terminal::is_background_job() {
            channel.send(&Frame::StdinEof).ok();
            return;
        }
        // SAFETY: fd 0 is open for the life of the process and ManuallyDrop never closes it; this
        // thread is its only reader.
        let mut stdin = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
        let mut buf = vec![0u8; CHUNK];
        loop {
            let frame = match stdin.read(&mut buf) {
                Ok(0) => Frame::StdinEof,
                Ok(n) => {
                    channel.take_stdin_credit(n as u64);
                    Frame::Stdin(buf[..n].to_vec())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Frame::StdinEof,
            };
            let last = frame == Frame::StdinEof;
            if channel.send(&frame).is_err() || last {
                return;
            }
        }
    });
}
