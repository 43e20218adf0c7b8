//! Orderings of host calls and livemig's threads that the state machine
//! must settle one way: the two directions starting together, a dirty mark
//! racing the switchover's commit, and a notifier removed while it runs.

mod common;

use std::ffi::{c_void, CString};
use std::os::fd::IntoRawFd;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use livemig::ffi::file::qemu_fdopen;
use livemig::ffi::migration as api;
use livemig::ffi::types::Notifier;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::params::MigrationCapability::ReturnPath;
use livemig::state::{MigrationStatus, INCOMING, OUTGOING};
use livemig::transport::Uri;

fn migrate(uri: &str) -> std::result::Result<(), String> {
    outgoing::start(Target::Uri(Uri::parse(uri).unwrap(), uri.to_string())).map_err(|e| e.to_string())
}

/// Each direction checks that the other is not active before it leaves
/// idle. Started together from two threads, at most one may succeed: both
/// running would load into the RAM being sent, and could start the VM
/// that was just handed to a destination.
#[test]
fn outgoing_and_incoming_never_start_together() {
    let (_g, _ram) = host();
    livemig::params::set_speed(0).unwrap();
    let mut overlaps = 0;
    // The window (the incoming side spawning its command) is narrow:
    // the old code overlapped in about 3 % of the iterations.
    for i in 0..150u64 {
        STATE.store(RunState::Paused as u32, SeqCst);
        let barrier = Arc::new(Barrier::new(2));
        let b = barrier.clone();
        // A source that stays silent for a while, then ends (FAILED).
        let t = std::thread::spawn(move || {
            b.wait();
            livemig::incoming::start_uri("exec:sleep 0.2").map_err(|e| e.to_string())
        });
        barrier.wait();
        // Vary which side gets there first, by up to a millisecond.
        let until = Instant::now() + Duration::from_micros((i % 40) * 25);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        let out = migrate("exec:cat > /dev/null");
        let inc = t.join().unwrap();
        let both = (OUTGOING.status(), INCOMING.status());
        if out.is_ok() && inc.is_ok() && both.0.is_active() && both.1.is_active() {
            overlaps += 1;
        }
        if let Err(e) = &out {
            assert_eq!(e, "Guest is waiting for an incoming migration", "iteration {i}");
        }
        if let Err(e) = &inc {
            assert_eq!(e, "an outgoing migration is in progress", "iteration {i}");
        }
        if out.is_ok() {
            wait_final(false, 60);
        }
        if inc.is_ok() {
            wait_final(true, 60);
        }
        if overlaps > 0 {
            break;
        }
    }
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(overlaps, 0, "an outgoing and an incoming migration ran at the same time");
}

/// A mark made after the switchover committed (the end of the stream is
/// out; with a return path the source then waits for the destination)
/// cannot fail the migration any more. It is refused as too late, not
/// as failing the migration; the migration completes; and once it has,
/// marks are taken again.
#[test]
fn a_mark_after_the_commit_is_refused_as_too_late() {
    let (_g, _ram) = host();
    livemig::transport::set_stall_timeout(10_000).unwrap();
    livemig::params::set_capabilities(&[(ReturnPath, true)]).unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let t0 = Instant::now();
    // A destination that reads everything but holds its confirmation back.
    let last = Arc::new(AtomicU64::new(0));
    let reader = {
        let (peer, last) = (peer.try_clone().unwrap(), last.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match std::io::Read::read(&mut &peer, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => last.store(t0.elapsed().as_millis() as u64, SeqCst),
                }
            }
        })
    };
    let mode = CString::new("wb").unwrap();
    let mut err = null_mut();
    api::migrate_fd_connect(null_mut(), qemu_fdopen(ours.into_raw_fd(), mode.as_ptr()), &mut err);
    assert!(err.is_null());
    // The VM is stopped, everything is sent, the source waits for SHUT.
    wait_until(30, "FINISH_MIGRATE", || STATE.load(SeqCst) == RunState::FinishMigrate as u32);
    wait_until(30, "the stream to go quiet", || t0.elapsed().as_millis() as u64 > last.load(SeqCst) + 300);
    assert_eq!(OUTGOING.status(), MigrationStatus::Active);
    let mark = livemig::ram::mark_dirty("ram", 0, 4096).map_err(|e| e.to_string());
    // The destination confirms: MIG_RP_MSG_SHUT, status 0.
    let mut shut = 1u16.to_be_bytes().to_vec();
    shut.extend(4u16.to_be_bytes());
    shut.extend(0u32.to_be_bytes());
    std::io::Write::write_all(&mut &peer, &shut).unwrap();
    let st = wait_final(false, 30);
    drop(peer);
    reader.join().unwrap();
    let after = livemig::ram::mark_dirty("ram", 0, 4096).map_err(|e| e.to_string());
    livemig::params::set_capabilities(&[(ReturnPath, false)]).unwrap();
    livemig::transport::set_stall_timeout(1000).unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(
        mark,
        Err("ram block 'ram': marked dirty after the switchover committed; the change will not reach the destination".to_string())
    );
    assert_eq!(st, MigrationStatus::Completed);
    assert_eq!(after, Ok(()), "marks are taken again once the migration has ended");
}

