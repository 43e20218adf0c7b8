//! Host registration: callback table, machine name, named fds.

use std::ffi::{c_char, c_void};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use super::errors::Error;
use super::types::{LivemigHostOps, LIVEMIG_HOST_OPS_VERSION};
use super::{cstr, guard_err};
use crate::error::MigError;

/// The version of the library linked at run time, "MAJOR.MINOR.PATCH" (a
/// static string; do not free). A host built against one header and run
/// with another library can compare it with `LIVEMIG_VERSION_STRING`.
#[no_mangle]
pub extern "C" fn livemig_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Registers the host's callbacks (copied) and its opaque pointer. Refused,
/// with an error naming it, when a required callback is NULL, when
/// `version`/`size` do not describe a table this library knows, and while a
/// migration is in progress. Returns true on success.
#[no_mangle]
pub extern "C" fn livemig_set_host_ops(ops: *const LivemigHostOps, opaque: *mut c_void, errp: *mut *mut Error) -> bool {
    guard_err("livemig_set_host_ops", errp, false, || {
        if ops.is_null() {
            return Err(MigError::new("livemig_set_host_ops: ops must not be NULL"));
        }
        // SAFETY: non-NULL; read the two header fields first, which every
        // version of the table has.
        let (version, size) = unsafe { ((*ops).version, (*ops).size) };
        if version != LIVEMIG_HOST_OPS_VERSION {
            return Err(MigError::new(format!(
                "host operations version {version} is not supported (this library knows version {LIVEMIG_HOST_OPS_VERSION})"
            )));
        }
        if (size as usize) < std::mem::size_of::<LivemigHostOps>() {
            return Err(MigError::new(format!(
                "host operations size {size} is smaller than version 1's {}",
                std::mem::size_of::<LivemigHostOps>()
            )));
        }
        // SAFETY: the caller's table is at least as large as ours (checked).
        let table = unsafe { *ops };
        crate::host::set(table, opaque)?;
        Ok(true)
    })
}

/// Sets the machine name sent in (and required of) the stream's
/// configuration record, e.g. "none" or "pc-i440fx-7.2". NULL removes it:
/// then no configuration is sent and none is accepted.
#[no_mangle]
pub extern "C" fn livemig_set_machine_name(name: *const c_char, errp: *mut *mut Error) -> bool {
    guard_err("livemig_set_machine_name", errp, false, || {
        let n = if name.is_null() { None } else { Some(cstr(name, "name")?) };
        crate::savevm::set_machine_name(n)?;
        Ok(true)
    })
}

/// Registers `fd` as `name` for a later `fd:NAME` URI; livemig owns the
/// descriptor from a successful call on (and closes it when used or
/// removed). Refused, the descriptor left open and the caller's, for a
/// NULL, empty or numeric `name`, a name already registered, and a
/// descriptor that is not open.
#[no_mangle]
pub extern "C" fn livemig_fd_add(name: *const c_char, fd: i32, errp: *mut *mut Error) -> bool {
    guard_err("livemig_fd_add", errp, false, || {
        let name = cstr(name, "name")?;
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(MigError::new(format!("livemig_fd_add: {fd} is not an open file descriptor")));
        }
        // SAFETY: `fd` is open (checked above) and the caller lends it for
        // the duration of the call.
        let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| MigError::io("livemig_fd_add: dup", e))?;
        // On failure the duplicate is closed and the caller keeps `fd`.
        crate::transport::fd_add(name, dup)?;
        // SAFETY: on success livemig owns `fd` (documented); it holds the
        // duplicate, so the original is closed here, once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(true)
    })
}

/// Closes and forgets the fd registered as `name`; false, with an error,
/// when none is (also once a migration has taken it).
#[no_mangle]
pub extern "C" fn livemig_fd_remove(name: *const c_char, errp: *mut *mut Error) -> bool {
    guard_err("livemig_fd_remove", errp, false, || {
        crate::transport::fd_remove(cstr(name, "name")?)?;
        Ok(true)
    })
}

/// Sets how long a migration stream may make no progress (a peer that
/// stops reading or writing without closing) before it fails: 100 ms to one
/// day; 60 s by default. Applies to both directions, from the next wait on.
/// It also bounds the switchover: a source whose VM has been stopped this
/// long without the stream going out (for `exec:`, without the command
/// having exited) fails and runs the VM again. It bounds, too, the wait
/// for a return path's confirmation and the lookup of a `tcp:` host name
/// by `qemu_start_incoming_migration`.
#[no_mangle]
pub extern "C" fn livemig_set_io_timeout(ms: u64, errp: *mut *mut Error) -> bool {
    guard_err("livemig_set_io_timeout", errp, false, || {
        crate::transport::set_stall_timeout(ms)?;
        Ok(true)
    })
}
