//! The source side when the host misbehaves around the switchover:
//!
//! - an error the host reports (`migrate_fd_error`) while the switchover
//!   waits for the host lock fails the migration before the VM is stopped
//!   and before any handler's complete runs, as a cancel made then is
//!   honoured: the VM never stops, and the next migration completes;
//! - an error the host reports during setup fails the migration without
//!   a move to ACTIVE (notifiers: setup, then failed);
//! - a cancelled migration whose VM cannot be started again ends FAILED
//!   with that reason (notifiers: cancelling, then failed), not CANCELLED.
//!
//! The host here is its own (a lock that counts its waiters, a stop and a
//! start that count their calls, a device that counts its completes); the
//! tests run one at a time.

use std::ffi::{c_void, CString};
use std::os::raw::c_int;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use livemig::error::Result;
use livemig::ffi::errors::{error_free, error_get_pretty, error_new, Error};
use livemig::ffi::migration as api;
use livemig::ffi::types::LivemigHostOps;
use livemig::host::RunState;
use livemig::qemu_file::QemuFile;
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::{MigrationStatus, OUTGOING};
use parking_lot::lock_api::RawMutex as _;

const RAM_SIZE: usize = 4 << 20;
const PAGE: usize = 4096;
const OWNER: usize = 0x5f_a017;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
/// Threads waiting in the host's lock.
static WAITERS: AtomicU32 = AtomicU32::new(0);
static STATE: AtomicU32 = AtomicU32::new(RunState::Running as u32);
static STARTS: AtomicU32 = AtomicU32::new(0);
static STOPS: AtomicU32 = AtomicU32::new(0);
/// Calls of the "dev" handler's complete.
static COMPLETES: AtomicU32 = AtomicU32::new(0);
/// When set, the "dev" handler's complete cancels the migration (as a
/// host thread may while the VM is stopped for the switchover).
static CANCEL_IN_COMPLETE: AtomicBool = AtomicBool::new(false);
/// When set, the "dev" handler's setup reports a host error (as a host
/// thread may while the migration sets up), and succeeds.
static ERROR_IN_SETUP: AtomicBool = AtomicBool::new(false);
/// The states the notifier was told of, in order.
static EVENTS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

