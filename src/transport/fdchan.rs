//! A channel over one non-blocking file descriptor (socket or pipe).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Child;
use std::time::Instant;

use super::{Aborter, Channel};
use crate::error::{MigError, Result};

/// A socket or pipe driven with `poll`, interruptible by an [`Aborter`].
pub struct FdChannel {
    /// None once `close` has closed a pipe (an `exec:` command's).
    fd: Option<OwnedFd>,
    name: String,
    abort: Aborter,
    is_socket: bool,
    /// The `exec:` command behind a pipe, waited for on close.
    child: Option<Child>,
    /// No wait for the peer goes past this (see [`Channel::set_deadline`]).
    deadline: Option<Instant>,
}

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `fd` is ready for `events`, the aborter fires, or the stall
/// timeout passes.
pub(super) fn wait_fd(fd: RawFd, events: libc::c_short, abort: &Aborter, what: &str) -> io::Result<()> {
    let limit = super::stall_timeout();
    wait_ready(fd, events, abort, Some(limit)).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => io::Error::new(io::ErrorKind::TimedOut, format!("no progress on {what} for {} ms", limit.as_millis())),
        _ => e,
    })
}

/// Waits until `fd` is ready for `events` or the aborter fires (ECANCELED),
/// for at most `limit` (TimedOut) or, with None, without a limit.
pub(super) fn wait_ready(fd: RawFd, events: libc::c_short, abort: &Aborter, limit: Option<std::time::Duration>) -> io::Result<()> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        let timeout_ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut pfds = [libc::pollfd { fd, events, revents: 0 }, libc::pollfd { fd: abort.raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: two valid pollfds in a live array.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfds[1].revents != 0 {
            return Err(io::Error::from_raw_os_error(libc::ECANCELED));
        }
        if pfds[0].revents != 0 {
            return Ok(());
        }
    }
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into a zeroed, live stat struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

impl FdChannel {
    /// Wraps `fd` (made non-blocking) under `name`; on failure `fd` is
    /// dropped (closed).
    pub fn new(fd: OwnedFd, name: String, abort: Aborter) -> Result<FdChannel> {
        FdChannel::try_new(fd, name, abort).map_err(|(e, _fd)| e)
    }

    /// [`FdChannel::new`], but a failure hands `fd` back (open) with the
    /// error, for a caller that must leave it with its owner.
    pub fn try_new(fd: OwnedFd, name: String, abort: Aborter) -> std::result::Result<FdChannel, (MigError, OwnedFd)> {
        if let Err(e) = set_nonblocking(fd.as_raw_fd()) {
            return Err((MigError::io(format!("{name}: set non-blocking"), e), fd));
        }
        let is_socket = is_socket(fd.as_raw_fd());
        Ok(FdChannel { fd: Some(fd), name, abort, is_socket, child: None, deadline: None })
    }

    /// Attaches the `exec:` child whose pipe this is.
    pub(super) fn with_child(mut self, child: Child) -> FdChannel {
        self.child = Some(child);
        self
    }
}

impl FdChannel {
    /// The descriptor, or -1 once closed (every call on it then fails
    /// with EBADF).
    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Waits for `events` on the channel: at most the stall timeout, and
    /// not past the deadline.
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        // A device section's load waits without the host lock.
        crate::host::unlocked_while_waiting(|| self.poll_ready(events))
    }

    /// [`FdChannel::wait`] itself.
    fn poll_ready(&self, events: libc::c_short) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return wait_fd(self.raw(), events, &self.abort, &self.name);
        };
        let stall = super::stall_timeout();
        let left = deadline.saturating_duration_since(Instant::now());
        if left >= stall {
            return wait_fd(self.raw(), events, &self.abort, &self.name);
        }
        wait_ready(self.raw(), events, &self.abort, Some(left)).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => io::Error::new(io::ErrorKind::TimedOut, "deadline passed"),
            _ => e,
        })
    }
}

impl Channel for FdChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.abort.check()?;
        loop {
            // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
            let r = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.wait(libc::POLLIN)?,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.abort.check()?;
        loop {
            let fd = self.raw();
            // SAFETY: `buf` is a live slice of `buf.len()` readable bytes.
            let r = crate::write_without_sigpipe(|| unsafe {
                if self.is_socket {
                    libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
                } else {
                    libc::write(fd, buf.as_ptr().cast(), buf.len())
                }
            });
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.wait(libc::POLLOUT)?,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let iov = &iov[..iov.len().min(1024)]; // IOV_MAX
        self.abort.check()?;
        loop {
            let fd = self.raw();
            // SAFETY: `iov` is a live array of iovecs the caller guarantees
            // readable; msghdr points at it for the duration of the call.
            let r = crate::write_without_sigpipe(|| unsafe {
                if self.is_socket {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                    msg.msg_iovlen = iov.len() as _;
                    libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
                } else {
                    libc::writev(fd, iov.as_ptr(), iov.len() as i32)
                }
            });
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EAGAIN) => self.wait(libc::POLLOUT)?,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }

    fn close(&mut self) -> io::Result<()> {
        if self.is_socket {
            // SAFETY: shutdown on our own socket; the fd stays open until drop.
            unsafe { libc::shutdown(self.raw(), libc::SHUT_WR) };
        }
        if let Some(mut child) = self.child.take() {
            // Close our end of the pipe first so the command sees EOF (or
            // EPIPE), then reap it. (Closing takes no new descriptor: it
            // works in a process at its RLIMIT_NOFILE.)
            self.fd = None;
            match super::exec::wait_child(&mut child, &self.abort, self.deadline)? {
                Some(status) if !status.success() => return Err(io::Error::other(format!("command exited with {status}"))),
                Some(_) => {}
                None => log::info!("{}: the command has exited; its status is unknown (SIGCHLD is ignored)", self.name),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    fn bidirectional(&self) -> bool {
        self.is_socket
    }

    fn aborter(&self) -> Option<Aborter> {
        Some(self.abort.clone())
    }

    fn exit_note(&mut self) -> Option<String> {
        // A write failed: a command that is exiting has done so within
        // moments. A status seen here is kept by `Child` for `close`.
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + std::time::Duration::from_millis(100);
        loop {
            match super::exec::try_reap(child) {
                Ok(Some(Some(st))) => return (!st.success()).then(|| format!("the command exited with {st}")),
                Ok(Some(None)) => return None,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(2)),
                _ => return None,
            }
        }
    }

    fn wait_readable(&self) -> io::Result<()> {
        self.abort.check()?;
        // A read of no bytes consumes nothing and returns at once, but
        // fails on a descriptor that cannot be read at all (the write end
        // of a pipe): that is reported now, not waited on forever.
        let mut none = [0u8; 0];
        // SAFETY: a read of 0 bytes into a live (empty) buffer.
        if unsafe { libc::read(self.raw(), none.as_mut_ptr().cast(), 0) } < 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                return Err(e);
            }
        }
        wait_ready(self.raw(), libc::POLLIN, &self.abort, None)
    }

    fn peer_closed(&self) -> bool {
        if !self.is_socket {
            return false;
        }
        let mut pfd = libc::pollfd { fd: self.raw(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

impl Drop for FdChannel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::exec::kill(&mut child);
            let _ = child.wait();
        }
    }
}
