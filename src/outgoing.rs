//! The source side: `qmp_migrate`, the migration thread, cancel.
//!
//! The thread ("livemig-out") owns the stream. It connects, writes the
//! setup sections, then runs 100 ms windows: within a window's byte budget
//! (speed / 10) it asks the live handlers how much is pending and iterates
//! while that exceeds `max_size` = bandwidth × downtime limit × 0.8 (a margin
//! for the last pass); once the rest
//! fits in the downtime limit it switches over under the host lock: wake the
//! guest, stop the VM (FINISH_MIGRATE), lift the rate limit, write END and
//! FULL sections, EOF. A failure or cancel at any point cancels the
//! handlers and restarts a VM that was running. All cleanup runs on this
//! thread; the host needs no event loop.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{MigError, Result};
use crate::host::{self, Host, RunState};
use crate::params;
use crate::qemu_file::{Direction, QemuFile};
use crate::savevm::SaveState;
use crate::state::{notify, MigrationStatus, MigrationStatus as S, OUTGOING};
use crate::transport::{self, Aborter, Uri};

/// Share of the downtime limit the switchover plans to use.
pub const SWITCHOVER_MARGIN: f64 = 0.8;

/// Length of one rate-limit / bandwidth window.
pub const WINDOW: Duration = Duration::from_millis(100);

/// Figures of the current or last outgoing migration.
#[derive(Debug, Clone, Default)]
pub struct OutStats {
    /// Why it failed.
    pub error: Option<String>,
    /// Total time in ms (running: so far).
    pub total_time_ms: u64,
    /// Downtime in ms (once completed).
    pub downtime_ms: Option<u64>,
    /// Setup time in ms.
    pub setup_time_ms: u64,
    /// Expected downtime in ms (while active; once completed, the estimate
    /// the switchover was decided on).
    pub expected_downtime_ms: u64,
    /// Bytes written to the stream.
    pub transferred: u64,
    /// Bytes written after the VM stopped.
    pub downtime_bytes: u64,
    /// Throughput of the last window, in megabits per second.
    pub mbps: f64,
    /// Bytes still pending at the last check.
    pub remaining: u64,
}

struct Outgoing {
    stats: OutStats,
    start: Option<Instant>,
    aborter: Option<Aborter>,
    thread: Option<JoinHandle<()>>,
    blockers: Vec<(usize, String)>,
    /// An error the host reported with migrate_fd_error.
    host_error: Option<String>,
}

static OUT: Mutex<Outgoing> =
    Mutex::new(Outgoing { stats: empty_stats(), start: None, aborter: None, thread: None, blockers: Vec::new(), host_error: None });
static WAKE: Condvar = Condvar::new();
static WAKE_LOCK: Mutex<()> = Mutex::new(());

const fn empty_stats() -> OutStats {
    OutStats {
        error: None,
        total_time_ms: 0,
        downtime_ms: None,
        setup_time_ms: 0,
        expected_downtime_ms: 0,
        transferred: 0,
        downtime_bytes: 0,
        mbps: 0.0,
        remaining: 0,
    }
}

/// A copy of the current figures (total time updated while running).
pub fn stats() -> OutStats {
    let o = OUT.lock();
    let mut s = o.stats.clone();
    if OUTGOING.status().is_active() {
        if let Some(start) = o.start {
            s.total_time_ms = start.elapsed().as_millis() as u64;
        }
    }
    s
}

fn update<F: FnOnce(&mut OutStats)>(f: F) {
    f(&mut OUT.lock().stats);
}

/// Adds a blocker: `qmp_migrate` refuses with `msg` while it is registered.
pub fn add_blocker(key: usize, msg: String) {
    OUT.lock().blockers.push((key, msg));
}

/// Removes the blocker registered under `key`.
pub fn del_blocker(key: usize) {
    OUT.lock().blockers.retain(|(k, _)| *k != key);
}

/// Where the stream goes.
pub enum Target {
    /// A URI to connect to (on the migration thread).
    Uri(Uri, String),
    /// A stream the host opened.
    File(QemuFile),
}

