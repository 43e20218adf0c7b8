//! What livemig's threads do with the host lock: none is taken after the
//! final transition (the host may then replace its table or free its
//! lock); a failure is decided before the host lock is waited for (a host
//! cancelling under its lock does not turn FAILED into CANCELLED); and a
//! notifier may release the host lock and wait for a thread that removes
//! another notifier.
//!
//! A device section that waits for the source does so without the
//! destination's host lock.
//!
//! The host here counts its lock calls; the tests run one at a time.
mod common;

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use livemig::ffi::migration as api;
use livemig::ffi::types::Notifier;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::state::{MigrationStatus, OUTGOING};
use livemig::transport::Uri;
use parking_lot::lock_api::RawMutex as _;
use parking_lot::lock_api::RawMutexTimed as _;

static MYLOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
static COMPLETED_SEEN: AtomicBool = AtomicBool::new(false);
static LATE_LOCKS: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn lock(_: *mut c_void) {
    if COMPLETED_SEEN.load(SeqCst) {
        LATE_LOCKS.fetch_add(1, SeqCst);
    }
    MYLOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { MYLOCK.unlock() };
}
/// The common host, with this file's counting lock.
fn my_host() {
    livemig::host::set(host_ops(lock, unlock), null_mut()).unwrap();
}

unsafe extern "C" fn on_state(_n: *mut Notifier, s: *mut c_void) {
    let st = api::migration_has_finished(s.cast());
    if st {
        COMPLETED_SEEN.store(true, SeqCst);
    }
}

fn migrate(uri: &str) -> std::result::Result<(), String> {
    outgoing::start(Target::Uri(Uri::parse(uri).unwrap(), uri.to_string())).map_err(|e| e.to_string())
}

/// After COMPLETED has been notified, the migration thread must not touch
/// the host any more (the host may re-register its table, free its opaque,
/// or destroy its lock once the migration has finished).
#[test]
fn the_host_lock_is_not_taken_after_completed() {
    let (_g, _ram) = host();
    my_host();
    STATE.store(RunState::Running as u32, SeqCst);
    let n = Box::leak(Box::new(Notifier { notify: Some(on_state), le_next: null_mut(), le_prev: null_mut() }));
    api::add_migration_state_change_notifier(n);
    let before = counts();
    migrate("exec:cat > /dev/null").unwrap();
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed);
    assert_no_leak(before, "migration");
    api::remove_migration_state_change_notifier(n);
    assert_eq!(LATE_LOCKS.load(SeqCst), 0, "the migration thread took the host lock after its final transition");
}

static ACTIVE_NOTIFIED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn on_active(_n: *mut Notifier, s: *mut c_void) {
    if api::migration_is_active(s.cast()) {
        ACTIVE_NOTIFIED.store(true, SeqCst);
    }
}

/// A stream failure detected while the host holds its lock, then a cancel
/// by the host under its lock (as QEMU's monitor): reported as CANCELLED,
/// the stream's error dropped.
#[test]
fn a_cancel_under_the_host_lock_after_a_failure_leaves_it_failed() {
    let (_g, ram) = host();
    // Pages with data: the stream fills the pipe long before the end of
    // the first round (all-zero RAM would reach the switchover, where a
    // cancel is rightly honoured).
    ram.fill_pattern();
    my_host();
    COMPLETED_SEEN.store(false, SeqCst);
    livemig::params::set_speed(0).unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    let n = Box::leak(Box::new(Notifier { notify: Some(on_active), le_next: null_mut(), le_prev: null_mut() }));
    api::add_migration_state_change_notifier(n);
    ACTIVE_NOTIFIED.store(false, SeqCst);
    // A destination that never reads and goes away after 0.4 s.
    migrate("exec:sleep 0.4").unwrap();
    // Past the ACTIVE notification, which takes the host lock.
    wait_until(10, "ACTIVE notified", || ACTIVE_NOTIFIED.load(SeqCst));
    api::remove_migration_state_change_notifier(n);
    let h = livemig::host::get().unwrap();
    let l = h.lock();
    // The stream fails meanwhile (EPIPE or the 1 s stall timeout); the
    // thread then waits for the host lock in finish().
    std::thread::sleep(Duration::from_millis(2500));
    let st_before_cancel = OUTGOING.status();
    outgoing::cancel();
    drop(l);
    let st = wait_final(false, 30);
    let err = outgoing::stats().error;
    eprintln!("status before cancel: {}, final: {}, error: {err:?}", st_before_cancel.name(), st.name());
    assert_eq!(st, MigrationStatus::Failed, "a migration that had already failed was reported as cancelled (error {err:?})");
}

