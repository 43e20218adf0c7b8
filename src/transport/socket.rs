//! `tcp:` and `unix:` sockets: non-blocking connect and accept, keepalive.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use super::fdchan::{set_nonblocking, wait_fd, wait_ready};
use super::{Aborter, Channel, Family, FdChannel, TcpOpts};
use crate::error::{MigError, Result};

fn setsockopt_int(fd: RawFd, level: i32, name: i32, val: i32) {
    // SAFETY: passes a pointer to a live i32 and its size.
    let r = unsafe { libc::setsockopt(fd, level, name, (&val as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t) };
    if r != 0 {
        log::debug!("setsockopt({level}, {name}) failed: {}", io::Error::last_os_error());
    }
}

/// Keepalive so that a dead peer is noticed even while nothing is sent, and
/// a user timeout so that unacknowledged data fails the stream: the io
/// timeout (`livemig_set_io_timeout`), so that the kernel never gives up
/// sooner than livemig would.
fn tune_tcp(fd: RawFd) {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
    let user_timeout = super::stall_timeout().as_millis().min(i32::MAX as u128) as i32;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout);
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn connect_one(addr: &SocketAddr, abort: &Aborter, text: &str) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (ss, len) = sockaddr_of(addr);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(raw, (&ss as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        wait_fd(raw, libc::POLLOUT, abort, text)?;
        let mut err: i32 = 0;
        let mut elen = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: getsockopt writes an i32 into `err`, whose size is in `elen`.
        unsafe { libc::getsockopt(raw, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut elen) };
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    Ok(fd)
}

/// The addresses of `host:port`. An address literal needs no lookup; a
/// name is looked up on a short-lived thread, so that a cancel or the
/// stall timeout ends the wait even while the resolver hangs (the thread
/// then ends on its own when the lookup returns).
fn resolve(host: &str, port: u16, abort: &Aborter) -> io::Result<Vec<SocketAddr>> {
    use std::sync::mpsc::RecvTimeoutError;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::Builder::new().name("livemig-resolve".into()).spawn(move || {
        let _ = tx.send((name.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    })?;
    let limit = super::stall_timeout();
    let deadline = std::time::Instant::now() + limit;
    loop {
        abort.check()?;
        match rx.recv_timeout(std::time::Duration::from_millis(10)) {
            Ok(r) => return r,
            Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer resolving '{host}' for {} ms", limit.as_millis())))
            }
            Err(RecvTimeoutError::Disconnected) => return Err(io::Error::other("the resolver thread ended without an answer")),
        }
    }
}

/// The addresses of `family` among `addrs`; none is an error, with
/// getaddrinfo's text (EAI_ADDRFAMILY), as QEMU 7.2 reports it.
fn of_family(addrs: Vec<SocketAddr>, family: Family) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        })
        .collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "Address family for hostname not supported"));
    }
    Ok(addrs)
}

/// Connects to `host:port`, trying each resolved address of `family` in
/// turn.
pub fn connect_tcp(host: &str, port: u16, family: Family, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    let fail = |e: io::Error| MigError::io(format!("Failed to connect to '{host}:{port}'"), e);
    let addrs = resolve(host, port, abort).and_then(|a| of_family(a, family)).map_err(fail)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in &addrs {
        match connect_one(addr, abort, text) {
            Ok(fd) => {
                tune_tcp(fd.as_raw_fd());
                log::info!("connected to {addr} for {text}");
                return Ok(Box::new(FdChannel::new(fd, text.to_string(), abort.clone())?));
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => return Err(fail(e)),
            Err(e) => last = e,
        }
    }
    Err(fail(last))
}

/// Connects to the unix socket at `path`.
pub fn connect_unix(path: &str, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    let fd = connect_unix_fd(path, abort, text).map_err(|e| MigError::io(format!("Failed to connect to '{path}'"), e))?;
    Ok(Box::new(FdChannel::new(fd, text.to_string(), abort.clone())?))
}

/// A non-blocking connect to the unix socket at `path`. A listener whose
/// backlog is full refuses it with EAGAIN (there is nothing to poll for):
/// it is retried every 10 ms until the stall timeout, and a cancel ends
/// the wait.
fn connect_unix_fd(path: &str, abort: &Aborter, text: &str) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"));
    }
    if bytes.len() >= sun.sun_path.len() {
        // QEMU 7.2's words, and the limit (as `listen_unix` says it).
        let why = format!("UNIX socket path '{path}' is too long (a socket path must be shorter than {} bytes)", sun.sun_path.len());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    for (d, &b) in sun.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = std::time::Instant::now() + super::stall_timeout();
    loop {
        abort.check()?;
        // SAFETY: `sun` is a valid sockaddr_un of at least `len` bytes.
        if unsafe { libc::connect(raw, (&sun as *const libc::sockaddr_un).cast(), len) } == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) if std::time::Instant::now() < deadline => {
                // Sleeps 10 ms unless the aborter fires.
                match wait_ready(abort.raw_fd(), 0, abort, Some(std::time::Duration::from_millis(10))) {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    r => r?,
                }
            }
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no progress on {text} for {} ms (the listener's backlog stays full)", super::stall_timeout().as_millis()),
                ))
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