/// Starts a migration to `target`. Never blocks on the network.
pub fn start(target: Target) -> Result<()> {
    let host = host::get()?;
    let mut o = OUT.lock();
    if let Some((_, msg)) = o.blockers.first() {
        return Err(MigError::new(msg.clone()));
    }
    if crate::state::INCOMING.status().is_active() {
        return Err(MigError::new("Guest is waiting for an incoming migration"));
    }
    let prev = OUTGOING.status();
    if !prev.is_idle() || !OUTGOING.cas(prev, S::Setup) {
        return Err(MigError::new("There's a migration process in progress"));
    }
    if let Some(t) = o.thread.take() {
        // The previous thread touches no shared state after its final
        // transition (it may still be running its notifiers): reap it if it
        // has exited, else let it end on its own. Never wait here — the
        // caller may hold the host lock, or be that thread's notifier.
        if t.is_finished() {
            let _ = t.join();
        }
    }
    let aborter = match Aborter::new() {
        Ok(a) => a,
        Err(e) => {
            OUTGOING.cas(S::Setup, prev);
            return Err(e);
        }
    };
    o.stats = empty_stats();
    o.start = Some(Instant::now());
    o.aborter = Some(aborter.clone());
    o.host_error = None;
    let spawned = std::thread::Builder::new().name("livemig-out".into()).spawn(move || {
        crate::block_sigpipe();
        run(host, target, aborter);
    });
    match spawned {
        Ok(t) => {
            o.thread = Some(t);
            Ok(())
        }
        Err(e) => {
            OUTGOING.cas(S::Setup, prev);
            Err(MigError::io("cannot start the migration thread", e))
        }
    }
}

/// Requests a cancel; the migration thread carries it out.
pub fn cancel() {
    if OUTGOING.cas_any(&[S::Setup, S::Active], S::Cancelling).is_some() {
        if let Some(a) = &OUT.lock().aborter {
            a.abort();
        }
        let _g = WAKE_LOCK.lock();
        WAKE.notify_all();
    }
}

/// The host reports a failure of the current migration (`migrate_fd_error`).
pub fn host_error(msg: String) {
    let mut o = OUT.lock();
    if OUTGOING.status().is_active() {
        o.host_error.get_or_insert(msg);
        if let Some(a) = &o.aborter {
            a.abort();
        }
    }
}

/// Waits up to `d`, returning early on a cancel.
fn sleep_interruptible(d: Duration) {
    let mut g = WAKE_LOCK.lock();
    if OUTGOING.status() == S::Cancelling {
        return;
    }
    WAKE.wait_for(&mut g, d);
}

/// Where the thread got to, for the unwinding path.
struct Progress {
    save: Option<SaveState>,
    /// The VM was running before we stopped it.
    stopped_running_vm: bool,
}

fn run(host: Host, target: Target, aborter: Aborter) {
    {
        let _l = host.lock();
        notify(S::Setup, false);
    }
    let mut p = Progress { save: None, stopped_running_vm: false };
    let file = match target {
        Target::File(f) => Ok(f),
        Target::Uri(uri, text) => transport::connect(&uri, &text, &aborter).map(|c| QemuFile::new(c, Direction::Write)),
    };
    let result = file.and_then(|f| migrate(&host, f, &mut p));
    finish(&host, result, p);
}

