//! Cancel from every state — none, setup, active, during the switchover,
//! completed, failed, cancelled — twice in a row, concurrently with queries
//! and capability changes, each followed by a new migration to a fresh
//! destination; and a stress test calling the public functions from several
//! threads during migrations, bounded in time (a deadlock fails it).

mod common;

use std::ffi::CString;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use common::*;
use livemig::error::Result;
use livemig::ffi::migration as api;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::qemu_file::QemuFile;
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::{MigrationStatus, OUTGOING};
use livemig::transport::Uri;

/// Test controls for the "gate" device.
static HOLD_SETUP: AtomicBool = AtomicBool::new(false);
static IN_SETUP: AtomicBool = AtomicBool::new(false);
static HOLD_COMPLETE: AtomicBool = AtomicBool::new(false);
static IN_COMPLETE: AtomicBool = AtomicBool::new(false);
static KEEP_ACTIVE: AtomicBool = AtomicBool::new(false);
static CANCELS: AtomicU32 = AtomicU32::new(0);

/// A live device whose setup and completion the test can hold, and which
/// can keep a migration in ACTIVE (it always has more to send).
struct Gate;

fn hold(flag: &AtomicBool, inside: &AtomicBool) {
    inside.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while flag.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    inside.store(false, Ordering::SeqCst);
}

impl SaveVmHandler for Gate {
    fn is_live(&self) -> bool {
        true
    }
    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        hold(&HOLD_SETUP, &IN_SETUP);
        f.put_u8(1);
        Ok(())
    }
    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        f.put_u8(2);
        Ok(!KEEP_ACTIVE.load(Ordering::SeqCst))
    }
    fn pending(&mut self, _max: u64) -> u64 {
        if KEEP_ACTIVE.load(Ordering::SeqCst) {
            1 << 40
        } else {
            0
        }
    }
    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        hold(&HOLD_COMPLETE, &IN_COMPLETE);
        f.put_u8(3);
        Ok(())
    }
    fn cancel(&mut self) {
        CANCELS.fetch_add(1, Ordering::SeqCst);
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.get_u8();
        f.check()
    }
}

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let (g, ram) = host();
    static GATE: Once = Once::new();
    GATE.call_once(|| {
        livemig::savevm::register("gate", 0, 1, Box::new(Gate), 0, Priority::Default).unwrap();
        ram.fill_pattern();
        livemig::params::set_speed(0).unwrap();
    });
    g
}

fn migrate(uri: &str) {
    outgoing::start(Target::Uri(Uri::parse(uri).unwrap(), uri.to_string())).unwrap();
}

/// A fresh destination: a new file.
fn fresh() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = tmpdir("fresh");
    format!("exec:cat > {}", d.join(format!("s{}.bin", N.fetch_add(1, Ordering::SeqCst))).display())
}

/// A new migration to a fresh destination completes.
fn then_migrate_again(what: &str) {
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    migrate(&fresh());
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed, "{what}: the next migration");
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

fn query_status() -> MigrationStatus {
    let i = api::qmp_query_migrate(null_mut());
    assert!(!i.is_null());
    // SAFETY: a MigrationInfo made by livemig, freed right after.
    let st = unsafe { (*i).status };
    api::qapi_free_MigrationInfo(i);
    st
}

/// Cancels twice while other threads query and try a capability change.
fn cancel_concurrently() {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|k| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if k == 0 {
                        query_status();
                    } else {
                        let _ = livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::Xbzrle, false)]);
                        let _ = livemig::params::set_speed(0);
                    }
                }
            })
        })
        .collect();
    outgoing::cancel();
    outgoing::cancel();
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
}

/// One test function: "none" must come first in this process.
#[test]
fn cancel_from_every_state_then_stress() {
    let _g = setup();
    cancel_from_every_state();
    stress_public_functions_from_many_threads();
}

