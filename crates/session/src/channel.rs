//! The host's end of the agent channel: whole frames from several threads, and the stdin credit
//! that keeps stdin from ever backing up the channel (see [`attest_protocol::STDIN_WINDOW`]).

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use attest_protocol::{Frame, STDIN_WINDOW};

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
    pub fn take_stdin_credit(&self, bytes: u64) {
        let (credit, changed) = &*self.stdin_credit;
        let guard = credit.lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = changed.wait_while(guard, |c| *c < bytes).unwrap_or_else(|p| p.into_inner());
        *guard -= bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attest_protocol::CHUNK;
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