#[repr(C)]
struct SlowNotifier {
    n: Notifier,
    entered: AtomicBool,
    removed: AtomicBool,
    calls_after_removal: AtomicU32,
}

unsafe extern "C" fn slow_notify(n: *mut Notifier, _s: *mut c_void) {
    // SAFETY: n is the first field of a SlowNotifier the test keeps alive.
    let me = unsafe { &*n.cast::<SlowNotifier>() };
    if !me.entered.swap(true, SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if me.removed.load(SeqCst) {
        // A host would have freed the notifier by now.
        me.calls_after_removal.fetch_add(1, SeqCst);
    }
}

/// `remove_migration_state_change_notifier` from another thread returns
/// only once a call of the notifier in progress has returned, so the host
/// may free it then.
#[test]
fn a_notifier_removed_from_another_thread_is_not_running_after_removal() {
    let (_g, _ram) = host();
    STATE.store(RunState::Running as u32, SeqCst);
    let me = Box::leak(Box::new(SlowNotifier {
        n: Notifier { notify: Some(slow_notify), le_next: null_mut(), le_prev: null_mut() },
        entered: AtomicBool::new(false),
        removed: AtomicBool::new(false),
        calls_after_removal: AtomicU32::new(0),
    }));
    let addr = &mut me.n as *mut Notifier as usize;
    api::add_migration_state_change_notifier(addr as *mut Notifier);
    let remover = std::thread::spawn(move || {
        // SAFETY: the notifier is leaked, so alive for the whole test.
        let me = unsafe { &*(addr as *const SlowNotifier) };
        wait_until(30, "the first notifier call", || me.entered.load(SeqCst));
        api::remove_migration_state_change_notifier(addr as *mut Notifier);
        me.removed.store(true, SeqCst);
    });
    migrate("exec:cat > /dev/null").unwrap();
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed);
    remover.join().unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(me.calls_after_removal.load(SeqCst), 0, "the notifier ran on after its removal returned");
}

