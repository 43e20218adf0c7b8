//! Edges of the migration's life where a host's call meets the migration
//! thread at a bad moment, or the host hands livemig something odd:
//!
//! - a cancel made while the switchover waits for the host lock is
//!   honoured before the VM stops (no EOF goes out), and a cancel wakes a
//!   migration blocked on a stream the host opened, or on a `unix:`
//!   listener whose backlog is full; an incoming cancel that returned true
//!   never lets the VM start, and wakes a `process_incoming_migration`;
//! - a failed setup still cancels and cleans up every handler; cleanup runs
//!   once per migration; a C handler gets exactly one of `complete` and
//!   `cancel` per migration, even when it fails after the complete; a host whose stop fails after stopping gets its VM
//!   started again, and a paused VM gets its run state back;
//! - a VM in POSTMIGRATE is not migrated again, nor one left in
//!   INMIGRATE by a failed incoming migration; `fd:N` is taken (and
//!   closed on refusal) by the call, and a bad one is refused at once;
//! - PART/END sections load as the version their START gave; a `unix:`
//!   listener never replaces a file that is not a socket; an incoming
//!   migration is refused while the VM runs, and fails unloaded if the
//!   host starts its VM before the source connects; a RAM block over memory not
//!   mapped readable and writable is refused, not a fault; any negative
//!   code from the host (INT_MIN too) is an error; handlers' pending
//!   amounts do not wrap around to a small sum;
//!   `migrate_fd_error` fails a migration at once, even under a low speed
//!   limit, and even when made just before the thread waits out a window;
//!   a device registered while a migration runs is refused.
//!
//! The host here is its own (a run state it reports, a stop that can fail,
//! a lock that counts its waiters, a dirty log that counts its starts and
//! stops); the tests run one at a time.

#[path = "common/scratch.rs"]
mod scratch;

use std::ffi::{c_void, CString};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::raw::c_int;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use livemig::error::{MigError, Result};
use livemig::ffi::errors::{error_free, error_get_pretty, error_new, Error};
use livemig::ffi::file::qemu_fdopen;
use livemig::ffi::migration as api;
use livemig::ffi::types::{LivemigHostOps, SaveVMHandlers};
use livemig::host::RunState;
use livemig::qemu_file::{Direction, QemuFile};
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::{MigrationStatus, INCOMING, OUTGOING};
use livemig::transport::mem::MemChannel;
use parking_lot::lock_api::RawMutex as _;

const RAM_SIZE: usize = 16 << 20;
const PAGE: usize = 4096;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
/// Threads waiting in the host's lock.
static WAITERS: AtomicU32 = AtomicU32::new(0);
static STATE: AtomicU32 = AtomicU32::new(RunState::Running as u32);
static STARTS: AtomicU32 = AtomicU32::new(0);
static STOPS: AtomicU32 = AtomicU32::new(0);
/// The host's stop sets the state, then fails.
static STOP_FAILS: AtomicBool = AtomicBool::new(false);
static LOG_STARTS: AtomicU32 = AtomicU32::new(0);
static LOG_STOPS: AtomicU32 = AtomicU32::new(0);
/// Calls of handlers' cancel and cleanup, and of dirty_log_stop, made
/// without the host lock held (only livemig's threads take it here).
static UNLOCKED_CALLS: AtomicU32 = AtomicU32::new(0);

fn note_lock_held() {
    if !LOCK.is_locked() {
        UNLOCKED_CALLS.fetch_add(1, Ordering::SeqCst);
    }
}

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
    if STOP_FAILS.load(Ordering::SeqCst) {
        -libc::EIO
    } else {
        0
    }
}
unsafe extern "C" fn start(_: *mut c_void) -> c_int {
    STARTS.fetch_add(1, Ordering::SeqCst);
    if START_FAILS.load(Ordering::SeqCst) {
        return -libc::EIO;
    }
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    0
}
/// When set, `vm_start` fails with EIO and leaves the VM as it was.
static START_FAILS: AtomicBool = AtomicBool::new(false);
unsafe extern "C" fn is_running(_: *mut c_void) -> bool {
    STATE.load(Ordering::SeqCst) == RunState::Running as u32
}
unsafe extern "C" fn set(_: *mut c_void, st: RunState) {
    STATE.store(st as u32, Ordering::SeqCst);
}
unsafe extern "C" fn get(_: *mut c_void) -> RunState {
    let st = state();
    if let Some(hook) = RUNSTATE_HOOK.lock().unwrap_or_else(|e| e.into_inner()).take() {
        hook();
    }
    st
}
/// Run (once) by the next `runstate_get`, after it has read the state:
/// the caller is held there, as a thread preempted after the call.
type Hook = Box<dyn FnOnce() + Send>;
static RUNSTATE_HOOK: Mutex<Option<Hook>> = Mutex::new(None);
unsafe extern "C" fn log_start(_: *mut c_void) -> c_int {
    LOG_STARTS.fetch_add(1, Ordering::SeqCst);
    0
}
unsafe extern "C" fn log_stop(_: *mut c_void) {
    note_lock_held();
    LOG_STOPS.fetch_add(1, Ordering::SeqCst);
}
/// Pages the dirty log reports at every sync (the first word's), when set.
static DIRTY_IN_SYNC: AtomicBool = AtomicBool::new(false);
/// When set with DIRTY_IN_SYNC, each sync first gives those pages new
/// pseudo-random contents (the value is the generator's state).
static REWRITE_IN_SYNC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The next this many syncs report those pages, unchanged.
static DIRTY_SYNCS_LEFT: AtomicU32 = AtomicU32::new(0);
unsafe extern "C" fn log_sync(_: *mut c_void, _: *const std::ffi::c_char, host: *mut c_void, len: u64, bitmap: *mut u64) -> c_int {
    if DIRTY_SYNCS_LEFT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        // SAFETY: livemig passes the block's bitmap, at least one word.
        unsafe { *bitmap |= u64::MAX };
    }
    let mut x = REWRITE_IN_SYNC.load(Ordering::SeqCst);
    if x != 0 && DIRTY_IN_SYNC.load(Ordering::SeqCst) {
        // SAFETY: `host` is the block's memory, `len` bytes long; the
        // first 64 pages (or fewer) lie in it.
        let mem = unsafe { std::slice::from_raw_parts_mut(host.cast::<u64>(), (len as usize).min(64 * PAGE) / 8) };
        for w in mem {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
        REWRITE_IN_SYNC.store(x, Ordering::SeqCst);
    }
    if DIRTY_IN_SYNC.load(Ordering::SeqCst) {
        // SAFETY: livemig passes the block's bitmap, at least one word.
        unsafe { *bitmap |= u64::MAX };
    }
    0
}

fn state() -> RunState {
    RunState::all()[STATE.load(Ordering::SeqCst) as usize]
}

fn set_state(st: RunState) {
    STATE.store(st as u32, Ordering::SeqCst);
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Sets the host up once (16 MiB of RAM, every page non-zero) and returns
/// a guard serialising the tests, with the VM running and no migration.
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
            dirty_log_start: Some(log_start),
            dirty_log_sync: Some(log_sync),
            dirty_log_stop: Some(log_stop),
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
        livemig::transport::set_stall_timeout(60_000).unwrap();
    });
    set_state(RunState::Running);
    STOP_FAILS.store(false, Ordering::SeqCst);
    START_FAILS.store(false, Ordering::SeqCst);
    g
}

