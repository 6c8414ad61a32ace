//! A QMP client, the control channel of QEMU machines: the greeting and capability negotiation,
//! commands matched to their replies by id, and asynchronous events kept for waiting on. One reader
//! thread parses QEMU's JSON stream; callers wait on a condition variable with their own deadline,
//! so nothing polls and no call waits forever.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: no {what} within {waited:?}")]
    Timeout { what: String, waited: Duration },
    #[error("QMP: the connection ended ({0})")]
    Closed(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP: unexpected message from QEMU: {0}")]
    Protocol(String),
}

/// An asynchronous event QEMU sent, such as `STOP`, `RESET` or `SHUTDOWN`.
pub use crate::control::VmmEvent as QmpEvent;

pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<(Mutex<Inbox>, Condvar)>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inbox {
    greeted: bool,
    replies: HashMap<u64, Result<Value, (String, String)>>,
    events: Vec<QmpEvent>,
    closed: Option<String>,
}

impl Qmp {
    /// Reads the greeting and enters command mode on a connected stream (QEMU connects to a
    /// [`crate::transport::ListeningSocket`] bound before it started).
    pub fn handshake(stream: UnixStream, deadline: Instant) -> Result<Qmp, QmpError> {
        let shared = Arc::new((Mutex::new(Inbox::default()), Condvar::new()));
        let reader = stream.try_clone()?;
        {
            let shared = shared.clone();
            std::thread::spawn(move || read_messages(reader, &shared));
        }
        let qmp = Qmp { writer: Mutex::new(stream), shared, next_id: AtomicU64::new(1) };
        qmp.wait("greeting", deadline, |inbox| inbox.greeted.then_some(()))?;
        qmp.execute("qmp_capabilities", None, deadline)?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value; QEMU's error reply is [`QmpError::Command`].
    pub fn execute(&self, command: &str, arguments: Option<Value>, deadline: Instant) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.extend_from_slice(b"\r\n");
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line)?;
        let reply = self.wait(&format!("reply to {command}"), deadline, |inbox| inbox.replies.remove(&id))?;
        reply.map_err(|(class, desc)| QmpError::Command { command: command.into(), class, desc })
    }

    /// An HMP command through QMP (`human-monitor-command`), returning its text output.
    pub fn human_monitor_command(&self, command_line: &str, deadline: Instant) -> Result<String, QmpError> {
        let output = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })), deadline)?;
        Ok(output.as_str().unwrap_or_default().to_string())
    }

    /// Waits for the first event `matches` accepts, and takes it (and the events before it) from
    /// the queue. Events that arrived before the call count: none is missed between calls.
    pub fn wait_for_event(
        &self,
        what: &str,
        matches: impl Fn(&QmpEvent) -> bool,
        deadline: Instant,
    ) -> Result<QmpEvent, QmpError> {
        self.wait(what, deadline, |inbox| {
            let index = inbox.events.iter().position(&matches)?;
            Some(inbox.events.drain(..=index).next_back().expect("drained at least the match"))
        })
    }

    /// Waits until `take` finds what it looks for in the inbox, the connection ends, or `deadline`.
    fn wait<T>(
        &self,
        what: &str,
        deadline: Instant,
        mut take: impl FnMut(&mut Inbox) -> Option<T>,
    ) -> Result<T, QmpError> {
        let started = Instant::now();
        let (inbox, changed) = &*self.shared;
        let mut inbox: MutexGuard<Inbox> = inbox.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(found) = take(&mut inbox) {
                return Ok(found);
            }
            if let Some(why) = &inbox.closed {
                return Err(QmpError::Closed(format!("{why}; waiting for {what}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout { what: what.into(), waited: started.elapsed() });
            }
            inbox = changed.wait_timeout(inbox, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Sorts QEMU's messages into the inbox until the stream ends.
fn read_messages(stream: UnixStream, shared: &(Mutex<Inbox>, Condvar)) {
    let (inbox, changed) = shared;
    let why = 'read: {
        for message in serde_json::Deserializer::from_reader(stream).into_iter::<Map<String, Value>>() {
            let mut message = match message {
                Ok(message) => message,
                Err(e) if e.is_eof() => break 'read "QEMU closed it".to_string(),
                Err(e) => break 'read format!("unreadable message: {e}"),
            };
            let mut inbox = inbox.lock().unwrap_or_else(|p| p.into_inner());
            if message.contains_key("QMP") {
                inbox.greeted = true;
            } else if let Some(Value::String(name)) = message.remove("event") {
                let data = message.remove("data").unwrap_or(Value::Null);
                inbox.events.push(QmpEvent { name, data });
            } else if let Some(id) = message.get("id").and_then(Value::as_u64) {
                let reply = match (message.remove("return"), message.remove("error")) {
                    (Some(value), _) => Ok(value),
                    (None, Some(error)) => Err((text(&error["class"]), text(&error["desc"]))),
                    (None, None) => Err(("Protocol".into(), format!("reply without return or error: {message:?}"))),
                };
                inbox.replies.insert(id, reply);
            }
            changed.notify_all();
        }
        "QEMU closed it".to_string()
    };
    inbox.lock().unwrap_or_else(|p| p.into_inner()).closed = Some(why);
    changed.notify_all();
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Qemu;
    use crate::transport::{ListeningSocket, Transport};
    use std::process::{Command, Stdio};

    /// A QEMU with no machine at all: enough to talk QMP to, in a few milliseconds.
    fn bare_qemu() -> Option<(std::process::Child, Qmp, tempfile::TempDir)> {
        let Some(binary) = Qemu::find_binary() else {
            eprintln!("SKIP: qemu-system-x86_64 not found");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let mut listener = ListeningSocket::bind(&socket).unwrap();
        let child = Command::new(binary)
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-chardev"])
            .arg(format!("socket,id=qmp,path={}", socket.display()))
            .args(["-mon", "chardev=qmp,mode=control"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = Qmp::handshake(listener.connect(deadline, None).unwrap(), deadline).unwrap();
        Some((child, qmp, dir))
    }

    #[test]
    fn commands_replies_errors_events_and_the_end() {
        let Some((mut child, qmp, _dir)) = bare_qemu() else { return };
        let soon = || Instant::now() + Duration::from_secs(20);
        let status = qmp.execute("query-status", None, soon()).unwrap();
        assert_eq!(status["status"], "running", "{status}");

        let err = qmp.execute("no-such-command", None, soon()).unwrap_err();
        assert!(matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"), "{err}");

        qmp.execute("stop", None, soon()).unwrap();
        let stop = qmp.wait_for_event("STOP", |e| e.name == "STOP", soon()).unwrap();
        assert_eq!(stop.name, "STOP");
        let none = qmp.wait_for_event("RESUME", |e| e.name == "RESUME", Instant::now() + Duration::from_millis(50));
        assert!(matches!(none, Err(QmpError::Timeout { .. })), "{none:?}");
        assert!(qmp.human_monitor_command("info status", soon()).unwrap().contains("paused"));

        qmp.execute("quit", None, soon()).ok();
        child.wait().unwrap();
        let after = qmp.execute("query-status", None, soon()).unwrap_err();
        assert!(matches!(after, QmpError::Closed(_) | QmpError::Io(_)), "{after}");
    }
}
