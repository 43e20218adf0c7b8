//! The core error type.
//!
//! Every failure inside livemig is a [`MigError`]: a specific, lower-case
//! message (QEMU's wording where a QEMU 7.2 peer has one, so logs from both
//! sides read alike), an errno-style code for `qemu_file_get_error`, and the
//! underlying cause where there is one.

use std::fmt;
use std::io;

/// A migration error: what went wrong, in words a VMM operator can act on.
#[derive(Debug)]
pub struct MigError {
    msg: String,
    errno: i32,
    source: Option<io::Error>,
}

impl MigError {
    /// An error with a message and `EINVAL` as its code.
    pub fn new(msg: impl Into<String>) -> MigError {
        MigError { msg: msg.into(), errno: libc::EINVAL, source: None }
    }

    /// An error with an explicit errno-style code.
    pub fn with_errno(msg: impl Into<String>, errno: i32) -> MigError {
        MigError { msg: msg.into(), errno, source: None }
    }

    /// An error from a host callback's negative return value `ret`
    /// (`-errno`, as QEMU's callbacks return); one with no positive
    /// counterpart (`INT_MIN`) is EIO.
    pub fn from_host(msg: impl Into<String>, ret: i32) -> MigError {
        MigError::with_errno(msg, ret.checked_neg().filter(|e| *e > 0).unwrap_or(libc::EIO))
    }

    /// An I/O error, with what livemig was doing as context.
    pub fn io(context: impl Into<String>, err: io::Error) -> MigError {
        let errno = err.raw_os_error().unwrap_or(match err.kind() {
            // livemig's own stall timeout (no errno behind it).
            io::ErrorKind::TimedOut => libc::ETIMEDOUT,
            _ => libc::EIO,
        });
        MigError { msg: context.into(), errno, source: Some(err) }
    }

    /// The errno-style code (positive).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// Prefixes the message with more context, keeping code and cause.
    pub fn context(mut self, ctx: impl fmt::Display) -> MigError {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
}

impl fmt::Display for MigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(e) => {
                // strerror text only, as QEMU prints it: drop std's " (os error N)".
                let text = e.to_string();
                let text = match text.rfind(" (os error ") {
                    Some(i) if e.raw_os_error().is_some() => text[..i].to_string(),
                    _ => text,
                };
                write!(f, "{}: {}", self.msg, text)
            }
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for MigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl Clone for MigError {
    fn clone(&self) -> Self {
        // io::Error is not Clone; keep its text, which is all a copy needs.
        MigError { msg: self.to_string(), errno: self.errno, source: None }
    }
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, MigError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_keeps_errno_and_text() {
        let e = MigError::io("write to tcp:127.0.0.1:1", io::Error::from_raw_os_error(libc::EPIPE));
        assert_eq!(e.errno(), libc::EPIPE);
        assert_eq!(e.to_string(), "write to tcp:127.0.0.1:1: Broken pipe");
        let c = e.clone().context("migration");
        assert_eq!(c.to_string(), "migration: write to tcp:127.0.0.1:1: Broken pipe");
        assert_eq!(c.errno(), libc::EPIPE);
    }
}
