//! Host callbacks that call back into livemig, as a VMM's may:
//!
//! - a `dirty_log_sync` that marks pages of another block (a log shared by
//!   every block) during the switchover's last sync has its marks sent in
//!   the final pass, whichever block's sync makes them;
//! - marks made while a cancelled switchover is wound up (a CANCELLING
//!   notifier, `dirty_log_stop`) are taken, not refused as failing a
//!   migration that is cancelled already;
//! - a host thread holding the host lock never sees ACTIVE before the
//!   ACTIVE notifier has run.
//!
//! The host here is its own (two RAM blocks, a run state, a dirty log
//! whose syncs run a hook); the tests run one at a time.

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::os::raw::c_int;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use livemig::error::Result;
use livemig::ffi::errors::{error_free, error_get_pretty, Error};
use livemig::ffi::migration as api;
use livemig::ffi::types::{LivemigHostOps, Notifier};
use livemig::host::RunState;
use livemig::qemu_file::QemuFile;
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::{MigrationStatus, OUTGOING};

use common::STATE;
use parking_lot::lock_api::{RawMutex as _, RawMutexTimed as _};

const BIG: usize = 4 << 20;
const SMALL: usize = 64 << 10;
const PAGE: usize = 4096;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;

/// Run by the next dirty-log sync of the block it names (once).
type SyncHook = (&'static str, Box<dyn FnOnce() + Send>);
static SYNC_HOOK: Mutex<Option<SyncHook>> = Mutex::new(None);
/// Run by `dirty_log_stop` and the notifier below (each once).
type Hook = Box<dyn FnOnce() + Send>;
static STOP_HOOK: Mutex<Option<Hook>> = Mutex::new(None);
static CANCELLING_HOOK: Mutex<Option<Hook>> = Mutex::new(None);
/// Run by the device's `setup` (once).
static SETUP_HOOK: Mutex<Option<Hook>> = Mutex::new(None);
/// The notifier has been called for ACTIVE.
static ACTIVE_NOTIFIED: AtomicBool = AtomicBool::new(false);
/// The device below cancels the migration from its `complete`.
static CANCEL_IN_COMPLETE: AtomicBool = AtomicBool::new(false);

fn state() -> RunState {
    RunState::all()[STATE.load(Ordering::SeqCst) as usize]
}

unsafe extern "C" fn lock(_: *mut c_void) {
    LOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn log_sync(_: *mut c_void, idstr: *const c_char, _: *mut c_void, _: u64, _: *mut u64) -> c_int {
    // SAFETY: livemig passes the block's name as a C string.
    let id = unsafe { CStr::from_ptr(idstr) }.to_string_lossy().into_owned();
    let mut g = SYNC_HOOK.lock().unwrap_or_else(|e| e.into_inner());
    if g.as_ref().is_some_and(|(block, _)| *block == id) {
        let (_, hook) = g.take().expect("checked");
        drop(g);
        hook();
    }
    0
}
unsafe extern "C" fn log_stop(_: *mut c_void) {
    let hook = STOP_HOOK.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(hook) = hook {
        hook();
    }
}
unsafe extern "C" fn on_state(_: *mut Notifier, s: *mut c_void) {
    if api::livemig_migration_status(s.cast()) == MigrationStatus::Active {
        ACTIVE_NOTIFIED.store(true, Ordering::SeqCst);
    }
    if api::livemig_migration_status(s.cast()) == MigrationStatus::Cancelling {
        let hook = CANCELLING_HOOK.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// A live device with one byte per section; its complete may cancel.
struct Dev;

impl SaveVmHandler for Dev {
    fn is_live(&self) -> bool {
        true
    }
    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        let hook = SETUP_HOOK.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
        f.put_u8(1);
        Ok(())
    }
    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        f.put_u8(2);
        Ok(true)
    }
    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        if CANCEL_IN_COMPLETE.load(Ordering::SeqCst) {
            let mut err = null_mut();
            api::qmp_migrate_cancel(&mut err);
            assert!(err.is_null());
        }
        f.put_u8(3);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.get_u8();
        f.check()
    }
}

struct Ram {
    big: *mut u8,
}

// SAFETY: a fixed mapping, written only by the tests, one at a time.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

static SERIAL: Mutex<()> = Mutex::new(());
static mut RAM: Option<Ram> = None;

/// Sets the host up once and returns a guard serialising the tests and
/// the big block's memory.
fn host() -> (MutexGuard<'static, ()>, *mut u8) {
    static SETUP: Once = Once::new();
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    SETUP.call_once(|| {
        // The common host's run state, with this file's lock and dirty log.
        let ops = LivemigHostOps { dirty_log_sync: Some(log_sync), dirty_log_stop: Some(log_stop), ..common::host_ops(lock, unlock) };
        livemig::host::set(ops, null_mut()).unwrap();
        let map = |len: usize| {
            // SAFETY: a fresh private anonymous mapping, never unmapped.
            let p =
                unsafe { libc::mmap(null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: `len` writable bytes at `p`.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x11, len) };
            p.cast::<u8>()
        };
        let big = map(BIG);
        livemig::ram::block_add("big", big, BIG as u64).unwrap();
        livemig::ram::block_add("small", map(SMALL), SMALL as u64).unwrap();
        livemig::savevm::register("dev", 0, 1, Box::new(Dev), 0, Priority::Default).unwrap();
        let n = Box::leak(Box::new(Notifier { notify: Some(on_state), le_next: null_mut(), le_prev: null_mut() }));
        api::add_migration_state_change_notifier(n);
        livemig::transport::set_stall_timeout(10_000).unwrap();
        // SAFETY: written once, here, before any reader (Once).
        unsafe { RAM = Some(Ram { big }) };
    });
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // SAFETY: initialised above and never written again.
    let big = unsafe { (*std::ptr::addr_of!(RAM)).as_ref().unwrap().big };
    (g, big)
}

fn take_err(err: &mut *mut Error) -> String {
    if err.is_null() {
        return String::new();
    }
    // SAFETY: a live error from livemig; its text is a C string it owns.
    let s = unsafe { CStr::from_ptr(error_get_pretty(*err)) }.to_string_lossy().into_owned();
    error_free(*err);
    *err = null_mut();
    s
}

/// `livemig_ram_mark_dirty` of one page: its error text ("" for none).
fn mark(block: &str, page: usize) -> String {
    let id = CString::new(block).unwrap();
    let mut err = null_mut();
    let ok = livemig::ffi::ram::livemig_ram_mark_dirty(id.as_ptr(), (page * PAGE) as u64, PAGE as u64, &mut err);
    match (ok, take_err(&mut err)) {
        (true, e) if e.is_empty() => e,
        (false, e) if !e.is_empty() => e,
        (ok, e) => format!("returned {ok} with error '{e}'"),
    }
}

/// Waits (bounded) for a final state of one direction, then for its
/// notifiers (run under the host lock) to have returned.
fn wait_final(incoming: bool, secs: u64) -> MigrationStatus {
    let s = common::wait_final(incoming, secs);
    assert!(LOCK.try_lock_for(Duration::from_secs(secs)), "the host lock is still held after {secs} s");
    // SAFETY: taken just above.
    unsafe { LOCK.unlock() };
    s
}

fn migrate(uri: &str) -> String {
    let c = CString::new(uri).unwrap();
    let mut err = null_mut();
    api::qmp_migrate(c.as_ptr(), false, false, false, false, false, false, &mut err);
    take_err(&mut err)
}

/// Arms the next sync of "small": the last one (the VM stopped) writes
/// page 5 of "big" and marks it dirty, keeping the mark's error text in
/// `result`; an earlier one arms the next.
fn arm_last_sync_mark(big_addr: usize, result: &'static Mutex<Option<String>>) {
    *SYNC_HOOK.lock().unwrap() = Some((
        "small",
        Box::new(move || {
            if state() != RunState::FinishMigrate {
                return arm_last_sync_mark(big_addr, result);
            }
            // A write the shared log saw, made before the VM stopped.
            // SAFETY: page 5 lies inside the big block.
            unsafe { std::ptr::write_bytes((big_addr as *mut u8).add(5 * PAGE), 0xb2, PAGE) };
            *result.lock().unwrap() = Some(mark("big", 5));
        }),
    ));
}

/// A host whose dirty log covers every block syncs it all at the first
/// block's call and marks what belongs to another: at the switchover's
/// last sync the second block's sync marks a page of the first (the
/// largest, synced first). That page goes in the final pass: the
/// migration completes and a destination loads the page as it was
/// written then.
#[test]
fn a_page_marked_by_another_block_s_last_sync_is_sent() {
    let (_g, big) = host();
    let dir = common::scratch::dir("cross-block-mark");
    let stream = dir.join("s.bin");
    let result: &'static Mutex<Option<String>> = Box::leak(Box::new(Mutex::new(None)));
    *STOP_HOOK.lock().unwrap() = None;
    arm_last_sync_mark(big as usize, result);
    assert_eq!(migrate(&format!("exec:cat > {}", stream.display())), "");
    let st = wait_final(false, 30);
    *SYNC_HOOK.lock().unwrap() = None;
    let marked = result.lock().unwrap().take().expect("the last sync of 'small' ran");
    assert_eq!(marked, "", "the mark made in the last sync");
    assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);

    // The destination (this process, the same blocks) gets the page as
    // written in the last sync, not as this side has it now.
    // SAFETY: page 5 lies inside the big block.
    unsafe { std::ptr::write_bytes(big.add(5 * PAGE), 0xc3, PAGE) };
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let uri = CString::new(format!("exec:cat {}", stream.display())).unwrap();
    let mut err = null_mut();
    api::qemu_start_incoming_migration(uri.as_ptr(), &mut err);
    assert_eq!(take_err(&mut err), "");
    assert_eq!(wait_final(true, 30), MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    // SAFETY: page 5 lies inside the big block; nothing writes it now.
    let page = unsafe { std::slice::from_raw_parts(big.add(5 * PAGE), PAGE) };
    assert!(page.iter().all(|&b| b == 0xb2), "page 5 arrived as {:#x}", page[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device cancels the migration from its `complete`, after RAM's final
/// pass has sealed the blocks. While the migration is wound up, a
/// CANCELLING notifier and `dirty_log_stop` mark pages dirty (a device
/// resuming its DMA, a log flushed as it stops): the VM runs on here, so
/// the marks are taken, not refused as failing a migration that is
/// cancelled already.
#[test]
fn marks_made_while_a_cancelled_switchover_is_wound_up_are_taken() {
    let (_g, _big) = host();
    let results: &'static Mutex<Vec<(&'static str, String)>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    *CANCELLING_HOOK.lock().unwrap() = Some(Box::new(move || results.lock().unwrap().push(("notifier", mark("big", 7)))));
    *STOP_HOOK.lock().unwrap() = Some(Box::new(move || results.lock().unwrap().push(("dirty_log_stop", mark("small", 1)))));
    CANCEL_IN_COMPLETE.store(true, Ordering::SeqCst);
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let st = wait_final(false, 30);
    CANCEL_IN_COMPLETE.store(false, Ordering::SeqCst);
    *CANCELLING_HOOK.lock().unwrap() = None;
    *STOP_HOOK.lock().unwrap() = None;
    assert_eq!(st, MigrationStatus::Cancelled, "{:?}", livemig::outgoing::stats().error);
    assert_eq!(state(), RunState::Running, "the VM runs here again");
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results, [("notifier", String::new()), ("dirty_log_stop", String::new())]);
    // The next migration completes, and marks are taken as ever.
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert_eq!(mark("big", 7), "");
}

#[test]
fn a_host_holding_its_lock_never_sees_active_before_its_notifier() {
    let (_g, _big) = host();
    ACTIVE_NOTIFIED.store(false, Ordering::SeqCst);
    // The device's setup (run without the host lock) waits until this
    // thread holds the host lock: the move to ACTIVE comes while it does.
    let (in_setup, held) = (std::sync::Arc::new(AtomicBool::new(false)), std::sync::Arc::new(AtomicBool::new(false)));
    let (i, h) = (in_setup.clone(), held.clone());
    *SETUP_HOOK.lock().unwrap() = Some(Box::new(move || {
        i.store(true, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while !h.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    }));
    assert_eq!(migrate("exec:cat > /dev/null"), "");
    let end = Instant::now() + Duration::from_secs(10);
    while !in_setup.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(in_setup.load(Ordering::SeqCst), "the device's setup did not run");
    LOCK.lock();
    held.store(true, Ordering::SeqCst);
    // Holding the lock, watch the state for a while: ACTIVE may show only
    // together with its notifier's call.
    let mut seen = None;
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        let st = OUTGOING.status();
        if st != MigrationStatus::Setup {
            seen = Some((st, ACTIVE_NOTIFIED.load(Ordering::SeqCst)));
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: taken above by this thread.
    unsafe { LOCK.unlock() };
    let st = wait_final(false, 30);
    assert_eq!(seen, None, "a state other than SETUP showed while the host held its lock (state, ACTIVE notified)");
    assert_eq!(st, MigrationStatus::Completed);
    assert!(ACTIVE_NOTIFIED.load(Ordering::SeqCst));
}
