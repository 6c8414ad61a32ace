//! Guest command channels: how attest gets a byte stream to a program inside the guest (the attest
//! agent, or later the NixOS backdoor shell). Backends differ in plumbing, not in what comes out:
//! QEMU and Cloud Hypervisor expose a virtio-serial port as a host unix socket; Firecracker's hybrid
//! vsock is a unix socket plus a `CONNECT <port>` handshake. Either way the result is a `UnixStream`.

pub mod virtio_serial;

use std::io;
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub use virtio_serial::VirtioSerialSocket;

pub trait Transport: Send {
    /// Waits until the channel is connected, at most until `deadline`, and returns the stream.
    fn connect(&mut self, deadline: Instant) -> io::Result<UnixStream>;

    /// Where the channel lives, for error messages.
    fn describe(&self) -> String;
}
