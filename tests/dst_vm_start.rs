//! A destination whose host cannot start the VM after a complete load:
//! the incoming migration ends FAILED with a reason that says the stream
//! was loaded and the start failed (and logs it), notifiers see setup,
//! active, failed, the VM is not running, and the next incoming
//! migration completes.

mod common;

use std::ffi::c_void;
use std::os::fd::IntoRawFd;
use std::os::raw::c_int;
use std::ptr::null_mut;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;

use common::*;
use livemig::ffi::migration as api;
use livemig::ffi::types::{LivemigHostOps, Notifier};
use livemig::host::RunState;
use livemig::state::MigrationStatus;

/// The host's vm_start, which fails with -EIO and leaves the VM stopped.
unsafe extern "C" fn failing_start(_: *mut c_void) -> c_int {
    -libc::EIO
}

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn record(_n: *mut Notifier, s: *mut c_void) {
    EVENTS.lock().unwrap().push(api::livemig_migration_status(s.cast()).name().to_string());
}

/// The error_desc `livemig_query_incoming` shows.
fn error_desc() -> Option<String> {
    let mut err = null_mut();
    let i = api::livemig_query_incoming(&mut err);
    assert!(!i.is_null());
    // SAFETY: a MigrationInfo from livemig, freed right after; its
    // error_desc, when set, is a C string it owns.
    let d = unsafe { ((*i).has_error_desc).then(|| std::ffi::CStr::from_ptr((*i).error_desc).to_string_lossy().into_owned()) };
    api::qapi_free_MigrationInfo(i);
    d
}

/// Loads `stream` from a file through `fd:`; the final state.
fn load_from(stream: &std::path::Path) -> MigrationStatus {
    STATE.store(RunState::Inmigrate as u32, SeqCst);
    let fd = std::fs::File::open(stream).unwrap().into_raw_fd();
    livemig::incoming::start_uri(&format!("fd:{fd}")).unwrap();
    wait_final(true, 30)
}

#[test]
fn a_vm_the_host_cannot_start_after_a_complete_load_fails_the_migration_with_that_reason() {
    let (_g, _ram) = host();
    let dir = tmpdir("dst-vm-start");
    let stream = dir.join("s.bin");
    std::fs::write(&stream, valid_stream()).unwrap();
    let before = counts();
    let starts = STARTS.load(SeqCst);
    livemig::host::set(LivemigHostOps { vm_start: Some(failing_start), ..host_ops_plain() }, null_mut()).unwrap();
    let mut n = Notifier { notify: Some(record), le_next: null_mut(), le_prev: null_mut() };
    api::add_migration_state_change_notifier(&mut n);
    EVENTS.lock().unwrap().clear();
    let st = load_from(&stream);
    let events = EVENTS.lock().unwrap().clone();
    let desc = error_desc();
    livemig::host::set(host_ops_plain(), null_mut()).unwrap();
    assert_eq!(st, MigrationStatus::Failed);
    assert_eq!(
        desc.as_deref(),
        Some("the incoming migration was loaded, but the VM could not be started: the host failed to start the VM (-5)")
    );
    assert_eq!(events, ["setup", "active", "failed"]);
    assert_eq!(STARTS.load(SeqCst), starts);
    assert_eq!(STATE.load(SeqCst), RunState::Inmigrate as u32, "left as the failed start left it");
    assert_no_leak(before, "a failed start");
    // The next incoming migration completes and starts the VM.
    EVENTS.lock().unwrap().clear();
    let st = load_from(&stream);
    api::remove_migration_state_change_notifier(&mut n);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", error_desc());
    assert_eq!(error_desc(), None);
    assert_eq!(*EVENTS.lock().unwrap(), ["setup", "active", "completed"]);
    assert_eq!(STARTS.load(SeqCst), starts + 1);
    assert_eq!(STATE.load(SeqCst), RunState::Running as u32);
    assert_no_leak(before, "the next migration");
    let _ = std::fs::remove_dir_all(&dir);
}