/// Runs the migration; on success the stream is closed and the state is
/// COMPLETED. On error `f` is dropped (closing the channel).
fn migrate(host: &Host, mut f: QemuFile, p: &mut Progress) -> Result<()> {
    let f = &mut f;
    let start = Instant::now();
    let mut prm = params::get();
    f.set_rate_limit(prm.speed / 10);
    p.save = Some(SaveState::begin(f)?);
    let save = p.save.as_mut().expect("just set");
    update(|s| s.setup_time_ms = start.elapsed().as_millis() as u64);
    if !OUTGOING.cas(S::Setup, S::Active) {
        return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
    }
    {
        let _l = host.lock();
        notify(S::Active, false);
    }
    let mut window_start = Instant::now();
    let mut window_bytes_start = f.tell();
    let mut max_size: u64 = 0;
    let mut bw_per_ms = 0.0f64;
    loop {
        if OUTGOING.status() != S::Active {
            return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
        }
        f.check()?;
        if !f.rate_limit_exceeded() {
            let pending = save.pending(max_size);
            update(|s| s.remaining = pending);
            if should_iterate(pending, max_size) {
                save.iterate(f)?;
            } else {
                // The estimate the switchover is made on, kept for the report.
                let expected = if bw_per_ms > 0.0 { (pending as f64 / bw_per_ms) as u64 } else { 0 };
                update(|s| s.expected_downtime_ms = expected);
                return switchover(host, f, save, &mut p.stopped_running_vm, start);
            }
        }
        let elapsed = window_start.elapsed();
        if elapsed >= WINDOW {
            let sent = f.tell() - window_bytes_start;
            prm = params::get();
            let w = Window::measure(sent, elapsed, prm.downtime_ns, crate::ram::dirty_bytes_rate(), save.pending(max_size));
            max_size = w.max_size;
            bw_per_ms = sent as f64 / elapsed.as_secs_f64() / 1000.0;
            let expected = w.expected_downtime_ms;
            update(|s| {
                s.transferred = f.tell();
                s.mbps = w.mbps;
                s.expected_downtime_ms = expected;
            });
            log::debug!("window: {sent} bytes in {elapsed:?}, max_size {max_size}, expected downtime {expected} ms");
            f.set_rate_limit(prm.speed / 10);
            f.reset_rate_limit();
            window_start = Instant::now();
            window_bytes_start = f.tell();
        } else if f.rate_limit_exceeded() {
            f.check()?;
            sleep_interruptible(WINDOW - elapsed);
        }
    }
}

/// The convergence decision: keep iterating while the pending bytes do not
/// fit in what one downtime window can send.
pub fn should_iterate(pending: u64, max_size: u64) -> bool {
    pending > 0 && pending >= max_size
}

/// What one finished window tells about bandwidth and convergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Bytes that fit in the downtime limit at the measured bandwidth.
    pub max_size: u64,
    /// Expected downtime in ms: the larger of (pending / bandwidth) and
    /// (dirty rate / bandwidth), QEMU's estimate.
    pub expected_downtime_ms: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
}

impl Window {
    /// Figures from `sent` bytes in `elapsed`, a downtime limit, the dirty
    /// rate (bytes/s) and the bytes pending.
    pub fn measure(sent: u64, elapsed: Duration, downtime_ns: u64, dirty_bytes_rate: u64, pending: u64) -> Window {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let bw_per_ms = sent as f64 / secs / 1000.0;
        // Aim at 80 % of the limit: the last pass shares the link and the
        // destination's CPU with the final sync and device state.
        let max_size = (bw_per_ms * (downtime_ns as f64 / 1e6) * SWITCHOVER_MARGIN) as u64;
        let expected_downtime_ms = if bw_per_ms > 0.0 { ((pending.max(dirty_bytes_rate / 1000)) as f64 / bw_per_ms) as u64 } else { 0 };
        Window { max_size, expected_downtime_ms, mbps: sent as f64 * 8.0 / secs / 1e6 }
    }
}

