//! The socket a script's Python threads connect to (each thread its own connection): a thread per
//! connection answers its requests in order. The listener holds the driver weakly, so the driver
//! goes (and tears down) once the runner and the last running call are done with it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Weak};

use attest_driver::Driver;

use crate::dispatch::{Reply, Request, Session};

/// Accepts connections on `listener` for as long as the driver exists.
pub fn serve(driver: Weak<Driver>, listener: UnixListener) {
    std::thread::Builder::new()
        .name("script-server".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let (Ok(stream), Some(driver)) = (stream, driver.upgrade()) else { break };
                std::thread::spawn(move || serve_connection(&driver, stream));
            }
        })
        .expect("starting the script server thread");
}

fn serve_connection(driver: &Arc<Driver>, stream: UnixStream) {
    let Ok(reader) = stream.try_clone() else { return };
    let mut writer = stream;
    let mut session = Session::new(driver);
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => session.handle(&request),
            Err(e) => Reply::Err { kind: "machine", message: format!("unreadable request from the script: {e}") },
        };
        let Ok(mut bytes) = serde_json::to_vec(&reply) else { break };
        bytes.push(b'\n');
        if writer.write_all(&bytes).is_err() {
            break;
        }
    }
}
