//! `exec:COMMAND`: the stream goes to a command's stdin or comes from its stdout.

use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Aborter, Channel, FdChannel};
use crate::error::{MigError, Result};

/// Runs `cmd` with `/bin/sh -c`; `outgoing` pipes its stdin (its stdout
/// goes nowhere, not to the host's: QEMU keeps it too), else its stdout.
pub fn spawn(cmd: &str, outgoing: bool, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    if outgoing {
        c.stdin(Stdio::piped()).stdout(Stdio::null());
    } else {
        c.stdout(Stdio::piped()).stdin(Stdio::null());
    }
    let mut child = c.spawn().map_err(|e| MigError::io(format!("{text}: cannot run /bin/sh"), e))?;
    let fd: OwnedFd =
        if outgoing { child.stdin.take().expect("stdin was piped").into() } else { child.stdout.take().expect("stdout was piped").into() };
    Ok(Box::new(FdChannel::new(fd, text.to_string(), abort.clone())?.with_child(child)))
}

/// Waits for the command to exit, bounded by the stall timeout and the aborter.
pub(super) fn wait_child(child: &mut Child, abort: &Aborter) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + super::stall_timeout();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if abort.is_aborted() || Instant::now() >= deadline {
            let _ = child.kill();
            let st = child.wait()?;
            return Err(io::Error::other(format!("command did not finish, killed ({st})")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
