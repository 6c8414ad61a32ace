//! attest's own stdio during `exec`: program output goes to fds 1 and 2 unbuffered and byte-exact,
//! and attest's stdin is forwarded to the program as it arrives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

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
    pub fn write(&mut self, data: &[u8]) {
        if !self.broken && self.file.write_all(data).is_err() {
            self.broken = true;
        }
    }
}

/// Forwards attest's stdin to the program on a thread, ending with an EOF marker.
/// A program that never reads stdin leaves this thread blocked, which is harmless: attest exits.
pub fn forward_stdin(mut channel: UnixStream) {
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
            if frame.write_to(&mut channel).is_err() || last {
                return;
            }
        }
    });
}
