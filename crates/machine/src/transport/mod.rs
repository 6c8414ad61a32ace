//! Guest command channels: how attest gets a byte stream to a program inside the guest (the attest
//! agent on a virtio-serial port or vsock, the NixOS backdoor shell on a virtconsole). Backends
//! differ in plumbing, not in what comes out: QEMU connects each to a host unix socket attest
//! listens on ([`ListeningSocket`], through vhost-device-vsock's hybrid sockets for vsock). The
//! result is a `UnixStream`; Firecracker's host-initiated `CONNECT <port>` would be another
//! `Transport`.

pub mod listening;

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub use listening::ListeningSocket;

pub trait Transport: Send {
    /// Waits until the channel is connected, at most until `deadline`, and returns the stream.
    /// With `unless`, gives up (`BrokenPipe`) as soon as that fd becomes readable or hangs up:
    /// [`crate::Vm::exit_watch`] does when the VMM exits, which then can never connect.
    fn connect(&mut self, deadline: Instant, unless: Option<BorrowedFd<'_>>) -> io::Result<UnixStream>;

    /// Where the channel lives, for error messages.
    fn describe(&self) -> String;
}
