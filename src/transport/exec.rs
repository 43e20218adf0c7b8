//! `exec:COMMAND`: the stream goes to a command's stdin or comes from its stdout.

use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Aborter, Channel, FdChannel};
use crate::error::{MigError, Result};

/// Runs `cmd` with `/bin/sh -c`; `outgoing` pipes its stdin (its stdout
/// goes nowhere, not to the host's: QEMU keeps it too), else its stdout.
/// The shell leads a process group of its own, so that a command killed
/// (see [`kill`]) takes the processes it started with it.
pub fn spawn(cmd: &str, outgoing: bool, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd).process_group(0);
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

/// Waits for the command to exit, bounded by the stall timeout, by
/// `deadline` (the channel's, e.g. the switchover's: the command's exit is
/// part of it) and by the aborter; a command still running then is killed.
pub(super) fn wait_child(child: &mut Child, abort: &Aborter, deadline: Option<Instant>) -> io::Result<ExitStatus> {
    let stall = Instant::now() + super::stall_timeout();
    let deadline = deadline.map_or(stall, |d| d.min(stall));
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if abort.is_aborted() {
            kill(child);
            let st = child.wait()?;
            return Err(io::Error::other(format!("command did not finish, killed ({st})")));
        }
        if Instant::now() >= deadline {
            kill(child);
            let st = child.wait()?;
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("the command did not exit within the io timeout, killed ({st})")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills the command and whatever it started in its process group (a
/// pipeline's other stages, a command run in the background): killing the
/// shell alone would leave them running. Called before the child is
/// waited for, so its pid (the group's id) cannot have been reused.
pub(super) fn kill(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group;
        // no memory is involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
}
