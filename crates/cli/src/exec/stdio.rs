//! attest's own stdio during `exec`: program output goes to fds 1 and 2 unbuffered and byte-exact,
//! and attest's stdin is forwarded to the program as it arrives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use attest_protocol::{Frame, CHUNK, STDIN_WINDOW};
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

/// The host's end of the agent channel: the stream, shared by the threads that write frames to it
/// (each holds the lock for one frame only), and the stdin credit the guest has granted.
#[derive(Clone)]
pub struct AgentWriter {
    stream: Arc<Mutex<UnixStream>>,
    stdin_credit: Arc<(Mutex<u64>, Condvar)>,
}

impl AgentWriter {
    pub fn new(stream: UnixStream) -> Self {
        AgentWriter {
            stream: Arc::new(Mutex::new(stream)),
            stdin_credit: Arc::new((Mutex::new(STDIN_WINDOW), Condvar::new())),
        }
    }

    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        frame.write_to(&mut *self.stream.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The guest wrote `bytes` more stdin to the program.
    pub fn grant_stdin(&self, bytes: u64) {
        let (credit, changed) = &*self.stdin_credit;
        *credit.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
        changed.notify_all();
    }

    /// Blocks until `bytes` of stdin may be sent, then takes that much credit.
    fn take_stdin_credit(&self, bytes: u64) {
        let (credit, changed) = &*self.stdin_credit;
        let guard = credit.lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = changed.wait_while(guard, |c| *c < bytes).unwrap_or_else(|p| p.into_inner());
        *guard -= bytes;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stdin_credit_blocks_until_the_guest_grants_more() {
        let (stream, _peer) = UnixStream::pair().unwrap();
        let writer = AgentWriter::new(stream);
        writer.take_stdin_credit(STDIN_WINDOW); // the whole initial window
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let taker = writer.clone();
        std::thread::spawn(move || {
            taker.take_stdin_credit(CHUNK as u64);
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err(), "sent beyond the window");
        writer.grant_stdin(CHUNK as u64 - 1);
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err(), "sent on partial credit");
        writer.grant_stdin(1);
        done_rx.recv_timeout(Duration::from_secs(5)).expect("credit granted, send proceeds");
    }
}
