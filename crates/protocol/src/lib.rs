//! The wire protocol between the attest host and the attest guest agent (PID 1 of `attest exec` guests).
//!
//! One byte stream carries framed messages both ways: `kind: u8, length: u32 LE, payload`.
//! Stream data (stdin, stdout, stderr) travels as raw bytes so that binary output stays byte-exact and cheap;
//! control messages are JSON so they stay readable in a hex dump and easy to extend.
//! Byte strings that need not be UTF-8 (argv, environment, paths) travel as `Vec<u8>`.

use std::io::{self, Read, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent speaks on (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT: &str = "attest.agent";

/// Where an attest initramfs lists the kernel modules its init loads: one path per line,
/// dependencies first.
pub const MODULE_LIST: &str = "/etc/attest/modules";

/// Kernel command-line parameter that moves the agent to vsock, for VMMs without virtio-serial:
/// `attest.channel=vsock:PORT` makes the agent connect to the host (CID 2) on PORT.
pub const CHANNEL_PARAM: &str = "attest.channel";

/// The vsock port the agent connects to when told to use vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Largest payload a frame may carry: room for a start request with argv and environment at the
/// kernel's own limits, JSON-encoded. Stream data travels in [`CHUNK`]s.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// A stream chunk size that keeps frames well under [`MAX_PAYLOAD`] while amortising the header.
pub const CHUNK: usize = 64 * 1024;

/// Stdin bytes the host may send before the guest has written them to the program. The guest
/// returns credit ([`Frame::StdinCredit`]) as the program consumes its input, so stdin never backs
/// up the shared channel and control frames always get through.
pub const STDIN_WINDOW: u64 = 4 * CHUNK as u64;

/// Filesystem that carries a host directory into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareFs {
    Virtiofs,
    #[serde(rename = "9p")]
    NineP,
}

impl ShareFs {
    /// The guest kernel modules that mount this filesystem.
    pub fn guest_drivers(self) -> &'static [&'static str] {
        match self {
            ShareFs::Virtiofs => &["virtiofs"],
            ShareFs::NineP => &["9p", "9pnet_virtio"],
        }
    }
}

/// One host directory to mount in the guest. A `guest_path` of `/` is the root the program runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub tag: String,
    pub fs: ShareFs,
    pub guest_path: Vec<u8>,
    pub read_only: bool,
}

/// What the host asks the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Vec<u8>,
    /// Mounted in order; the root mount (guest path `/`) comes first.
    pub mounts: Vec<Mount>,
    /// Directories of the new root made privately writable, before the other mounts.
    pub scratch: Vec<Scratch>,
    /// The guest's hostname (the host's, since the program sees the host's `/etc/hosts`).
    pub hostname: Vec<u8>,
    /// Interfaces to configure besides loopback, which is always brought up.
    pub network: Network,
    /// Run the program on a pseudo-terminal of this size (its stdin, stdout and stderr, and its
    /// controlling terminal), instead of on pipes. Output then arrives as [`Frame::Stdout`] only.
    pub terminal: Option<WindowSize>,
}

/// An empty `argv` in [`Start`] asks for an interactive shell: `$SHELL` from the program's
/// environment if it exists in the guest, else the first of these that does.
pub const FALLBACK_SHELLS: [&str; 2] = ["/bin/bash", "/bin/sh"];

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The guest's network configuration, applied by the agent before the program starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub interfaces: Vec<Interface>,
    /// Written to the guest's view of `/etc/resolv.conf` when not empty.
    pub nameservers: Vec<IpAddr>,
}

/// One network card, found in the guest by its MAC address, so device naming does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub mac: [u8; 6],
    pub addresses: Vec<IpPrefix>,
    /// Default route through this interface.
    pub gateway: Option<IpAddr>,
}

/// `52:54:00:12:34:56`, as QEMU and `ip link` write MAC addresses.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An address with its prefix length, e.g. 10.0.2.15/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A privately writable directory: a fresh tmpfs, or the host's directory seen through an overlay
/// whose upper layer is a tmpfs (reads see the host's files, writes stay in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scratch {
    pub path: Vec<u8>,
    pub over_host: bool,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit status {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Control messages from host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    Start(Start),
    /// The host terminal was resized (only for a program on a pseudo-terminal).
    Resize(WindowSize),
}

/// Control messages from guest to host. Times are guest uptime in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// The agent is up and waits for [`HostMessage::Start`].
    Ready { kernel_ms: u64, modules_ms: u64, ready_ms: u64 },
    /// Mounts are done and the program was spawned.
    Started { started_ms: u64 },
    /// The program ended and its output streams are drained.
    Exited { status: ExitStatus, exited_ms: u64 },
    /// The agent could not do what was asked; the VM is about to power off.
    Failed { stage: FailedStage, message: String },
}

/// What the agent was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailedStage {
    /// Configuring the network or the hostname.
    Network,
    /// Mounting the host's files and entering the new root.
    Mount,
    /// Starting or running the program.
    Run,
}

impl std::fmt::Display for FailedStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailedStage::Network => "configuring the network",
            FailedStage::Mount => "mounting the host's files",
            FailedStage::Run => "starting the program",
        })
    }
}

/// One unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Host(HostMessage),
    Guest(GuestMessage),
    Stdin(Vec<u8>),
    StdinEof,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The host's reader of the program's stdout (or stderr) went away: like a closed pipe, the
    /// program's next write there should fail with EPIPE/SIGPIPE.
    StdoutClosed,
    StderrClosed,
    /// The guest wrote this many more stdin bytes to the program (see [`STDIN_WINDOW`]).
    StdinCredit(u64),
}