/// Runs `start_and_fail` (a migration that fails at once) up to 300 times
/// while another thread queries with `query`; returns (migrations,
/// queries, queries that showed FAILED without an error description),
/// stopping at the first such query.
fn failed_without_error(
    query: extern "C" fn(*mut *mut livemig::ffi::errors::Error) -> *mut livemig::ffi::types::MigrationInfo,
    mut start_and_fail: impl FnMut(),
) -> (u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (queries, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let querier = {
        let (stop, queries, torn) = (stop.clone(), queries.clone(), torn.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let i = query(null_mut());
                assert!(!i.is_null());
                // SAFETY: a MigrationInfo made by livemig, freed right after.
                let (st, has_err) = unsafe { ((*i).status, (*i).has_error_desc) };
                api::qapi_free_MigrationInfo(i);
                queries.fetch_add(1, SeqCst);
                if st == MigrationStatus::Failed && !has_err {
                    torn.fetch_add(1, SeqCst);
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut runs = 0;
    while runs < 300 && torn.load(SeqCst) == 0 && Instant::now() < deadline {
        start_and_fail();
        runs += 1;
    }
    stop.store(true, SeqCst);
    querier.join().unwrap();
    (runs, queries.load(SeqCst), torn.load(SeqCst))
}

/// `qmp_query_migrate` shows the figures of the migration whose status it
/// reports: a query racing the start of the next migration (from another
/// thread) must not show the last one's FAILED with the next one's reset
/// figures (no error description).
#[test]
fn a_query_never_shows_a_status_with_the_next_migration_s_figures() {
    let (_g, _ram) = host();
    // Migrations that fail at once (the destination exits): many starts,
    // each right after a FAILED that carries its error.
    let (runs, queries, torn) = failed_without_error(api::qmp_query_migrate, || {
        STATE.store(RunState::Running as u32, SeqCst);
        migrate("exec:exit 0").unwrap();
        assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    });
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(torn, 0, "after {runs} migrations and {queries} queries: FAILED reported without its error (the next migration's figures)");
}

/// The same on the destination: `livemig_query_incoming` racing the start
/// of the next incoming migration must not show the last one's FAILED
/// without its reason (the next one's cleared error).
#[test]
fn an_incoming_query_never_shows_a_status_with_the_next_migration_s_error() {
    let (_g, _ram) = host();
    // Sources that end at once (an empty stream): each load fails.
    let (runs, queries, torn) = failed_without_error(api::livemig_query_incoming, || {
        STATE.store(RunState::Inmigrate as u32, SeqCst);
        livemig::incoming::start_uri("exec:exit 0").unwrap();
        assert_eq!(wait_final(true, 30), MigrationStatus::Failed);
    });
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(torn, 0, "after {runs} incoming migrations and {queries} queries: FAILED reported without its reason");
}

/// A `qmp_migrate` that is refused (here: an `fd:NAME` that is not
/// registered) never shows as a migration in progress: a capability change
/// made meanwhile from another thread is not refused because of it.
#[test]
fn a_refused_migration_never_shows_as_in_progress() {
    let (_g, _ram) = host();
    STATE.store(RunState::Running as u32, SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let (changes, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let changer = {
        let (stop, changes, refused) = (stop.clone(), changes.clone(), refused.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                if let Err(e) = livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::Xbzrle, false)]) {
                    if refused.fetch_add(1, SeqCst) == 0 {
                        eprintln!("capability change refused: {e}");
                    }
                }
                changes.fetch_add(1, SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut starts = 0;
    while Instant::now() < deadline && refused.load(SeqCst) == 0 {
        let e = migrate("fd:livemig-no-such-fd").unwrap_err();
        assert!(e.contains("has not been found"), "{e}");
        assert!(OUTGOING.status().is_idle());
        starts += 1;
    }
    stop.store(true, SeqCst);
    changer.join().unwrap();
    assert_eq!(
        refused.load(SeqCst),
        0,
        "{} of {} capability changes refused as 'in progress' during {starts} refused migrations",
        refused.load(SeqCst),
        changes.load(SeqCst)
    );
}

/// The same on the destination: an incoming start that is refused (its
/// port is taken) never shows as a migration in progress to a change of
/// the RAM block list made meanwhile on another thread.
#[test]
fn a_refused_incoming_start_never_shows_as_in_progress() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, SeqCst);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:127.0.0.1:{}", taken.local_addr().unwrap().port());
    let stop = Arc::new(AtomicBool::new(false));
    let (changes, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let changer = {
        let (stop, changes, refused) = (stop.clone(), changes.clone(), refused.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let e = livemig::ram::block_remove("livemig-no-such-block").unwrap_err().to_string();
                if e.contains("in progress") && refused.fetch_add(1, SeqCst) == 0 {
                    eprintln!("block list change refused: {e}");
                }
                changes.fetch_add(1, SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut starts = 0;
    while Instant::now() < deadline && refused.load(SeqCst) == 0 {
        assert!(livemig::incoming::start_uri(&uri).is_err(), "the port is taken");
        assert!(INCOMING.status().is_idle());
        starts += 1;
    }
    stop.store(true, SeqCst);
    changer.join().unwrap();
    STATE.store(RunState::Running as u32, SeqCst);
    assert_eq!(
        refused.load(SeqCst),
        0,
        "{} of {} block list changes refused as 'in progress' during {starts} refused incoming starts",
        refused.load(SeqCst),
        changes.load(SeqCst)
    );
}