static WORKER_GO: AtomicBool = AtomicBool::new(false);
static WORKER_DONE: AtomicBool = AtomicBool::new(false);
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn noop(_n: *mut Notifier, _s: *mut c_void) {}

/// A notifier that waits for a host worker with the host lock released
/// (QEMU's qemu_cond_wait on the BQL, e.g. run_on_cpu), the worker taking
/// the host lock and removing another notifier.
unsafe extern "C" fn waits_for_worker(_n: *mut Notifier, s: *mut c_void) {
    if api::migration_is_active(s.cast()) && !WORKER_GO.swap(true, SeqCst) {
        // SAFETY: notifiers are called with the host lock held.
        unsafe { MYLOCK.unlock() };
        let t0 = std::time::Instant::now();
        while !WORKER_DONE.load(SeqCst) {
            if t0.elapsed() > Duration::from_secs(3) {
                TIMED_OUT.store(true, SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        MYLOCK.lock();
    }
}

#[test]
fn a_notifier_may_release_the_host_lock_for_a_thread_that_removes_another() {
    let (_g, _ram) = host();
    my_host();
    COMPLETED_SEEN.store(false, SeqCst);
    STATE.store(RunState::Running as u32, SeqCst);
    let a = Box::leak(Box::new(Notifier { notify: Some(waits_for_worker), le_next: null_mut(), le_prev: null_mut() }));
    let b = Box::leak(Box::new(Notifier { notify: Some(noop), le_next: null_mut(), le_prev: null_mut() }));
    api::add_migration_state_change_notifier(a);
    api::add_migration_state_change_notifier(b);
    let bb = b as *mut Notifier as usize;
    let worker = std::thread::spawn(move || {
        wait_until(30, "go", || WORKER_GO.load(SeqCst));
        let h = livemig::host::get().unwrap();
        let _l = h.lock();
        api::remove_migration_state_change_notifier(bb as *mut Notifier);
        WORKER_DONE.store(true, SeqCst);
    });
    migrate("exec:cat > /dev/null").unwrap();
    let st = wait_final(false, 60);
    worker.join().unwrap();
    api::remove_migration_state_change_notifier(a);
    assert_eq!(st, MigrationStatus::Completed);
    assert!(!TIMED_OUT.load(SeqCst), "the worker's remove waited for the notifier that waited for it (would deadlock)");
}

/// What [`StallCheck`]'s load saw: whether the host lock was held when it
/// began and when it had read its bytes, and the bytes.
static STALL_LOADED: parking_lot::Mutex<Vec<(bool, bool, [u8; 16])>> = parking_lot::Mutex::new(Vec::new());

static STALL_LOAD_BEGUN: AtomicBool = AtomicBool::new(false);

/// A device whose 16-byte section the test's source sends in two halves.
struct StallCheck;

impl livemig::savevm::SaveVmHandler for StallCheck {
    fn is_live(&self) -> bool {
        false
    }
    fn load(&mut self, f: &mut livemig::qemu_file::QemuFile, _v: u32, _k: livemig::savevm::SectionKind) -> livemig::error::Result<()> {
        let at_start = MYLOCK.is_locked();
        STALL_LOAD_BEGUN.store(true, SeqCst);
        let mut b = [0u8; 16];
        f.get_buffer(&mut b);
        f.check()?;
        STALL_LOADED.lock().push((at_start, MYLOCK.is_locked(), b));
        Ok(())
    }
}

/// A source that stalls in the middle of a device section must not keep
/// the destination's host lock (and so its main loop) for the io timeout:
/// the lock is released while the section waits for bytes (as QEMU's
/// incoming coroutine yields the BQL), and held again when it goes on.
#[test]
fn a_device_section_waits_for_the_source_without_the_host_lock() {
    use std::io::Write;
    let (_g, _ram) = host();
    my_host();
    const OWNER: usize = 0x5a11;
    livemig::savevm::register("stallcheck", 0, 1, Box::new(StallCheck), OWNER, livemig::savevm::Priority::Default).unwrap();
    STALL_LOADED.lock().clear();
    STALL_LOAD_BEGUN.store(false, SeqCst);
    livemig::transport::set_stall_timeout(20_000).unwrap();
    STATE.store(RunState::Inmigrate as u32, SeqCst);
    let dir = tmpdir("stalled-section");
    let sock = dir.join("in.sock");
    livemig::incoming::start_uri(&format!("unix:{}", sock.display())).unwrap();
    let mut src = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => assert!(std::time::Instant::now() < deadline, "connect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Header, configuration "none", and a FULL section for stallcheck
    // with the first half of its body.
    let mut head = Vec::new();
    head.extend_from_slice(b"QEVM\0\0\0\x03\x07\0\0\0\x04none");
    head.extend_from_slice(b"\x04\0\0\0\x09\x0astallcheck\0\0\0\0\0\0\0\x01");
    let body: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
    head.extend_from_slice(&body[..8]);
    src.write_all(&head).unwrap();
    // Once the section waits for the rest, the lock is free for the
    // host's other threads, long before the 20 s io timeout.
    wait_until(10, "the section's load to begin", || STALL_LOAD_BEGUN.load(SeqCst));
    let t0 = std::time::Instant::now();
    let mut got = false;
    while !got && t0.elapsed() < Duration::from_secs(5) {
        got = MYLOCK.try_lock_for(Duration::from_millis(100));
    }
    let waited = t0.elapsed();
    if got {
        // SAFETY: taken just above by this thread.
        unsafe { MYLOCK.unlock() };
    }
    let mut tail = body[8..].to_vec();
    tail.extend_from_slice(b"\x7e\0\0\0\x09\x00");
    src.write_all(&tail).unwrap();
    // Closed: the end of the stream (no vmdesc follows).
    drop(src);
    let st = wait_final(true, 30);
    livemig::transport::set_stall_timeout(1000).unwrap();
    let loaded = STALL_LOADED.lock().clone();
    let err = livemig::incoming::error();
    livemig::savevm::unregister("stallcheck", OWNER);
    STATE.store(RunState::Running as u32, SeqCst);
    assert!(got, "the host lock stayed held for {waited:?} while the device section waited for the source");
    assert_eq!(st, MigrationStatus::Completed, "incoming: {err:?}");
    assert_eq!(loaded, vec![(true, true, body)], "the load ran with the host lock held, and got its bytes");
}

/// Once the whole stream is out, the switchover waits for the channel to
/// close (an `exec:` command to exit) without the host lock, as QEMU's
/// migration thread awaits its end without the BQL: a command that takes
/// 2 s to exit after the end of its input must not keep the host's other
/// threads out for those 2 s. The command's outcome still decides the
/// migration's.
#[test]
fn the_switchover_waits_for_an_exec_command_without_the_host_lock() {
    let (_g, ram) = host();
    ram.fill_pattern();
    my_host();
    livemig::params::set_speed(0).unwrap();
    livemig::transport::set_stall_timeout(10_000).unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    migrate("exec:cat > /dev/null; sleep 2").unwrap();
    // The longest this thread waited for the host lock until the end.
    let mut longest = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !matches!(OUTGOING.status(), MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled) {
        assert!(std::time::Instant::now() < deadline, "the migration did not end within 30 s");
        let t = std::time::Instant::now();
        assert!(MYLOCK.try_lock_for(Duration::from_secs(10)), "the host lock stayed held for 10 s");
        longest = longest.max(t.elapsed());
        // SAFETY: taken just above by this thread.
        unsafe { MYLOCK.unlock() };
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = wait_final(false, 10);
    let downtime = outgoing::stats().downtime_ms;
    livemig::transport::set_stall_timeout(1000).unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", outgoing::stats().error);
    // The command's 2 s count as downtime (the channel is closed then).
    assert!(downtime.is_some_and(|d| d >= 1900), "downtime {downtime:?}");
    assert!(longest < Duration::from_secs(1), "the host lock was held for {longest:?} while the command finished");
}