const KIND_HOST: u8 = 1;
const KIND_GUEST: u8 = 2;
const KIND_STDIN: u8 = 3;
const KIND_STDIN_EOF: u8 = 4;
const KIND_STDOUT: u8 = 5;
const KIND_STDERR: u8 = 6;
const KIND_STDOUT_CLOSED: u8 = 7;
const KIND_STDERR_CLOSED: u8 = 8;
const KIND_STDIN_CREDIT: u8 = 9;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Frame {
    /// Writes the frame as one `write_all` so concurrent writers behind a lock never interleave.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let json;
        let credit;
        let (kind, payload): (u8, &[u8]) = match self {
            Frame::Host(m) => {
                json = serde_json::to_vec(m).map_err(io::Error::other)?;
                (KIND_HOST, &json)
            }
            Frame::Guest(m) => {
                json = serde_json::to_vec(m).map_err(io::Error::other)?;
                (KIND_GUEST, &json)
            }
            Frame::Stdin(b) => (KIND_STDIN, b),
            Frame::StdinEof => (KIND_STDIN_EOF, &[]),
            Frame::Stdout(b) => (KIND_STDOUT, b),
            Frame::Stderr(b) => (KIND_STDERR, b),
            Frame::StdoutClosed => (KIND_STDOUT_CLOSED, &[]),
            Frame::StderrClosed => (KIND_STDERR_CLOSED, &[]),
            Frame::StdinCredit(bytes) => {
                credit = bytes.to_le_bytes();
                (KIND_STDIN_CREDIT, &credit)
            }
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(invalid(format!("frame payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len())));
        }
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(payload);
        w.write_all(&buf)?;
        w.flush()
    }

    /// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut header = [0u8; 5];
        if !read_exact_or_eof(r, &mut header)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes(header[1..5].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return Err(invalid(format!("frame length {len} exceeds {MAX_PAYLOAD}")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        let json_err = |e: serde_json::Error| invalid(format!("bad control message: {e}"));
        Ok(Some(match header[0] {
            KIND_HOST => Frame::Host(serde_json::from_slice(&payload).map_err(json_err)?),
            KIND_GUEST => Frame::Guest(serde_json::from_slice(&payload).map_err(json_err)?),
            KIND_STDIN => Frame::Stdin(payload),
            KIND_STDIN_EOF => Frame::StdinEof,
            KIND_STDOUT => Frame::Stdout(payload),
            KIND_STDERR => Frame::Stderr(payload),
            KIND_STDOUT_CLOSED => Frame::StdoutClosed,
            KIND_STDERR_CLOSED => Frame::StderrClosed,
            KIND_STDIN_CREDIT => Frame::StdinCredit(u64::from_le_bytes(
                payload.as_slice().try_into().map_err(|_| invalid(format!("stdin credit of {len} bytes")))?,
            )),
            other => return Err(invalid(format!("unknown frame kind {other}"))),
        }))
    }
}

/// Fills `buf`, returning `false` if the stream ended before the first byte.
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) {
        let mut buf = Vec::new();
        frame.write_to(&mut buf).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(Frame::read_from(&mut r).unwrap(), Some(frame));
        assert_eq!(Frame::read_from(&mut r).unwrap(), None);
    }

    #[test]
    fn frames_roundtrip_byte_exact() {
        roundtrip(Frame::Stdout((0..=255).collect()));
        roundtrip(Frame::Stderr(Vec::new()));
        roundtrip(Frame::StdinEof);
        roundtrip(Frame::StdoutClosed);
        roundtrip(Frame::StderrClosed);
        roundtrip(Frame::StdinCredit(u64::MAX - 1));
        roundtrip(Frame::Host(HostMessage::Start(Start {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo 'a\"b'\n\xff".to_vec()],
            env: vec![(b"K".to_vec(), b"v\x00 w".to_vec())],
            cwd: b"/tmp/x y".to_vec(),
            mounts: vec![Mount { tag: "root".into(), fs: ShareFs::NineP, guest_path: b"/".to_vec(), read_only: true }],
            scratch: vec![Scratch { path: b"/tmp".to_vec(), over_host: true }],
            hostname: b"host".to_vec(),
            network: Network {
                interfaces: vec![Interface {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    addresses: vec![IpPrefix { addr: "10.0.2.15".parse().unwrap(), len: 24 }],
                    gateway: Some("10.0.2.2".parse().unwrap()),
                }],
                nameservers: vec!["10.0.2.3".parse().unwrap()],
            },
            terminal: Some(WindowSize { rows: 24, cols: 80 }),
        })));
        roundtrip(Frame::Host(HostMessage::Resize(WindowSize { rows: 50, cols: 132 })));
        roundtrip(Frame::Guest(GuestMessage::Failed { stage: FailedStage::Mount, message: "no".into() }));
        roundtrip(Frame::Guest(GuestMessage::Exited { status: ExitStatus::Signal(9), exited_ms: 3 }));
    }

    #[test]
    fn truncated_frame_is_an_error_not_eof() {
        let mut buf = Vec::new();
        Frame::Stdout(vec![1, 2, 3]).write_to(&mut buf).unwrap();
        buf.pop();
        assert!(Frame::read_from(&mut buf.as_slice()).is_err());
    }

    #[test]
    fn oversized_and_unknown_frames_are_rejected() {
        let mut big = vec![KIND_STDOUT];
        big.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        assert!(Frame::read_from(&mut big.as_slice()).is_err());
        assert!(Frame::read_from(&mut [99u8, 0, 0, 0, 0].as_slice()).is_err());
        assert!(Frame::Stdout(vec![0; MAX_PAYLOAD + 1]).write_to(&mut Vec::new()).is_err());
    }
}