unsafe extern "C" fn lock(_: *mut c_void) {
    WAITERS.fetch_add(1, Ordering::SeqCst);
    LOCK.lock();
    WAITERS.fetch_sub(1, Ordering::SeqCst);
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn stop(_: *mut c_void, st: RunState) -> c_int {
    STATE.store(st as u32, Ordering::SeqCst);
    STOPS.fetch_add(1, Ordering::SeqCst);
    0
}
/// When set, `vm_start` fails with EIO and leaves the VM as it was.
static START_FAILS: AtomicBool = AtomicBool::new(false);
unsafe extern "C" fn start(_: *mut c_void) -> c_int {
    STARTS.fetch_add(1, Ordering::SeqCst);
    if START_FAILS.load(Ordering::SeqCst) {
        return -libc::EIO;
    }
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    0
}
unsafe extern "C" fn is_running(_: *mut c_void) -> bool {
    STATE.load(Ordering::SeqCst) == RunState::Running as u32
}
unsafe extern "C" fn set(_: *mut c_void, st: RunState) {
    STATE.store(st as u32, Ordering::SeqCst);
}
unsafe extern "C" fn get(_: *mut c_void) -> RunState {
    state()
}

fn state() -> RunState {
    RunState::all()[STATE.load(Ordering::SeqCst) as usize]
}

/// A live device with a little state, whose completes are counted.
struct Dev;

impl SaveVmHandler for Dev {
    fn is_live(&self) -> bool {
        true
    }
    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        if ERROR_IN_SETUP.load(Ordering::SeqCst) {
            report_disk_gone();
        }
        f.put_be32(1);
        f.check()
    }
    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        COMPLETES.fetch_add(1, Ordering::SeqCst);
        if CANCEL_IN_COMPLETE.load(Ordering::SeqCst) {
            let mut err = null_mut();
            api::qmp_migrate_cancel(&mut err);
            assert_eq!(take_err(&mut err), "");
        }
        f.put_be32(0xde7);
        f.check()
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Sets the host up once (4 MiB of RAM, every page non-zero, a live
/// device) and returns a guard serialising the tests, with the VM running.
fn host() -> MutexGuard<'static, ()> {
    static SETUP: Once = Once::new();
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    SETUP.call_once(|| {
        let ops = LivemigHostOps {
            version: 1,
            size: std::mem::size_of::<LivemigHostOps>() as u32,
            iothread_lock: Some(lock),
            iothread_unlock: Some(unlock),
            vm_stop_force_state: Some(stop),
            vm_start: Some(start),
            runstate_is_running: Some(is_running),
            runstate_set: Some(set),
            runstate_get: Some(get),
            system_wakeup_request: None,
            announce_self: None,
            dirty_log_start: None,
            dirty_log_sync: None,
            dirty_log_stop: None,
            autostart: true,
        };
        livemig::host::set(ops, null_mut()).unwrap();
        // SAFETY: a fresh private anonymous mapping, never unmapped.
        let ram = unsafe {
            let p = libc::mmap(null_mut(), RAM_SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts_mut(p.cast::<u8>(), RAM_SIZE)
        };
        for (i, page) in ram.chunks_mut(PAGE).enumerate() {
            page.fill(i as u8 | 1);
        }
        livemig::ram::block_add("ram", ram.as_mut_ptr(), RAM_SIZE as u64).unwrap();
        livemig::savevm::register("dev", 0, 1, Box::new(Dev), OWNER, Priority::Default).unwrap();
        livemig::transport::set_stall_timeout(10_000).unwrap();
    });
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    START_FAILS.store(false, Ordering::SeqCst);
    CANCEL_IN_COMPLETE.store(false, Ordering::SeqCst);
    ERROR_IN_SETUP.store(false, Ordering::SeqCst);
    g
}

/// `migrate_fd_error` with "disk gone".
fn report_disk_gone() {
    let e = error_new(c"disk gone".as_ptr());
    api::migrate_fd_error(api::migrate_get_current(), e);
    error_free(e);
}

/// Records the outgoing states it is told of in EVENTS.
unsafe extern "C" fn record_state(_n: *mut livemig::ffi::types::Notifier, s: *mut c_void) {
    if !api::livemig_migration_is_incoming(s.cast()) {
        EVENTS.lock().unwrap_or_else(|e| e.into_inner()).push(api::livemig_migration_status(s.cast()).name());
    }
}

/// Waits (bounded) until `f` holds.
fn wait_until(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (bounded) for the outgoing migration's final state.
fn wait_final(secs: u64) -> MigrationStatus {
    wait_until(secs, "a final state", || {
        matches!(OUTGOING.status(), MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    });
    OUTGOING.status()
}

/// Takes `err`'s text and frees it ("" for none).
fn take_err(err: &mut *mut Error) -> String {
    if err.is_null() {
        return String::new();
    }
    // SAFETY: a live error from livemig; its text is a C string it owns.
    let s = unsafe { std::ffi::CStr::from_ptr(error_get_pretty(*err)) }.to_string_lossy().into_owned();
    error_free(*err);
    *err = null_mut();
    s
}

/// qmp_migrate(uri): its error text ("" for none).
fn migrate(uri: &str) -> String {
    let c = CString::new(uri).unwrap();
    let mut err = null_mut();
    api::qmp_migrate(c.as_ptr(), false, false, false, false, false, false, &mut err);
    take_err(&mut err)
}

/// Takes the host lock once the migration is ACTIVE, and keeps it until
/// the migration thread waits for it (the switchover is the only place
/// it takes the lock once ACTIVE); then runs `f` with it held and releases
/// it. False if the thread never got there.
fn at_switchover_lock_wait(f: impl FnOnce()) -> bool {
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    LOCK.lock();
    let deadline = Instant::now() + Duration::from_secs(30);
    while WAITERS.load(Ordering::SeqCst) == 0 && OUTGOING.status() == MigrationStatus::Active && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let waiting = WAITERS.load(Ordering::SeqCst) > 0;
    f();
    // SAFETY: locked above by this thread.
    unsafe { LOCK.unlock() };
    waiting
}

/// `migrate_fd_error` made while the switchover waits for the host lock
/// (a host reports its errors under its lock) fails the migration with
/// the host's error before the VM stops and before any handler completes,
/// as a cancel made then does. It used to stop the VM, run the devices'
/// completes into the aborted stream, and start the VM again.
#[test]
fn migrate_fd_error_while_the_switchover_waits_for_the_host_lock_never_stops_the_vm() {
    let _g = host();
    let (stops, starts, completes) = (STOPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst), COMPLETES.load(Ordering::SeqCst));
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let waiting = at_switchover_lock_wait(report_disk_gone);
    assert!(waiting, "the migration thread did not reach the switchover ({})", OUTGOING.status().name());
    assert_eq!(wait_final(30), MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
    assert_eq!(STOPS.load(Ordering::SeqCst) - stops, 0, "the VM was stopped");
    assert_eq!(STARTS.load(Ordering::SeqCst) - starts, 0, "the VM was started again");
    assert_eq!(COMPLETES.load(Ordering::SeqCst) - completes, 0, "a device completed into a failed migration");
    assert_eq!(state(), RunState::Running);
    // The next migration completes.
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert_eq!(state(), RunState::Postmigrate);
}

/// A cancel made while the VM is stopped for the switchover, whose VM
/// then cannot be started again, ends FAILED with that reason: CANCELLED
/// says the VM runs here again, and it does not (it is left as the failed
/// start left it). It used to end CANCELLED, the failed start only logged.
#[test]
fn a_cancelled_migration_whose_vm_cannot_be_started_again_fails_with_that_reason() {
    let _g = host();
    let mut n = livemig::ffi::types::Notifier { notify: Some(record_state), le_next: null_mut(), le_prev: null_mut() };
    api::add_migration_state_change_notifier(&mut n);
    EVENTS.lock().unwrap().clear();
    CANCEL_IN_COMPLETE.store(true, Ordering::SeqCst);
    START_FAILS.store(true, Ordering::SeqCst);
    let starts = STARTS.load(Ordering::SeqCst);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let end = wait_final(30);
    api::remove_migration_state_change_notifier(&mut n);
    START_FAILS.store(false, Ordering::SeqCst);
    CANCEL_IN_COMPLETE.store(false, Ordering::SeqCst);
    let e = livemig::outgoing::stats().error.unwrap_or_default();
    assert_eq!(end, MigrationStatus::Failed, "{e}");
    assert_eq!(e, "migration cancelled; the VM could not be started again: the host failed to start the VM (-5)");
    assert_eq!(STARTS.load(Ordering::SeqCst) - starts, 1, "one start was tried");
    assert_eq!(state(), RunState::FinishMigrate, "left as the failed start left it");
    let events = EVENTS.lock().unwrap().clone();
    assert_eq!(events, ["setup", "active", "cancelling", "failed"]);
    // The query shows why.
    let mut err = null_mut();
    let info = api::qmp_query_migrate(&mut err);
    assert_eq!(take_err(&mut err), "");
    // SAFETY: a live MigrationInfo from livemig; error_desc, when present,
    // is a C string it owns.
    let desc = unsafe {
        assert!((*info).has_error_desc);
        std::ffi::CStr::from_ptr((*info).error_desc).to_string_lossy().into_owned()
    };
    api::qapi_free_MigrationInfo(info);
    assert_eq!(desc, e);
    // Once the host has its VM running again, a migration completes.
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
}

/// `migrate_fd_error` made while the migration sets up fails it from
/// SETUP: the notifiers are not told of an ACTIVE after the host reported
/// the error (a QEMU host's error moves the state to FAILED at once). They
/// used to see setup, active, failed.
#[test]
fn migrate_fd_error_during_setup_fails_without_going_active() {
    let _g = host();
    let mut n = livemig::ffi::types::Notifier { notify: Some(record_state), le_next: null_mut(), le_prev: null_mut() };
    api::add_migration_state_change_notifier(&mut n);
    EVENTS.lock().unwrap().clear();
    ERROR_IN_SETUP.store(true, Ordering::SeqCst);
    let (stops, starts) = (STOPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst));
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let end = wait_final(30);
    api::remove_migration_state_change_notifier(&mut n);
    ERROR_IN_SETUP.store(false, Ordering::SeqCst);
    assert_eq!(end, MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
    assert_eq!(*EVENTS.lock().unwrap(), ["setup", "failed"]);
    assert_eq!((STOPS.load(Ordering::SeqCst) - stops, STARTS.load(Ordering::SeqCst) - starts), (0, 0));
    assert_eq!(state(), RunState::Running);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
}
