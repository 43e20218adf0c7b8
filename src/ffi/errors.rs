//! `Error`: QEMU's opaque error object.

use std::ffi::{c_char, CString};

use super::guard;
use crate::error::MigError;

/// An error: a message. Opaque to C; freed with `error_free`.
pub struct Error {
    msg: CString,
}

impl Error {
    fn boxed(msg: &str) -> *mut Error {
        let msg = CString::new(msg.replace('\0', " ")).expect("NULs were replaced");
        Box::into_raw(Box::new(Error { msg }))
    }

    /// The message of a C `Error` (NULL gives None).
    pub(crate) fn message(e: *const Error) -> Option<String> {
        // SAFETY: a non-NULL `Error *` was made by this module and is alive
        // (the caller owns it until error_free).
        unsafe { e.as_ref() }.map(|e| e.msg.to_string_lossy().into_owned())
    }
}

/// Sets `*errp` to `e` if `errp` is not NULL and `*errp` is still NULL
/// (the first error is kept).
pub(crate) fn set(errp: *mut *mut Error, e: &MigError) {
    if errp.is_null() {
        log::debug!("error dropped (errp is NULL): {e}");
        return;
    }
    // SAFETY: non-NULL `errp` points to a caller-owned `Error *` slot.
    unsafe {
        if (*errp).is_null() {
            *errp = Error::boxed(&e.to_string());
        }
    }
}

/// For the QEMU-signature calls that return only a code: logs the error
/// the checked variant produced (if any) and frees it.
pub(crate) fn log_and_free(err: *mut Error, what: &str) {
    if let Some(m) = Error::message(err) {
        log::error!("{what}: {m}");
    }
    error_free(err);
}

/// Creates an error with `msg` (NULL gives an empty message).
#[no_mangle]
pub extern "C" fn error_new(msg: *const c_char) -> *mut Error {
    guard("error_new", std::ptr::null_mut(), || {
        // SAFETY: non-NULL; the caller passes a NUL-terminated string that
        // lives for the duration of the call (the C API contract).
        let m = if msg.is_null() { String::new() } else { unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned() };
        Error::boxed(&m)
    })
}

/// The error's message; valid until `error_free`. NULL gives "".
#[no_mangle]
pub extern "C" fn error_get_pretty(err: *const Error) -> *const c_char {
    // SAFETY: a non-NULL `Error *` was made by this module and is alive.
    match unsafe { err.as_ref() } {
        Some(e) => e.msg.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// A copy of `err` (NULL gives NULL).
#[no_mangle]
pub extern "C" fn error_copy(err: *const Error) -> *mut Error {
    guard("error_copy", std::ptr::null_mut(), || match Error::message(err) {
        Some(m) => Error::boxed(&m),
        None => std::ptr::null_mut(),
    })
}

/// Frees an error (NULL is ignored).
#[no_mangle]
pub extern "C" fn error_free(err: *mut Error) {
    if !err.is_null() {
        // SAFETY: made by Box::into_raw in this module; freed once by contract.
        drop(unsafe { Box::from_raw(err) });
    }
}