/// A listening socket, or for a `tcp:` host name one per address it
/// resolves to, waiting for one source.
pub struct SocketListener {
    fds: Vec<OwnedFd>,
    name: String,
    abort: Aborter,
    port: Option<u16>,
    /// A `unix:` listener's path, and the device and inode of its socket
    /// file there (removed on drop only if it is still this one).
    unix_path: Option<(String, (u64, u64))>,
}

impl SocketListener {
    /// The bound TCP port.
    pub fn local_port(&self) -> Option<u16> {
        self.port
    }

    /// Waits for one connection on any of the sockets; they are all
    /// closed afterwards.
    pub fn accept(self) -> Result<Box<dyn Channel>> {
        let fail = |e: io::Error| MigError::io(format!("{}: accept", self.name), e);
        loop {
            for fd in &self.fds {
                // SAFETY: accept4 with NULL address pointers is allowed.
                let c = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                if c >= 0 {
                    // SAFETY: `c` is a fresh descriptor owned by nobody else.
                    let fd = unsafe { OwnedFd::from_raw_fd(c) };
                    if self.port.is_some() {
                        tune_tcp(c);
                    }
                    return FdChannel::new(fd, self.name.clone(), self.abort.clone()).map(|c| Box::new(c) as Box<dyn Channel>);
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED) => {}
                    _ => return Err(fail(e)),
                }
            }
            // Waiting for the source has no stall limit; only a cancel ends it.
            self.wait_any().map_err(fail)?;
        }
    }

    /// Waits until a connection is pending on one of the sockets, or a
    /// cancel.
    fn wait_any(&self) -> io::Result<()> {
        let mut pfds: Vec<libc::pollfd> =
            self.fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        pfds.push(libc::pollfd { fd: self.abort.raw_fd(), events: libc::POLLIN, revents: 0 });
        loop {
            // SAFETY: `pfds` is a live array of `pfds.len()` pollfds.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfds.last().is_some_and(|p| p.revents != 0) {
                return Err(io::Error::from_raw_os_error(libc::ECANCELED));
            }
            return Ok(());
        }
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        if let Some((p, id)) = &self.unix_path {
            // Not a socket another listener has bound at the path since.
            if file_id(p).ok() == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The device and inode of the file at `path` (not following a link).
fn file_id(path: &str) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(path)?;
    Ok((md.dev(), md.ino()))
}

