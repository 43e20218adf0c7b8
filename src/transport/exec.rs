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
/// (see [`kill`]) takes the processes it started with it. It gets stdin,
/// stdout and stderr only (see [`no_inherited_fds`]).
pub fn spawn(cmd: &str, outgoing: bool, text: &str, abort: &Aborter) -> Result<Box<dyn Channel>> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd).process_group(0);
    // SAFETY: the closure makes only async-signal-safe system calls, as a
    // child between fork and exec may.
    unsafe { c.pre_exec(no_inherited_fds) };
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

/// In the child, before exec: every descriptor above stderr is marked
/// close-on-exec, so that the command inherits none of the host's (guest
/// RAM, disk images, KVM's, sockets) that the host left without
/// FD_CLOEXEC; as a command QEMU spawns through glib inherits none. (Marked
/// rather than closed: the pipe through which the child reports a failed
/// exec to `spawn` must stay open until the exec.) Only async-signal-safe
/// calls, no allocation: this runs between fork and exec.
fn no_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if r == 0 {
        return Ok(());
    }
    // A kernel before 5.11: each descriptor up to the limit, in turn.
    // SAFETY: sysconf has no memory-safety preconditions.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    let max = if max > 0 { max.min(1 << 20) as i32 } else { 1024 };
    for fd in 3..max {
        // SAFETY: fcntl on a descriptor number; one not open fails (EBADF).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Waits for the command to exit, bounded by the stall timeout, by
/// `deadline` (the channel's, e.g. the switchover's: the command's exit is
/// part of it) and by the aborter; a command still running then is killed.
/// `Ok(None)`: it exited, but how is not known (see [`try_reap`]).
pub(super) fn wait_child(child: &mut Child, abort: &Aborter, deadline: Option<Instant>) -> io::Result<Option<ExitStatus>> {
    let stall = Instant::now() + super::stall_timeout();
    let deadline = deadline.map_or(stall, |d| d.min(stall));
    loop {
        if let Some(st) = try_reap(child)? {
            return Ok(st);
        }
        if abort.is_aborted() {
            kill(child);
            let st = reap(child)?;
            return Err(io::Error::other(format!("command did not finish, killed{}", in_parens(st))));
        }
        if Instant::now() >= deadline {
            kill(child);
            let st = reap(child)?;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the command did not exit within the io timeout, killed{}", in_parens(st)),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn in_parens(st: Option<ExitStatus>) -> String {
    st.map_or_else(String::new, |st| format!(" ({st})"))
}

/// The command's exit: `None` while it runs, `Some(None)` once it has
/// exited where its status is gone. A host that ignores SIGCHLD (SIG_IGN
/// or SA_NOCLDWAIT, as daemons do to leave no zombies) has the kernel
/// reap its children as they exit: waitpid then fails with ECHILD, and
/// that means the command has exited, not that the stream failed (QEMU,
/// too, completes a migration whose command it cannot reap).
pub(super) fn try_reap(child: &mut Child) -> io::Result<Option<Option<ExitStatus>>> {
    match child.try_wait() {
        Ok(st) => Ok(st.map(Some)),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(Some(None)),
        Err(e) => Err(e),
    }
}

/// Waits for the command's exit (see [`try_reap`] for `None`).
fn reap(child: &mut Child) -> io::Result<Option<ExitStatus>> {
    match child.wait() {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Kills the command and whatever it started in its process group (a
/// pipeline's other stages, a command run in the background): killing the
/// shell alone would leave them running. Only while the command's pid is
/// still ours (running, or exited but not reaped): one reaped already (by
/// an earlier wait, or by the kernel in a host that ignores SIGCHLD) may
/// have been reused by another process, which must not be signalled.
pub(super) fn kill(child: &mut Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return };
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOWAIT only inspects the child (it reaps
    // nothing) and fills `info`.
    if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) } != 0 {
        // ECHILD: reaped already.
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group (its
    // id is the command's pid, held by the command, even as a zombie);
    // no memory is involved.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = child.kill();
}
