//! Getting hold of a fresh user+net namespace without entering it: a short-lived helper process
//! (`true`, after a `pre_exec` hook) unshares both, opens an rtnetlink socket and the `/dev/net/tun`
//! files there, and passes them back over a socket pair. The objects stay bound to the new
//! namespace, and keep it alive, after the helper is gone.
//!
//! A helper is needed because the caller is multi-threaded, and only a single-threaded process may
//! join a user namespace; the forked child is single-threaded.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libc::c_int;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};

use crate::error::{NetworkError, Result};

/// Creating namespaces and opening a few files takes milliseconds; this only bounds a stuck kernel.
const HELPER_DEADLINE: Duration = Duration::from_secs(10);

/// Descriptors per message: the kernel takes at most 253 (SCM_MAX_FD) in one.
const BATCH: usize = 250;

/// Room for one SCM_RIGHTS message of BATCH descriptors.
// SAFETY: CMSG_SPACE only computes a size.
const CONTROL_BYTES: usize = unsafe { libc::CMSG_SPACE((BATCH * std::mem::size_of::<c_int>()) as u32) } as usize;

/// The cmsg buffer on the helper's stack, aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// The first byte of each message from the helper: descriptors follow, or which step failed (the
/// errno follows in bytes 4..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Report {
    Descriptors = 0,
    Unshare = 1,
    NetlinkSocket = 2,
    OpenTun = 3,
}

const REPORT_BYTES: usize = 8;

/// What the helper opened in the new namespace.
pub(super) struct NamespaceFds {
    pub netlink: OwnedFd,
    pub tuns: Vec<OwnedFd>,
}

/// Creates a user+net namespace and returns an rtnetlink socket and `tun_count` unattached
/// `/dev/net/tun` files in it.
pub(super) fn create(tun_count: usize) -> Result<NamespaceFds> {
    let deadline = Instant::now() + HELPER_DEADLINE;
    let true_program = which::which("true").map_err(|_| NetworkError::MissingProgram {
        program: "true",
        purpose: "to create the TAP network's namespace".into(),
        fix: "install coreutils",
    })?;
    let (ours, helpers) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(|e| {
            NetworkError::Io { what: "creating a socket pair for the namespace helper".into(), source: e.into() }
        })?;

    // A full socket buffer (thousands of TAPs) must fail the helper, not block it and spawn forever.
    limit_send_time(&helpers, HELPER_DEADLINE)
        .map_err(NetworkError::io("setting a send timeout for the namespace helper"))?;
    let helper_end = helpers.as_raw_fd();
    let mut command = Command::new(&true_program);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: the hook runs in the forked child of a multi-threaded process, where only
    // async-signal-safe calls are sound. `open_in_new_namespace` makes raw syscalls only, on an fd
    // number and a count copied into the closure before the fork, with stack buffers: it neither
    // allocates nor takes locks.
    unsafe { command.pre_exec(move || open_in_new_namespace(helper_end, tun_count)) };
    let spawned = command.spawn();
    // Our copy of the helper's end must go, so that its exit reads as end of file.
    drop(command);
    drop(helpers);

    let received = receive(&ours, 1 + tun_count, deadline);
    let spawn_error = match spawned {
        Ok(child) => {
            reap(child, deadline);
            None
        }
        // spawn has reaped a helper whose hook or exec failed; its report, if any, is in `received`.
        Err(error) => Some(error),
    };
    let mut fds = match received {
        Ok(fds) => {
            if let Some(error) = spawn_error {
                // Everything arrived before the exec: the helper's job is done all the same.
                tracing::debug!("the namespace helper could not exec true: {error}");
            }
            fds
        }
        Err(Received::Ended) => {
            let source = spawn_error.unwrap_or_else(|| io::Error::other("it ended before sending its descriptors"));
            return Err(NetworkError::Io { what: "the TAP network's namespace helper".into(), source });
        }
        Err(Received::Failed(error)) => return Err(error),
    };
    let tuns = fds.split_off(1);
    Ok(NamespaceFds { netlink: fds.remove(0), tuns })
}

enum Received {
    /// The helper closed its end before sending everything, without saying why.
    Ended,
    Failed(NetworkError),
}

