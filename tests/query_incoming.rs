//! qmp_query_migrate on a destination, where no outgoing migration has run
//! in the process: what QEMU 7.2 shows (fill_destination_migration_info).

mod common;

use std::ffi::CString;
use std::ptr::null_mut;
use std::sync::atomic::Ordering;

use common::*;
use livemig::ffi::migration as api;
use livemig::host::RunState;
use livemig::state::MigrationStatus;

/// (has_status, status) of qmp_query_migrate, or of livemig_query_incoming.
fn status(incoming_api: bool) -> (bool, MigrationStatus) {
    let mut err = null_mut();
    let i = if incoming_api { api::livemig_query_incoming(&mut err) } else { api::qmp_query_migrate(&mut err) };
    assert!(!i.is_null());
    // SAFETY: a MigrationInfo from livemig, freed right after.
    let r = unsafe { ((*i).has_status, (*i).status) };
    api::qapi_free_MigrationInfo(i);
    r
}

#[test]
fn a_listening_destination_shows_no_status_until_the_stream_arrives() {
    let _g = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let uri = CString::new("tcp:127.0.0.1:0").unwrap();
    let mut err = null_mut();
    api::qemu_start_incoming_migration(uri.as_ptr(), &mut err);
    assert!(err.is_null());
    // QEMU 7.2 leaves the incoming state NONE until a connection arrives
    // (process_incoming_migration_co goes from NONE to ACTIVE): no status.
    let (has_status, st) = status(false);
    assert!(!has_status, "qmp_query_migrate while listening: {st:?}");
    // livemig's own query tells the listener apart.
    assert_eq!(status(true), (true, MigrationStatus::Setup));
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(status(false), (true, MigrationStatus::Failed));
}

#[test]
fn the_incoming_port_is_gone_once_the_source_is_accepted() {
    let _g = host();
    // The load waits for the source for as long as this test needs.
    livemig::transport::set_stall_timeout(60_000).unwrap();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let uri = CString::new("tcp:127.0.0.1:0").unwrap();
    let mut err = null_mut();
    api::qemu_start_incoming_migration(uri.as_ptr(), &mut err);
    assert!(err.is_null());
    let port = api::livemig_incoming_port();
    assert!(port > 0, "listening: {port}");
    // The header, then nothing: the load waits for the rest.
    let mut src = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    std::io::Write::write_all(&mut src, &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]).unwrap();
    wait_until(10, "the incoming ACTIVE", || livemig::state::INCOMING.status() == MigrationStatus::Active);
    // The listener was closed when the source was accepted.
    assert_eq!(api::livemig_incoming_port(), -1, "no listener once the source is accepted");
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(api::livemig_incoming_port(), -1);
    drop(src);
    livemig::transport::set_stall_timeout(1000).unwrap();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// The error text of a call that took `errp`, or None.
fn error_text(err: *mut livemig::ffi::errors::Error) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: a live Error from livemig, freed right after.
    let t = unsafe { std::ffi::CStr::from_ptr(livemig::ffi::errors::error_get_pretty(err)) }.to_string_lossy().into_owned();
    livemig::ffi::errors::error_free(err);
    Some(t)
}

#[test]
fn migrate_incoming_as_qemu_7_2_starts_a_deferred_destination() {
    let _g = host();
    // A host that tells its exact run state.
    livemig::host::set(host_ops_exact(), null_mut()).unwrap();
    let uri = CString::new("tcp:127.0.0.1:0").unwrap();
    // Not in the inmigrate state (a VM not started with -incoming defer):
    // refused with 7.2's text, nothing listens, the state stays.
    for st in [RunState::Prelaunch, RunState::Running, RunState::Paused] {
        STATE.store(st as u32, Ordering::SeqCst);
        let before = status(true);
        let mut err = null_mut();
        api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
        assert_eq!(error_text(err).as_deref(), Some("'-incoming' was not specified on the command line"), "{st:?}");
        assert_eq!(api::livemig_incoming_port(), -1);
        assert_eq!(status(true), before);
    }
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let mut err = null_mut();
    api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
    assert_eq!(error_text(err), None);
    let port = api::livemig_incoming_port();
    assert!(port > 0, "listening: {port}");
    // A second one while the first listens.
    let mut err = null_mut();
    api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
    assert_eq!(error_text(err).as_deref(), Some("The incoming migration has already been started"));
    assert_eq!(api::livemig_incoming_port(), port, "the first still listens");
    // A cancelled one may be followed by another (7.2 needs a new process).
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    let mut err = null_mut();
    api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
    assert_eq!(error_text(err), None);
    assert!(api::livemig_incoming_port() > 0);
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    // NULL: an error, not a crash.
    let mut err = null_mut();
    api::qmp_migrate_incoming(std::ptr::null(), &mut err);
    assert_eq!(error_text(err).as_deref(), Some("uri must not be NULL"));
    // A host without runstate_get: only a running VM is refused.
    livemig::host::set(host_ops_plain(), null_mut()).unwrap();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let mut err = null_mut();
    api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
    assert_eq!(error_text(err).as_deref(), Some("cannot start an incoming migration while the VM is running"));
    STATE.store(RunState::Paused as u32, Ordering::SeqCst);
    let mut err = null_mut();
    api::qmp_migrate_incoming(uri.as_ptr(), &mut err);
    assert_eq!(error_text(err), None);
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}