/// Binds `host:port` (empty host: every address, IPv4 and IPv6, as QEMU's
/// `tcp::PORT` listens; a name: every address it resolves to, as QEMU
/// listens on each; port 0: any free port), of the families `opts` asks
/// for; with `opts.to`, the first port from `port` to `to` that is free,
/// as QEMU's `,to=` does.
pub fn listen_tcp(host: &str, port: u16, opts: TcpOpts, text: &str, abort: &Aborter) -> Result<SocketListener> {
    let fail = |e: io::Error| MigError::io(format!("Failed to bind socket for '{text}'"), e);
    // Looked up once, as for a connect: the stall timeout ends a resolver
    // that hangs (a cancel cannot: the start has not left idle yet, and no
    // cancel reaches its aborter).
    let addrs =
        if host.is_empty() { None } else { Some(resolve(host, port, abort).and_then(|a| of_family(a, opts.family)).map_err(fail)?) };
    let bind_at = |p: u16| -> io::Result<Vec<TcpListener>> {
        match &addrs {
            None => match opts.family {
                // One IPv6 socket that takes IPv4 too; IPv4 alone where
                // that cannot be had (no IPv6), unless the port is the
                // problem.
                Family::Any => listen_any_v6(p, false)
                    .or_else(|e| match e.raw_os_error() {
                        Some(libc::EADDRINUSE | libc::EACCES) => Err(e),
                        _ => TcpListener::bind(("0.0.0.0", p)),
                    })
                    .map(|l| vec![l]),
                Family::V4 => TcpListener::bind(("0.0.0.0", p)).map(|l| vec![l]),
                Family::V6 => listen_any_v6(p, true).map(|l| vec![l]),
            },
            // An IPv6 address takes IPv4 sources too unless `,ipv6` was
            // asked for (IPV6_V6ONLY set as QEMU 7.2's try_bind sets it,
            // whatever the system's default): `[::]` is every address.
            Some(addrs) => bind_each_with(&addrs.iter().map(|a| SocketAddr::new(a.ip(), p)).collect::<Vec<_>>(), &mut |a| {
                if a.is_ipv6() {
                    listen_v6(a, opts.family == Family::V6)
                } else {
                    TcpListener::bind(a)
                }
            }),
        }
    };
    let last = opts.to.unwrap_or(port);
    if last < port {
        return Err(fail(io::Error::new(io::ErrorKind::InvalidInput, format!("no port from {port} to {last}"))));
    }
    let mut p = port;
    let bound = loop {
        match bind_at(p) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && p < last && port != 0 => p += 1,
            r => break r,
        }
    };
    let listeners = bound.map_err(fail)?;
    let port = listeners[0].local_addr().map_err(|e| MigError::io("getsockname", e))?.port();
    let mut fds = Vec::with_capacity(listeners.len());
    for l in listeners {
        let fd = OwnedFd::from(l);
        set_nonblocking(fd.as_raw_fd()).map_err(|e| MigError::io("listener", e))?;
        fds.push(fd);
    }
    log::info!("listening on {text} (port {port}, {} address(es))", fds.len());
    // Errors name the port bound, not the 0 asked for.
    let name = text.strip_suffix(":0").map_or_else(|| text.to_string(), |t| format!("{t}:{port}"));
    Ok(SocketListener { fds, name, abort: abort.clone(), port: Some(port), unix_path: None })
}

/// Attempts of [`bind_each_with`] at a port all of a name's addresses have free.
const PORT_ATTEMPTS: usize = 8;

/// Binds each of `addrs` that can be bound with `bind`, at least one (the
/// last error otherwise); port 0 binds the first on a free port and the
/// others on that same port, so that one port number reaches them all.
/// Where another socket holds that port on a later address, it starts
/// over on another free port (up to [`PORT_ATTEMPTS`] times; the last
/// attempt's addresses otherwise): a source given the port must not
/// reach that other socket.
fn bind_each_with(addrs: &[SocketAddr], bind: &mut dyn FnMut(SocketAddr) -> io::Result<TcpListener>) -> io::Result<Vec<TcpListener>> {
    let mut attempt = 1;
    loop {
        let mut bound: Vec<TcpListener> = Vec::new();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        let mut port_taken = false;
        for addr in addrs {
            let mut addr = *addr;
            let ephemeral = addr.port() == 0;
            if let Some(first) = bound.first() {
                if ephemeral {
                    addr.set_port(first.local_addr()?.port());
                }
                if bound.iter().any(|l| l.local_addr().ok() == Some(addr)) {
                    continue;
                }
            }
            match bind(addr) {
                Ok(l) => bound.push(l),
                Err(e) => {
                    port_taken |= ephemeral && !bound.is_empty() && e.kind() == io::ErrorKind::AddrInUse;
                    log::info!("not listening on {addr}: {e}");
                    last = e;
                }
            }
        }
        if port_taken && attempt < PORT_ATTEMPTS {
            log::info!("the free port chosen is taken on another address of the name: trying another");
            attempt += 1;
            continue;
        }
        return if bound.is_empty() { Err(last) } else { Ok(bound) };
    }
}

/// A listener on every IPv6 address (`[::]`) and, unless `v6only`, every
/// IPv4 one.
fn listen_any_v6(port: u16, v6only: bool) -> io::Result<TcpListener> {
    listen_v6(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)), v6only)
}

