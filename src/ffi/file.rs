//! The QEMUFile functions savevm handlers use to write and read their
//! bytes, and `qemu_fdopen`/`qemu_fclose` for streams the host opens.
//!
//! Inside a handler the `QEMUFile *` is livemig's stream, valid for the
//! call only; the handler must not close it. Errors are sticky: after one,
//! writes do nothing and reads return 0; `qemu_file_get_error` reports it.
//! A read from a stream open for writing, or a write to one open for
//! reading, is such an error (EINVAL). These calls wait for their channel
//! when it is full or empty, up to the io timeout
//! (`livemig_set_io_timeout`), as QEMU's do.

use std::ffi::{c_char, c_int};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use super::guard;
use crate::error::MigError;
use crate::qemu_file::{Direction, QemuFile};
use crate::transport::{Aborter, FdChannel};

/// Runs `body` on a stream open in direction `dir`; on the other, records
/// an error on the stream and returns `default`.
fn with_dir<T: Copy>(name: &str, f: *mut QemuFile, dir: Direction, default: T, body: impl FnOnce(&mut QemuFile) -> T) -> T {
    with(name, f, default, |f| {
        if f.direction() == dir {
            if dir == Direction::Read && f.error().is_some() {
                // Nothing more is read from a failed stream, not even
                // bytes it had buffered before the error.
                return default;
            }
            body(f)
        } else {
            let open = if dir == Direction::Read { "writing" } else { "reading" };
            f.set_error(MigError::new(format!("{name}: the stream is open for {open}")));
            default
        }
    })
}

fn with<T: Copy>(name: &str, f: *mut QemuFile, default: T, body: impl FnOnce(&mut QemuFile) -> T) -> T {
    guard(name, default, || {
        // SAFETY: a non-NULL `QEMUFile *` is livemig's stream, handed to the
        // handler for the duration of the callback (or made by qemu_fdopen
        // and not yet closed); livemig does not touch it during the call.
        match unsafe { f.as_mut() } {
            Some(f) => body(f),
            None => {
                log::error!("{name}: NULL QEMUFile");
                default
            }
        }
    })
}

/// Writes one byte (the low 8 bits of `v`).
#[no_mangle]
pub extern "C" fn qemu_put_byte(f: *mut QemuFile, v: c_int) {
    with_dir("qemu_put_byte", f, Direction::Write, (), |f| f.put_u8(v as u8))
}

/// Writes a big-endian 16-bit value.
#[no_mangle]
pub extern "C" fn qemu_put_be16(f: *mut QemuFile, v: u32) {
    with_dir("qemu_put_be16", f, Direction::Write, (), |f| f.put_be16(v as u16))
}

/// Writes a big-endian 32-bit value.
#[no_mangle]
pub extern "C" fn qemu_put_be32(f: *mut QemuFile, v: u32) {
    with_dir("qemu_put_be32", f, Direction::Write, (), |f| f.put_be32(v))
}

/// Writes a big-endian 64-bit value.
#[no_mangle]
pub extern "C" fn qemu_put_be64(f: *mut QemuFile, v: u64) {
    with_dir("qemu_put_be64", f, Direction::Write, (), |f| f.put_be64(v))
}

/// Writes `size` bytes from `buf` (NULL with size 0 is allowed).
#[no_mangle]
pub extern "C" fn qemu_put_buffer(f: *mut QemuFile, buf: *const u8, size: usize) {
    with_dir("qemu_put_buffer", f, Direction::Write, (), |f| {
        if size == 0 {
            return;
        }
        if buf.is_null() {
            f.set_error(MigError::new("qemu_put_buffer: NULL buffer"));
            return;
        }
        // SAFETY: the caller passes `size` readable bytes at `buf`.
        f.put_buffer(unsafe { std::slice::from_raw_parts(buf, size) })
    })
}

/// Reads one byte (0 once the stream has an error, and from a NULL
/// stream: check `qemu_file_get_error`).
#[no_mangle]
pub extern "C" fn qemu_get_byte(f: *mut QemuFile) -> c_int {
    with_dir("qemu_get_byte", f, Direction::Read, 0, |f| f.get_u8() as c_int)
}

/// Reads a big-endian 16-bit value (0 as for `qemu_get_byte`).
#[no_mangle]
pub extern "C" fn qemu_get_be16(f: *mut QemuFile) -> u32 {
    with_dir("qemu_get_be16", f, Direction::Read, 0, |f| f.get_be16() as u32)
}

/// Reads a big-endian 32-bit value (0 as for `qemu_get_byte`).
#[no_mangle]
pub extern "C" fn qemu_get_be32(f: *mut QemuFile) -> u32 {
    with_dir("qemu_get_be32", f, Direction::Read, 0, |f| f.get_be32())
}

