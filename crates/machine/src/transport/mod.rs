//! Guest command channels: how attest gets a byte stream to a program inside the guest (the attest
//! agent, or later the NixOS backdoor shell). Backends differ in plumbing, not in what comes out:
//! QEMU exposes a virtio-serial port or a guest's vsock connection (through vhost-device-vsock's
//! hybrid sockets) as a host unix socket it connects to; Firecracker's hybrid vsock is the same for
//! guest-initiated connections, plus a `CONNECT <port>` handshake for host-initiated ones. Either
//! way the result is a `UnixStream`.

pub mod listening;

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub use listening::ListeningSocket;

pub trait Transport: Send {
    /// Waits until the channel is connected, at most until `deadline`, and returns the stream.
    /// With `unless`, gives up (`BrokenPipe`) as soon as that fd becomes readable or hangs up:
    /// [`crate::Vm::exit_fd`] does when the VMM exits, which then can never connect.
    fn connect(&mut self, deadline: Instant, unless: Option<BorrowedFd<'_>>) -> io::Result<UnixStream>;

    /// Where the channel lives, for error messages.
    fn describe(&self) -> String;
}
