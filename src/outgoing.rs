//! The source side: `qmp_migrate`, the migration thread, cancel.
//!
//! The thread ("livemig-out") owns the stream. It connects, writes the
//! setup sections, then runs 100 ms windows: within a window's byte budget
//! (speed / 10) it asks the live handlers how much is pending and iterates
//! until the first round has reached every page, the rate of re-sent pages
//! has been measured (for at most 40 ms more) and the rest is expected to
//! take at most 80 % of the downtime limit (a margin for the last pass;
//! see [`should_iterate`] and [`Rates`]); once the rest
//! fits in the downtime limit it switches over under the host lock: wake the
//! guest, stop the VM (FINISH_MIGRATE), lift the rate limit, write END and
//! FULL sections, EOF (no wait for the destination goes past the io
//! timeout counted from stopping the VM). A new
//! speed limit applies at once to the window in progress. A failure, a
//! host error (`migrate_fd_error`) or a cancel at any point cancels the
//! handlers and restarts a VM that was running. All cleanup runs on this
//! thread; the host needs no event loop.

use std::sync::atomic::{AtomicBool, Ordering};
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

mod convergence;
use convergence::{budget_ms, probing, window_budget, RATE_SAMPLE};
use convergence::{expected_downtime_ms, should_iterate, Bucket, Rates, Window, WindowSample};

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
    /// RAM bytes written after the switchover stopped the VM.
    pub downtime_bytes: u64,
    /// The VM did not run when the migration started, nor at the
    /// switchover: as QEMU 7.2 counts a RAM byte sent while the VM does
    /// not run as downtime-bytes, all of them are.
    pub vm_paused: bool,
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
    /// The end of the stream is being sent: the destination may load it
    /// all and start the VM, so a cancel (or a host error) is too late and
    /// is ignored; only a failure of the stream itself fails the migration.
    committed: bool,
    /// A failed migration's end is decided (failed or cancelled): a later
    /// cancel or host error does not change it.
    settled: bool,
    /// Migrations started so far.
    started: u64,
}

static OUT: Mutex<Outgoing> = Mutex::new(Outgoing {
    stats: empty_stats(),
    start: None,
    aborter: None,
    thread: None,
    blockers: Vec::new(),
    host_error: None,
    committed: false,
    settled: false,
    started: 0,
});
static WAKE: Condvar = Condvar::new();
static WAKE_LOCK: Mutex<()> = Mutex::new(());
/// The speed limit changed since the migration thread last read it.
static SPEED_CHANGED: AtomicBool = AtomicBool::new(false);

const fn empty_stats() -> OutStats {
    OutStats {
        error: None,
        total_time_ms: 0,
        downtime_ms: None,
        setup_time_ms: 0,
        expected_downtime_ms: 0,
        transferred: 0,
        downtime_bytes: 0,
        vm_paused: false,
        mbps: 0.0,
        remaining: 0,
    }
}

/// A copy of the current figures (total time updated while running).
pub fn stats() -> OutStats {
    with_stats(|_, s| s.clone())
}

/// Runs `f` on the status and the figures of one migration: both are read
/// under OUT, where `start` leaves idle and resets the figures (and the RAM
/// counters) for the next one, so a query racing that start sees either
/// the last migration whole or the next one, never the last one's status
/// with the next one's figures. `f` must take no host lock (nor OUT).
pub fn with_stats<T>(f: impl FnOnce(MigrationStatus, &OutStats) -> T) -> T {
    let o = OUT.lock();
    let status = OUTGOING.status();
    if status.is_active() {
        if let Some(start) = o.start {
            let mut s = o.stats.clone();
            s.total_time_ms = start.elapsed().as_millis() as u64;
            return f(status, &s);
        }
    }
    f(status, &o.stats)
}

fn update<F: FnOnce(&mut OutStats)>(f: F) {
    f(&mut OUT.lock().stats);
}

