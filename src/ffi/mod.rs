//! The C boundary: every exported function and `#[repr(C)]` type.
//!
//! Each export checks its pointers and strings, runs its body inside
//! `guard` (a panic is logged and turned into the documented default,
//! never unwound into C), and reports failures through QEMU-style
//! `Error **errp` out-parameters: `errp` may be NULL; `*errp` is set only on
//! failure, to an `Error` the caller frees with `error_free`.

// Exported functions take raw pointers from C by design; each checks them
// (NULL, ownership) and documents its contract in the header.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod errors;
pub mod file;
pub mod host;
pub mod migration;
pub mod parameters;
pub mod ram;
pub mod savevm;
pub mod types;

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{MigError, Result};
use errors::Error;

/// Runs `body`, turning a panic into `default` (and a log line).
pub(crate) fn guard<T>(name: &str, default: T, body: impl FnOnce() -> T) -> T {
    crate::init();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(p) => {
            let what = crate::panic_message(p.as_ref());
            log::error!("internal error in {name}: {what}");
            default
        }
    }
}

/// Runs a fallible body; on `Err` (or a panic) sets `*errp` and returns
/// `default`.
pub(crate) fn guard_err<T: Copy>(name: &str, errp: *mut *mut Error, default: T, body: impl FnOnce() -> Result<T>) -> T {
    let r = guard(name, Err(MigError::new(format!("{name}: internal error (see the log)"))), body);
    match r {
        Ok(v) => v,
        Err(e) => {
            errors::set(errp, &e);
            default
        }
    }
}

/// Borrows a C string as UTF-8, with an error naming the argument.
pub(crate) fn cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(MigError::new(format!("{what} must not be NULL")));
    }
    // SAFETY: non-NULL; the caller passes a NUL-terminated string that lives
    // for the duration of the call (the C API contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| MigError::new(format!("{what} is not valid UTF-8")))
}