/// Stop-and-copy under the host lock. Everything that can fail, and every
/// change to shared state (stream closed, handlers cleaned up), happens
/// before the transition to COMPLETED: after it, a later error must not
/// restart a VM that now runs on the destination.
fn switchover(host: &Host, f: &mut QemuFile, save: &mut SaveState, stopped_running_vm: &mut bool, start: Instant) -> Result<()> {
    let _l = host.lock();
    host.system_wakeup_request();
    let was_running = host.runstate_is_running();
    crate::globalstate::store(host.runstate());
    let stop_time = Instant::now();
    host.vm_stop_force_state(RunState::FinishMigrate)?;
    *stopped_running_vm = was_running;
    f.set_rate_limit(0);
    let before = f.tell();
    save.complete(f)?;
    f.flush()?;
    save.await_destination(f)?;
    // Close the channel now (for exec:, wait for the command): its failure
    // is the migration's failure.
    let closing = std::mem::replace(f, QemuFile::closed());
    let sent = closing.tell();
    closing.close()?;
    save.cleanup();
    let downtime = stop_time.elapsed().as_millis() as u64;
    let total = start.elapsed();
    update(|s| {
        s.transferred = sent;
        s.downtime_bytes = sent - before;
        s.downtime_ms = Some(downtime);
        s.total_time_ms = total.as_millis() as u64;
        s.remaining = 0;
        s.mbps = sent as f64 * 8.0 / total.as_secs_f64().max(1e-9) / 1e6;
    });
    OUT.lock().aborter = None;
    // The run state first: whoever sees COMPLETED sees POSTMIGRATE.
    host.runstate_set(RunState::Postmigrate);
    if !OUTGOING.cas(S::Active, S::Completed) {
        return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
    }
    log::info!("migration completed: {sent} bytes, total {} ms, downtime {downtime} ms", total.as_millis());
    notify(S::Completed, false);
    Ok(())
}

fn finish(host: &Host, result: Result<()>, mut p: Progress) {
    if let Some(save) = p.save.as_mut() {
        if result.is_err() {
            save.cancel();
        }
        save.cleanup();
    }
    let Err(err) = result else {
        // Completed and notified inside the switchover, under the host lock.
        return;
    };
    let host_err = OUT.lock().host_error.take();
    let _l = host.lock();
    let cancelled = OUTGOING.status() == S::Cancelling;
    if cancelled {
        notify(S::Cancelling, false);
    }
    if p.stopped_running_vm {
        if let Err(e) = host.vm_start() {
            log::error!("could not restart the source VM after the failed migration: {e}");
        }
    }
    let msg = host_err.unwrap_or_else(|| err.to_string());
    {
        let mut o = OUT.lock();
        o.aborter = None;
        if let Some(start) = o.start {
            o.stats.total_time_ms = start.elapsed().as_millis() as u64;
        }
        if !cancelled {
            o.stats.error = Some(msg.clone());
        }
    }
    if cancelled {
        OUTGOING.cas(S::Cancelling, S::Cancelled);
        log::info!("migration cancelled");
        notify(S::Cancelled, false);
    } else if let Some(from) = OUTGOING.cas_any(&[S::Setup, S::Active], S::Failed) {
        log::error!("migration failed (in {}): {msg}", from.name());
        notify(S::Failed, false);
    } else if OUTGOING.cas(S::Cancelling, S::Cancelled) {
        notify(S::Cancelled, false);
    }
}

/// The outgoing status.
pub fn status() -> MigrationStatus {
    OUTGOING.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_figures() {
        // 10 MB in 100 ms = 100 MB/s = 100_000 bytes/ms; 300 ms of downtime
        // sends 30 MB, of which the switchover plans to use 80 %.
        let w = Window::measure(10_000_000, Duration::from_millis(100), 300_000_000, 0, 15_000_000);
        assert_eq!(w.max_size, 24_000_000);
        assert_eq!(w.expected_downtime_ms, 150);
        assert!((w.mbps - 800.0).abs() < 1e-6);
        // Nothing sent: nothing fits, no estimate.
        let w = Window::measure(0, Duration::from_millis(100), 300_000_000, 1 << 20, 1 << 20);
        assert_eq!((w.max_size, w.expected_downtime_ms), (0, 0));
    }

    #[test]
    fn convergence_decision() {
        assert!(should_iterate(1, 0), "before the first window everything iterates");
        assert!(should_iterate(30_000_000, 30_000_000));
        assert!(!should_iterate(29_999_999, 30_000_000), "fits in the downtime: switch over");
        assert!(!should_iterate(0, 0), "nothing pending: switch over");
    }
}
