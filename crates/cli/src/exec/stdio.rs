//! attest's own stdio during `exec`: program output goes to fds 1 and 2 unbuffered and byte-exact,
//! and attest's stdin is forwarded to the program as it arrives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use attest_protocol::{Frame, CHUNK};

/// Writes straight to a file descriptor attest does not own (no buffering, never closed).
pub struct RawOut {
    file: ManuallyDrop<File>,
    broken: bool,
}

impl RawOut {
    pub fn stdout() -> Self {
        RawOut { file: ManuallyDrop::new(unsafe { File::from_raw_fd(1) }), broken: false }
    }

    pub fn stderr() -> Self {
        RawOut { file: ManuallyDrop::new(unsafe { File::from_raw_fd(2) }), broken: false }
    }

    /// Once the reader has gone (EPIPE), further output is dropped rather than failing the run.
    /// Returns true exactly once: on the write that found the reader gone.
    pub fn write(&mut self, data: &[u8]) -> bool {
        if !self.broken && self.file.write_all(data).is_err() {
            self.broken = true;
            return true;
        }
        false
    }
}

/// The host's end of the agent channel, shared by the threads that write frames to it.
pub type AgentWriter = Arc<Mutex<UnixStream>>;

pub fn send(writer: &AgentWriter, frame: &Frame) -> io::Result<()> {
    frame.write_to(&mut *writer.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Forwards attest's stdin to the program on a thread, ending with an EOF marker.
/// A program that never reads stdin leaves this thread blocked, which is harmless: attest exits.
pub fn forward_stdin(channel: AgentWriter) {
    std::thread::spawn(move || {
        let mut stdin = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
        let mut buf = vec![0u8; CHUNK];
        loop {
            let frame = match stdin.read(&mut buf) {
                Ok(0) => Frame::StdinEof,
                Ok(n) => Frame::Stdin(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Frame::StdinEof,
            };
            let last = frame == Frame::StdinEof;
            if send(&channel, &frame).is_err() || last {
                return;
            }
        }
    });
}
