//! livemig — live migration of virtual machines for C hypervisors.
//!
//! A VMM links `liblivemig` and includes `livemig.h`. The API mirrors QEMU's
//! `migration/migration.c` (`qmp_migrate`, `qmp_query_migrate`, notifiers,
//! blockers, capabilities) over one global migration state; the stream is
//! QEMU 7.2's savevm format, so a QEMU 7.2 is a peer in both directions.
//!
//! # Threads and locks
//!
//! - The host calls the `qmp_*` and `livemig_*` functions from any of its
//!   threads, with or without its own lock held. None of them blocks on the
//!   network, joins a running migration thread, or calls a notifier, but
//!   `qmp_migrate_incoming`, which (as `qemu_start_incoming_migration`)
//!   looks a `tcp:` host name up on the calling thread, within the io
//!   timeout.
//! - "livemig-out" (one per outgoing migration) connects, runs setup and
//!   iteration without the host lock, and takes the host lock for the
//!   switchover (VM stopped, END/FULL sections written) and for every
//!   notifier call. Failure and cancel handling run on it too.
//! - "livemig-in" (one per incoming migration) accepts and loads the
//!   stream; device load handlers run under the host lock, RAM is written
//!   straight into registered blocks without it.
//! - Notifiers run only on these threads, with the host lock held, once per
//!   state transition and in order. A notifier may call any query function,
//!   `qmp_migrate_cancel`, `migrate_fd_error`, and add or remove notifiers.
//! - Transitions made by livemig's threads happen under the host lock
//!   together with their notifiers, so a host that reads the state with
//!   its lock held never sees a state whose notifiers have not run yet
//!   (without the lock, it may see the state a moment earlier).
//! - Lock order: host lock before livemig's internal locks; livemig never
//!   takes the host lock while holding one of its own.
//!
//! Modules: the C boundary is [`ffi`]; everything else is safe Rust.

pub mod error;
pub mod ffi;
pub mod globalstate;
pub mod host;
pub mod incoming;
pub mod loadvm;
pub mod outgoing;
pub mod parameters;
pub mod params;
pub mod qemu_file;
pub mod ram;
pub mod savevm;
pub mod state;
pub mod transport;

/// Blocks SIGPIPE in the calling (livemig) thread, so a write to a closed
/// pipe fails with EPIPE instead of killing the host process.
pub(crate) fn block_sigpipe() {
    // SAFETY: sigset manipulation on a local, zero-initialised set; only the
    // calling thread's mask changes.
    unsafe {
        let set = sigpipe_set();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    SIGPIPE_BLOCKED.set(true);
}

thread_local! {
    /// This thread is one of livemig's, with SIGPIPE blocked for good.
    static SIGPIPE_BLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The set holding SIGPIPE alone.
fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a local, zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

/// Runs `write` (a write(2) to a pipe, whose closed reader raises SIGPIPE)
/// so that the caller gets EPIPE and the process no signal, on any thread:
/// a host thread writing a `qemu_fdopen` stream has SIGPIPE unblocked, and
/// its default action ends the process. Returns the byte count, or the
/// error of the write itself.
pub(crate) fn write_without_sigpipe(write: impl FnOnce() -> isize) -> std::io::Result<usize> {
    let done = |r: isize| if r >= 0 { Ok(r as usize) } else { Err(std::io::Error::last_os_error()) };
    if SIGPIPE_BLOCKED.get() {
        return done(write());
    }
    let set = sigpipe_set();
    // SAFETY: signal-mask calls on local sets; only this thread's mask and
    // pending signals are touched, and the old mask is restored.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let r = done(write());
        if r.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EPIPE)) && !was_pending {
            // Take the SIGPIPE this write raised before unblocking.
            let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) < 0 && *libc::__errno_location() == libc::EINTR {}
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// CPU time the calling thread has used so far, for the threads' closing
/// log lines (`RUST_LOG=livemig=info`).
pub(crate) fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Time the calling thread has spent runnable but waiting for a CPU, per
/// `/proc/thread-self/schedstat` (Linux with scheduler statistics; None
/// where it cannot be read). Time lost to other threads, such as a running
/// guest's vCPUs, that a stopped VM gives back.
pub(crate) fn thread_runqueue_wait() -> Option<std::time::Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(std::time::Duration::from_nanos(ns))
}

/// The message of a caught panic (empty when it carried no string).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Runs a migration thread's `body`, turning a panic (a bug in livemig, or
/// in a handler registered from Rust) into an error, so that the thread
/// still ends the migration the way it ends a failed one: state FAILED
/// with the reason, a stopped source VM started again, a destination VM
/// not started. What the body owned is dropped on the way out (a stream
/// is closed, the host lock released).
pub(crate) fn contain_panic<T>(thread: &str, body: impl FnOnce() -> error::Result<T>) -> error::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
        let msg = panic_message(p.as_ref());
        log::error!("internal error in the {thread} thread: {msg}");
        Err(error::MigError::new(format!("internal error in the {thread} thread: {msg}")))
    })
}

/// Initialises logging (`RUST_LOG`, e.g. `RUST_LOG=livemig=debug`) once;
/// output goes to stderr, never stdout.
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("livemig=warn"))
            .target(env_logger::Target::Stderr)
            .try_init();
        globalstate::register();
    });
}