/// Collects `expected` descriptors from the helper, or its report of the step that failed.
fn receive(socket: &OwnedFd, expected: usize, deadline: Instant) -> Result<Vec<OwnedFd>, Received> {
    let failed = |what: &str, source: io::Error| Received::Failed(NetworkError::Io { what: what.into(), source });
    let mut fds = Vec::with_capacity(expected);
    while fds.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(failed("waiting for the namespace helper", io::ErrorKind::TimedOut.into()));
        }
        let timeout = PollTimeout::try_from(remaining).unwrap_or(PollTimeout::MAX);
        let mut poll_fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut poll_fds, timeout) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(failed("waiting for the namespace helper", e.into())),
        }
        let mut report = [0u8; REPORT_BYTES];
        let mut control = nix::cmsg_space!([RawFd; BATCH]);
        let mut iov = [IoSliceMut::new(&mut report)];
        let message = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(message) => message,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => continue,
            Err(e) => return Err(failed("receiving from the namespace helper", e.into())),
        };
        let (bytes, truncated) = (message.bytes, message.flags.contains(MsgFlags::MSG_CTRUNC));
        for control_message in message.cmsgs().map_err(|e| failed("reading the helper's message", e.into()))? {
            if let ControlMessageOwned::ScmRights(raw_fds) = control_message {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone;
                // each is wrapped once, right away, so it is closed on every path.
                fds.extend(raw_fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if truncated {
            return Err(failed("receiving from the namespace helper", io::Error::other("descriptors were truncated")));
        }
        if bytes == 0 {
            return Err(Received::Ended);
        }
        let errno = i32::from_ne_bytes(report[4..8].try_into().expect("four bytes"));
        let source = io::Error::from_raw_os_error(errno);
        match report[0] {
            step if step == Report::Descriptors as u8 => {}
            step if step == Report::Unshare as u8 => {
                let refused = [libc::EPERM, libc::EINVAL, libc::ENOSPC, libc::EUSERS, libc::EACCES].contains(&errno);
                return Err(Received::Failed(if refused {
                    NetworkError::NoNamespaces { source }
                } else {
                    NetworkError::Io { what: "creating a user and network namespace".into(), source }
                }));
            }
            step if step == Report::OpenTun as u8 => {
                return Err(Received::Failed(NetworkError::NoTunDevice { source }))
            }
            _ => return Err(failed("creating an rtnetlink socket in the new namespace", source)),
        }
    }
    Ok(fds)
}

/// Reaps the helper, which has exec'd `true` by now, killing it if it has not exited by the deadline.
fn reap(mut child: Child, deadline: Instant) {
    if !exits_before(&child, deadline) {
        tracing::warn!("the namespace helper (pid {}) did not exit; killing it", child.id());
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Waits on a pidfd, which becomes readable when the process exits. Without pidfds (Linux < 5.3)
/// this says no, and `true` is killed: it has nothing left to do.
fn exits_before(child: &Child, deadline: Instant) -> bool {
    // SAFETY: pidfd_open takes a pid and flags; the child is not reaped yet, so the pid is its own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if pidfd < 0 {
        return false;
    }
    // SAFETY: pidfd_open's new descriptor is ours alone, wrapped once.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(remaining).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)], timeout) {
            Ok(ready) => return ready > 0,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Sets SO_SNDTIMEO, so that a send on `socket` fails with EAGAIN after `limit` instead of waiting.
fn limit_send_time(socket: &OwnedFd, limit: Duration) -> io::Result<()> {
    let timeout = libc::timeval { tv_sec: limit.as_secs() as libc::time_t, tv_usec: 0 };
    let size = std::mem::size_of_val(&timeout) as libc::socklen_t;
    let value = std::ptr::from_ref(&timeout).cast();
    // SAFETY: SO_SNDTIMEO reads one timeval of the given size, which lives across the call.
    if unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDTIMEO, value, size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The helper's work, in the forked child before exec: raw syscalls only, no allocation (see the
/// SAFETY note at `pre_exec`). A failing step is reported over `socket` and fails the exec.
fn open_in_new_namespace(socket: c_int, tun_count: usize) -> io::Result<()> {
    let fail = |step: Report| {
        let error = io::Error::last_os_error();
        let _ = send(socket, step, error.raw_os_error().unwrap_or(libc::EIO), &[]);
        Err(error)
    };
    // SAFETY: unshare takes flags only; the child is single-threaded, as CLONE_NEWUSER requires.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        return fail(Report::Unshare);
    }
    // SAFETY: socket takes integers only; the new descriptor is closed at exec (SOCK_CLOEXEC).
    let netlink = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if netlink < 0 {
        return fail(Report::NetlinkSocket);
    }
    send(socket, Report::Descriptors, 0, &[netlink])?;

    let mut batch = [0 as c_int; BATCH];
    let mut filled = 0;
    for opened in 1..=tun_count {
        // SAFETY: the path is a static NUL-terminated string; the descriptor is closed at exec
        // (O_CLOEXEC) if not before.
        let tun = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if tun < 0 {
            return fail(Report::OpenTun);
        }
        batch[filled] = tun;
        filled += 1;
        if filled == BATCH || opened == tun_count {
            send(socket, Report::Descriptors, 0, &batch[..filled])?;
            for fd in &batch[..filled] {
                // SAFETY: our own descriptor, sent already, so the parent holds its own copy.
                unsafe { libc::close(*fd) };
            }
            filled = 0;
        }
    }
    Ok(())
}

/// Sends one report, with `fds` (at most BATCH) attached, from buffers on the stack.
fn send(socket: c_int, report: Report, errno: c_int, fds: &[c_int]) -> io::Result<()> {
    let mut payload = [0u8; REPORT_BYTES];
    payload[0] = report as u8;
    payload[4..8].copy_from_slice(&errno.to_ne_bytes());
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    // SAFETY: msghdr is plain old data, for which all zeroes (no name, no control) is valid.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        header.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size, at most CONTROL_BYTES as fds.len() <= BATCH.
        header.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // SAFETY: msg_control points to msg_controllen aligned bytes of `control`, enough for one
        // header and `fds`, which are copied into its data; all of it lives across the sendmsg.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<c_int>(), fds.len());
        }
    }
    // SAFETY: the header and everything it points to live across the call.
    if unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
