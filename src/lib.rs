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
//!   network, joins a running migration thread, or calls a notifier.
//! - "livemig-out" (one per outgoing migration) connects, runs setup and
//!   iteration without the host lock, and takes the host lock for the
//!   switchover (VM stopped, END/FULL sections written) and for every
//!   notifier call. Failure and cancel handling run on it too.
//! - "livemig-in" (one per incoming migration) accepts and loads the
//!   stream; device load handlers run under the host lock, RAM is written
//!   straight into registered blocks without it.
//! - Notifiers run only on these threads, with the host lock held, once per
//!   state transition and in order. A notifier may call any query function,
//!   `qmp_migrate_cancel`, and add or remove notifiers.
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
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
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
