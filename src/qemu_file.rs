//! QEMUFile: the buffered, byte-counting, rate-limited migration stream.
//!
//! One `QemuFile` wraps one [`Channel`] in one direction. Writes are buffered
//! and handed to the channel in large chunks; reads are buffered the same
//! way. Errors are sticky, as in QEMU: the first error is kept, every later
//! operation is a no-op (writes) or returns zeros (reads), and callers check
//! [`QemuFile::error`] at section and pass boundaries. Reading past the end
//! of the stream is an error ("unexpected end of migration stream"), never a
//! silent zero.
//!
//! Guest RAM is written by running vCPUs on the source, so pages are copied
//! out of it with raw-pointer copies ([`QemuFile::put_guest`]) and never
//! borrowed as Rust slices; on the destination pages are read straight into
//! guest memory ([`QemuFile::get_guest`]).

use std::time::Instant;

use crate::error::{MigError, Result};
use crate::transport::{Aborter, Channel};

/// Buffer size of a stream: large enough that a pass costs few syscalls.
const IO_BUF_SIZE: usize = 256 * 1024;
/// Most pieces handed to one writev.
const MAX_IOV: usize = 128;

/// A queued piece of output: bytes in the staging buffer, or a range of
/// guest memory sent straight from where it is (no copy).
#[derive(Clone, Copy)]
enum Seg {
    Buf { off: usize, len: usize },
    Guest { ptr: usize, len: usize },
}

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The source side: the stream is written.
    Write,
    /// The destination side: the stream is read.
    Read,
}

/// A buffered migration stream (QEMU's `QEMUFile`), opaque to C: one from
/// `qemu_fdopen` is the host's until it hands it to `migrate_fd_connect` or
/// `process_incoming_migration` (or closes it with `qemu_fclose`); one that
/// livemig passes to a device's handler is valid only during that call.
pub struct QemuFile {
    chan: Box<dyn Channel>,
    dir: Direction,
    buf: Vec<u8>,
    /// Write side: what goes out, in order, at the next flush.
    segs: Vec<Seg>,
    /// Write side: guest bytes queued in `segs`.
    guest_queued: usize,
    /// Read side: the next unread byte in `buf`.
    rpos: usize,
    /// Read side: the end of the bytes read into `buf` (`buf` itself is
    /// allocated once, at its full size, on the first read).
    rlen: usize,
    /// Bytes written by the user (write side) or consumed (read side).
    pos: u64,
    error: Option<MigError>,
    /// The source asked for a return path (set by the loader).
    pub return_path: bool,
    /// Bytes allowed per rate-limit window; 0 means unlimited.
    rate_limit_max: u64,
    /// Bytes counted against the current window.
    rate_limit_used: u64,
}

impl QemuFile {
    /// A stream over `chan`.
    pub fn new(chan: Box<dyn Channel>, dir: Direction) -> QemuFile {
        QemuFile {
            chan,
            dir,
            buf: Vec::with_capacity(IO_BUF_SIZE),
            segs: Vec::new(),
            guest_queued: 0,
            rpos: 0,
            rlen: 0,
            pos: 0,
            error: None,
            return_path: false,
            rate_limit_max: 0,
            rate_limit_used: 0,
        }
    }

    /// A placeholder stream whose channel is gone: every operation fails.
    pub fn closed() -> QemuFile {
        let mut f = QemuFile::new(Box::new(crate::transport::mem::MemChannel::broken()), Direction::Write);
        // Set directly: not an error that happened (set_error logs those).
        f.error = Some(MigError::with_errno("stream already closed", libc::EBADF));
        f
    }

    /// The direction of this stream.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// A short description of the channel (its URI), for error messages.
    pub fn describe(&self) -> String {
        self.chan.describe()
    }

    /// The aborter that wakes the channel's blocking operations, if it
    /// has one.
    pub fn aborter(&self) -> Option<Aborter> {
        self.chan.aborter()
    }

