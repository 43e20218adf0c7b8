//! Transports: `tcp:`, `unix:`, `exec:` and `fd:` URIs, both ways.
//!
//! Every channel is a file descriptor driven in non-blocking mode with
//! `poll`, so that three things hold on every transport:
//! - a cancel ([`Aborter::abort`]) wakes a thread blocked in connect, accept,
//!   read or write at once;
//! - a peer that stops reading or writing without closing is detected
//!   (no progress for the stall timeout, [`stall_timeout`], fails the stream);
//! - a write to a closed peer returns `EPIPE` instead of raising `SIGPIPE`.
//!
//! URI forms:
//! - `tcp:HOST:PORT` — IPv4, `[IPv6]`, or a host name; on the incoming side
//!   an empty host binds every address, IPv4 and IPv6 (as QEMU's
//!   `tcp::PORT`), and port 0 binds a free port (see [`Listener::local_port`]);
//!   QEMU's options after the port: `,ipv4`/`,ipv6` (`=on`/`=off`) keep to
//!   one address family, `,to=PORT` on the incoming side takes the first
//!   free port up to PORT, others are ignored ([`TcpOpts`]);
//! - `unix:PATH`;
//! - `exec:COMMAND` — run by `/bin/sh -c`; outgoing writes to its stdin,
//!   incoming reads its stdout;
//! - `fd:N` or `fd:NAME` — an open descriptor passed by number or registered
//!   by the host under a name (`livemig_fd_add`); livemig owns and closes it.

mod exec;
mod fdchan;
pub mod mem;
mod socket;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use crate::error::{MigError, Result};

pub use fdchan::FdChannel;

/// How long a read or write may make no progress before the stream fails,
/// by default.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

static STALL_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(60_000);

