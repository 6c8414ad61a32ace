//! The thread that reads the agent's frames: the program's output goes straight to its sinks, in
//! order, and everything else becomes an [`Event`] for the session's loop.

use std::sync::mpsc::Sender;
use std::time::Instant;

use attest_machine::Transport;
use attest_protocol::{Frame, GuestMessage};

use crate::{AgentWriter, Event};

/// Where one of the program's output streams goes. A call writes all of `data` and returns true
/// exactly once: on the write that found the reader gone (later output is dropped). The agent then
/// closes the program's stream the same way, so the program sees EPIPE as with a closed pipe.
pub type OutputSink = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// Connects to the agent (at most until `deadline`) and reads its frames until its final report
/// or the channel's end, which it reports as [`Event::AgentClosed`] with the reason.
pub fn spawn(
    mut transport: Box<dyn Transport>,
    deadline: Instant,
    events: Sender<Event>,
    mut stdout: OutputSink,
    mut stderr: OutputSink,
) {
    std::thread::spawn(move || {
        let mut stream = match transport.connect(deadline, None) {
            Ok(stream) => stream,
            Err(err) => return drop(events.send(Event::AgentClosed(format!("{}: {err}", transport.describe())))),
        };
        let writer = match stream.try_clone() {
            Ok(writer) => AgentWriter::new(writer),
            Err(err) => return drop(events.send(Event::AgentClosed(err.to_string()))),
        };
        events.send(Event::AgentConnected(writer.clone())).ok();
        let why = loop {
            let reader_gone = match Frame::read_from(&mut stream) {
                Ok(Some(Frame::Stdout(data))) => stdout(&data).then_some(Frame::StdoutClosed),
                Ok(Some(Frame::Stderr(data))) => stderr(&data).then_some(Frame::StderrClosed),
                Ok(Some(Frame::StdinCredit(bytes))) => {
                    writer.grant_stdin(bytes);
                    None
                }
                Ok(Some(Frame::Guest(message))) => {
                    let done = matches!(message, GuestMessage::Exited { .. } | GuestMessage::Failed { .. });
                    events.send(Event::Agent(message)).ok();
                    if done {
                        return;
                    }
                    None
                }
                Ok(Some(other)) => break format!("unexpected frame from the guest: {other:?}"),
                Ok(None) => break "the guest closed the agent channel".to_string(),
                Err(err) => break format!("reading from the guest agent: {err}"),
            };
            if let Some(frame) = reader_gone {
                writer.send(&frame).ok();
            }
        };
        events.send(Event::AgentClosed(why)).ok();
    });
}