/// Reads a big-endian 64-bit value (0 as for `qemu_get_byte`).
#[no_mangle]
pub extern "C" fn qemu_get_be64(f: *mut QemuFile) -> u64 {
    with_dir("qemu_get_be64", f, Direction::Read, 0, |f| f.get_be64())
}

/// Reads `size` bytes into `buf`; returns `size`, or 0 if the stream has
/// or meets an error (then `buf` holds zeros, no data of the stream). The
/// other `qemu_get_*` calls also read 0 from a stream with an error.
#[no_mangle]
pub extern "C" fn qemu_get_buffer(f: *mut QemuFile, buf: *mut u8, size: usize) -> usize {
    if size == 0 {
        return 0;
    }
    let got = with_dir("qemu_get_buffer", f, Direction::Read, 0, |f| {
        if buf.is_null() {
            f.set_error(MigError::new("qemu_get_buffer: NULL buffer"));
            return 0;
        }
        // SAFETY: the caller passes `size` writable bytes at `buf`, which
        // are its own memory (not guest RAM shared with running vCPUs).
        let out = unsafe { std::slice::from_raw_parts_mut(buf, size) };
        if f.get_buffer(out) {
            size
        } else {
            0
        }
    });
    if got == 0 && !buf.is_null() {
        // No part of a read that failed, or was refused, is passed on.
        // SAFETY: as above, `size` writable bytes at `buf`.
        unsafe { std::ptr::write_bytes(buf, 0, size) };
    }
    got
}

/// 0, or the stream's first error as a negative errno (-EINVAL for a
/// NULL stream).
#[no_mangle]
pub extern "C" fn qemu_file_get_error(f: *mut QemuFile) -> c_int {
    with("qemu_file_get_error", f, -libc::EINVAL, |f| f.error().map_or(0, |e| -e.errno()))
}

/// Records an error (a negative errno) on the stream; the migration fails.
#[no_mangle]
pub extern "C" fn qemu_file_set_error(f: *mut QemuFile, ret: c_int) {
    with("qemu_file_set_error", f, (), |f| {
        if ret < 0 {
            f.set_error(MigError::from_host(format!("a savevm handler reported error {ret}"), ret));
        }
    })
}

/// Bytes written or read so far (-1 for a NULL stream).
#[no_mangle]
pub extern "C" fn qemu_ftell(f: *mut QemuFile) -> i64 {
    with("qemu_ftell", f, -1, |f| f.tell() as i64)
}

/// Opens a stream over `fd` ("wb": outgoing, "rb": incoming) for
/// `migrate_fd_connect` or `process_incoming_migration`. livemig owns `fd`
/// on success, and makes it non-blocking (O_NONBLOCK, a flag of the open
/// file, so also of any duplicate of it). NULL on error (bad mode or fd;
/// the reason is logged, and the descriptor stays the caller's).
#[no_mangle]
pub extern "C" fn qemu_fdopen(fd: c_int, mode: *const c_char) -> *mut QemuFile {
    guard("qemu_fdopen", std::ptr::null_mut(), || {
        let dir = match super::cstr(mode, "mode") {
            Ok("wb") | Ok("w") => Direction::Write,
            Ok("rb") | Ok("r") => Direction::Read,
            _ => {
                log::error!("qemu_fdopen: mode must be \"rb\" or \"wb\"");
                return std::ptr::null_mut();
            }
        };
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            log::error!("qemu_fdopen: {fd} is not an open file descriptor");
            return std::ptr::null_mut();
        }
        let made = Aborter::new().and_then(|a| {
            // SAFETY: open descriptor handed to livemig by the caller.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // On failure the descriptor stays the caller's (documented):
            // given back open, never closed here.
            FdChannel::try_new(owned, format!("fd:{fd}"), a).map_err(|(e, owned)| {
                let _ = owned.into_raw_fd();
                e
            })
        });
        match made {
            Ok(chan) => Box::into_raw(Box::new(QemuFile::new(Box::new(chan), dir))),
            Err(e) => {
                log::error!("qemu_fdopen: {e}");
                std::ptr::null_mut()
            }
        }
    })
}

/// Flushes and closes a stream from `qemu_fdopen` that was not handed to
/// livemig, and its descriptor; 0 or a negative errno (-EINVAL for NULL).
/// The stream is freed either way.
#[no_mangle]
pub extern "C" fn qemu_fclose(f: *mut QemuFile) -> c_int {
    guard("qemu_fclose", -libc::EINVAL, || {
        if f.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: made by qemu_fdopen with Box::into_raw; closed once.
        let file = unsafe { *Box::from_raw(f) };
        match file.close() {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        }
    })
}