/// A listener on the IPv6 address `addr` with IPV6_V6ONLY set as asked,
/// whatever the system default (`[::]` without it takes IPv4 sources
/// too), with std's SO_REUSEADDR and backlog.
fn listen_v6(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    // SAFETY: plain socket(2); the descriptor is owned at once below.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let only: i32 = v6only.into();
    // SAFETY: passes a pointer to a live i32 and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&only as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let (ss, len) = sockaddr_of(&addr);
    // SAFETY: `ss` holds a sockaddr_in6 of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// Removes a socket at `path`, as QEMU does before it binds: whether a
/// listener still uses it is not checked (a probe connect would reach
/// that listener as a source). Anything else there (a file, a
/// directory, a link) is the user's and is refused, not replaced.
fn remove_stale_socket(path: &str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to` unless `to` exists (then EEXIST). Where the
/// file system has no RENAME_NOREPLACE (EINVAL: NFS, some FUSE ones),
/// `to` is made a hard link of `from`, which fails the same way when `to`
/// exists, and `from` removed.
fn rename_noreplace(from: &str, to: &str) -> io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths, relative to the working directory.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => link_then_unlink(from, to),
        e => Err(e),
    }
}

/// `rename_noreplace` without RENAME_NOREPLACE: a hard link (EEXIST when
/// `to` exists), then `from` removed.
fn link_then_unlink(from: &str, to: &str) -> io::Result<()> {
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// The size of `sockaddr_un.sun_path`: a path to bind is shorter.
const SUN_PATH_LEN: usize = 108;

/// Binds the unix socket `path`, replacing a socket there (and nothing
/// else: see `remove_stale_socket`).
pub fn listen_unix(path: &str, text: &str, abort: &Aborter) -> Result<SocketListener> {
    let fail = |e: io::Error| MigError::io(format!("Failed to bind socket for '{text}'"), e);
    // Checked before anything at the path is touched (as QEMU checks it
    // before it unlinks): a path that cannot be bound must not cost
    // another listener its socket.
    if path.len() >= SUN_PATH_LEN {
        let why = format!("UNIX socket path '{path}' is too long (a socket path must be shorter than {SUN_PATH_LEN} bytes)");
        return Err(fail(io::Error::new(io::ErrorKind::InvalidInput, why)));
    }
    remove_stale_socket(path).map_err(fail)?;
    // Bind and listen under a temporary name, then rename: the path appears
    // only once the socket accepts, so a source that waits for the path
    // never meets a bound-but-not-listening socket (ECONNREFUSED).
    // (A path too long for the temporary name is bound directly.)
    let tmp = format!("{path}.{}.tmp", std::process::id());
    let bind_at = if tmp.len() < SUN_PATH_LEN { tmp.as_str() } else { path };
    if bind_at != path {
        remove_stale_socket(&tmp).map_err(fail)?;
    }
    let l = UnixListener::bind(bind_at).map_err(fail)?;
    if bind_at != path {
        if let Err(e) = rename_noreplace(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
    }
    let fd = OwnedFd::from(l);
    set_nonblocking(fd.as_raw_fd()).map_err(|e| MigError::io("listener", e))?;
    let id = file_id(path).map_err(|e| {
        let _ = std::fs::remove_file(path);
        fail(e)
    })?;
    Ok(SocketListener { fds: vec![fd], name: text.to_string(), abort: abort.clone(), port: None, unix_path: Some((path.to_string(), id)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where RENAME_NOREPLACE is missing, the socket still moves into
    /// place without replacing what is there.
    #[test]
    fn the_socket_moves_into_place_without_rename_noreplace() {
        let d = std::env::temp_dir().join(format!("livemig-link-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (tmp, path) = (d.join("tmp.sock"), d.join("migrate.sock"));
        let (tmp, path) = (tmp.to_str().unwrap(), path.to_str().unwrap());
        let _l = std::os::unix::net::UnixListener::bind(tmp).unwrap();
        link_then_unlink(tmp, path).expect("moved");
        assert!(std::fs::symlink_metadata(tmp).is_err(), "the temporary name is gone");
        std::os::unix::net::UnixStream::connect(path).expect("the listener is reached at its path");
        let _l2 = std::os::unix::net::UnixListener::bind(tmp).unwrap();
        assert_eq!(link_then_unlink(tmp, path).unwrap_err().kind(), io::ErrorKind::AlreadyExists, "what is there stays");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn bind_each(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
        bind_each_with(addrs, &mut |a| TcpListener::bind(a))
    }

    /// `[::]` takes IPv4 sources too, whatever the system's default, and
    /// `,ipv6` only IPv6 ones: IPV6_V6ONLY as QEMU 7.2 sets it.
    #[test]
    fn every_ipv6_address_takes_ipv4_unless_ipv6_only_is_asked() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: no IPv6 on this host");
            return;
        }
        let abort = Aborter::new().expect("aborter");
        let v6only = |l: &SocketListener| {
            let mut v: i32 = -1;
            let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
            // SAFETY: getsockopt into a live i32 of `len` bytes.
            let r = unsafe {
                libc::getsockopt(l.fds[0].as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&mut v as *mut i32).cast(), &mut len)
            };
            assert_eq!(r, 0);
            v
        };
        let both = listen_tcp("::", 0, TcpOpts::default(), "tcp:[::]:0", &abort).expect("listen");
        assert_eq!(v6only(&both), 0);
        let port = both.port.expect("a tcp port");
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("IPv4 connect");
        std::net::TcpStream::connect(("::1", port)).expect("IPv6 connect");
        let opts = TcpOpts { family: Family::V6, ..TcpOpts::default() };
        let six = listen_tcp("::", 0, opts, "tcp:[::]:0,ipv6", &abort).expect("listen");
        assert_eq!(v6only(&six), 1);
        let port = six.port.expect("a tcp port");
        std::net::TcpStream::connect(("::1", port)).expect("IPv6 connect");
        let e = std::net::TcpStream::connect(("127.0.0.1", port)).expect_err("no IPv4 on an IPv6-only listener");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// An empty host takes sources on IPv4 and, where the host has it,
    /// IPv6, as QEMU's `tcp::PORT` does.
    #[test]
    fn an_empty_host_listens_on_ipv4_and_ipv6() {
        let abort = Aborter::new().expect("aborter");
        let l = listen_tcp("", 0, TcpOpts::default(), "tcp::0", &abort).expect("listen");
        let port = l.port.expect("a tcp port");
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("IPv4 connect");
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            std::net::TcpStream::connect(("::1", port)).expect("IPv6 connect");
        }
    }

    /// A name that resolves to several addresses is listened on at each,
    /// on one port, as QEMU does: a source may connect to any of them.
    #[test]
    fn every_address_of_a_name_is_listened_on() {
        let abort = Aborter::new().expect("aborter");
        let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let mut addrs: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap()];
        if v6 {
            addrs.push("[::1]:0".parse().unwrap());
        }
        // Both addresses of 127.0.0.1 and 127.0.0.2 are loopback on Linux.
        addrs.push("127.0.0.2:0".parse().unwrap());
        let bound = bind_each(&addrs).expect("bind");
        assert_eq!(bound.len(), addrs.len());
        let port = bound[0].local_addr().unwrap().port();
        assert!(bound.iter().all(|l| l.local_addr().unwrap().port() == port), "one port for all");
        let fds = bound.into_iter().map(OwnedFd::from).collect::<Vec<_>>();
        for fd in &fds {
            set_nonblocking(fd.as_raw_fd()).unwrap();
        }
        let l = SocketListener { fds, name: "tcp:test".into(), abort: abort.clone(), port: Some(port), unix_path: None };
        // A source on the last address is accepted.
        let _c = std::net::TcpStream::connect(("127.0.0.2", port)).expect("connect");
        l.accept().expect("accepted on the last address");
    }

    /// When the free port the first address got is taken on a later one
    /// (by another process), the listener starts over on another port
    /// rather than leave that address to the other socket.
    #[test]
    fn a_port_taken_on_a_later_address_is_not_used() {
        let other = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let taken = other.local_addr().unwrap().port();
        let addrs: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap(), "127.0.0.2:0".parse().unwrap()];
        // The first port-0 bind is given the port `other` holds on the
        // second address (free on the first); later ones bind as asked.
        let mut calls = Vec::new();
        let bound = bind_each_with(&addrs, &mut |a| {
            calls.push(a);
            if calls.len() == 1 {
                std::net::TcpListener::bind(SocketAddr::new(a.ip(), taken))
            } else {
                std::net::TcpListener::bind(a)
            }
        })
        .expect("bind");
        assert_eq!(bound.len(), 2, "both addresses listened on");
        let port = bound[0].local_addr().unwrap().port();
        assert_ne!(port, taken, "not the port another socket holds on 127.0.0.2");
        assert_eq!(bound[1].local_addr().unwrap(), SocketAddr::new("127.0.0.2".parse().unwrap(), port));
        assert_eq!(calls.len(), 4, "one attempt over, one more: {calls:?}");
    }

    /// A name that resolves to nothing bindable fails with the reason.
    #[test]
    fn a_name_with_no_bindable_address_fails() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind_each(&[addr]).expect_err("in use");
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(bind_each(&[]).expect_err("empty").kind(), io::ErrorKind::NotFound);
    }
}