fn cancel_from_every_state() {
    let before = counts();

    // none
    assert_eq!(OUTGOING.status(), MigrationStatus::None);
    cancel_concurrently();
    assert_eq!(OUTGOING.status(), MigrationStatus::None, "cancel with nothing running changes nothing");
    then_migrate_again("after none");

    // setup
    let cancels = CANCELS.load(Ordering::SeqCst);
    HOLD_SETUP.store(true, Ordering::SeqCst);
    migrate(&fresh());
    wait_until(20, "setup reached", || IN_SETUP.load(Ordering::SeqCst));
    assert_eq!(OUTGOING.status(), MigrationStatus::Setup);
    cancel_concurrently();
    HOLD_SETUP.store(false, Ordering::SeqCst);
    assert_eq!(wait_final(false, 30), MigrationStatus::Cancelled);
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
    assert!(CANCELS.load(Ordering::SeqCst) > cancels, "handlers were told");
    then_migrate_again("after setup");

    // active
    KEEP_ACTIVE.store(true, Ordering::SeqCst);
    migrate(&fresh());
    wait_until(20, "active", || OUTGOING.status() == MigrationStatus::Active);
    std::thread::sleep(Duration::from_millis(50));
    cancel_concurrently();
    assert_eq!(wait_final(false, 30), MigrationStatus::Cancelled);
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
    KEEP_ACTIVE.store(false, Ordering::SeqCst);
    then_migrate_again("after active");

    // during the switchover (the VM is stopped)
    let (stops, starts) = (STOPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst));
    HOLD_COMPLETE.store(true, Ordering::SeqCst);
    migrate(&fresh());
    wait_until(20, "switchover", || IN_COMPLETE.load(Ordering::SeqCst));
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::FinishMigrate as u32);
    cancel_concurrently();
    HOLD_COMPLETE.store(false, Ordering::SeqCst);
    assert_eq!(wait_final(false, 30), MigrationStatus::Cancelled);
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "the stopped VM runs again");
    assert_eq!((STOPS.load(Ordering::SeqCst) - stops, STARTS.load(Ordering::SeqCst) - starts), (1, 1));
    then_migrate_again("after switchover");

    // completed
    cancel_concurrently();
    assert_eq!(OUTGOING.status(), MigrationStatus::Completed, "a late cancel never overwrites COMPLETED");
    then_migrate_again("after completed");

    // failed
    migrate("tcp:127.0.0.1:1");
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    cancel_concurrently();
    assert_eq!(OUTGOING.status(), MigrationStatus::Failed);
    then_migrate_again("after failed");

    // cancelled
    KEEP_ACTIVE.store(true, Ordering::SeqCst);
    migrate(&fresh());
    wait_until(20, "active", || OUTGOING.status() == MigrationStatus::Active);
    outgoing::cancel();
    assert_eq!(wait_final(false, 30), MigrationStatus::Cancelled);
    KEEP_ACTIVE.store(false, Ordering::SeqCst);
    cancel_concurrently();
    assert_eq!(OUTGOING.status(), MigrationStatus::Cancelled);
    then_migrate_again("after cancelled");

    assert_no_leak(before, "cancel from every state");
}

/// Several host threads call the public functions while migrations start,
/// run, get cancelled and complete. Every wait is bounded; a watchdog fails
/// the process if anything deadlocks.
fn stress_public_functions_from_many_threads() {
    let before = counts();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !d2.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                eprintln!("stress: no progress within 120 s: deadlock");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..4)
        .map(|k| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut err = null_mut();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    match (k, i % 7) {
                        (0, _) => {
                            let info = api::qmp_query_migrate(&mut err);
                            api::qapi_free_MigrationInfo(info);
                            let caps = api::qmp_query_migrate_capabilities(&mut err);
                            api::qapi_free_MigrationCapabilityStatusList(caps);
                        }
                        (1, _) => {
                            api::qmp_migrate_set_speed((i % 3) as i64 * 200_000_000, &mut err);
                            api::qmp_migrate_set_downtime(0.05 + (i % 5) as f64 * 0.1, &mut err);
                        }
                        // A cancel about every 150 ms: some migrations end
                        // cancelled, most complete.
                        (2, _) if i.is_multiple_of(500) => api::qmp_migrate_cancel(&mut err),
                        (2, _) => {
                            api::qmp_migrate_set_cache_size(1 << (20 + i % 4), &mut err);
                            let _ = api::migrate_max_downtime() + api::migrate_xbzrle_cache_size() as u64;
                        }
                        _ => {
                            let reason = livemig::ffi::errors::error_new(CString::new("stress blocker").unwrap().as_ptr());
                            if api::migrate_add_blocker(reason, &mut err) == 0 {
                                api::migrate_del_blocker(reason);
                            }
                            livemig::ffi::errors::error_free(reason);
                            let _ = api::migration_is_active(api::migrate_get_current());
                        }
                    }
                    if !err.is_null() {
                        livemig::ffi::errors::error_free(err);
                        err = null_mut();
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    let (mut completed, mut cancelled, mut refused) = (0, 0, 0);
    let mut last = MigrationStatus::None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
        let uri = fresh();
        match outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())) {
            Ok(()) => {
                last = wait_final(false, 60);
                match last {
                    MigrationStatus::Completed => completed += 1,
                    MigrationStatus::Cancelled => cancelled += 1,
                    other => panic!("migration ended {}: {:?}", other.name(), outgoing::stats().error),
                }
                // A completed source is stopped (postmigrate), a cancelled
                // one runs again.
                let want = if last == MigrationStatus::Completed { RunState::Postmigrate } else { RunState::Running };
                assert_eq!(STATE.load(Ordering::SeqCst), want as u32, "run state after {}", last.name());
            }
            Err(_) => refused += 1, // a blocker was registered at that moment
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    livemig::params::set_speed(0).unwrap();
    livemig::params::set_downtime(0.3).unwrap();
    println!("stress: {completed} completed, {cancelled} cancelled, {refused} refused, {} api calls", calls.load(Ordering::Relaxed));
    assert!(completed > 0 && cancelled > 0, "both outcomes happen: {completed} completed, {cancelled} cancelled");
    assert!(last != MigrationStatus::None);
    assert_no_leak(before, "stress");
}