    /// The first error seen on this stream, if any.
    pub fn error(&self) -> Option<&MigError> {
        self.error.as_ref()
    }

    /// Records `e` unless an error is already recorded (only the first is kept).
    pub fn set_error(&mut self, e: MigError) {
        if self.error.is_none() {
            log::debug!("stream {}: error: {}", self.chan.describe(), e);
            self.error = Some(e);
        }
    }

    /// `Err` with the sticky error, if there is one.
    pub fn check(&self) -> Result<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Bytes written (write side, including still-buffered ones) or consumed
    /// (read side): QEMU's `qemu_ftell`.
    pub fn tell(&self) -> u64 {
        self.pos
    }

    /// Bounds every later wait for the peer by `deadline` (None: only by
    /// the stall timeout); see [`Channel::set_deadline`].
    pub fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.chan.set_deadline(deadline);
    }

    // ----- rate limiting (write side) -----

    /// Sets the per-window byte budget; 0 lifts the limit.
    pub fn set_rate_limit(&mut self, bytes_per_window: u64) {
        self.rate_limit_max = bytes_per_window;
    }

    /// True when this window's budget is spent (or the stream has failed, so
    /// that loops stop producing data).
    pub fn rate_limit_exceeded(&self) -> bool {
        self.error.is_some() || (self.rate_limit_max > 0 && self.rate_limit_used >= self.rate_limit_max)
    }

    /// Starts a new window.
    pub fn reset_rate_limit(&mut self) {
        self.rate_limit_used = 0;
    }

    // ----- writing -----

    fn assert_write(&self) {
        debug_assert_eq!(self.dir, Direction::Write, "write on a read stream");
    }

    /// Appends bytes to the stream (copied into the staging buffer).
    pub fn put_buffer(&mut self, data: &[u8]) {
        self.assert_write();
        // Nothing to send: no piece is queued (a flush with only empty
        // pieces would hand the channel a write of 0 bytes, whose 0 reads
        // as a closed connection).
        if self.error.is_some() || data.is_empty() {
            return;
        }
        self.pos += data.len() as u64;
        self.rate_limit_used += data.len() as u64;
        if data.len() >= IO_BUF_SIZE {
            self.flush_buf();
            self.write_out(data);
            return;
        }
        if self.buf.len() + data.len() > IO_BUF_SIZE {
            self.flush_buf();
        }
        let off = self.buf.len();
        self.buf.extend_from_slice(data);
        match self.segs.last_mut() {
            Some(Seg::Buf { off: o, len }) if *o + *len == off => *len += data.len(),
            _ => self.segs.push(Seg::Buf { off, len: data.len() }),
        }
    }

    /// Appends `len` bytes of guest memory at `src`, sent from there by the
    /// next flush (writev), not copied.
    ///
    /// # Safety
    /// `src` must stay valid for reads of `len` bytes until the next flush
    /// (guest RAM stays mapped while it is registered). The memory may be
    /// written concurrently by a running guest: what goes out is then a mix
    /// of old and new bytes, which the dirty log makes good by sending the
    /// page again; with the VM stopped it is exact.
    pub unsafe fn put_guest(&mut self, src: *const u8, len: usize) {
        self.assert_write();
        // As in `put_buffer`: no empty piece is queued.
        if self.error.is_some() || len == 0 {
            return;
        }
        self.pos += len as u64;
        self.rate_limit_used += len as u64;
        self.segs.push(Seg::Guest { ptr: src as usize, len });
        self.guest_queued += len;
        if self.segs.len() >= MAX_IOV || self.guest_queued >= IO_BUF_SIZE {
            self.flush_buf();
        }
    }

    /// Appends one byte.
    pub fn put_u8(&mut self, v: u8) {
        self.put_buffer(&[v]);
    }

    /// Appends a big-endian u16.
    pub fn put_be16(&mut self, v: u16) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Appends a big-endian u32.
    pub fn put_be32(&mut self, v: u32) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Appends a big-endian u64.
    pub fn put_be64(&mut self, v: u64) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Appends a counted string (u8 length, then the bytes). Strings longer
    /// than 255 bytes are a programming error caught at registration.
    pub fn put_counted_str(&mut self, s: &str) {
        debug_assert!(s.len() <= 255);
        self.put_u8(s.len() as u8);
        self.put_buffer(s.as_bytes());
    }

    /// A write error (EPIPE) with what the channel knows of why its peer
    /// went away: "Broken pipe" alone does not tell that an `exec:`
    /// command failed, nor how.
    fn explained(&mut self, e: MigError) -> MigError {
        if e.errno() != libc::EPIPE {
            return e;
        }
        match self.chan.exit_note() {
            Some(note) => MigError::with_errno(format!("{e} ({note})"), libc::EPIPE),
            None => e,
        }
    }

    fn write_out(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.chan.write(data) {
                Ok(0) => {
                    let e = MigError::with_errno(format!("unable to write to {}: connection closed", self.chan.describe()), libc::EPIPE);
                    let e = self.explained(e);
                    self.set_error(e);
                    return;
                }
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = MigError::io(format!("unable to write to {}", self.chan.describe()), e);
                    let e = self.explained(e);
                    self.set_error(e);
                    return;
                }
            }
        }
    }

    fn flush_buf(&mut self) {
        if self.segs.is_empty() {
            self.buf.clear();
            return;
        }
        let base = self.buf.as_ptr();
        let mut iov: Vec<libc::iovec> = self
            .segs
            .iter()
            .map(|s| match *s {
                // SAFETY: `off + len` lies within `buf` (recorded as it grew).
                Seg::Buf { off, len } => libc::iovec { iov_base: unsafe { base.add(off) } as *mut libc::c_void, iov_len: len },
                Seg::Guest { ptr, len } => libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len },
            })
            .collect();
        let mut i = 0;
        while i < iov.len() && self.error.is_none() {
            match self.chan.writev(&iov[i..]) {
                Ok(0) => {
                    let e = MigError::with_errno(format!("unable to write to {}: connection closed", self.chan.describe()), libc::EPIPE);
                    let e = self.explained(e);
                    self.set_error(e);
                }
                Ok(mut n) => {
                    while n > 0 {
                        if n >= iov[i].iov_len {
                            n -= iov[i].iov_len;
                            i += 1;
                        } else {
                            // SAFETY: advancing within the same iovec.
                            iov[i].iov_base = unsafe { iov[i].iov_base.cast::<u8>().add(n) }.cast();
                            iov[i].iov_len -= n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = MigError::io(format!("unable to write to {}", self.chan.describe()), e);
                    let e = self.explained(e);
                    self.set_error(e);
                }
            }
        }
        self.segs.clear();
        self.buf.clear();
        self.guest_queued = 0;
    }

    /// Hands every buffered byte to the channel.
    pub fn flush(&mut self) -> Result<()> {
        if self.dir == Direction::Write && self.error.is_none() {
            self.flush_buf();
        }
        self.check()
    }

    /// Flushes (write side) and closes the channel; the first error wins.
    pub fn close(mut self) -> Result<()> {
        let flushed = self.flush();
        let closed = self.chan.close().map_err(|e| MigError::io(format!("closing {}", self.chan.describe()), e));
        flushed.and(closed)
    }

    // ----- the return path: the other direction of the same socket -----

    /// Sends a return-path message (`be16 type, be16 len, data`) back to
    /// the source (destination side).
    pub fn rp_send(&mut self, msg_type: u16, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(4 + data.len());
        m.extend_from_slice(&msg_type.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
        let mut rest = &m[..];
        while !rest.is_empty() {
            match self.chan.write(rest) {
                Ok(0) => return Err(MigError::with_errno("return path closed", libc::EPIPE)),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MigError::io(format!("return path to {}", self.chan.describe()), e)),
            }
        }
        Ok(())
    }

    /// Reads one return-path message (source side): `(type, data)`, or
    /// `None` when the destination closed the connection. `check` sees the
    /// header (type, length) before any of the body is read and refuses
    /// what is not expected, so that no more than an expected message is
    /// waited for. No read starts after `deadline`, and no wait for the
    /// destination goes past it (the channel's deadline is set to it for
    /// the call, and to none after it: the return path is read once the
    /// stream is out): the error is then `late()`, so that a destination
    /// sending a byte at a time cannot extend the wait.
    pub fn rp_recv(
        &mut self,
        deadline: Instant,
        late: impl Fn() -> MigError,
        check: impl FnOnce(u16, usize) -> Result<()>,
    ) -> Result<Option<(u16, Vec<u8>)>> {
        self.chan.set_deadline(Some(deadline));
        let r = self.rp_recv_by(deadline, &late, check);
        self.chan.set_deadline(None);
        r
    }

    fn rp_recv_by(
        &mut self,
        deadline: Instant,
        late: &impl Fn() -> MigError,
        check: impl FnOnce(u16, usize) -> Result<()>,
    ) -> Result<Option<(u16, Vec<u8>)>> {
        let mut hdr = [0u8; 4];
        if !self.rp_read_exact(&mut hdr, deadline, late)? {
            return Ok(None);
        }
        let msg_type = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        check(msg_type, len)?;
        let mut data = vec![0u8; len];
        if !self.rp_read_exact(&mut data, deadline, late)? {
            return Ok(None);
        }
        Ok(Some((msg_type, data)))
    }

    fn rp_read_exact(&mut self, buf: &mut [u8], deadline: Instant, late: &impl Fn() -> MigError) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            if Instant::now() >= deadline {
                return Err(late());
            }
            match self.chan.read(&mut buf[got..]) {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The wait ended at the deadline.
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() >= deadline => return Err(late()),
                Err(e) => return Err(MigError::io(format!("return path from {}", self.chan.describe()), e)),
            }
        }
        Ok(true)
    }

    /// Waits, without the stall timeout, until the stream has something to
    /// read or has ended (a destination's source may start long after it
    /// was set up, as QEMU waits for it); only the aborter ends the wait.
    pub fn wait_for_source(&self) -> Result<()> {
        if self.rpos < self.rlen || self.error.is_some() {
            return Ok(());
        }
        self.chan.wait_readable().map_err(|e| MigError::io(format!("{}: waiting for the source", self.chan.describe()), e))
    }

    /// True when the peer of a socket has closed or shut down its side.
    pub fn peer_closed(&self) -> bool {
        self.chan.peer_closed()
    }

    /// True when the channel is a socket (can carry a return path).
    pub fn bidirectional(&self) -> bool {
        self.chan.bidirectional()
    }

    // ----- reading -----

    /// Reads more bytes behind the unread tail: `Some(true)` when some
    /// arrived, `Some(false)` at a clean end of stream, `None` on an error
    /// (recorded).
    fn fill_raw(&mut self) -> Option<bool> {
        debug_assert_eq!(self.dir, Direction::Read, "read on a write stream");
        if self.error.is_some() {
            return None;
        }
        if self.buf.len() < IO_BUF_SIZE {
            // Zeroed by the allocator (calloc), not by a pass over it.
            self.buf = vec![0; IO_BUF_SIZE];
        }
        // Keep the unread tail (usually part of one record) at the front.
        self.buf.copy_within(self.rpos..self.rlen, 0);
        self.rlen -= self.rpos;
        self.rpos = 0;
        if self.rlen == self.buf.len() {
            let grown = self.buf.len() * 2;
            self.buf.resize(grown, 0);
        }
        loop {
            match self.chan.read(&mut self.buf[self.rlen..]) {
                Ok(n) => {
                    self.rlen += n;
                    return Some(n > 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = MigError::io(format!("unable to read from {}", self.chan.describe()), e);
                    self.set_error(e);
                    return None;
                }
            }
        }
    }

    /// Like `fill_raw`, but the end of the stream is an error.
    fn fill(&mut self) -> bool {
        match self.fill_raw() {
            Some(true) => true,
            Some(false) => {
                let e = MigError::with_errno("unexpected end of migration stream", libc::EIO);
                // From an `exec:` command that failed: how it ended.
                let e = match self.chan.exit_note() {
                    Some(note) => MigError::with_errno(format!("{e} ({note})"), libc::EIO),
                    None => e,
                };
                self.set_error(e);
                false
            }
            None => false,
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.rpos..self.rlen]
    }

    /// Reads exactly `out.len()` bytes; on a short stream records the error,
    /// fills the rest with zeros and returns false.
    pub fn get_buffer(&mut self, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            if self.available().is_empty() && !self.fill() {
                out[done..].fill(0);
                return false;
            }
            let n = self.available().len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.rpos..self.rpos + n]);
            self.rpos += n;
            self.pos += n as u64;
            done += n;
        }
        true
    }

    /// Reads `len` bytes straight into guest memory at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes and not aliased by any
    /// Rust reference for the duration of the call.
    pub unsafe fn get_guest(&mut self, dst: *mut u8, len: usize) -> bool {
        let mut done = 0;
        while done < len {
            if self.available().is_empty() && !self.fill() {
                return false;
            }
            let n = self.available().len().min(len - done);
            // SAFETY: `available()` has at least `n` bytes at `rpos`; the
            // caller guarantees `dst` is writable for `len` bytes and
            // `done + n <= len`; our buffer cannot overlap guest memory.
            unsafe { std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.rpos), dst.add(done), n) };
            self.rpos += n;
            self.pos += n as u64;
            done += n;
        }
        true
    }

    /// Returns the next byte without consuming it (None at the end or on
    /// error; the end of stream is not recorded as an error here).
    pub fn peek_u8(&mut self) -> Option<u8> {
        if self.available().is_empty() && self.fill_raw() != Some(true) {
            return None;
        }
        Some(self.buf[self.rpos])
    }

    /// Returns the next `n` bytes without consuming them (None when the
    /// stream ends or fails first; the end is not recorded as an error).
    pub fn peek(&mut self, n: usize) -> Option<&[u8]> {
        while self.available().len() < n {
            if self.fill_raw() != Some(true) {
                return None;
            }
        }
        Some(&self.buf[self.rpos..self.rpos + n])
    }

    /// Reads one byte (0 on error).
    pub fn get_u8(&mut self) -> u8 {
        let mut b = [0u8; 1];
        if !self.get_buffer(&mut b) {
            return 0;
        }
        b[0]
    }

    /// Reads a big-endian u16 (0 on error).
    pub fn get_be16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        if !self.get_buffer(&mut b) {
            return 0;
        }
        u16::from_be_bytes(b)
    }

    /// Reads a big-endian u32 (0 on error).
    pub fn get_be32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        if !self.get_buffer(&mut b) {
            return 0;
        }
        u32::from_be_bytes(b)
    }

    /// Reads a big-endian u64 (0 on error).
    pub fn get_be64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        if !self.get_buffer(&mut b) {
            return 0;
        }
        u64::from_be_bytes(b)
    }

    /// Reads a counted string as raw bytes (empty on error).
    pub fn get_counted_bytes(&mut self) -> Vec<u8> {
        let len = self.get_u8() as usize;
        let mut v = vec![0u8; len];
        if !self.get_buffer(&mut v) {
            v.clear();
        }
        v
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, mut n: usize) -> bool {
        while n > 0 {
            if self.available().is_empty() && !self.fill() {
                return false;
            }
            let k = self.available().len().min(n);
            self.rpos += k;
            self.pos += k as u64;
            n -= k;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem::MemChannel;

    #[test]
    fn writes_big_endian_and_counts() {
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        f.put_be32(0x5145_564D);
        f.put_be16(0x0102);
        f.put_be64(0x10);
        f.put_counted_str("ram");
        assert_eq!(f.tell(), 4 + 2 + 8 + 4);
        f.flush().unwrap();
        assert_eq!(&*out.lock(), &[0x51, 0x45, 0x56, 0x4D, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0x10, 3, b'r', b'a', b'm']);
    }

    #[test]
    fn large_writes_bypass_buffer_in_order() {
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        f.put_u8(7);
        let big: Vec<u8> = (0..IO_BUF_SIZE * 2 + 3).map(|i| i as u8).collect();
        f.put_buffer(&big);
        f.put_u8(9);
        f.flush().unwrap();
        let out = out.lock();
        assert_eq!(out.len(), big.len() + 2);
        assert_eq!(out[0], 7);
        assert_eq!(&out[1..1 + big.len()], &big[..]);
        assert_eq!(out[out.len() - 1], 9);
    }

    #[test]
    fn guest_pieces_go_out_in_order_without_copies() {
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        let pages: Vec<Vec<u8>> = (0..300u32).map(|i| vec![i as u8; 4096]).collect();
        let mut want = Vec::new();
        for (i, p) in pages.iter().enumerate() {
            f.put_be64(i as u64);
            want.extend_from_slice(&(i as u64).to_be_bytes());
            // SAFETY: `p` is a live 4096-byte buffer that outlives the flush.
            unsafe { f.put_guest(p.as_ptr(), p.len()) };
            want.extend_from_slice(p);
        }
        f.put_u8(0xEE);
        want.push(0xEE);
        assert_eq!(f.tell(), want.len() as u64);
        f.flush().unwrap();
        assert_eq!(*out.lock(), want);
    }

    #[test]
    fn rate_limit_window() {
        let (chan, _out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        f.set_rate_limit(10);
        f.put_buffer(&[0; 9]);
        assert!(!f.rate_limit_exceeded());
        f.put_u8(0);
        assert!(f.rate_limit_exceeded());
        f.reset_rate_limit();
        assert!(!f.rate_limit_exceeded());
        f.set_rate_limit(0);
        f.put_buffer(&[0; 100]);
        assert!(!f.rate_limit_exceeded());
    }

    #[test]
    fn short_read_is_sticky_error() {
        let chan = MemChannel::source(vec![0, 0, 0, 3, 0xAA]);
        let mut f = QemuFile::new(Box::new(chan), Direction::Read);
        assert_eq!(f.get_be32(), 3);
        assert_eq!(f.peek_u8(), Some(0xAA));
        assert_eq!(f.get_be16(), 0);
        let e = f.error().expect("short read recorded");
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(e.to_string(), "unexpected end of migration stream");
        assert_eq!(f.get_u8(), 0, "reads after an error return zero");
    }

    #[test]
    fn peek_at_clean_end_is_not_an_error() {
        let chan = MemChannel::source(vec![1]);
        let mut f = QemuFile::new(Box::new(chan), Direction::Read);
        assert_eq!(f.get_u8(), 1);
        assert_eq!(f.peek_u8(), None);
        assert!(f.error().is_none());
    }

    #[test]
    fn write_error_is_sticky_and_first_wins() {
        let mut f = QemuFile::new(Box::new(MemChannel::broken()), Direction::Write);
        f.put_buffer(&vec![1u8; IO_BUF_SIZE + 1]);
        let first = f.error().expect("error").to_string();
        f.set_error(MigError::new("second"));
        assert_eq!(f.error().unwrap().to_string(), first);
        assert!(first.contains("unable to write to mem"), "{first}");
        assert!(f.rate_limit_exceeded());
    }
}