/// The current stall timeout.
pub fn stall_timeout() -> Duration {
    Duration::from_millis(STALL_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Sets the stall timeout (100 ms to 1 day); a peer that stops reading or
/// writing without closing fails the stream after this long.
pub fn set_stall_timeout(ms: u64) -> Result<()> {
    if !(100..=86_400_000).contains(&ms) {
        return Err(MigError::new(format!("io timeout {ms} ms is out of range (100 ms to 1 day)")));
    }
    STALL_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// A byte channel under a migration stream.
pub trait Channel: Send {
    /// Reads some bytes; `Ok(0)` at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes some bytes.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Writes some bytes from several pieces (which may point into guest
    /// memory: they are read through raw pointers only). By default the
    /// first non-empty piece is copied out and written.
    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let Some(v) = iov.iter().find(|v| v.iov_len > 0) else { return Ok(0) };
        let mut tmp = vec![0u8; v.iov_len];
        // SAFETY: the caller guarantees every iovec is readable; `tmp` is a
        // fresh buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), tmp.as_mut_ptr(), v.iov_len) };
        self.write(&tmp)
    }
    /// Releases the channel (for `exec:`, waits for the command and reports
    /// a non-zero exit).
    fn close(&mut self) -> io::Result<()>;
    /// The URI (or a description) for messages.
    fn describe(&self) -> String;
    /// Bounds every later wait for the peer by `deadline` (None: only by
    /// the stall timeout): a wait that reaches it fails with `TimedOut`.
    fn set_deadline(&mut self, _deadline: Option<std::time::Instant>) {}
    /// True when bytes can flow back on the same channel (sockets).
    fn bidirectional(&self) -> bool {
        false
    }
    /// The aborter that wakes this channel's blocking operations, if it
    /// has one: a migration over a stream the host opened is cancelled
    /// through it.
    fn aborter(&self) -> Option<Aborter> {
        None
    }
    /// True when the peer of a socket has closed or shut down its sending
    /// side (known without reading).
    fn peer_closed(&self) -> bool {
        false
    }
    /// Why a write found the channel closed, when the channel knows more
    /// than the errno: an `exec:` command's exit status.
    fn exit_note(&mut self) -> Option<String> {
        None
    }
    /// Waits until there is something to read (or the end of the stream),
    /// without the stall timeout: only the aborter ends the wait.
    fn wait_readable(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Wakes and fails every blocking operation of the channels it was given
/// to; once fired, their every later operation fails too.
#[derive(Clone)]
pub struct Aborter(std::sync::Arc<AborterInner>);

struct AborterInner {
    /// Readable once fired: wakes a `poll`.
    fd: OwnedFd,
    /// Set once fired: checked before each operation.
    fired: std::sync::atomic::AtomicBool,
}

impl Aborter {
    /// A new, unfired aborter (an eventfd).
    pub fn new() -> Result<Aborter> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(MigError::io("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Aborter(std::sync::Arc::new(AborterInner { fd, fired: std::sync::atomic::AtomicBool::new(false) })))
    }

    /// Fires: every operation waiting on this aborter, and every later
    /// one, fails with `ECANCELED`.
    pub fn abort(&self) {
        self.0.fired.store(true, std::sync::atomic::Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe { libc::write(self.0.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// True once fired.
    pub fn is_aborted(&self) -> bool {
        self.0.fired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `Err(ECANCELED)` once fired: what an operation of a channel returns
    /// instead of starting.
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.is_aborted() {
            Err(io::Error::from_raw_os_error(libc::ECANCELED))
        } else {
            Ok(())
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }
}

/// The address families a `tcp:` URI asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// IPv4 and IPv6.
    #[default]
    Any,
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
}

/// The options of a `tcp:` URI after its port, as QEMU 7.2 reads them
/// (`,to=PORT`, `,ipv4[=on|off]`, `,ipv6[=on|off]`, `,keep-alive[=on|off]`;
/// others are ignored, as QEMU ignores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOpts {
    /// Incoming: the highest port to try when PORT is taken.
    pub to: Option<u16>,
    /// The address families to connect to or listen on.
    pub family: Family,
}

impl TcpOpts {
    /// Parses `opts` (what follows the port, from its first ','), with
    /// QEMU 7.2's messages (`inet_parse`, `inet_parse_flag`,
    /// `inet_ai_family_from_address`).
    fn parse(opts: &str) -> std::result::Result<TcpOpts, String> {
        let flag = |name: &str| -> std::result::Result<Option<bool>, String> {
            let Some(i) = opts.find(&format!(",{name}")) else { return Ok(None) };
            let v = &opts[i + 1 + name.len()..];
            let v = match v.find(',') {
                Some(j) if v[j + 1..].starts_with(',') => return Err(format!("error parsing '{name}' flag '{v}'")),
                Some(j) => &v[..j],
                None => v,
            };
            match v {
                "" | "=on" => Ok(Some(true)),
                "=off" => Ok(Some(false)),
                _ => Err(format!("error parsing '{name}' flag '{v}'")),
            }
        };
        let to = match opts.find(",to=") {
            Some(i) => {
                let v = &opts[i + 4..];
                let v = &v[..v.find(',').unwrap_or(v.len())];
                Some(v.parse::<u16>().map_err(|_| "error parsing to= argument".to_string())?)
            }
            None => None,
        };
        flag("keep-alive")?; // always on in livemig
        let family = match (flag("ipv4")?, flag("ipv6")?) {
            (Some(false), Some(false)) => return Err("Cannot disable IPv4 and IPv6 at same time".into()),
            (Some(true), Some(true)) => Family::Any,
            (_, Some(true)) | (Some(false), _) => Family::V6,
            (Some(true), _) | (_, Some(false)) => Family::V4,
            (None, None) => Family::Any,
        };
        Ok(TcpOpts { to, family })
    }
}

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT[,OPTIONS]` (host without brackets; empty on incoming
    /// = any).
    Tcp { host: String, port: u16, opts: TcpOpts },
    /// `unix:PATH`.
    Unix(String),
    /// `exec:COMMAND`.
    Exec(String),
    /// `fd:N`.
    FdNum(RawFd),
    /// `fd:NAME`, registered by the host.
    FdName(String),
}

impl Uri {
    /// Parses a migration URI, with a message naming what is wrong.
    pub fn parse(uri: &str) -> Result<Uri> {
        let bad = |why: &str| MigError::new(format!("invalid migration uri '{uri}': {why}"));
        let (proto, rest) = uri.split_once(':').ok_or_else(|| bad("expected tcp:, unix:, exec: or fd:"))?;
        match proto {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                let host = if let Some(h) = host.strip_prefix('[') {
                    h.strip_suffix(']').ok_or_else(|| bad("unbalanced '[' in host"))?
                } else {
                    if host.contains(':') {
                        return Err(bad("an IPv6 address must be in brackets, e.g. tcp:[::1]:4444"));
                    }
                    host
                };
                let (port, opts) = port.split_at(port.find(',').unwrap_or(port.len()));
                let port: u16 = port.parse().map_err(|_| bad(&format!("port '{port}' is not a number from 0 to 65535")))?;
                let opts = TcpOpts::parse(opts).map_err(|why| bad(&why))?;
                Ok(Uri::Tcp { host: host.to_string(), port, opts })
            }
            "unix" if !rest.is_empty() => Ok(Uri::Unix(rest.to_string())),
            "unix" => Err(bad("empty socket path")),
            "exec" if !rest.trim().is_empty() => Ok(Uri::Exec(rest.to_string())),
            "exec" => Err(bad("empty command")),
            "fd" if rest.is_empty() => Err(bad("empty file descriptor")),
            "fd" => match rest.parse::<RawFd>() {
                Ok(n) if n >= 0 => Ok(Uri::FdNum(n)),
                Ok(_) => Err(bad("negative file descriptor")),
                Err(_) => Ok(Uri::FdName(rest.to_string())),
            },
            other => Err(bad(&format!("unknown protocol '{other}' (expected tcp:, unix:, exec: or fd:)"))),
        }
    }
}

static NAMED_FDS: Lazy<Mutex<Vec<(String, OwnedFd)>>> = Lazy::new(|| Mutex::new(Vec::new()));

/// Registers `fd` under `name` for a later `fd:NAME` URI; livemig owns it
/// from now on. A name already registered is refused.
pub fn fd_add(name: &str, fd: OwnedFd) -> Result<()> {
    if name.is_empty() || name.parse::<i64>().is_ok() {
        return Err(MigError::new(format!("fd name '{name}' must be non-empty and not a number")));
    }
    let mut fds = NAMED_FDS.lock();
    if fds.iter().any(|(n, _)| n == name) {
        return Err(MigError::new(format!("fd name '{name}' is already registered")));
    }
    fds.push((name.to_string(), fd));
    Ok(())
}

/// Removes and closes the fd registered under `name`.
pub fn fd_remove(name: &str) -> Result<()> {
    let mut fds = NAMED_FDS.lock();
    let i = fds.iter().position(|(n, _)| n == name).ok_or_else(|| MigError::new(format!("no fd registered as '{name}'")))?;
    fds.remove(i);
    Ok(())
}

fn take_fd(uri: &Uri) -> Result<OwnedFd> {
    match uri {
        Uri::FdNum(n) => {
            // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
            if unsafe { libc::fcntl(*n, libc::F_GETFD) } < 0 {
                return Err(MigError::io(format!("fd:{n}"), io::Error::last_os_error()));
            }
            // SAFETY: the host handed fd N to livemig with the URI; we own it
            // from here on (documented on qmp_migrate).
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*n) })
        }
        Uri::FdName(name) => {
            let mut fds = NAMED_FDS.lock();
            let i = fds
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| MigError::new(format!("File descriptor named '{name}' has not been found")))?;
            Ok(fds.remove(i).1)
        }
        _ => unreachable!("take_fd on a non-fd uri"),
    }
}

/// Opens the outgoing channel for `uri` (runs on the migration thread;
/// `abort` interrupts a pending connect).
pub fn connect(uri: &Uri, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    match uri {
        Uri::Tcp { host, port, opts } => socket::connect_tcp(host, *port, opts.family, text, abort),
        Uri::Unix(path) => socket::connect_unix(path, text, abort),
        Uri::Exec(cmd) => exec::spawn(cmd, true, text, abort),
        Uri::FdNum(_) | Uri::FdName(_) => Ok(Box::new(FdChannel::new(take_fd(uri)?, text.to_string(), abort.clone())?)),
    }
}

/// Takes the descriptor of an `fd:` URI now (on the caller's thread, so
/// that a bad one is reported at once) as a channel with its own aborter.
pub fn fd_channel(uri: &Uri, text: &str) -> Result<Box<dyn Channel>> {
    let fd = take_fd(uri)?;
    Ok(Box::new(FdChannel::new(fd, text.to_string(), Aborter::new()?)?))
}

/// An incoming endpoint that has been set up but not yet connected.
pub enum Listener {
    /// A listening socket; [`Listener::accept`] waits for the source.
    Socket(socket::SocketListener),
    /// A channel that is already connected (`exec:` and `fd:`).
    Ready(Box<dyn Channel>),
}

impl Listener {
    /// Sets up the incoming side of `uri` (runs on the caller's thread; never
    /// blocks on the network).
    pub fn open(uri: &Uri, text: &str, abort: &Aborter) -> Result<Listener> {
        match uri {
            Uri::Tcp { host, port, opts } => Ok(Listener::Socket(socket::listen_tcp(host, *port, *opts, text, abort)?)),
            Uri::Unix(path) => Ok(Listener::Socket(socket::listen_unix(path, text, abort)?)),
            Uri::Exec(cmd) => Ok(Listener::Ready(exec::spawn(cmd, false, text, abort)?)),
            Uri::FdNum(_) | Uri::FdName(_) => {
                Ok(Listener::Ready(Box::new(FdChannel::new(take_fd(uri)?, text.to_string(), abort.clone())?)))
            }
        }
    }

    /// The bound TCP port, for a `tcp:` listener.
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Socket(l) => l.local_port(),
            Listener::Ready(_) => None,
        }
    }

    /// Waits for the source (interruptible by the aborter), without the
    /// stall timeout: a listening socket for a connection; an `exec:`
    /// command or an `fd:` for the first byte (or the end of the stream),
    /// as QEMU's destination waits for it. The source may come long after
    /// the destination was set up: a command such as `nc -l PORT` waits
    /// for the source itself.
    pub fn accept(self) -> Result<Box<dyn Channel>> {
        match self {
            Listener::Socket(l) => l.accept(),
            Listener::Ready(c) => {
                c.wait_readable().map_err(|e| MigError::io(format!("{}: waiting for the source", c.describe()), e))?;
                Ok(c)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let none = TcpOpts::default();
        assert_eq!(Uri::parse("tcp:127.0.0.1:4444").unwrap(), Uri::Tcp { host: "127.0.0.1".into(), port: 4444, opts: none });
        assert_eq!(Uri::parse("tcp:[::1]:0").unwrap(), Uri::Tcp { host: "::1".into(), port: 0, opts: none });
        assert_eq!(Uri::parse("tcp:localhost:1").unwrap(), Uri::Tcp { host: "localhost".into(), port: 1, opts: none });
        assert_eq!(Uri::parse("tcp::5").unwrap(), Uri::Tcp { host: "".into(), port: 5, opts: none });
        assert_eq!(Uri::parse("unix:/tmp/x.sock").unwrap(), Uri::Unix("/tmp/x.sock".into()));
        assert_eq!(Uri::parse("exec:cat > f").unwrap(), Uri::Exec("cat > f".into()));
        assert_eq!(Uri::parse("fd:7").unwrap(), Uri::FdNum(7));
        assert_eq!(Uri::parse("fd:mig").unwrap(), Uri::FdName("mig".into()));
    }

    /// QEMU 7.2's `tcp:` options: read as it reads them, unknown ones
    /// ignored, bad values refused with its messages.
    #[test]
    fn parses_tcp_options_as_qemu() {
        let opts = |uri: &str| match Uri::parse(uri) {
            Ok(Uri::Tcp { opts, .. }) => Ok(opts),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let o = |to, family| Ok(TcpOpts { to, family });
        assert_eq!(opts("tcp:h:1,to=9"), o(Some(9), Family::Any));
        assert_eq!(opts("tcp:h:1,ipv4"), o(None, Family::V4));
        assert_eq!(opts("tcp:h:1,ipv6=on,to=3"), o(Some(3), Family::V6));
        assert_eq!(opts("tcp:h:1,ipv4=off"), o(None, Family::V6));
        assert_eq!(opts("tcp:h:1,ipv6=off"), o(None, Family::V4));
        assert_eq!(opts("tcp:h:1,ipv4,ipv6"), o(None, Family::Any));
        assert_eq!(opts("tcp:[::1]:1,keep-alive,foo"), o(None, Family::Any));
        let bad = |uri: &str, why: &str| assert_eq!(opts(uri), Err(format!("invalid migration uri '{uri}': {why}")));
        bad("tcp:h:1,to=x", "error parsing to= argument");
        bad("tcp:h:1,ipv4=foo", "error parsing 'ipv4' flag '=foo'");
        bad("tcp:h:1,ipv6=on,,x", "error parsing 'ipv6' flag '=on,,x'");
        bad("tcp:h:1,ipv4=off,ipv6=off", "Cannot disable IPv4 and IPv6 at same time");
        bad("tcp:h:x,ipv4", "port 'x' is not a number from 0 to 65535");
    }

    #[test]
    fn refuses_bad_uris_with_reason() {
        let cases = [
            ("", "expected tcp:, unix:, exec: or fd:"),
            ("http://x", "unknown protocol 'http'"),
            ("tcp:1.2.3.4", "expected tcp:HOST:PORT"),
            ("tcp:::1:4", "must be in brackets"),
            ("tcp:[::1:4", "unbalanced"),
            ("tcp:h:70000", "port '70000' is not a number"),
            ("tcp:h:-1", "port '-1'"),
            ("unix:", "empty socket path"),
            ("exec: ", "empty command"),
            ("fd:", "empty file descriptor"),
            ("fd:-3", "negative"),
        ];
        for (uri, want) in cases {
            let e = Uri::parse(uri).expect_err(uri).to_string();
            assert!(e.contains(want) && e.contains(&format!("'{uri}'")), "{uri}: {e}");
        }
    }

    #[test]
    fn aborter_fires_once_and_stays_fired() {
        let a = Aborter::new().unwrap();
        assert!(!a.is_aborted());
        a.abort();
        a.clone().abort();
        assert!(a.is_aborted());
    }

    #[test]
    fn named_fds_are_taken_once() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        fd_add("t-named", OwnedFd::from(a)).unwrap();
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(fd_add("t-named", OwnedFd::from(c)).unwrap_err().to_string().contains("already registered"));
        assert!(fd_add("12", OwnedFd::from(_d)).is_err());
        let uri = Uri::parse("fd:t-named").unwrap();
        take_fd(&uri).unwrap();
        assert!(take_fd(&uri).unwrap_err().to_string().contains("has not been found"));
        assert!(fd_remove("t-named").is_err());
    }
}