/// Waits (bounded) until `f` holds.
fn wait_until(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (bounded) for a final state of one direction.
fn wait_final(incoming: bool, secs: u64) -> MigrationStatus {
    let st = if incoming { &INCOMING } else { &OUTGOING };
    wait_until(secs, "a final state", || {
        matches!(st.status(), MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    });
    st.status()
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

fn cancel() {
    let mut err = null_mut();
    api::qmp_migrate_cancel(&mut err);
    assert_eq!(take_err(&mut err), "");
}

fn tmp(name: &str) -> std::path::PathBuf {
    scratch::dir(name)
}

/// A complete stream of this host (migrated to a file).
fn stream_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("s.bin");
    assert_eq!(migrate(&format!("exec:cat > {}", p.display())), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    set_state(RunState::Running);
    p
}

#[test]
fn a_cancel_while_the_switchover_waits_for_the_host_lock_is_honoured() {
    let _g = host();
    let dir = tmp("switchover-cancel");
    let out = dir.join("s.bin");
    let (stops, starts) = (STOPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst));
    assert_eq!(migrate(&format!("exec:cat > {}", out.display())), "");
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    // The host takes its lock (as a monitor command runs under it)...
    LOCK.lock();
    // ...until the migration thread, done with the RAM, waits for it: the
    // switchover is the only place it takes the lock once ACTIVE.
    let waited = Instant::now() + Duration::from_secs(30);
    while WAITERS.load(Ordering::SeqCst) == 0 && OUTGOING.status() == MigrationStatus::Active && Instant::now() < waited {
        std::thread::sleep(Duration::from_millis(1));
    }
    let waiting = WAITERS.load(Ordering::SeqCst) > 0;
    cancel();
    // SAFETY: locked above by this thread.
    unsafe { LOCK.unlock() };
    assert!(waiting, "the migration thread did not reach the switchover ({})", OUTGOING.status().name());
    assert_eq!(wait_final(false, 30), MigrationStatus::Cancelled);
    assert_eq!(STOPS.load(Ordering::SeqCst), stops, "the VM was never stopped");
    assert_eq!(STARTS.load(Ordering::SeqCst), starts);
    assert_eq!(state(), RunState::Running);
    // What went out has no end: a destination fails on it.
    let bytes = std::fs::read(&out).unwrap();
    let mut f = QemuFile::new(Box::new(MemChannel::source(bytes)), Direction::Read);
    let e = livemig::loadvm::load_stream(&mut f, None).expect_err("a stream cut before its end").to_string();
    assert!(!e.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cancel_wakes_a_migration_blocked_on_a_stream_the_host_opened() {
    let _g = host();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mode = CString::new("wb").unwrap();
    let f = qemu_fdopen(ours.into_raw_fd(), mode.as_ptr());
    assert!(!f.is_null());
    let mut err = null_mut();
    api::migrate_fd_connect(null_mut(), f, &mut err);
    assert_eq!(take_err(&mut err), "");
    // The peer never reads: the socket buffer fills and the write blocks
    // (for up to the 60 s stall timeout, but for the cancel).
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    cancel();
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    assert!(t.elapsed() < Duration::from_secs(5), "the cancel took {:?}", t.elapsed());
    assert_eq!(state(), RunState::Running);
    drop(peer);
}

/// A unix listener at `dir/s.sock` with a backlog of 0 and one connection
/// queued, never accepted: a further connect cannot complete while both
/// are kept.
fn full_backlog(dir: &std::path::Path) -> (std::path::PathBuf, std::os::unix::net::UnixListener, std::os::unix::net::UnixStream) {
    let path = dir.join("s.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) on our own socket.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
    (path, l, queued)
}

#[test]
fn a_cancel_wakes_a_connect_to_a_unix_listener_with_a_full_backlog() {
    let _g = host();
    let dir = tmp("backlog");
    let (path, _l, _queued) = full_backlog(&dir);
    assert_eq!(migrate(&format!("unix:{}", path.display())), "");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(OUTGOING.status(), MigrationStatus::Setup, "still connecting");
    let t = Instant::now();
    cancel();
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    assert!(t.elapsed() < Duration::from_secs(5), "the cancel took {:?}", t.elapsed());
    assert_eq!(state(), RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_incoming_cancel_that_returned_true_never_starts_the_vm() {
    let _g = host();
    let dir = tmp("incoming-cancel");
    let stream = stream_file(&dir);
    let (mut honoured, mut late) = (0, 0);
    for _ in 0..10 {
        set_state(RunState::Inmigrate);
        let starts = STARTS.load(Ordering::SeqCst);
        // A regular file: its reads never wait, so a cancel is noticed
        // only by checks between them, or after the last one.
        let fd = std::fs::File::open(&stream).unwrap().into_raw_fd();
        livemig::incoming::start_uri(&format!("fd:{fd}")).unwrap();
        let cancelled = livemig::incoming::cancel();
        let st = wait_final(true, 30);
        if cancelled {
            honoured += 1;
            assert_eq!(st, MigrationStatus::Failed, "cancel() returned true");
            assert!(livemig::incoming::error().unwrap_or_default().contains("cancel"), "{:?}", livemig::incoming::error());
            assert_eq!(STARTS.load(Ordering::SeqCst), starts, "a cancelled load does not start the VM");
            assert_ne!(state(), RunState::Running);
        } else {
            late += 1;
            assert_eq!(st, MigrationStatus::Completed, "cancel() returned false: the load goes on");
        }
    }
    println!("cancel honoured {honoured}, too late {late}");
    // Cancelled at once, a 16 MiB load from a file is nearly always still
    // reading: the promise above was put to the test.
    assert!(honoured > 0, "no cancel was honoured");
    set_state(RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_incoming_cancel_wakes_process_incoming_migration() {
    let _g = host();
    set_state(RunState::Inmigrate);
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    // The header, then nothing: the load waits in a read (for up to the
    // 60 s stall timeout, but for the cancel).
    std::io::Write::write_all(&mut peer, &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]).unwrap();
    let mode = CString::new("rb").unwrap();
    let f = qemu_fdopen(ours.into_raw_fd(), mode.as_ptr());
    assert!(!f.is_null());
    api::process_incoming_migration(f);
    wait_until(10, "the incoming ACTIVE", || INCOMING.status() == MigrationStatus::Active);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert!(t.elapsed() < Duration::from_secs(5), "the cancel took {:?}", t.elapsed());
    assert!(livemig::incoming::error().unwrap_or_default().contains("cancel"), "{:?}", livemig::incoming::error());
    set_state(RunState::Running);
    drop(peer);
}

/// What the handlers below and `record_state` saw, in order.
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn record_state(_n: *mut livemig::ffi::types::Notifier, s: *mut c_void) {
    let st = api::livemig_migration_status(s.cast());
    EVENTS.lock().unwrap().push(st.name().to_string());
}

/// Counts of the handlers below.
static SETUP_FAILS: AtomicBool = AtomicBool::new(false);
static CANCELS: AtomicU32 = AtomicU32::new(0);
static CLEANUPS: AtomicU32 = AtomicU32::new(0);

/// A live device: empty sections; counts its cancels and cleanups.
struct Counted;

impl SaveVmHandler for Counted {
    fn is_live(&self) -> bool {
        true
    }
    fn cancel(&mut self) {
        note_lock_held();
        CANCELS.fetch_add(1, Ordering::SeqCst);
        EVENTS.lock().unwrap().push("handler cancel".into());
    }
    fn cleanup(&mut self) {
        note_lock_held();
        CLEANUPS.fetch_add(1, Ordering::SeqCst);
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

/// A live device whose setup fails while SETUP_FAILS is set.
struct FailingSetup;

impl SaveVmHandler for FailingSetup {
    fn is_live(&self) -> bool {
        true
    }
    fn setup(&mut self, _f: &mut QemuFile) -> Result<()> {
        if SETUP_FAILS.load(Ordering::SeqCst) {
            Err(MigError::new("no setup today"))
        } else {
            Ok(())
        }
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

const OWNER: usize = 0xed9e;

#[test]
fn a_failed_setup_cancels_and_cleans_up_every_handler_and_cleanup_runs_once() {
    let _g = host();
    let unlocked = UNLOCKED_CALLS.load(Ordering::SeqCst);
    livemig::savevm::register("counted", 0, 1, Box::new(Counted), OWNER, Priority::Default).unwrap();
    livemig::savevm::register("failing-setup", 0, 1, Box::new(FailingSetup), OWNER, Priority::Default).unwrap();
    for fails in [true, false] {
        SETUP_FAILS.store(fails, Ordering::SeqCst);
        let (cancels, cleanups) = (CANCELS.load(Ordering::SeqCst), CLEANUPS.load(Ordering::SeqCst));
        let (log_starts, log_stops) = (LOG_STARTS.load(Ordering::SeqCst), LOG_STOPS.load(Ordering::SeqCst));
        assert_eq!(migrate("exec:cat > /dev/null"), "");
        let st = wait_final(false, 30);
        let (cancels, cleanups) = (CANCELS.load(Ordering::SeqCst) - cancels, CLEANUPS.load(Ordering::SeqCst) - cleanups);
        let (log_starts, log_stops) = (LOG_STARTS.load(Ordering::SeqCst) - log_starts, LOG_STOPS.load(Ordering::SeqCst) - log_stops);
        if fails {
            assert_eq!(st, MigrationStatus::Failed);
            let e = livemig::outgoing::stats().error.unwrap_or_default();
            assert!(e.contains("no setup today"), "{e}");
            assert_eq!((cancels, cleanups), (1, 1), "the handler set up before the failure is cancelled and cleaned up");
            assert_eq!(state(), RunState::Running);
        } else {
            assert_eq!(st, MigrationStatus::Completed);
            assert_eq!((cancels, cleanups), (0, 1), "cleanup runs once");
            set_state(RunState::Running);
        }
        assert_eq!(log_stops, log_starts, "the dirty log is stopped as often as it was started (setup failed: {fails})");
        assert_eq!(
            UNLOCKED_CALLS.load(Ordering::SeqCst),
            unlocked,
            "cancel, cleanup and dirty_log_stop run under the host lock (setup failed: {fails})"
        );
    }
    livemig::savevm::unregister("counted", OWNER);
    livemig::savevm::unregister("failing-setup", OWNER);
}

#[test]
fn notifiers_see_cancelling_before_the_handlers_are_cancelled() {
    let _g = host();
    livemig::savevm::register("counted", 0, 1, Box::new(Counted), OWNER, Priority::Default).unwrap();
    let mut n = livemig::ffi::types::Notifier { notify: Some(record_state), le_next: null_mut(), le_prev: null_mut() };
    api::add_migration_state_change_notifier(&mut n);
    EVENTS.lock().unwrap().clear();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mode = CString::new("wb").unwrap();
    let mut err = null_mut();
    // The peer never reads: the migration blocks until the cancel.
    api::migrate_fd_connect(null_mut(), qemu_fdopen(ours.into_raw_fd(), mode.as_ptr()), &mut err);
    assert_eq!(take_err(&mut err), "");
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    cancel();
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    api::remove_migration_state_change_notifier(&mut n);
    livemig::savevm::unregister("counted", OWNER);
    drop(peer);
    let events = EVENTS.lock().unwrap().clone();
    assert_eq!(events[events.len() - 3..], ["cancelling", "handler cancel", "cancelled"], "{events:?}");
    assert_eq!(state(), RunState::Running);
}

#[test]
fn a_stop_that_fails_after_stopping_still_gets_the_vm_started_again() {
    let _g = host();
    STOP_FAILS.store(true, Ordering::SeqCst);
    let starts = STARTS.load(Ordering::SeqCst);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    assert!(
        livemig::outgoing::stats().error.unwrap_or_default().contains("the host failed to stop the VM"),
        "{:?}",
        livemig::outgoing::stats().error
    );
    assert_eq!(STARTS.load(Ordering::SeqCst), starts + 1, "the stopped VM is started again");
    assert_eq!(state(), RunState::Running);
    STOP_FAILS.store(false, Ordering::SeqCst);
}

#[test]
fn a_vm_that_cannot_be_started_again_after_a_failed_switchover_is_reported() {
    let _g = host();
    START_FAILS.store(true, Ordering::SeqCst);
    // The command reads the whole stream, then fails: the switchover's
    // close fails after the VM was stopped.
    assert_eq!(migrate("exec:cat > /dev/null; exit 3"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    let e = livemig::outgoing::stats().error.unwrap_or_default();
    assert!(
        e.starts_with("closing exec:cat > /dev/null; exit 3: command exited with exit status: 3"),
        "the migration's own error first: {e}"
    );
    assert!(e.ends_with("; the VM could not be started again: the host failed to start the VM (-5)"), "{e}");
    assert_eq!(state(), RunState::FinishMigrate, "left as the failed start left it");
    START_FAILS.store(false, Ordering::SeqCst);
}

#[test]
fn a_paused_vm_gets_its_run_state_back_after_a_failed_switchover() {
    let _g = host();
    set_state(RunState::Paused);
    let starts = STARTS.load(Ordering::SeqCst);
    // The command reads the whole stream, then fails: the switchover's
    // close fails after the VM was stopped.
    assert_eq!(migrate("exec:cat > /dev/null; exit 3"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    assert_eq!(state(), RunState::Paused, "not left in finish-migrate");
    assert_eq!(STARTS.load(Ordering::SeqCst), starts, "a VM that was paused is not started");
    set_state(RunState::Running);
}

#[test]
fn a_vm_in_postmigrate_is_not_migrated_again() {
    let _g = host();
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed);
    assert_eq!(state(), RunState::Postmigrate);
    assert_eq!(migrate("exec:cat > /dev/null"), "Can't migrate the vm that was paused due to previous migration");
    assert_eq!(OUTGOING.status(), MigrationStatus::Completed, "the refusal changes nothing");
    set_state(RunState::Running);
    assert_eq!(migrate("exec:cat > /dev/null"), "", "once running again");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed);
}

#[test]
fn a_vm_left_in_inmigrate_by_a_failed_incoming_migration_is_not_migrated() {
    let _g = host();
    set_state(RunState::Inmigrate);
    livemig::incoming::start_uri("exec:printf garbage").unwrap();
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(state(), RunState::Inmigrate, "a failed load leaves the VM waiting");
    let before = OUTGOING.status();
    assert_eq!(migrate("exec:cat > /dev/null"), "Guest is waiting for an incoming migration");
    assert_eq!(OUTGOING.status(), before, "the refusal changes nothing");
    set_state(RunState::Running);
    assert_eq!(migrate("exec:cat > /dev/null"), "", "once running");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed);
    set_state(RunState::Running);
}

#[test]
fn fd_n_is_taken_by_the_call_and_a_bad_one_is_refused_at_once() {
    let _g = host();
    let before = OUTGOING.status();
    // Refused for a blocker: the descriptor is closed all the same.
    let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = w.into_raw_fd();
    let reason = CString::new("device 'x' cannot migrate").unwrap();
    let reason = error_new(reason.as_ptr());
    let mut err = null_mut();
    assert_eq!(api::migrate_add_blocker(reason, &mut err), 0);
    assert_eq!(migrate(&format!("fd:{fd}")), "device 'x' cannot migrate");
    api::migrate_del_blocker(reason);
    error_free(reason);
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0, "fd {fd} is closed on refusal");
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut &r, &mut buf).unwrap(), 0, "the peer sees the end");
    // A descriptor that is not open: refused by the call, state unchanged.
    let e = migrate(&format!("fd:{fd}"));
    assert!(e.starts_with(&format!("fd:{fd}")) && e.contains("Bad file descriptor"), "{e}");
    assert_eq!(OUTGOING.status(), before, "a refused call changes nothing");
}

/// The versions a v3 live device was loaded with, per section kind.
static LOADS: Mutex<Vec<(SectionKind, u32)>> = Mutex::new(Vec::new());

/// A live device at version 3 that records its loads.
struct V3;

impl SaveVmHandler for V3 {
    fn is_live(&self) -> bool {
        true
    }
    fn load(&mut self, f: &mut QemuFile, version_id: u32, kind: SectionKind) -> Result<()> {
        LOADS.lock().unwrap().push((kind, version_id));
        f.check()
    }
}

#[test]
fn part_and_end_sections_load_as_the_version_their_start_gave() {
    let _g = host();
    livemig::savevm::register("vdev", 0, 3, Box::new(V3), OWNER, Priority::Default).unwrap();
    LOADS.lock().unwrap().clear();
    // START (id 9, "vdev", instance 0, version 2), PART, END, each with a
    // footer, then EOF: a v2 source's sections.
    let mut s = vec![0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];
    s.extend([1, 0, 0, 0, 9, 4]);
    s.extend(b"vdev");
    s.extend([0, 0, 0, 0, 0, 0, 0, 2]);
    for kind in [None, Some(2u8), Some(3u8)] {
        if let Some(k) = kind {
            s.extend([k, 0, 0, 0, 9]);
        }
        s.extend([0x7e, 0, 0, 0, 9]);
    }
    s.push(0); // EOF
    let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
    let r = livemig::loadvm::load_stream(&mut f, None);
    livemig::savevm::unregister("vdev", OWNER);
    r.unwrap_or_else(|e| panic!("{e}: loads {:?}", LOADS.lock().unwrap()));
    assert_eq!(*LOADS.lock().unwrap(), [(SectionKind::Start, 2), (SectionKind::Part, 2), (SectionKind::End, 2)]);
}

#[test]
fn a_unix_listener_replaces_a_stale_socket_and_nothing_else() {
    let _g = host();
    set_state(RunState::Inmigrate);
    let dir = tmp("unix-listen");
    let path = dir.join("precious.txt");
    std::fs::write(&path, b"keep me").unwrap();
    let e = livemig::incoming::start_uri(&format!("unix:{}", path.display())).expect_err("a regular file at the path").to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me", "the file is left alone");
    assert!(INCOMING.status().is_idle(), "nothing started");
    // A socket left behind by an earlier listener is replaced.
    let sock = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    livemig::incoming::start_uri(&format!("unix:{}", sock.display())).expect("a stale socket is replaced");
    assert!(livemig::incoming::cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    set_state(RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_incoming_migration_is_refused_while_the_vm_runs() {
    let _g = host();
    let before = INCOMING.status();
    let e = livemig::incoming::start_uri("exec:cat /dev/null").expect_err("the VM runs").to_string();
    assert_eq!(e, "cannot start an incoming migration while the VM is running");
    assert_eq!(INCOMING.status(), before, "nothing started");
    assert_eq!(state(), RunState::Running);
    // fd:N is livemig's from the call on: closed on the refusal too.
    let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let n = ours.into_raw_fd();
    let e = livemig::incoming::start_uri(&format!("fd:{n}")).expect_err("the VM runs").to_string();
    assert_eq!(e, "cannot start an incoming migration while the VM is running");
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    assert_eq!(unsafe { libc::fcntl(n, libc::F_GETFD) }, -1, "fd:{n} is closed");
    assert_eq!(INCOMING.status(), before, "nothing started");
}

#[test]
fn a_vm_started_while_the_destination_waits_for_the_source_is_not_loaded_into() {
    let _g = host();
    let dir = tmp("started-while-listening");
    let stream = std::fs::read(stream_file(&dir)).unwrap();
    set_state(RunState::Prelaunch);
    livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
    let port = livemig::incoming::local_port().unwrap();
    // The host starts its VM while the destination listens (a `cont` from
    // prelaunch): the stream must not be loaded under running vCPUs, nor
    // the running VM started again.
    set_state(RunState::Running);
    let starts = STARTS.load(Ordering::SeqCst);
    let mut src = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = std::io::Write::write_all(&mut src, &stream);
    drop(src);
    assert_eq!(wait_final(true, 30), MigrationStatus::Failed);
    let e = livemig::incoming::error().unwrap_or_default();
    assert!(e.contains("the VM was started while waiting for the incoming migration"), "{e}");
    assert_eq!(STARTS.load(Ordering::SeqCst), starts, "vm_start is not called on a running VM");
    assert_eq!(state(), RunState::Running, "the host's run state is left alone");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_unix_listener_leaves_a_socket_bound_at_its_path_since() {
    let _g = host();
    set_state(RunState::Inmigrate);
    let dir = tmp("unix-rebound");
    let path = dir.join("s.sock");
    livemig::incoming::start_uri(&format!("unix:{}", path.display())).unwrap();
    // Another listener takes the path over while livemig waits.
    std::fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert!(livemig::incoming::cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    set_state(RunState::Running);
    assert!(path.exists(), "livemig's listener removed another listener's socket");
    drop(std::os::unix::net::UnixStream::connect(&path).expect("the other listener is still reachable"));
    drop(other);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn livemig_s_own_sections_cannot_be_unregistered_by_a_host() {
    let _g = host();
    let ram = CString::new("ram").unwrap();
    let gs = CString::new("globalstate").unwrap();
    // A host passing a NULL opaque (its own devices' owner) for these names.
    livemig::ffi::savevm::unregister_savevm(null_mut(), ram.as_ptr(), null_mut());
    livemig::ffi::savevm::unregister_savevm(null_mut(), gs.as_ptr(), null_mut());
    let names: Vec<String> = livemig::savevm::entries().into_iter().map(|e| e.idstr).collect();
    assert!(names.iter().any(|n| n == "ram") && names.iter().any(|n| n == "globalstate"), "{names:?}");
    // Nor registered by one: a host's "ram" would fail every migration.
    for name in ["ram", "globalstate"] {
        let e = livemig::savevm::register(name, 0, 4, Box::new(Counted), OWNER, Priority::Default).expect_err(name).to_string();
        assert_eq!(e, format!("savevm: '{name}' is livemig's own section; a host cannot register it"));
    }
    // And the RAM still migrates: a stream of 16 MiB of non-zero pages.
    let dir = tmp("builtin");
    let stream = stream_file(&dir);
    assert!(std::fs::metadata(&stream).unwrap().len() > RAM_SIZE as u64, "the RAM is in the stream");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Set: the device below marks guest RAM dirty in its save_state (as a
/// device flushing DMA there would); its result is kept.
static MARK_IN_SAVE: AtomicBool = AtomicBool::new(false);
static MARK_RESULT: Mutex<Option<std::result::Result<(), String>>> = Mutex::new(None);

/// A device that may mark a page dirty while its state is saved.
struct Dma;

impl SaveVmHandler for Dma {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, _f: &mut QemuFile) -> Result<()> {
        if MARK_IN_SAVE.load(Ordering::SeqCst) {
            let r = livemig::ram::mark_dirty("ram", 7 * PAGE as u64, PAGE as u64).map_err(|e| e.to_string());
            *MARK_RESULT.lock().unwrap() = Some(r);
        }
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

#[test]
fn a_page_marked_dirty_after_the_final_ram_pass_fails_the_switchover() {
    let _g = host();
    livemig::savevm::register("dma", 0, 1, Box::new(Dma), OWNER, Priority::Default).unwrap();
    for late in [true, false] {
        MARK_IN_SAVE.store(late, Ordering::SeqCst);
        *MARK_RESULT.lock().unwrap() = None;
        let starts = STARTS.load(Ordering::SeqCst);
        assert_eq!(migrate("exec:cat > /dev/null"), "");
        let st = wait_final(false, 30);
        if late {
            let r = MARK_RESULT.lock().unwrap().clone().expect("save_state ran");
            assert!(r.as_ref().is_err_and(|e| e.contains("marked dirty after the final RAM pass")), "{r:?}");
            assert_eq!(st, MigrationStatus::Failed, "the page would be lost");
            let e = livemig::outgoing::stats().error.unwrap_or_default();
            assert!(e.contains("marked dirty after the final RAM pass"), "{e}");
            assert_eq!(STARTS.load(Ordering::SeqCst), starts + 1, "the VM runs here again");
            assert_eq!(state(), RunState::Running);
        } else {
            assert_eq!(st, MigrationStatus::Completed);
            set_state(RunState::Running);
        }
        // Once the migration is over, marks are taken again.
        livemig::ram::mark_dirty("ram", 0, PAGE as u64).expect("marks after the migration");
    }
    livemig::savevm::unregister("dma", OWNER);
}

#[test]
fn a_named_fd_is_taken_by_the_call() {
    let _g = host();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let name = CString::new("mig").unwrap();
    let mut err = null_mut();
    assert!(livemig::ffi::host::livemig_fd_add(name.as_ptr(), ours.into_raw_fd(), &mut err), "{}", take_err(&mut err));
    let reader = std::thread::spawn(move || std::io::copy(&mut &peer, &mut std::io::sink()).unwrap());
    assert_eq!(migrate("fd:mig"), "");
    // Taken by the call: no longer registered, so removing it fails and
    // the migration goes on.
    assert!(!livemig::ffi::host::livemig_fd_remove(name.as_ptr(), &mut err), "the fd is the migration's now");
    assert!(take_err(&mut err).contains("mig"));
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert!(reader.join().unwrap() > RAM_SIZE as u64, "the peer got the stream");
    set_state(RunState::Running);
}

#[test]
fn a_blocker_added_during_a_migration_is_refused_with_ebusy() {
    let _g = host();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mode = CString::new("wb").unwrap();
    let f = qemu_fdopen(ours.into_raw_fd(), mode.as_ptr());
    let mut err = null_mut();
    api::migrate_fd_connect(null_mut(), f, &mut err);
    assert_eq!(take_err(&mut err), "");
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    let reason = CString::new("late device").unwrap();
    let reason = error_new(reason.as_ptr());
    assert_eq!(api::migrate_add_blocker(reason, &mut err), -libc::EBUSY);
    assert_eq!(take_err(&mut err), "disallowing migration blocker (migration/snapshot in progress) for: late device");
    error_free(reason);
    cancel();
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    drop(peer);
}

#[test]
fn a_host_name_is_resolved_and_an_unknown_one_fails_with_its_reason() {
    let _g = host();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let reader = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::io::copy(&mut &s, &mut std::io::sink()).unwrap()
    });
    // "localhost" is looked up (on the resolver thread); its IPv6 address,
    // if listed first, is refused and the next one is tried.
    assert_eq!(migrate(&format!("tcp:localhost:{port}")), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert!(reader.join().unwrap() > RAM_SIZE as u64);
    set_state(RunState::Running);
    assert_eq!(migrate("tcp:livemig-test.invalid:4444"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    let e = livemig::outgoing::stats().error.unwrap_or_default();
    assert!(e.starts_with("Failed to connect to 'livemig-test.invalid:4444'"), "{e}");
    assert_eq!(state(), RunState::Running);
}

/// What the notifier below saw: (status, migration_is_active,
/// migration_in_setup, migration_has_finished, migration_has_failed).
type Seen = (MigrationStatus, bool, bool, bool, bool);
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

unsafe extern "C" fn record(_n: *mut livemig::ffi::types::Notifier, data: *mut c_void) {
    let s = data.cast::<livemig::state::MigrationState>();
    if api::livemig_migration_is_incoming(s) {
        return;
    }
    SEEN.lock().unwrap().push((
        api::livemig_migration_status(s),
        api::migration_is_active(s),
        api::migration_in_setup(s),
        api::migration_has_finished(s),
        api::migration_has_failed(s),
    ));
}

#[test]
fn the_state_predicates_are_qemu_s() {
    let _g = host();
    let n = Box::leak(Box::new(livemig::ffi::types::Notifier { notify: Some(record), le_next: null_mut(), le_prev: null_mut() }));
    api::add_migration_state_change_notifier(n);
    SEEN.lock().unwrap().clear();
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed);
    set_state(RunState::Running);
    api::remove_migration_state_change_notifier(n);
    use MigrationStatus::*;
    // In setup only migration_in_setup, while active only
    // migration_is_active, once completed only migration_has_finished.
    assert_eq!(
        *SEEN.lock().unwrap(),
        [(Setup, false, true, false, false), (Active, true, false, false, false), (Completed, false, false, true, false)]
    );
}

/// The fields of the source's query-migrate: (status, has_ram,
/// has_total_time, has_error_desc), and the RAM figures when set.
fn query() -> (MigrationStatus, bool, bool, bool, Option<livemig::ffi::types::MigrationStats>) {
    let mut err = null_mut();
    let i = api::qmp_query_migrate(&mut err);
    assert!(!i.is_null(), "{}", take_err(&mut err));
    // SAFETY: a MigrationInfo from livemig, freed below; `ram` is set when
    // `has_ram` is.
    let r = unsafe {
        let info = &*i;
        let ram = info.has_ram.then(|| *info.ram);
        (info.status, info.has_ram, info.has_total_time, info.has_error_desc, ram)
    };
    api::qapi_free_MigrationInfo(i);
    r
}

/// A device with this many bytes of state.
struct Big(usize);

impl SaveVmHandler for Big {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        f.put_buffer(&vec![0x5a; self.0]);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.skip(self.0);
        f.check()
    }
}

#[test]
fn query_migrate_shows_what_qemu_shows_in_each_state() {
    let _g = host();
    use MigrationStatus::*;
    // Setup (connecting to a full backlog): the status alone, not the last
    // migration's figures; then cancelled: the status alone.
    let dir = tmp("query");
    let (path, _l, _queued) = full_backlog(&dir);
    assert_eq!(migrate(&format!("unix:{}", path.display())), "");
    let q = query();
    assert_eq!((q.0, q.1, q.2, q.3), (Setup, false, false, false), "setup");
    cancel();
    assert_eq!(wait_final(false, 10), Cancelled);
    let q = query();
    assert_eq!((q.0, q.1, q.2, q.3), (Cancelled, false, false, false), "cancelled");
    // Active at 8 MiB/s: the send rate shows during the first pass, before
    // any sync but setup's.
    let mut err = null_mut();
    api::qmp_migrate_set_speed(8 << 20, &mut err);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    std::thread::sleep(Duration::from_millis(700));
    let q = query();
    assert_eq!((q.0, q.1, q.2), (Active, true, true), "active");
    let ram = q.4.unwrap();
    assert_eq!(ram.dirty_sync_count, 1, "still in the first pass");
    assert!(ram.pages_per_second > 0, "pages_per_second in the first pass");
    assert!(ram.total == RAM_SIZE as i64 && ram.remaining > 0 && ram.remaining < ram.total, "{} of {}", ram.remaining, ram.total);
    cancel();
    assert_eq!(wait_final(false, 10), Cancelled);
    api::qmp_migrate_set_speed(0, &mut err);
    // Completed, with 1 MiB of device state: downtime-bytes counts RAM only.
    livemig::savevm::register("big", 0, 1, Box::new(Big(1 << 20)), OWNER, Priority::Default).unwrap();
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(false, 30), Completed);
    set_state(RunState::Running);
    livemig::savevm::unregister("big", OWNER);
    let q = query();
    let ram = q.4.unwrap();
    assert!(ram.downtime_bytes < 64 << 10, "downtime-bytes {} counts the device state", ram.downtime_bytes);
    assert_eq!(ram.precopy_bytes + ram.downtime_bytes, ram.transferred);
    // Failed: the status and the error.
    assert_eq!(migrate("exec:exit 3"), "");
    assert_eq!(wait_final(false, 30), Failed);
    let q = query();
    assert_eq!((q.0, q.1, q.2, q.3), (Failed, false, false, true), "failed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn capabilities_may_change_while_an_incoming_migration_listens() {
    let _g = host();
    set_state(RunState::Inmigrate);
    livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::Xbzrle, true)]).expect("the destination reads none");
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::Xbzrle, false)]).unwrap();
    assert!(livemig::incoming::cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    set_state(RunState::Running);
}

/// A destination on the far end of `peer` that reads the whole stream and
/// answers on the return path with `messages` (type, payload) every 100 ms
/// until the stream ends, never with SHUT.
fn chatty_destination(peer: std::os::unix::net::UnixStream, messages: Vec<(u16, Vec<u8>)>) -> std::thread::JoinHandle<()> {
    let reader = peer.try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut &reader, &mut std::io::sink()).map(drop).unwrap_or(()));
    std::thread::spawn(move || {
        for (t, d) in messages.iter().cycle() {
            let mut m = t.to_be_bytes().to_vec();
            m.extend((d.len() as u16).to_be_bytes());
            m.extend(d);
            if std::io::Write::write_all(&mut &peer, &m).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// A destination on the far end of `peer` that reads the whole stream and,
/// once the vmdesc has come, writes `head` on the return path, then one
/// zero byte every `gap` until the connection closes: always progress.
fn trickling_destination(peer: std::os::unix::net::UnixStream, head: Vec<u8>, gap: Duration) -> std::thread::JoinHandle<()> {
    use std::sync::Arc;
    let reader = peer.try_clone().unwrap();
    // 1: the stream ended with the vmdesc's "]}"; 2: it was closed first.
    let ended = Arc::new(AtomicU32::new(0));
    let seen = ended.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match std::io::Read::read(&mut &reader, &mut buf) {
                Ok(n) if n > 0 => {
                    if buf[..n].ends_with(b"]}") {
                        seen.store(1, Ordering::SeqCst);
                    }
                }
                _ => {
                    let _ = seen.compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
                    return;
                }
            }
        }
    });
    std::thread::spawn(move || {
        while ended.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        if ended.load(Ordering::SeqCst) != 1 || std::io::Write::write_all(&mut &peer, &head).is_err() {
            return;
        }
        while std::io::Write::write_all(&mut &peer, &[0]).is_ok() {
            std::thread::sleep(gap);
        }
    })
}

/// Migrates over a socket pair with the return path on, to `messages`.
fn migrate_to_chatty(messages: Vec<(u16, Vec<u8>)>) -> (MigrationStatus, String, Duration) {
    migrate_to(|peer| chatty_destination(peer, messages), 30)
}

/// Migrates over a socket pair with the return path on, to the destination
/// `dst` runs on the far end; waits `secs` at most for the outcome.
fn migrate_to(
    dst: impl FnOnce(std::os::unix::net::UnixStream) -> std::thread::JoinHandle<()>,
    secs: u64,
) -> (MigrationStatus, String, Duration) {
    use livemig::params::MigrationCapability::ReturnPath;
    livemig::params::set_capabilities(&[(ReturnPath, true)]).unwrap();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let dst = dst(peer);
    let mode = CString::new("wb").unwrap();
    let mut err = null_mut();
    let t = Instant::now();
    api::migrate_fd_connect(null_mut(), qemu_fdopen(ours.into_raw_fd(), mode.as_ptr()), &mut err);
    assert_eq!(take_err(&mut err), "");
    let st = wait_final(false, secs);
    let took = t.elapsed();
    livemig::params::set_capabilities(&[(ReturnPath, false)]).unwrap();
    dst.join().unwrap();
    (st, livemig::outgoing::stats().error.unwrap_or_default(), took)
}

#[test]
fn a_destination_cannot_hold_the_source_with_a_trickled_return_path_message() {
    let _g = host();
    livemig::transport::set_stall_timeout(1000).unwrap();
    let gap = Duration::from_millis(300);
    // A PONG announcing 65535 bytes, sent a byte every 300 ms: every read
    // makes progress, so only the header can tell (as QEMU's source checks
    // it) that this is not a message to wait for. Reading the body first
    // kept the VM stopped and the host lock held for 65535 reads.
    let (st, e, took) = migrate_to(|peer| trickling_destination(peer, vec![0, 2, 0xff, 0xff], gap), 10);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("RP: Received message 0x0002 with incorrect length 65535 expecting 4"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(state(), RunState::Running);
    // An unknown type, the same.
    let (st, e, took) = migrate_to(|peer| trickling_destination(peer, vec![0x77, 0x77, 0xff, 0xff], gap), 10);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("RP: Received invalid message 0x7777 length 0xffff"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(state(), RunState::Running);
    // A SHUT whose last byte comes 1.8 s after its header, past the
    // confirmation's deadline: the wait ends there (it used to end only
    // with the message, here a confirmation), and (as the destination may
    // have loaded the stream) the VM stays stopped.
    let starts = STARTS.load(Ordering::SeqCst);
    let (st, e, took) = migrate_to(|peer| trickling_destination(peer, vec![0, 1, 0, 4], Duration::from_millis(600)), 10);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("did not confirm the load within 1000 ms") && e.contains("this VM stays stopped"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!((STARTS.load(Ordering::SeqCst), state()), (starts, RunState::Postmigrate), "the VM stays stopped");
    set_state(RunState::Running);
    livemig::transport::set_stall_timeout(60_000).unwrap();
}

#[test]
fn a_destination_reading_slowly_cannot_keep_the_vm_stopped_past_the_io_timeout() {
    let _g = host();
    livemig::transport::set_stall_timeout(1000).unwrap();
    // 16 MiB of device state: more than the sockets hold, so that the
    // switchover waits for the destination to read it.
    livemig::savevm::register("bulky", 0, 1, Box::new(Big(16 << 20)), OWNER, Priority::Default).unwrap();
    let stops = STOPS.load(Ordering::SeqCst);
    let starts = STARTS.load(Ordering::SeqCst);
    // Reads at full speed until the VM stops, then 256 KiB every 300 ms
    // (the 16 MiB would take 19 s): every write makes progress within the
    // stall timeout, so only a bound on the whole stop-and-copy ends it.
    let (st, e, took) = migrate_to(
        |peer| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let deadline = Instant::now() + Duration::from_secs(20);
                while STOPS.load(Ordering::SeqCst) == stops && Instant::now() < deadline {
                    match std::io::Read::read(&mut &peer, &mut buf) {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                }
                while OUTGOING.status() == MigrationStatus::Active && Instant::now() < deadline {
                    let mut chunk = 0;
                    while chunk < 256 << 10 {
                        match std::io::Read::read(&mut &peer, &mut buf) {
                            Ok(n) if n > 0 => chunk += n,
                            _ => return,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        },
        10,
    );
    livemig::savevm::unregister("bulky", OWNER);
    livemig::transport::set_stall_timeout(60_000).unwrap();
    assert_eq!(st, MigrationStatus::Failed, "{e}");
    assert!(e.contains("the VM was stopped for 1000 ms (the io timeout) and the stream is not out"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The destination lacks the end of the stream: the VM runs here again.
    assert_eq!(STARTS.load(Ordering::SeqCst), starts + 1);
    assert_eq!(state(), RunState::Running);
}

#[test]
fn the_source_waits_for_the_confirmation_a_bounded_time_and_checks_the_messages() {
    let _g = host();
    livemig::transport::set_stall_timeout(1000).unwrap();
    let starts = STARTS.load(Ordering::SeqCst);
    // PONGs every 100 ms, never SHUT: each message used to restart the
    // wait, with the VM stopped and the host lock held.
    let (st, e, took) = migrate_to_chatty(vec![(2, vec![0, 0, 0, 1])]);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("did not confirm the load within 1000 ms"), "{e}");
    assert!(e.contains("may be running the VM; this VM stays stopped (postmigrate)"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The destination has the whole stream and may start the VM: not
    // started here again.
    assert_eq!((STARTS.load(Ordering::SeqCst), state()), (starts, RunState::Postmigrate), "the VM stays stopped");
    set_state(RunState::Running);
    // A destination that goes silent after the end of the stream: the same.
    let (st, e, _) = migrate_to_chatty(vec![]);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("did not confirm the load within 1000 ms") && e.contains("this VM stays stopped"), "{e}");
    assert_eq!((STARTS.load(Ordering::SeqCst), state()), (starts, RunState::Postmigrate), "the VM stays stopped");
    set_state(RunState::Running);
    // A message QEMU's source refuses: an unknown type.
    let (st, e, _) = migrate_to_chatty(vec![(0x7777, vec![])]);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("RP: Received invalid message 0x7777"), "{e}");
    // SHUT with a wrong length.
    let (st, e, _) = migrate_to_chatty(vec![(1, vec![0; 8])]);
    assert_eq!(st, MigrationStatus::Failed);
    assert!(e.contains("incorrect length 8 expecting 4"), "{e}");
    assert_eq!(state(), RunState::Running);
    livemig::transport::set_stall_timeout(60_000).unwrap();
}

#[test]
fn a_destination_does_not_start_when_the_source_closed_before_the_confirmation() {
    let _g = host();
    let dir = tmp("rp-closed");
    // This host's stream with the return path opened after the header.
    let mut s = std::fs::read(stream_file(&dir)).unwrap();
    s.splice(8..8, [0x08, 0, 1, 0, 0]);
    set_state(RunState::Inmigrate);
    let starts = STARTS.load(Ordering::SeqCst);
    livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
    let port = livemig::incoming::local_port().unwrap();
    let mut src = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until(10, "the incoming ACTIVE", || INCOMING.status() == MigrationStatus::Active);
    // The host lock is held while the whole stream arrives and the source
    // (giving up) closes: the RAM loads without the lock, the device
    // section after it waits for the lock.
    LOCK.lock();
    let writer = std::thread::spawn(move || {
        std::io::Write::write_all(&mut src, &s).unwrap();
        src.shutdown(std::net::Shutdown::Both).unwrap();
    });
    writer.join().unwrap();
    let waited = Instant::now() + Duration::from_secs(10);
    while WAITERS.load(Ordering::SeqCst) == 0 && Instant::now() < waited {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: locked above by this thread.
    unsafe { LOCK.unlock() };
    assert_eq!(wait_final(true, 30), MigrationStatus::Failed);
    let e = livemig::incoming::error().unwrap_or_default();
    assert!(e.contains("the source closed the connection before the load could be confirmed"), "{e}");
    assert_eq!(STARTS.load(Ordering::SeqCst), starts, "the destination VM is not started");
    set_state(RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_exec_command_s_output_goes_nowhere() {
    let _g = host();
    // The command fails unless its stdout is /dev/null (not the host's).
    assert_eq!(migrate(r#"exec:cat > /dev/null; [ "$(readlink /proc/$$/fd/1)" = /dev/null ] || exit 7"#), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    set_state(RunState::Running);
}

#[test]
fn stream_calls_in_the_wrong_direction_fail_the_stream() {
    let _g = host();
    use livemig::ffi::file::{qemu_fclose, qemu_file_get_error, qemu_get_byte, qemu_put_be32};
    for (mode, write) in [("wb", false), ("rb", true)] {
        let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let m = CString::new(mode).unwrap();
        let f = qemu_fdopen(ours.into_raw_fd(), m.as_ptr());
        assert!(!f.is_null());
        if write {
            qemu_put_be32(f, 0x1122_3344);
        } else {
            assert_eq!(qemu_get_byte(f), 0);
        }
        assert_eq!(qemu_file_get_error(f), -libc::EINVAL, "{mode}: a {} is refused", if write { "write" } else { "read" });
        assert_eq!(qemu_fclose(f), -libc::EINVAL);
    }
}

#[test]
fn a_handler_error_without_an_errno_is_eio() {
    let _g = host();
    use livemig::ffi::file::{qemu_fclose, qemu_file_get_error, qemu_file_set_error};
    let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let m = CString::new("rb").unwrap();
    let f = qemu_fdopen(ours.into_raw_fd(), m.as_ptr());
    // INT_MIN has no positive counterpart (its negation overflows).
    qemu_file_set_error(f, i32::MIN);
    assert_eq!(qemu_file_get_error(f), -libc::EIO);
    qemu_fclose(f);
}

#[test]
fn nothing_is_read_from_a_stream_with_an_error() {
    let _g = host();
    use livemig::ffi::file::{qemu_fclose, qemu_file_get_error, qemu_file_set_error, qemu_get_buffer, qemu_get_byte};
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &peer, b"ABCDEFGH").unwrap();
    let m = CString::new("rb").unwrap();
    let f = qemu_fdopen(ours.into_raw_fd(), m.as_ptr());
    assert_eq!(qemu_get_byte(f), i32::from(b'A'));
    qemu_file_set_error(f, -libc::EIO);
    // "BCDEFGH" is buffered, but the stream has failed.
    assert_eq!(qemu_get_byte(f), 0);
    let mut buf = [0xa5u8; 4];
    assert_eq!(qemu_get_buffer(f, buf.as_mut_ptr(), buf.len()), 0);
    assert_eq!(buf, [0; 4], "no data of the stream");
    assert_eq!(qemu_file_get_error(f), -libc::EIO);
    qemu_fclose(f);
    // A read cut short by the end of the stream passes none of its bytes on.
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &peer, b"XYZ").unwrap();
    drop(peer);
    let f = qemu_fdopen(ours.into_raw_fd(), m.as_ptr());
    let mut buf = [0xa5u8; 8];
    assert_eq!(qemu_get_buffer(f, buf.as_mut_ptr(), buf.len()), 0);
    assert_eq!(buf, [0; 8], "no data of the stream");
    assert_ne!(qemu_file_get_error(f), 0);
    qemu_fclose(f);
}

#[test]
fn odd_host_inputs_get_clear_answers() {
    let _g = host();
    // The incoming port is -1 once the incoming migration has ended.
    set_state(RunState::Inmigrate);
    livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
    let port = api::livemig_incoming_port();
    assert!(port > 0);
    assert!(livemig::incoming::cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(api::livemig_incoming_port(), -1);
    // Its error names the port bound, not the 0 asked for.
    let e = livemig::incoming::error().unwrap_or_default();
    assert!(e.contains(&format!("tcp:127.0.0.1:{port}: accept")), "{e}");
    set_state(RunState::Running);
    // An error message that is not UTF-8 is kept, its bad bytes replaced.
    let e = error_new(c"disk \xff gone".as_ptr());
    // SAFETY: a live error; its text is a C string it owns.
    let text = unsafe { std::ffi::CStr::from_ptr(error_get_pretty(e)) }.to_string_lossy().into_owned();
    error_free(e);
    assert_eq!(text, "disk \u{fffd} gone");
    // Instance ids: -1 picks the next free one, other negatives are refused.
    let e = livemig::savevm::register("neg", -7, 1, Box::new(Counted), OWNER, Priority::Default).unwrap_err().to_string();
    assert!(e.contains("instance id -7 of 'neg' is out of range"), "{e}");
    livemig::savevm::register("neg", -1, 1, Box::new(Counted), OWNER, Priority::Default).unwrap();
    assert_eq!(livemig::savevm::unregister("neg", OWNER), 1);
}

static C_COMPLETES: AtomicU32 = AtomicU32::new(0);
static C_CANCELS: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn c_setup(_: *mut QemuFile, _: *mut c_void) -> c_int {
    0
}
unsafe extern "C" fn c_iterate(_: *mut QemuFile, _: *mut c_void) -> c_int {
    1
}
unsafe extern "C" fn c_complete(_: *mut QemuFile, _: *mut c_void) -> c_int {
    C_COMPLETES.fetch_add(1, Ordering::SeqCst);
    0
}
unsafe extern "C" fn c_pending(_: *mut QemuFile, _: *mut c_void, _: u64) -> u64 {
    0
}
unsafe extern "C" fn c_cancel(_: *mut c_void) {
    C_CANCELS.fetch_add(1, Ordering::SeqCst);
}
unsafe extern "C" fn c_load(_: *mut QemuFile, _: *mut c_void, _: c_int) -> c_int {
    0
}

/// The C handler table of the live device the tests below register.
fn c_handlers() -> SaveVMHandlers {
    SaveVMHandlers {
        save_state: None,
        save_live_setup: Some(c_setup),
        save_live_iterate: Some(c_iterate),
        save_live_complete: Some(c_complete),
        save_live_pending: Some(c_pending),
        cancel: Some(c_cancel),
        load_state: Some(c_load),
        is_active: None,
    }
}

/// A C handler frees what a migration holds in `complete` or in `cancel`
/// (the C table has no cleanup): it gets exactly one of them per
/// migration. A migration that fails after the handler's complete
/// succeeded (here: the `exec:` command exits non-zero once it has read
/// the whole stream) does not call its cancel too; the next failure
/// before the switchover does.
#[test]
fn a_c_handler_gets_complete_or_cancel_never_both() {
    let _g = host();
    let ops = c_handlers();
    let opaque = 0xc0de as *mut c_void;
    let mut err = null_mut();
    let id = livemig::ffi::savevm::livemig_register_savevm_live(null_mut(), c"c-dev".as_ptr(), 0, 1, &ops, opaque, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert!(id > 0);
    for (uri, want, completes, cancels) in [
        ("exec:cat > /dev/null; exit 3", MigrationStatus::Failed, 1, 0),
        ("exec:false", MigrationStatus::Failed, 0, 1),
        ("exec:cat > /dev/null", MigrationStatus::Completed, 1, 0),
        ("exec:exit 4", MigrationStatus::Failed, 0, 1),
    ] {
        set_state(RunState::Running);
        let (c0, k0) = (C_COMPLETES.load(Ordering::SeqCst), C_CANCELS.load(Ordering::SeqCst));
        assert_eq!(migrate(uri), "");
        let st = wait_final(false, 30);
        assert_eq!(st, want, "{uri}: {:?}", livemig::outgoing::stats().error);
        let got = (C_COMPLETES.load(Ordering::SeqCst) - c0, C_CANCELS.load(Ordering::SeqCst) - k0);
        assert_eq!(got, (completes, cancels), "{uri}: (complete, cancel) calls");
    }
    set_state(RunState::Running);
    let name = CString::new("c-dev").unwrap();
    livemig::ffi::savevm::unregister_savevm(null_mut(), name.as_ptr(), opaque);
}

#[test]
fn a_ram_block_over_memory_not_mapped_is_refused_not_a_fault() {
    let _g = host();
    // SAFETY: three fresh private anonymous pages, unmapped below.
    let base =
        unsafe { libc::mmap(null_mut(), 3 * PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(base, libc::MAP_FAILED);
    let (page, mid) = (base as usize, base as usize + PAGE);
    // The middle page inaccessible, the last one gone.
    // SAFETY: pages of the mapping made above.
    unsafe {
        assert_eq!(libc::mprotect(mid as *mut c_void, PAGE, libc::PROT_NONE), 0);
        assert_eq!(libc::munmap((page + 2 * PAGE) as *mut c_void, PAGE), 0);
    }
    let mut err = null_mut();
    let add = |len: u64, err: &mut *mut Error| livemig::ffi::ram::livemig_ram_block_add(c"holey".as_ptr(), base, len, err);
    assert!(!add(2 * PAGE as u64, &mut err));
    assert_eq!(
        take_err(&mut err),
        format!("ram block 'holey': its memory at 0x{mid:x}..0x{:x} is not mapped readable and writable in this process", mid + PAGE)
    );
    // As long as it can be without wrapping: past every mapping.
    let huge = (u64::MAX - page as u64) & !(PAGE as u64 - 1);
    assert!(!add(huge, &mut err));
    assert!(take_err(&mut err).contains("is not mapped readable and writable"));
    // A resizable block's memory is all of its maximum length.
    unsafe extern "C" fn resized(_: *mut c_void, _: *const std::ffi::c_char, _: u64) {}
    assert!(!livemig::ffi::ram::livemig_ram_block_add_resizable(
        c"holey".as_ptr(),
        base,
        PAGE as u64,
        2 * PAGE as u64,
        Some(resized),
        null_mut(),
        &mut err
    ));
    assert!(take_err(&mut err).contains(&format!("its memory at 0x{mid:x}..")));
    // Nothing was registered: the name and the memory are still free, and
    // the page that is mapped registers.
    assert!(add(PAGE as u64, &mut err), "{}", take_err(&mut err));
    assert!(livemig::ffi::ram::livemig_ram_block_remove(c"holey".as_ptr(), &mut err), "{}", take_err(&mut err));
    // SAFETY: the two pages still mapped, no longer registered.
    unsafe { libc::munmap(base, 2 * PAGE) };
}

/// A live device with more to send than any link moves in a lifetime.
struct Endless;

impl SaveVmHandler for Endless {
    fn is_live(&self) -> bool {
        true
    }
    fn pending(&mut self, _max_size: u64) -> u64 {
        1 << 63
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

#[test]
fn handlers_pending_amounts_do_not_wrap_around_to_a_small_sum() {
    let _g = host();
    // Each alone keeps the migration from converging; the two together
    // summed to 2^64, which wrapped to 0, and the migration completed.
    livemig::savevm::register("endless", 0, 1, Box::new(Endless), OWNER, Priority::Default).unwrap();
    livemig::savevm::register("endless", 1, 1, Box::new(Endless), OWNER, Priority::Default).unwrap();
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    // The RAM alone goes in well under a second.
    std::thread::sleep(Duration::from_secs(2));
    let st = OUTGOING.status();
    cancel();
    let end = wait_final(false, 30);
    assert_eq!(livemig::savevm::unregister("endless", OWNER), 2);
    set_state(RunState::Running);
    assert_eq!(st, MigrationStatus::Active, "ended {end:?}");
    assert_eq!(end, MigrationStatus::Cancelled);
}

/// A migration under a 10 kB/s limit (the stream's buffer goes out every
/// few seconds) to which the host reports "disk gone" once ACTIVE, after
/// `settle`, then cancels if `cancel_after`: its end, and how long after
/// the report it came. The VM must run again.
fn slow_migration_with_host_error(settle: Duration, cancel_after: bool) -> (MigrationStatus, Duration) {
    let mut err = null_mut();
    api::qmp_migrate_set_speed(10_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    std::thread::sleep(settle);
    let e = error_new(c"disk gone".as_ptr());
    let t = Instant::now();
    api::migrate_fd_error(api::migrate_get_current(), e);
    error_free(e);
    if cancel_after {
        api::qmp_migrate_cancel(&mut err);
        assert_eq!(take_err(&mut err), "");
    }
    let end = wait_final(false, 30);
    let took = t.elapsed();
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(state(), RunState::Running);
    (end, took)
}

#[test]
fn migrate_fd_error_fails_a_slow_migration_at_once() {
    let _g = host();
    let (end, took) = slow_migration_with_host_error(Duration::from_millis(300), false);
    assert_eq!(end, MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
    assert!(took < Duration::from_secs(1), "FAILED {took:?} after migrate_fd_error");
}

#[test]
fn a_cancel_after_migrate_fd_error_leaves_the_hosts_error() {
    let _g = host();
    // The host reports its error and then cancels, before the migration
    // thread has acted on the error: the migration fails with it.
    let (end, _) = slow_migration_with_host_error(Duration::ZERO, true);
    assert_eq!(end, MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
}

/// A notifier that, as a QEMU host's does, reports the host's error with
/// the `MigrationState *` it was handed, once the outgoing migration is
/// ACTIVE.
unsafe extern "C" fn reports_error_with_its_state(_n: *mut livemig::ffi::types::Notifier, s: *mut c_void) {
    if api::livemig_migration_status(s.cast()) == MigrationStatus::Active && !api::livemig_migration_is_incoming(s.cast()) {
        let e = error_new(c"disk gone".as_ptr());
        api::migrate_fd_error(s.cast(), e);
        error_free(e);
    }
}

/// The state a notifier is handed names the migration as well as
/// `migrate_get_current()` does: `migrate_fd_error` made with it fails the
/// migration (it was ignored, and the migration completed).
#[test]
fn migrate_fd_error_with_a_notifiers_state_fails_the_migration() {
    let _g = host();
    let mut err = null_mut();
    api::qmp_migrate_set_speed(10_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    let mut n = livemig::ffi::types::Notifier { notify: Some(reports_error_with_its_state), le_next: null_mut(), le_prev: null_mut() };
    api::add_migration_state_change_notifier(&mut n);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    // At 10 kB/s the migration would take half an hour: an ignored error
    // leaves it running, and it is cancelled after 2 s.
    let ended = || matches!(OUTGOING.status(), MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled);
    let t = Instant::now();
    while !ended() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !ended() {
        cancel();
    }
    let end = wait_final(false, 30);
    api::remove_migration_state_change_notifier(&mut n);
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(end, MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
    assert_eq!(state(), RunState::Running);
}

/// An `exec:` command that exits without reading its stream fails the
/// migration with its exit status, not only with "Broken pipe".
#[test]
fn a_failed_exec_command_is_reported_with_its_exit_status() {
    let _g = host();
    for (uri, status) in [("exec:exit 4", "exit status: 4"), ("exec:/nonexistent/livemig-cmd", "exit status: 127")] {
        assert_eq!(migrate(uri), "");
        assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
        let error = livemig::outgoing::stats().error.unwrap_or_default();
        assert!(error.contains(&format!("the command exited with {status}")), "{uri}: {error}");
        set_state(RunState::Running);
    }
}

/// The same on the destination: a source command that fails before the
/// end of the stream is reported with its exit status, not only as the
/// stream's end.
#[test]
fn a_failed_incoming_exec_command_is_reported_with_its_exit_status() {
    let _g = host();
    for (uri, status) in [("exec:exit 5", "exit status: 5"), ("exec:printf QEVM; exit 6", "exit status: 6")] {
        set_state(RunState::Inmigrate);
        livemig::incoming::start_uri(uri).unwrap();
        assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
        let error = livemig::incoming::error().unwrap_or_default();
        assert!(error.contains("unexpected end of migration stream"), "{uri}: {error}");
        assert!(error.contains(&format!("the command exited with {status}")), "{uri}: {error}");
    }
    set_state(RunState::Running);
}

/// When the live handler below reported the host's error (see its
/// `pending`); None until then.
static REPORTED_AT: Mutex<Option<Instant>> = Mutex::new(None);

/// A live handler that reports a host error (`migrate_fd_error`) from the
/// migration thread, in the `pending` call that starts an iteration: the
/// second of two calls made back to back (the first ends a window).
struct ReportsInPending {
    last: Option<Instant>,
}

impl SaveVmHandler for ReportsInPending {
    fn is_live(&self) -> bool {
        true
    }
    fn pending(&mut self, _max_size: u64) -> u64 {
        let now = Instant::now();
        let back_to_back = self.last.is_some_and(|t| now.duration_since(t) < Duration::from_millis(20));
        self.last = Some(now);
        let mut at = REPORTED_AT.lock().unwrap_or_else(|e| e.into_inner());
        if back_to_back && at.is_none() {
            let e = error_new(c"disk gone".as_ptr());
            *at = Some(Instant::now());
            api::migrate_fd_error(api::migrate_get_current(), e);
            error_free(e);
        }
        0
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

/// A host error reported just before the migration thread waits out a
/// spent window (here from the thread itself, between its check of the
/// error and its wait) ends that wait: the error is not left for the next
/// window.
#[test]
fn migrate_fd_error_just_before_the_window_wait_is_not_missed() {
    let _g = host();
    *REPORTED_AT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    livemig::savevm::register("reporter", 0, 1, Box::new(ReportsInPending { last: None }), OWNER, Priority::Default).unwrap();
    let mut err = null_mut();
    // A page per window: every iteration spends its window's budget.
    api::qmp_migrate_set_speed(10_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    wait_until(10, "a final state", || {
        matches!(OUTGOING.status(), MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    });
    let ended = Instant::now();
    let end = OUTGOING.status();
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(livemig::savevm::unregister("reporter", OWNER), 1);
    let reported = REPORTED_AT.lock().unwrap_or_else(|e| e.into_inner()).take().expect("the error was reported");
    assert_eq!(end, MigrationStatus::Failed);
    assert_eq!(livemig::outgoing::stats().error.as_deref(), Some("disk gone"));
    assert_eq!(state(), RunState::Running);
    // Waiting out the window took the rest of it: about 100 ms.
    let took = ended.duration_since(reported);
    assert!(took < Duration::from_millis(50), "FAILED {took:?} after migrate_fd_error");
}

/// A destination on the far end of `peer` that reads the whole stream and,
/// once the vmdesc has come, writes each of `parts` on the return path at
/// its time after that.
fn timed_destination(peer: std::os::unix::net::UnixStream, parts: Vec<(Duration, Vec<u8>)>) -> std::thread::JoinHandle<()> {
    let reader = peer.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = std::io::Read::read(&mut &reader, &mut buf) {
            if buf[..n].ends_with(b"]}") {
                let _ = tx.send(Instant::now());
            }
        }
    });
    std::thread::spawn(move || {
        let Ok(ended) = rx.recv() else { return };
        for (at, bytes) in parts {
            std::thread::sleep((ended + at).saturating_duration_since(Instant::now()));
            if std::io::Write::write_all(&mut &peer, &bytes).is_err() {
                return;
            }
        }
    })
}

/// The confirmation is awaited for the io timeout and no longer: a SHUT
/// whose header and most of its body come before it, and whose last byte
/// comes after it, counts as none (the VM stopped and the host lock held
/// meanwhile): the source fails, keeping its VM stopped.
#[test]
fn a_confirmation_completed_after_the_io_timeout_counts_as_none() {
    let _g = host();
    livemig::transport::set_stall_timeout(1000).unwrap();
    let starts = STARTS.load(Ordering::SeqCst);
    let (st, e, took) = migrate_to(
        |peer| {
            timed_destination(peer, vec![(Duration::from_millis(700), vec![0, 1, 0, 4, 0, 0, 0]), (Duration::from_millis(1600), vec![0])])
        },
        10,
    );
    livemig::transport::set_stall_timeout(60_000).unwrap();
    let stays_stopped = (STARTS.load(Ordering::SeqCst), state());
    set_state(RunState::Running);
    assert_eq!(st, MigrationStatus::Failed, "{e}");
    assert!(e.contains("did not confirm the load within 1000 ms") && e.contains("this VM stays stopped"), "{e}");
    assert_eq!(stays_stopped, (starts, RunState::Postmigrate), "the VM stays stopped");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn qmp_migrate_checks_the_run_state_before_the_blockers() {
    let _g = host();
    // QEMU 7.2's migrate_prepare: a migration in progress, then the run
    // state (inmigrate, postmigrate), then the blockers.
    let reason = CString::new("device 'x' cannot migrate").unwrap();
    let reason = error_new(reason.as_ptr());
    let mut err = null_mut();
    assert_eq!(api::migrate_add_blocker(reason, &mut err), 0);
    set_state(RunState::Inmigrate);
    assert_eq!(migrate("exec:cat > /dev/null"), "Guest is waiting for an incoming migration");
    set_state(RunState::Postmigrate);
    assert_eq!(migrate("exec:cat > /dev/null"), "Can't migrate the vm that was paused due to previous migration");
    set_state(RunState::Running);
    assert_eq!(migrate("exec:cat > /dev/null"), "device 'x' cannot migrate");
    api::migrate_del_blocker(reason);
    error_free(reason);
}

#[test]
fn a_completed_migration_reports_no_remaining_bytes_nor_dirty_rate() {
    let _g = host();
    // Pages dirtied all through the migration (64 at every sync, the final
    // one included), so the last sync measures a dirty rate; once completed
    // QEMU 7.2 leaves `remaining` and `dirty_pages_rate` unset (0), as there
    // is nothing left to send.
    DIRTY_IN_SYNC.store(true, Ordering::SeqCst);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let st = wait_final(false, 30);
    DIRTY_IN_SYNC.store(false, Ordering::SeqCst);
    set_state(RunState::Running);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    let q = query();
    let ram = q.4.expect("ram once completed");
    assert!(ram.dirty_sync_count > 1, "pages were dirtied during the migration");
    assert_eq!((ram.remaining, ram.dirty_pages_rate), (0, 0));
}

/// A non-live handler whose state takes a while to save (the VM is
/// stopped while it runs): it notes when the VM stopped.
struct SlowSave(Duration);

static SLOW_SAVE_AT: Mutex<Option<Instant>> = Mutex::new(None);

impl SaveVmHandler for SlowSave {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        *SLOW_SAVE_AT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        std::thread::sleep(self.0);
        f.put_be32(0);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.skip(4);
        f.check()
    }
}

/// An `exec:` command that has read the whole stream but does not exit
/// keeps the VM stopped (and the host lock held) no longer than the io
/// timeout in all: the wait for its exit is part of the switchover. It
/// used to get a whole io timeout of its own on top, after the stream.
/// What the command started is killed with it: killing the shell alone
/// used to leave its `sleep` running.
#[test]
fn an_exec_command_that_does_not_exit_cannot_keep_the_vm_stopped_past_the_io_timeout() {
    let _g = host();
    let dir = tmp("exec-no-exit");
    let pid_file = dir.join("pid");
    livemig::transport::set_stall_timeout(2000).unwrap();
    // 1.5 s of the 2 s go on saving the device state, with the VM stopped.
    livemig::savevm::register("slow-save", 0, 1, Box::new(SlowSave(Duration::from_millis(1500))), OWNER, Priority::Default).unwrap();
    *SLOW_SAVE_AT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let starts = STARTS.load(Ordering::SeqCst);
    assert_eq!(migrate(&format!("exec:cat > /dev/null; sleep 30 & echo $! > {}; wait", pid_file.display())), "");
    let end = wait_final(false, 30);
    let ended = Instant::now();
    livemig::savevm::unregister("slow-save", OWNER);
    livemig::transport::set_stall_timeout(60_000).unwrap();
    let stopped_at = SLOW_SAVE_AT.lock().unwrap_or_else(|e| e.into_inner()).take().expect("the switchover ran");
    let e = livemig::outgoing::stats().error.unwrap_or_default();
    assert_eq!(end, MigrationStatus::Failed, "{e}");
    let stopped = ended.duration_since(stopped_at);
    assert!(stopped < Duration::from_millis(2800), "the VM stayed stopped {stopped:?} with a 2000 ms io timeout ({e})");
    assert!(e.contains("did not exit within the io timeout"), "{e}");
    // Whether the command got it all is unknown: the VM runs here again.
    assert_eq!(STARTS.load(Ordering::SeqCst), starts + 1);
    assert_eq!(state(), RunState::Running);
    let pid = std::fs::read_to_string(&pid_file).expect("the command wrote its sleep's pid");
    let stat = format!("/proc/{}/stat", pid.trim());
    // Gone, or a zombie its new parent has not reaped yet.
    wait_until(5, "the command's sleep to be killed", || {
        std::fs::read_to_string(&stat).map_or(true, |s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
    });
}

/// An `exec:` command gets the end of its stream (its stdin closed) even
/// when the process has no descriptor to spare when the migration ends
/// (RLIMIT_NOFILE reached): closing the pipe needs none. It used to need a
/// new one (for /dev/null), and without it the command never saw the end,
/// was killed at the io timeout, and the migration failed.
#[test]
fn an_exec_command_sees_the_end_of_its_stream_when_descriptors_run_out() {
    let _g = host();
    livemig::transport::set_stall_timeout(2000).unwrap();
    // Saving this device's state waits until the descriptors have run out:
    // the switchover, and so the close, comes after that.
    static LIMITED: AtomicBool = AtomicBool::new(false);
    struct AfterLimit;
    impl SaveVmHandler for AfterLimit {
        fn is_live(&self) -> bool {
            false
        }
        fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !LIMITED.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            f.put_be32(0);
            Ok(())
        }
        fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
            f.skip(4);
            f.check()
        }
    }
    LIMITED.store(false, Ordering::SeqCst);
    livemig::savevm::register("after-limit", 0, 1, Box::new(AfterLimit), OWNER, Priority::Default).unwrap();
    let dir = tmp("exec-emfile");
    let out = dir.join("s.bin");
    assert_eq!(migrate(&format!("exec:cat > {}", out.display())), "");
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    // No descriptor can be opened from here on (the lowest free one is at
    // the limit).
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a live rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
    let tight = libc::rlimit { rlim_cur: lowest_free as libc::rlim_t, rlim_max: old.rlim_max };
    // SAFETY: setrlimit reads a live rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) }, 0);
    let emfile = std::fs::File::open("/dev/null").map(drop).map_err(|e| e.raw_os_error());
    LIMITED.store(true, Ordering::SeqCst);
    let end = wait_final(false, 30);
    // SAFETY: setrlimit reads a live rlimit (the limits from before).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    livemig::savevm::unregister("after-limit", OWNER);
    livemig::transport::set_stall_timeout(60_000).unwrap();
    assert_eq!(emfile, Err(Some(libc::EMFILE)), "the limit is reached");
    let e = livemig::outgoing::stats().error.unwrap_or_default();
    assert_eq!(end, MigrationStatus::Completed, "{e}");
    assert!(std::fs::metadata(&out).unwrap().len() > RAM_SIZE as u64, "the command got the whole stream");
    set_state(RunState::Running);
}

/// A `unix:` path too long for a socket address is refused before
/// anything at it is touched: a socket there (bound by another listener
/// through a shorter path to the same place) is left alone, as QEMU checks
/// the length before it unlinks. It used to be removed, and then the bind
/// failed.
#[test]
fn a_unix_path_too_long_to_bind_is_refused_before_a_socket_there_is_removed() {
    let _g = host();
    set_state(RunState::Inmigrate);
    let dir = tmp("unix-long");
    let deep = dir.join("d".repeat(120));
    std::fs::create_dir_all(&deep).unwrap();
    let long = deep.join("in.sock");
    assert!(long.as_os_str().len() >= 108);
    // Another listener's socket at the long path, bound through
    // /proc/self/fd/N (a short path to the same directory).
    let dirfd = std::fs::File::open(&deep).unwrap();
    let short = format!("/proc/self/fd/{}/in.sock", dirfd.as_raw_fd());
    let other = std::os::unix::net::UnixListener::bind(&short).unwrap();
    let e = livemig::incoming::start_uri(&format!("unix:{}", long.display())).expect_err("too long to bind").to_string();
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&long).is_ok_and(|m| m.file_type().is_socket()), "the other listener's socket is still there ({e})");
    assert!(e.contains("is too long"), "{e}");
    assert!(INCOMING.status().is_idle(), "nothing started");
    // And it still takes connections.
    std::os::unix::net::UnixStream::connect(&short).expect("the other listener is still reachable");
    drop(other);
    set_state(RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A handler that flushes its state itself, after an empty piece.
struct FlushesAfterEmpty;

impl SaveVmHandler for FlushesAfterEmpty {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        // A large piece goes out at once (the buffer is empty after it),
        // then nothing, then the handler flushes.
        f.put_buffer(&vec![0x33; 1 << 20]);
        f.put_buffer(&[]);
        f.flush()
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.skip(1 << 20);
        f.check()
    }
}

/// An empty write is nothing to send: a flush with only it queued used
/// to hand the channel a write of no bytes, whose 0 was taken for a
/// closed connection ("unable to write to …: connection closed").
#[test]
fn an_empty_write_is_not_taken_for_a_closed_connection() {
    let _g = host();
    livemig::savevm::register("flushes-after-empty", 0, 1, Box::new(FlushesAfterEmpty), OWNER, Priority::Default).unwrap();
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || std::io::copy(&mut &peer, &mut std::io::sink()).unwrap());
    assert_eq!(migrate(&format!("fd:{}", ours.into_raw_fd())), "");
    let end = wait_final(false, 30);
    livemig::savevm::unregister("flushes-after-empty", OWNER);
    assert_eq!(end, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert!(reader.join().unwrap() > (RAM_SIZE + (1 << 20)) as u64, "the peer got the stream");
    set_state(RunState::Running);
}

/// `qemu_fdopen` leaves the descriptor with the caller whenever it
/// returns NULL, also when the descriptor cannot be made non-blocking
/// (here an O_PATH one): the caller then closes it, once. It used to be
/// closed already, so that the caller's close could hit a number reused
/// meanwhile by another thread.
#[test]
fn qemu_fdopen_leaves_the_descriptor_with_the_caller_when_it_fails() {
    let _g = host();
    let dir = tmp("fdopen-opath");
    let file = dir.join("f");
    std::fs::write(&file, b"").unwrap();
    let path = CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: open(2) with a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    let mode = CString::new("wb").unwrap();
    assert!(qemu_fdopen(fd, mode.as_ptr()).is_null(), "an O_PATH descriptor cannot carry a stream");
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0, "fd {fd} is still open: the caller's");
    // SAFETY: the caller's descriptor, closed once, here.
    assert_eq!(unsafe { libc::close(fd) }, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qmp_migrate` asks the run state before it takes the migration's lock:
/// a migration that completes in between (the VM now postmigrate, its
/// state on the destination) must not let the call migrate the VM again
/// on the stale answer. It started a second migration of it.
#[test]
fn a_migration_that_completes_while_qmp_migrate_asks_the_run_state_is_not_followed_by_another() {
    let _g = host();
    let dir = tmp("stale-runstate");
    let go = dir.join("go");
    // The first migration waits, with the whole stream out and the VM
    // stopped, for its command to exit, which waits for `go`.
    let uri = format!("exec:cat > /dev/null; while [ ! -e {} ]; do sleep 0.01; done", go.display());
    assert_eq!(migrate(&uri), "");
    wait_until(20, "the switchover", || state() == RunState::FinishMigrate);
    // The next call reads finish-migrate; before it goes on, the first
    // migration completes.
    *RUNSTATE_HOOK.lock().unwrap() = Some(Box::new(move || {
        std::fs::write(&go, b"").unwrap();
        wait_until(20, "the first migration completed", || OUTGOING.status() == MigrationStatus::Completed);
    }));
    let second = migrate("exec:cat > /dev/null");
    let after = OUTGOING.status();
    if after != MigrationStatus::Completed {
        wait_final(false, 30);
    }
    assert_eq!(state(), RunState::Postmigrate);
    assert_eq!(
        (second.as_str(), after),
        ("Can't migrate the vm that was paused due to previous migration", MigrationStatus::Completed),
        "a VM that went to the destination was migrated again"
    );
    set_state(RunState::Running);
    let _ = std::fs::remove_dir_all(&dir);
}

unsafe extern "C" fn c_save(_: *mut QemuFile, _: *mut c_void) {}

/// A device registered while a migration runs is refused (-EBUSY, with
/// the reason), in either direction, and nothing is registered: the
/// migration took its list of devices when it started, so the device
/// would silently not be migrated (or its section not be found by the
/// load). The migration in progress goes on; once it has ended, the same
/// registration is accepted.
#[test]
fn a_device_registered_while_a_migration_runs_is_refused() {
    let _g = host();
    let ops = c_handlers();
    let opaque = 0x1a7e as *mut c_void;
    let name = c"late-dev";
    let busy = "savevm: 'late-dev' cannot be registered while a migration is in progress";
    let mut err = null_mut();
    // Outgoing: a slow migration, ACTIVE.
    api::qmp_migrate_set_speed(100_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    let id = livemig::ffi::savevm::livemig_register_savevm_live(null_mut(), name.as_ptr(), 0, 1, &ops, opaque, &mut err);
    assert_eq!((id, take_err(&mut err).as_str()), (-libc::EBUSY, busy));
    assert_eq!(livemig::ffi::savevm::register_savevm(null_mut(), name.as_ptr(), 0, 1, Some(c_save), Some(c_load), opaque), -libc::EBUSY);
    assert_eq!(livemig::savevm::register("late-dev", 0, 1, Box::new(Counted), OWNER, Priority::Default).unwrap_err().to_string(), busy);
    assert_eq!(livemig::savevm::unregister("late-dev", opaque as usize), 0, "a refused registration registered nothing");
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    set_state(RunState::Inmigrate);
    // Incoming: a destination listening for its source.
    livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
    let id = livemig::ffi::savevm::livemig_register_savevm_live(null_mut(), name.as_ptr(), 0, 1, &ops, opaque, &mut err);
    assert_eq!((id, take_err(&mut err).as_str()), (-libc::EBUSY, busy));
    assert!(livemig::incoming::cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(livemig::savevm::unregister("late-dev", opaque as usize), 0, "a refused registration registered nothing");
    // Once no migration runs, it is accepted.
    let id = livemig::ffi::savevm::livemig_register_savevm_live(null_mut(), name.as_ptr(), 0, 1, &ops, opaque, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert!(id > 0);
    assert_eq!(livemig::savevm::unregister("late-dev", opaque as usize), 1);
    set_state(RunState::Running);
}

/// While a migration runs, a capability change is refused as QEMU 7.2
/// refuses it, before the capabilities are looked at: "There's a
/// migration process in progress", also for a list that names one livemig
/// does not implement; nothing changes.
#[test]
fn a_capability_change_during_a_migration_is_refused_as_in_progress() {
    use livemig::ffi::types::{MigrationCapabilityStatus, MigrationCapabilityStatusList};
    use livemig::params::MigrationCapability as Cap;
    let _g = host();
    let mut err = null_mut();
    api::qmp_migrate_set_speed(100_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    let mut compress = MigrationCapabilityStatus { capability: Cap::Compress, state: true };
    let mut xbzrle = MigrationCapabilityStatus { capability: Cap::Xbzrle, state: true };
    for list in [vec![&mut compress as *mut _], vec![&mut xbzrle as *mut _, &mut compress as *mut _]] {
        let mut nodes: Vec<MigrationCapabilityStatusList> =
            list.iter().map(|&v| MigrationCapabilityStatusList { next: null_mut(), value: v }).collect();
        for i in (0..nodes.len() - 1).rev() {
            let next: *mut MigrationCapabilityStatusList = &mut nodes[i + 1];
            nodes[i].next = next;
        }
        api::qmp_migrate_set_capabilities(&mut nodes[0], &mut err);
        assert_eq!(take_err(&mut err), "There's a migration process in progress");
        assert!(!api::migrate_use_xbzrle(), "a refused list changed a capability");
    }
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
}

/// The XBZRLE cache size of a migration in progress: the new cache is
/// made by `qmp_migrate_set_cache_size`, so a size that cannot be
/// allocated is refused there, with the reason, and changes nothing (the
/// parameter and what query-migrate reports stay the cache in use); one
/// that can be is taken. With no migration running a size is only
/// recorded (as in QEMU 7.2): the cache is allocated when one starts.
#[test]
fn a_cache_size_that_cannot_be_allocated_during_a_migration_is_refused() {
    use livemig::params::MigrationCapability as Cap;
    let _g = host();
    let mut err = null_mut();
    livemig::params::set_capabilities(&[(Cap::Xbzrle, true)]).unwrap();
    api::qmp_migrate_set_speed(100_000, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    let reported = || {
        let info = api::qmp_query_migrate(null_mut());
        // SAFETY: a MigrationInfo from livemig, freed below; its
        // xbzrle_cache is set while ACTIVE with the capability on.
        let size = unsafe { (*info).xbzrle_cache.as_ref().map(|x| x.cache_size) };
        api::qapi_free_MigrationInfo(info);
        (api::qmp_query_migrate_cache_size(null_mut()), size)
    };
    assert_eq!(reported(), (64 << 20, Some(64 << 20)));
    api::qmp_migrate_set_cache_size(1 << 40, &mut err);
    assert_eq!(take_err(&mut err), "Parameter 'xbzrle_cache_size': cannot allocate an xbzrle cache of 1099511627776 bytes");
    assert_eq!(reported(), (64 << 20, Some(64 << 20)), "a refused size changed the parameter");
    api::qmp_migrate_set_cache_size(1 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(reported(), (1 << 20, Some(1 << 20)));
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    api::qmp_migrate_set_cache_size(1 << 40, &mut err);
    assert_eq!(take_err(&mut err), "", "no migration: recorded only");
    assert_eq!(api::qmp_query_migrate_cache_size(null_mut()), 1 << 40);
    api::qmp_migrate_set_cache_size(64 << 20, &mut err);
    api::qmp_migrate_set_speed(128 << 20, &mut err);
    assert_eq!(take_err(&mut err), "");
    livemig::params::set_capabilities(&[(Cap::Xbzrle, false)]).unwrap();
}

unsafe extern "C" fn on_resized(_: *mut c_void, _: *const std::ffi::c_char, _: u64) {}

/// A RAM block whose memory would run past the end of the address space
/// is refused with that reason, not with one about its length (which is
/// a whole number of pages), and nothing is registered.
#[test]
fn a_ram_block_past_the_end_of_the_address_space_is_refused_with_that_reason() {
    let _g = host();
    let mut err = null_mut();
    let host_addr = 0x1000 as *mut c_void;
    let len = u64::MAX - 4095;
    assert!(!livemig::ffi::ram::livemig_ram_block_add(c"wrap".as_ptr(), host_addr, len, &mut err));
    assert_eq!(take_err(&mut err), "ram block 'wrap': 18446744073709547520 bytes at 0x1000 run past the end of the address space");
    let resized: livemig::ffi::ram::LivemigRamResized = Some(on_resized);
    assert!(!livemig::ffi::ram::livemig_ram_block_add_resizable(c"wrap".as_ptr(), host_addr, 4096, len, resized, null_mut(), &mut err));
    assert_eq!(take_err(&mut err), "ram block 'wrap': 18446744073709547520 bytes at 0x1000 run past the end of the address space");
    assert!(!livemig::ffi::ram::livemig_ram_block_remove(c"wrap".as_ptr(), &mut err));
    assert_eq!(take_err(&mut err), "ram block 'wrap' is not registered");
}

/// As QEMU 7.2 (migration_calculate_complete): once completed, the total
/// time counts from the qmp_migrate call, the connect included (as while
/// the migration runs), and `mbps` is the whole stream over the time
/// after setup: bytes * 8 / (total_time - setup_time) / 1000.
#[test]
fn a_completed_migration_times_from_the_call_and_rates_the_stream_after_setup() {
    use std::io::Read;
    let _g = host();
    let mut err = null_mut();
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(take_err(&mut err), "");
    // The connect waits for a full backlog, which the destination frees
    // after 400 ms; then it reads the stream to its end.
    let dir = tmp("complete-times");
    let (path, l, queued) = full_backlog(&dir);
    let dest = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(l.accept().unwrap());
        drop(queued);
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf).unwrap() {
                0 => return n,
                k => n += k as u64,
            }
        }
    });
    assert_eq!(migrate(&format!("unix:{}", path.display())), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    set_state(RunState::Running);
    let bytes = dest.join().unwrap();
    let i = api::qmp_query_migrate(&mut err);
    assert!(!i.is_null(), "{}", take_err(&mut err));
    // SAFETY: a MigrationInfo from livemig, freed below.
    let (total, setup, downtime, mbps) = unsafe { ((*i).total_time, (*i).setup_time, (*i).downtime, (*(*i).ram).mbps) };
    api::qapi_free_MigrationInfo(i);
    assert!(total >= 400, "total_time {total} ms leaves out the 400 ms connect");
    assert!(total >= setup + downtime, "total {total}, setup {setup}, downtime {downtime}");
    let expected = bytes as f64 * 8.0 / (total - setup) as f64 / 1000.0;
    assert!((mbps - expected).abs() <= expected * 1e-9, "mbps {mbps}, {bytes} bytes over {total} - {setup} ms: {expected}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// XBZRLE figures as QEMU 7.2 counts them (save_xbzrle_page): `pages` is
/// every page found in the cache, whether encoded, unchanged (skipped)
/// or overflowed; `bytes` adds a page size for each overflow.
#[test]
fn xbzrle_pages_and_bytes_count_unchanged_and_overflowed_pages_as_qemu() {
    use livemig::params::MigrationCapability as Cap;
    let _g = host();
    let mut err = null_mut();
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(take_err(&mut err), "");
    livemig::params::set_capabilities(&[(Cap::Xbzrle, true)]).unwrap();
    let mut run = |rewrite: u64| {
        if rewrite == 0 {
            DIRTY_SYNCS_LEFT.store(4, Ordering::SeqCst);
        } else {
            REWRITE_IN_SYNC.store(rewrite, Ordering::SeqCst);
            DIRTY_IN_SYNC.store(true, Ordering::SeqCst);
        }
        assert_eq!(migrate("exec:cat > /dev/null"), "");
        let st = wait_final(false, 30);
        DIRTY_IN_SYNC.store(false, Ordering::SeqCst);
        REWRITE_IN_SYNC.store(0, Ordering::SeqCst);
        DIRTY_SYNCS_LEFT.store(0, Ordering::SeqCst);
        set_state(RunState::Running);
        assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
        let i = api::qmp_query_migrate(&mut err);
        assert!(!i.is_null(), "{}", take_err(&mut err));
        // SAFETY: a MigrationInfo from livemig, freed below; `ram` and
        // `xbzrle_cache` are set once completed with the capability on.
        let r = unsafe { (*(*i).ram, *(*i).xbzrle_cache) };
        api::qapi_free_MigrationInfo(i);
        r
    };
    // The same 64 pages dirtied at the next 4 syncs, never changed: after
    // a round of misses, each is found unchanged.
    let (ram, x) = run(0);
    assert!(ram.skipped > 0 && x.cache_miss > 0, "skipped {}, misses {}", ram.skipped, x.cache_miss);
    assert_eq!((x.pages, x.bytes, x.overflow, x.encoding_rate), (ram.skipped, 0, 0, 0.0));
    // Rewritten with random bytes at every sync: each page found in the
    // cache overflows, and counts a page into the bytes.
    let (ram, x) = run(0x9e37_79b9_7f4a_7c15);
    assert!(x.overflow > 0, "no overflow: {x:?}");
    assert_eq!((x.pages, x.bytes), (x.overflow + ram.skipped, x.overflow * PAGE as i64));
    // The host's pattern back in the rewritten pages.
    livemig::params::set_capabilities(&[(Cap::Xbzrle, false)]).unwrap();
    let blk = livemig::ram::blocks().into_iter().find(|b| b.idstr == "ram").unwrap();
    for i in 0..64 {
        // SAFETY: page i of the host's RAM block, which no migration reads now.
        unsafe { std::ptr::write_bytes(blk.page_ptr(i), i as u8 | 1, PAGE) };
    }
}

/// As QEMU 7.2 (qmp_migrate_set_downtime, then the `downtime_limit`
/// parameter in ms): the limit is kept in whole milliseconds, truncated.
#[test]
fn the_downtime_limit_is_kept_in_whole_milliseconds() {
    let _g = host();
    let mut err = null_mut();
    // 1.001 * 1000 is 1000.999… in binary floating point: 1000 ms in QEMU.
    for (s, ms) in [(0.0105, 10), (0.0005, 0), (1.001, 1000), (0.3, 300), (2000.0, 2_000_000)] {
        api::qmp_migrate_set_downtime(s, &mut err);
        assert_eq!(take_err(&mut err), "");
        assert_eq!(api::migrate_max_downtime(), ms * 1_000_000, "{s} s");
    }
    api::qmp_migrate_set_downtime(0.3, &mut err);
    assert_eq!(take_err(&mut err), "");
}

/// A downtime limit out of range is refused with QEMU 7.2's text
/// (qmp_migrate_set_downtime), the value after it; nothing changes.
#[test]
fn a_downtime_limit_out_of_range_is_refused_with_qemu_s_text() {
    let _g = host();
    let mut err = null_mut();
    for (s, shown) in [(2000.5, "2000.5"), (-1.0, "-1"), (f64::NAN, "NaN")] {
        api::qmp_migrate_set_downtime(s, &mut err);
        assert_eq!(
            take_err(&mut err),
            format!("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds, got {shown}")
        );
        assert_eq!(api::migrate_max_downtime(), 300_000_000);
    }
}

/// QEMU 7.2 counts a RAM byte sent while the VM does not run as
/// downtime-bytes (ram_transferred_add): a paused VM's migration has no
/// precopy bytes.
#[test]
fn a_paused_vm_s_ram_bytes_are_all_downtime_bytes() {
    let _g = host();
    let mut err = null_mut();
    api::qmp_migrate_set_speed(0, &mut err);
    assert_eq!(take_err(&mut err), "");
    set_state(RunState::Paused);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let st = wait_final(false, 30);
    set_state(RunState::Running);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    let ram = query().4.expect("ram once completed");
    assert!(ram.transferred > RAM_SIZE as i64 / 2, "transferred {}", ram.transferred);
    assert_eq!((ram.precopy_bytes, ram.downtime_bytes), (0, ram.transferred));
    // A running VM's bytes before the switchover are precopy bytes.
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let st = wait_final(false, 30);
    set_state(RunState::Running);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    let ram = query().4.expect("ram once completed");
    assert!(ram.precopy_bytes > RAM_SIZE as i64 / 2 && ram.downtime_bytes < 64 << 10, "{ram:?}");
}