/// Adds a blocker: `qmp_migrate` refuses with `msg` while it is
/// registered. Refused (EBUSY) while a migration runs; checked under OUT,
/// where `start` checks the blockers and leaves idle.
pub fn add_blocker(key: usize, msg: String) -> Result<()> {
    let mut o = OUT.lock();
    if OUTGOING.status().is_active() {
        return Err(MigError::with_errno(
            format!("disallowing migration blocker (migration/snapshot in progress) for: {msg}"),
            libc::EBUSY,
        ));
    }
    o.blockers.push((key, msg));
    Ok(())
}

/// The registered blockers' texts, oldest first.
pub fn blocker_reasons() -> Vec<String> {
    OUT.lock().blockers.iter().map(|(_, m)| m.clone()).collect()
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
    start_checked(Ok(target))
}

/// [`start`] with a target that could not be made (a URI that cannot be
/// parsed): as in QEMU 7.2's `qmp_migrate`, a migration in progress, the
/// run state and a blocker are reported first, then the target's error.
/// Either way nothing changes.
pub fn start_checked(target: Result<Target>) -> Result<()> {
    // Asked before OUT is taken: the migration thread takes OUT while it
    // holds the host lock, which a host's run-state callback may want. A
    // migration that ended or started meanwhile makes the answer stale (a
    // completed one leaves the VM postmigrate): it is asked again.
    let (runstate, mut o) = loop {
        let seen = (OUTGOING.status(), OUT.lock().started);
        let runstate = host::get()?.runstate()?;
        let o = OUT.lock();
        if (OUTGOING.status(), o.started) == seen {
            break (runstate, o);
        }
    };
    // Until this side has left idle, the other cannot (see STARTING).
    let starting = crate::state::STARTING.lock();
    // The refusals in QEMU 7.2's order (migrate_prepare): a migration in
    // progress, the run state, then the blockers.
    const IN_PROGRESS: &str = "There's a migration process in progress";
    let prev = OUTGOING.status();
    if !prev.is_idle() {
        return Err(MigError::new(IN_PROGRESS));
    }
    // As QEMU 7.2, also by the run state: a VM in inmigrate (waiting for
    // an incoming migration, or left there by one that failed) holds no
    // state worth sending.
    if crate::state::INCOMING.status().is_active() || runstate == RunState::Inmigrate {
        return Err(MigError::new("Guest is waiting for an incoming migration"));
    }
    if runstate == RunState::Postmigrate {
        // As QEMU: this VM's state went to a destination already.
        return Err(MigError::new("Can't migrate the vm that was paused due to previous migration"));
    }
    if let Some((_, msg)) = o.blockers.last() {
        // The newest blocker, as QEMU reports it.
        return Err(MigError::new(msg.clone()));
    }
    // What can still refuse the call is done before the state leaves idle
    // (nothing else leaves it while OUT is held): a refused call never
    // shows as a migration in progress, for which a capability change, a
    // blocker or an incoming migration made meanwhile on another thread
    // would be refused. A named fd is taken by the call, as in QEMU.
    let prepared = (|| -> Result<(Target, Aborter)> {
        let target = match target? {
            Target::Uri(uri @ Uri::FdName(_), text) => Target::File(QemuFile::new(transport::fd_channel(&uri, &text)?, Direction::Write)),
            t => t,
        };
        // A stream the host opened is woken through its own aborter.
        let own = match &target {
            Target::File(f) => f.aborter(),
            Target::Uri(..) => None,
        };
        Ok((target, own.map_or_else(Aborter::new, Ok)?))
    })();
    // A target that cannot be made is refused like the rest: nothing
    // changes (QEMU 7.2 also leaves its state FAILED then; livemig keeps
    // the last migration's state and figures, as for any bad input).
    let (target, aborter) = prepared?;
    if !OUTGOING.cas(prev, S::Setup) {
        return Err(MigError::new(IN_PROGRESS));
    }
    o.started += 1;
    drop(starting);
    if let Some(t) = o.thread.take() {
        // The previous thread touches no shared state after its final
        // transition (it may still be running its notifiers): reap it if it
        // has exited, else let it end on its own. Never wait here — the
        // caller may hold the host lock, or be that thread's notifier.
        if t.is_finished() {
            let _ = t.join();
        }
    }
    // Out of idle, the host table, the block list and the capabilities
    // can no longer change under the migration (each change is refused
    // under its own lock once the state left idle): the table is taken
    // now (one was registered: it was asked for the run state above).
    let host = match host::get() {
        Ok(h) => h,
        Err(e) => {
            OUTGOING.cas(S::Setup, prev);
            return Err(e);
        }
    };
    // As QEMU 7.2 (migrate_fd_connect): the downtime limit is the
    // expected downtime until the first estimate.
    o.stats =
        OutStats { expected_downtime_ms: params::get().downtime_ns / 1_000_000, vm_paused: runstate != RunState::Running, ..empty_stats() };
    crate::ram::reset_counters();
    o.start = Some(Instant::now());
    o.aborter = Some(aborter.clone());
    o.host_error = None;
    o.committed = false;
    o.settled = false;
    let spawned = std::thread::Builder::new().name("livemig-out".into()).spawn(move || {
        crate::block_sigpipe();
        run(host, target, aborter);
        log::info!("migration thread done: {} ms CPU", crate::thread_cpu_time().as_millis());
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

/// Requests a cancel; the migration thread carries it out. Ignored once
/// the end of the stream is being sent (see `Outgoing::committed`), once
/// a failed migration's end is decided (`Outgoing::settled`), and once
/// the host has reported an error (`migrate_fd_error`): the migration
/// fails with it.
pub fn cancel() {
    let o = OUT.lock();
    if o.committed || o.settled || o.host_error.is_some() {
        if o.committed && OUTGOING.status() == S::Active {
            log::warn!("cancel ignored: the switchover is sending the end of the stream");
        } else if o.host_error.is_some() {
            log::info!("cancel ignored: the migration fails with the host's error");
        }
        return;
    }
    if OUTGOING.cas_any(&[S::Setup, S::Active], S::Cancelling).is_some() {
        if let Some(a) = &o.aborter {
            a.abort();
        }
        drop(o);
        let _g = WAKE_LOCK.lock();
        WAKE.notify_all();
    }
}

/// The host reports a failure of the current migration (`migrate_fd_error`).
/// Ignored, like a cancel, once the end of the stream is being sent.
pub fn host_error(msg: String) {
    let mut o = OUT.lock();
    if o.committed || o.settled {
        if o.committed && OUTGOING.status() == S::Active {
            log::warn!("host error ignored: the switchover is sending the end of the stream: {msg}");
        }
        return;
    }
    if OUTGOING.status().is_active() {
        o.host_error.get_or_insert(msg);
        if let Some(a) = &o.aborter {
            a.abort();
        }
        drop(o);
        // Wakes a thread sleeping out a window under a speed limit.
        let _g = WAKE_LOCK.lock();
        WAKE.notify_all();
    }
}

/// Waits up to `d`, returning early on a cancel, a host error (`aborter`
/// fired) or a new speed limit. Each is checked under WAKE_LOCK, which
/// whoever makes one takes (after making it) to wake this wait: one made
/// before the wait starts is seen here, one made later wakes it.
fn sleep_interruptible(d: Duration, aborter: &Aborter) {
    let mut g = WAKE_LOCK.lock();
    if OUTGOING.status() == S::Cancelling || aborter.is_aborted() || SPEED_CHANGED.load(Ordering::Acquire) {
        return;
    }
    WAKE.wait_for(&mut g, d);
}

/// A new speed limit was set: a migration in progress applies it to the
/// window it is in, as QEMU does, and a thread waiting out a spent window
/// wakes to send under a raised limit at once.
pub(crate) fn speed_changed() {
    SPEED_CHANGED.store(true, Ordering::Release);
    let _g = WAKE_LOCK.lock();
    WAKE.notify_all();
}

/// Where the thread got to, for the unwinding path.
struct Progress {
    save: Option<SaveState>,
    /// The run state before the switchover stopped the VM (None: not
    /// stopped): a VM that was running is started again on failure, one
    /// that was not gets this state back.
    stopped_from: Option<RunState>,
    /// The generation of this migration's RAM final pass, once RAM's setup
    /// began it (`crate::ram::begin_final_pass`): what ends it.
    final_pass: Option<u64>,
}

fn run(host: Host, target: Target, aborter: Aborter) {
    {
        let _l = host.lock();
        notify(S::Setup, false);
    }
    let mut p = Progress { save: None, stopped_from: None, final_pass: None };
    let result = crate::contain_panic("migration", || {
        let file = match target {
            Target::File(f) => Ok(f),
            Target::Uri(uri, text) => transport::connect(&uri, &text, &aborter).map(|c| QemuFile::new(c, Direction::Write)),
        };
        file.and_then(|f| migrate(&host, f, &mut p, &aborter))
    });
    if result.is_err() && OUTGOING.status() == S::Completed {
        // A panic after the switchover completed (the error is logged): the
        // VM now runs on the destination, so this one must stay stopped.
        return;
    }
    let Err(err) = result else {
        // Completed: the switchover cleaned up and notified under the host
        // lock. Nothing shared is touched after that final transition (the
        // host may replace its table or free its lock once it sees it).
        return;
    };
    // Cancelled or failed is decided now, under OUT, before waiting for the
    // host lock: a cancel arriving later (a host cancels under its lock)
    // would otherwise turn this failure into CANCELLED and hide its error.
    let outcome = {
        let mut o = OUT.lock();
        o.settled = true;
        Outcome { cancelled: OUTGOING.status() == S::Cancelling, host_error: o.host_error.take() }
    };
    finish(&host, err, outcome, p);
}

/// How a failed migration ends, decided once it has failed.
struct Outcome {
    /// A cancel came first: CANCELLED rather than FAILED.
    cancelled: bool,
    /// The host's `migrate_fd_error` message, reported instead of the
    /// migration's own error.
    host_error: Option<String>,
}

/// Runs the migration; on success the stream is closed and the state is
/// COMPLETED. On error `f` is dropped (closing the channel).
fn migrate(host: &Host, mut f: QemuFile, p: &mut Progress, aborter: &Aborter) -> Result<()> {
    let f = &mut f;
    let start = Instant::now();
    SPEED_CHANGED.store(false, Ordering::Relaxed);
    let mut prm = params::get();
    f.set_rate_limit(window_budget(prm.speed));
    // Kept in `p` before any handler's setup runs: on failure, every
    // handler is cancelled and cleaned up, whether its setup ran or not.
    let save = p.save.insert(SaveState::registered());
    let began = save.begin(f);
    p.final_pass = Some(crate::ram::final_pass_generation());
    began?;
    update(|s| s.setup_time_ms = start.elapsed().as_millis() as u64);
    {
        // The move and its notifiers under the host lock, as every
        // transition of this thread: a host reading the state under its
        // lock never sees ACTIVE before its notifiers ran.
        let _l = host.lock();
        {
            // Under OUT, where the host's error is recorded: one reported
            // during setup fails the migration from SETUP (no notifier is
            // told of ACTIVE after it), one reported later from ACTIVE.
            let o = OUT.lock();
            if o.host_error.is_some() {
                return Err(MigError::with_errno("migration aborted", libc::ECANCELED));
            }
            if !OUTGOING.cas(S::Setup, S::Active) {
                return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
            }
        }
        notify(S::Active, false);
    }
    let mut window_start = Instant::now();
    let mut window_bytes_start = f.tell();
    let mut sample = WindowSample::default();
    let mut max_size: u64 = 0;
    let mut rates = Rates::default();
    let mut first_round_done: Option<Instant> = None;
    let mut last_window_throttled = false;
    loop {
        if OUTGOING.status() != S::Active {
            return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
        }
        // The host reported an error (`migrate_fd_error`): fail now, not at
        // the next write to the channel, which a low speed limit may put
        // off for seconds (the message reported is the host's).
        if aborter.is_aborted() {
            return Err(MigError::with_errno("migration aborted", libc::ECANCELED));
        }
        f.check()?;
        if SPEED_CHANGED.swap(false, Ordering::AcqRel) {
            // Applied to this window, whose bytes already sent still count.
            prm.speed = params::get().speed;
            f.set_rate_limit(window_budget(prm.speed));
        }
        if !f.rate_limit_exceeded() {
            let pending = save.pending(max_size);
            update(|s| s.remaining = pending);
            let fresh = crate::ram::first_round_left_bytes();
            let expected = expected_downtime_ms(&rates, pending, fresh, crate::ram::last_sync_time());
            if fresh == 0 && first_round_done.is_none() {
                first_round_done = Some(Instant::now());
                log::debug!(
                    "first round done at {:?}: pending {pending}, link {:.0} bytes/ms{}",
                    start.elapsed(),
                    rates.link,
                    rates.link_source()
                );
            }
            let probing = probing(&rates, sample.throttled || last_window_throttled, first_round_done, Instant::now());
            if should_iterate(pending, fresh, max_size, expected, budget_ms(prm.downtime_ns), probing) {
                let (t, b, done, resent, zero, wait) = (
                    Instant::now(),
                    f.tell(),
                    crate::ram::dirty_bytes_done(),
                    crate::ram::resent_bytes(),
                    crate::ram::zero_scan_time(),
                    crate::thread_runqueue_wait(),
                );
                save.iterate(f)?;
                // On its way before the thread waits out a window or syncs
                // (as QEMU's RAM iterate ends with a flush): a limited
                // stream goes out window by window, not in 256 KiB bursts.
                f.flush()?;
                let (wire, retired) = (f.tell() - b, crate::ram::dirty_bytes_done() - done);
                let waited = wait.zip(crate::thread_runqueue_wait()).map_or(Duration::ZERO, |(a, b)| b.saturating_sub(a));
                let bucket = if (crate::ram::resent_bytes() - resent) * 10 >= retired * 9 { &mut sample.resend } else { &mut sample.first };
                bucket.add(wire, retired, t.elapsed(), crate::ram::zero_scan_time() - zero, waited);
                // Unthrottled, every RATE_SAMPLE of sending is a measurement:
                // a short migration sees few windows, and the passes just
                // before the switchover resemble it most.
                if !sample.throttled && !f.rate_limit_exceeded() && sample.resend.time + sample.first.time >= RATE_SAMPLE {
                    rates.update(&WindowSample { resend: sample.resend, first: sample.first, ..Default::default() });
                    log::trace!(
                        "rate sample: re-sending {:?}, first round {:?}: link {:.0}{} / first round {:.0} bytes/ms",
                        sample.resend,
                        sample.first,
                        rates.link,
                        rates.link_source(),
                        rates.first_round
                    );
                    (sample.resend, sample.first) = (Bucket::default(), Bucket::default());
                }
            } else {
                // The estimate the switchover is made on, kept for the report.
                update(|s| s.expected_downtime_ms = expected);
                if log::log_enabled!(log::Level::Debug) {
                    // The estimate unrounded, to set against the switchover's
                    // own line (the VM's stop is not in it).
                    let sync = crate::ram::last_sync_time();
                    let send = rates.time_ms(pending, fresh).map_or(Duration::ZERO, |t| Duration::from_secs_f64(t / 1000.0));
                    log::debug!("switchover decided: {pending} bytes pending, expected downtime {:?} (final sync {sync:?})", sync + send);
                }
                return switchover(host, f, save, &mut p.stopped_from, p.final_pass, start);
            }
        }
        let elapsed = window_start.elapsed();
        sample.throttled |= f.rate_limit_exceeded();
        if elapsed >= WINDOW {
            sample.sent = f.tell() - window_bytes_start;
            sample.elapsed = elapsed;
            prm = params::get();
            let pending = save.pending(max_size);
            let fresh = crate::ram::first_round_left_bytes();
            let w = Window::measure(rates, sample, prm.downtime_ns, pending, fresh, crate::ram::last_sync_time());
            (max_size, rates) = (w.max_size, w.rates);
            let expected = w.expected_downtime_ms;
            update(|s| {
                s.transferred = f.tell();
                s.mbps = w.mbps;
                // Until the link has been measured, the limit stays (QEMU
                // 7.2 keeps its last figure without a bandwidth).
                if rates.link > 0.0 {
                    s.expected_downtime_ms = expected;
                }
            });
            log::debug!(
                "window: {} bytes in {elapsed:?}, link {:.0}{} / first round {:.0} bytes/ms, pending {pending} ({fresh} first round), max_size {max_size}, expected downtime {expected} ms",
                sample.sent,
                rates.link,
                rates.link_source(),
                rates.first_round
            );
            last_window_throttled = sample.throttled;
            f.set_rate_limit(window_budget(prm.speed));
            f.reset_rate_limit();
            window_start = Instant::now();
            window_bytes_start = f.tell();
            sample = WindowSample::default();
        } else if f.rate_limit_exceeded() {
            f.check()?;
            sleep_interruptible(WINDOW - elapsed, aborter);
        }
    }
}

/// Stop-and-copy under the host lock. Everything that can fail, and every
/// change to shared state (stream closed, handlers cleaned up), happens
/// before the transition to COMPLETED: after it, a later error must not
/// restart a VM that now runs on the destination.
fn switchover(
    host: &Host,
    f: &mut QemuFile,
    save: &mut SaveState,
    stopped_from: &mut Option<RunState>,
    final_pass: Option<u64>,
    start: Instant,
) -> Result<()> {
    let lock = host.lock();
    // A cancel made while this thread waited for the lock (the host calls
    // qmp_migrate_cancel under it) is honoured before the VM stops; so is
    // an error the host reported then (`migrate_fd_error`): no device
    // completes into a migration that has failed.
    if OUTGOING.status() != S::Active {
        return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
    }
    if OUT.lock().host_error.is_some() {
        return Err(MigError::with_errno("migration aborted", libc::ECANCELED));
    }
    host.system_wakeup_request();
    let was = host.runstate()?;
    if was == RunState::Running {
        // Its RAM bytes so far went while it ran (or some of them did).
        update(|s| s.vm_paused = false);
    }
    crate::globalstate::store(was);
    let stop_time = Instant::now();
    // For the debug line below: read only when it is printed (the wait
    // comes from a /proc read, and this is downtime).
    let debug = log::log_enabled!(log::Level::Debug);
    let (cpu0, wait0) = if debug { (crate::thread_cpu_time(), crate::thread_runqueue_wait()) } else { (Duration::ZERO, None) };
    // Set before the call: a host that fails after stopping the VM still
    // gets it started again.
    *stopped_from = Some(was);
    host.vm_stop_force_state(RunState::FinishMigrate)?;
    let stopped = stop_time.elapsed();
    f.set_rate_limit(0);
    // The VM stays stopped and the host lock held until the stream is out:
    // a destination taking it slowly (a byte just within each stall
    // timeout) must not keep them so for longer than the io timeout in all.
    let limit = transport::stall_timeout();
    f.set_deadline(Some(stop_time + limit));
    let too_slow = |e: MigError| match e.errno() {
        // (A handler's own ETIMEDOUT before then is its own.)
        libc::ETIMEDOUT if stop_time.elapsed() >= limit => {
            e.context(format!("the VM was stopped for {} ms (the io timeout) and the stream is not out", limit.as_millis()))
        }
        _ => e,
    };
    let before = f.tell();
    // RAM bytes sent with the VM stopped (QEMU's downtime-bytes).
    let ram_before = crate::ram::COUNTERS.transferred.load(std::sync::atomic::Ordering::Relaxed);
    save.complete(f).map_err(too_slow)?;
    f.flush().map_err(too_slow)?;
    // Everything but the end of the stream is out. From here on the
    // destination may load it all and start the VM, so the source must not
    // run it again: a cancel until now is honoured (the destination gets no
    // EOF and fails); after it, a cancel is too late.
    {
        let mut o = OUT.lock();
        if OUTGOING.status() != S::Active {
            return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
        }
        // Fails if a page was marked dirty after the final RAM pass; later
        // marks are refused as too late.
        crate::ram::commit_final_pass()?;
        o.committed = true;
    }
    save.end(f);
    f.flush().map_err(too_slow)?;
    // The whole stream is out, and the outcome no longer depends on the
    // host: the host lock is released while the destination confirms and
    // the channel closes (an `exec:` command may take its time to exit),
    // as QEMU 7.2's migration thread awaits the return path without the
    // BQL. A cancel or a host error is too late from here on.
    drop(lock);
    // The confirmation has a deadline of its own.
    f.set_deadline(None);
    let sent = stop_time.elapsed();
    let confirmed = save.await_destination(f);
    if debug {
        let waited = wait0.zip(crate::thread_runqueue_wait()).map(|(a, b)| b.saturating_sub(a));
        log::debug!(
            "switchover: VM stopped in {stopped:?}, {} bytes sent by {sent:?}, destination confirmed by {:?} (this thread: {:?} on a CPU, {waited:?} waiting for one)",
            f.tell() - before,
            stop_time.elapsed(),
            crate::thread_cpu_time().saturating_sub(cpu0)
        );
    }
    // Close the channel now (for exec:, wait for the command): its failure
    // is the migration's failure. The command's exit is part of the
    // switchover: the VM stays stopped for no longer than the io timeout
    // in all.
    let mut closing = std::mem::replace(f, QemuFile::closed());
    closing.set_deadline(Some(stop_time + limit));
    let sent = closing.tell();
    let closed = match confirmed {
        Ok(()) => closing.close(),
        // Dropped unconfirmed, as on any failure: the confirmation's error
        // is the one reported.
        Err(_) => {
            drop(closing);
            Ok(())
        }
    };
    // Downtime ends here, as in QEMU: everything is on its way to the
    // destination, which needs nothing more from us; stopping the dirty
    // log does not delay it.
    let downtime = round_ms(stop_time.elapsed());
    let _l = host.lock();
    if let Err(e) = confirmed {
        if e.errno() == libc::ETIMEDOUT {
            // No answer (a stalled destination or network): it has the whole
            // stream and may be running the VM (a QEMU destination starts
            // it whether or not its confirmation gets through), so this one
            // is not started again; the host decides, as after completion.
            *stopped_from = None;
            host.runstate_set(RunState::Postmigrate);
            return Err(e.context("no confirmation from the destination, which has the whole stream and may be running the VM; this VM stays stopped (postmigrate)"));
        }
        return Err(e);
    }
    closed?;
    save.cleanup();
    // As QEMU 7.2 (migration_calculate_complete): the total time counts
    // from the qmp_migrate call, connecting included, as it does while
    // the migration runs, and the throughput is the stream's bytes over
    // the time after setup (total_time - setup_time).
    let total = OUT.lock().start.map_or_else(|| start.elapsed(), |t| t.elapsed());
    update(|s| {
        s.transferred = sent;
        s.downtime_bytes = crate::ram::COUNTERS.transferred.load(std::sync::atomic::Ordering::Relaxed) - ram_before;
        s.downtime_ms = Some(downtime);
        s.total_time_ms = round_ms(total);
        s.remaining = 0;
        let transfer_ms = s.total_time_ms.saturating_sub(s.setup_time_ms);
        if transfer_ms > 0 {
            s.mbps = sent as f64 * 8.0 / transfer_ms as f64 / 1000.0;
        }
    });
    OUT.lock().aborter = None;
    // The run state first: whoever sees COMPLETED sees POSTMIGRATE.
    host.runstate_set(RunState::Postmigrate);
    if !OUTGOING.cas(S::Active, S::Completed) {
        return Err(MigError::with_errno("migration cancelled", libc::ECANCELED));
    }
    // Marks are taken again only now: one made before COMPLETED was
    // refused, not lost.
    if let Some(g) = final_pass {
        crate::ram::end_final_pass(&crate::ram::blocks(), g);
    }
    log::info!("migration completed: {sent} bytes, total {} ms, downtime {downtime} ms", round_ms(total));
    notify(S::Completed, false);
    Ok(())
}

/// A duration in whole milliseconds, to the nearest: the reported times
/// are then off by at most half a millisecond either way (truncating
/// would report every downtime up to a millisecond short).
fn round_ms(d: Duration) -> u64 {
    ((d.as_micros() + 500) / 1000) as u64
}

/// Ends a failed or cancelled migration: handlers cancelled and cleaned
/// up, the VM back in its run state, then FAILED or CANCELLED.
fn finish(host: &Host, err: MigError, outcome: Outcome, mut p: Progress) {
    let Outcome { cancelled, host_error: host_err } = outcome;
    // Marks are taken again from here on: the VM runs on here, and a mark
    // made while the migration is wound up (by a notifier, a handler's
    // cancel, the dirty log's stop) cannot fail it any more.
    if let Some(g) = p.final_pass {
        crate::ram::end_final_pass(&crate::ram::blocks(), g);
    }
    // The handlers' cancel and cleanup, and the dirty log's stop, run under
    // the host lock, as the switchover's do (QEMU: under the BQL).
    let _l = host.lock();
    if cancelled {
        // Before the handlers are cancelled, so that a notifier sees it
        // first.
        notify(S::Cancelling, false);
    }
    if let Some(save) = p.save.as_mut() {
        // A handler that panics here still lets the migration end (logged).
        let _ = crate::contain_panic("migration", || {
            save.cancel();
            save.cleanup();
            Ok(())
        });
    }
    let mut restart_failed = None;
    match p.stopped_from {
        // Unless the host's stop failed before it stopped anything.
        Some(RunState::Running) if !host.runstate_is_running() => {
            if let Err(e) = host.vm_start() {
                log::error!("could not restart the source VM after the failed migration: {e}");
                restart_failed = Some(e);
            }
        }
        // A VM that was not running gets its run state back, not
        // FINISH_MIGRATE.
        Some(was) if was != RunState::Running && !host.runstate_is_running() => host.runstate_set(was),
        _ => {}
    }
    let mut msg = match host_err {
        Some(m) => m,
        // (The error a cancel leaves is that of whatever it interrupted.)
        None if cancelled => "migration cancelled".to_string(),
        None => err.to_string(),
    };
    // CANCELLED says the VM runs here again: a cancelled migration whose
    // VM could not be started again fails instead, with that reason.
    let fails = !cancelled || restart_failed.is_some();
    if let Some(e) = restart_failed {
        // The VM is left stopped: the host must know it was not restarted.
        msg = format!("{msg}; the VM could not be started again: {e}");
    }
    {
        let mut o = OUT.lock();
        o.aborter = None;
        if let Some(start) = o.start {
            o.stats.total_time_ms = start.elapsed().as_millis() as u64;
        }
        if fails {
            o.stats.error = Some(msg.clone());
        }
    }
    if !fails {
        OUTGOING.cas(S::Cancelling, S::Cancelled);
        log::info!("migration cancelled");
        notify(S::Cancelled, false);
    } else if let Some(from) = OUTGOING.cas_any(&[S::Setup, S::Active], S::Failed) {
        log::error!("migration failed (in {}): {msg}", from.name());
        notify(S::Failed, false);
    } else if cancelled && OUTGOING.cas(S::Cancelling, S::Failed) {
        log::error!("migration failed (in cancelling): {msg}");
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
    fn reported_times_round_to_the_nearest_millisecond() {
        let us = Duration::from_micros;
        assert_eq!([round_ms(us(0)), round_ms(us(499)), round_ms(us(500)), round_ms(us(6_900)), round_ms(us(7_499))], [0, 0, 1, 7, 7]);
    }
}
