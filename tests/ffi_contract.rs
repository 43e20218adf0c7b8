//! What the header promises about the exported functions' arguments,
//! results and ownership, called as a C host calls them: NULL arguments,
//! who keeps or frees what, and the values returned on error.

mod common;

use std::ffi::{c_char, c_int, CStr};
use std::os::fd::AsRawFd;

use livemig::ffi::errors::{error_copy, error_free, error_get_pretty, error_new, Error};
use livemig::ffi::file::{
    qemu_fclose, qemu_fdopen, qemu_file_get_error, qemu_ftell, qemu_get_be32, qemu_put_be16, qemu_put_be32, qemu_put_be64, qemu_put_buffer,
    qemu_put_byte,
};
use livemig::ffi::host::{livemig_fd_add, livemig_fd_remove};
use livemig::ffi::migration as api;
use livemig::ffi::savevm::{livemig_register_savevm_live, register_savevm};

fn take_err(err: &mut *mut Error) -> Option<String> {
    if err.is_null() {
        return None;
    }
    let s = text(*err);
    error_free(*err);
    *err = std::ptr::null_mut();
    Some(s)
}

fn text(e: *const Error) -> String {
    // SAFETY: error_get_pretty returns a C string valid until error_free.
    unsafe { CStr::from_ptr(error_get_pretty(e)) }.to_string_lossy().into_owned()
}

/// The (device, inode) of what `fd` refers to, or None when it is closed.
fn file_id(fd: c_int) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat fills the stat buffer of ours, or fails.
    (unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0).then(|| {
        // SAFETY: fstat succeeded, so the buffer is filled.
        let st = unsafe { st.assume_init() };
        (st.st_dev, st.st_ino)
    })
}

fn is_open(fd: c_int) -> bool {
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// `error_copy` gives an error of its own (NULL for NULL), which outlives
/// the original; `error_get_pretty(NULL)` is "".
#[test]
fn error_copy_is_independent_and_null_gives_null() {
    assert!(error_copy(std::ptr::null()).is_null());
    assert_eq!(text(std::ptr::null()), "");
    let e = error_new(c"disk gone".as_ptr());
    let c = error_copy(e);
    assert!(!c.is_null() && c != e);
    error_free(e);
    assert_eq!(text(c), "disk gone");
    error_free(c);
    let empty = error_new(std::ptr::null());
    assert_eq!(text(empty), "");
    error_free(empty);
    error_free(std::ptr::null_mut());
}

/// A stream from `qemu_fdopen`: `qemu_ftell` counts the bytes written,
/// `qemu_fclose` flushes them and returns 0, the values are big-endian.
/// NULL streams get the documented answers.
#[test]
fn a_host_opened_stream_counts_flushes_and_closes() {
    let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
    let wfd = {
        use std::os::fd::IntoRawFd;
        w.into_raw_fd()
    };
    let f = qemu_fdopen(wfd, c"wb".as_ptr());
    assert!(!f.is_null());
    qemu_put_byte(f, 0x1ff);
    qemu_put_be16(f, 0x0203);
    qemu_put_be32(f, 0x0405_0607);
    qemu_put_be64(f, 0x0809_0a0b_0c0d_0e0f);
    qemu_put_buffer(f, b"xyz".as_ptr(), 3);
    qemu_put_buffer(f, std::ptr::null(), 0);
    assert_eq!(qemu_ftell(f), 18);
    assert_eq!(qemu_file_get_error(f), 0);
    assert_eq!(qemu_fclose(f), 0);
    // qemu_fclose closed the descriptor: the peer reads to the end. (Not
    // checked by the number: a test running alongside may reuse it.)
    r.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    use std::io::Read;
    (&r).read_to_end(&mut got).expect("end of stream: the write end was closed");
    assert_eq!(got, b"\xff\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0fxyz");

    // NULL: no crash, an answer that cannot pass for a success.
    assert_eq!(qemu_fclose(std::ptr::null_mut()), -libc::EINVAL);
    assert_eq!(qemu_file_get_error(std::ptr::null_mut()), -libc::EINVAL);
    assert_eq!(qemu_ftell(std::ptr::null_mut()), -1);
    assert_eq!(qemu_get_be32(std::ptr::null_mut()), 0);
}

/// A bad mode leaves the descriptor with the caller.
#[test]
fn qemu_fdopen_with_a_bad_mode_leaves_the_descriptor_open() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(qemu_fdopen(a.as_raw_fd(), c"x".as_ptr()).is_null());
    assert!(qemu_fdopen(a.as_raw_fd(), std::ptr::null()).is_null());
    assert!(is_open(a.as_raw_fd()));
    assert!(qemu_fdopen(-1, c"wb".as_ptr()).is_null());
}

/// `livemig_fd_add` takes the descriptor on success only: a refused
/// name leaves it open and the caller's; `livemig_fd_remove` of a name
/// not registered fails with an error.
#[test]
fn livemig_fd_add_takes_the_descriptor_only_on_success() {
    let mut err: *mut Error = std::ptr::null_mut();
    for bad in [c"".as_ptr(), c"42".as_ptr(), std::ptr::null::<c_char>()] {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!livemig_fd_add(bad, a.as_raw_fd(), &mut err));
        assert!(take_err(&mut err).is_some());
        assert!(is_open(a.as_raw_fd()), "a refused fd stays the caller's");
    }
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = {
        use std::os::fd::IntoRawFd;
        a.into_raw_fd()
    };
    let id = file_id(fd).expect("open");
    assert!(livemig_fd_add(c"contract-fd".as_ptr(), fd, &mut err), "{:?}", take_err(&mut err));
    // (A test running alongside may reuse the number: the file tells.)
    assert_ne!(file_id(fd), Some(id), "livemig keeps a duplicate and closes the original");
    let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(!livemig_fd_add(c"contract-fd".as_ptr(), c.as_raw_fd(), &mut err), "a name is registered once");
    assert!(take_err(&mut err).unwrap().contains("already registered"));
    assert!(is_open(c.as_raw_fd()));
    assert!(livemig_fd_remove(c"contract-fd".as_ptr(), &mut err), "{:?}", take_err(&mut err));
    assert!(!livemig_fd_remove(c"contract-fd".as_ptr(), &mut err));
    assert!(take_err(&mut err).is_some());
    // errp may be NULL.
    assert!(!livemig_fd_remove(c"contract-fd".as_ptr(), std::ptr::null_mut()));
}

/// `migrate_add_blocker` returns 0, or a negative errno with `errp` set:
/// -EINVAL for a NULL reason. A blocker refuses `qmp_migrate` with its
/// text, and `migrate_del_blocker` lifts it; the caller keeps the reason.
#[test]
fn blockers_return_codes_and_ownership() {
    let (_g, _ram) = common::host();
    let mut err: *mut Error = std::ptr::null_mut();
    assert_eq!(api::migrate_add_blocker(std::ptr::null_mut(), &mut err), -libc::EINVAL);
    assert!(take_err(&mut err).unwrap().contains("reason must not be NULL"));
    assert_eq!(api::migrate_add_blocker(std::ptr::null_mut(), std::ptr::null_mut()), -libc::EINVAL);
    let reason = error_new(c"vfio device attached".as_ptr());
    assert_eq!(api::migrate_add_blocker(reason, &mut err), 0);
    assert!(err.is_null());
    api::qmp_migrate(c"exec:cat >/dev/null".as_ptr(), false, false, false, false, false, false, &mut err);
    assert_eq!(take_err(&mut err).as_deref(), Some("vfio device attached"));
    api::migrate_del_blocker(reason);
    // Still the caller's: readable, then freed by it.
    assert_eq!(text(reason), "vfio device attached");
    error_free(reason);
    // Removing one not registered is harmless.
    api::migrate_del_blocker(std::ptr::null_mut());
}

/// The registrations return a negative errno (-EINVAL for a bad
/// argument) and, for `livemig_register_savevm_live`, say why.
#[test]
fn registrations_refuse_bad_arguments_with_einval() {
    let mut err: *mut Error = std::ptr::null_mut();
    assert_eq!(register_savevm(std::ptr::null_mut(), std::ptr::null(), 0, 1, None, None, std::ptr::null_mut()), -libc::EINVAL);
    assert_eq!(register_savevm(std::ptr::null_mut(), c"contract-dev".as_ptr(), 0, 1, None, None, std::ptr::null_mut()), -libc::EINVAL);
    let r = livemig_register_savevm_live(
        std::ptr::null_mut(),
        c"contract-live".as_ptr(),
        0,
        1,
        std::ptr::null(),
        std::ptr::null_mut(),
        &mut err,
    );
    assert_eq!(r, -libc::EINVAL);
    assert!(take_err(&mut err).unwrap().contains("ops must not be NULL"));
}

/// Calls that have nothing to act on: no error, the documented answers.
#[test]
fn calls_with_nothing_to_act_on() {
    let (_g, _ram) = common::host();
    let mut err: *mut Error = std::ptr::null_mut();
    api::qmp_migrate_cancel(&mut err);
    assert!(err.is_null(), "a cancel with nothing running is no error");
    assert!(!api::livemig_incoming_cancel());
    assert!(!api::migrate_get_current().is_null());
    assert_eq!(api::livemig_migration_status(std::ptr::null()), livemig::state::MigrationStatus::None);
    assert!(!api::livemig_migration_is_incoming(std::ptr::null()));
    let null = std::ptr::null_mut();
    assert!(!api::migration_is_active(null) && !api::migration_in_setup(null));
    assert!(!api::migration_has_finished(null) && !api::migration_has_failed(null));
    // A NULL notifier is ignored; removing one never added is harmless.
    api::add_migration_state_change_notifier(std::ptr::null_mut());
    api::remove_migration_state_change_notifier(std::ptr::null_mut());
    // The capability list livemig makes is freed with its function.
    let caps = api::qmp_query_migrate_capabilities(&mut err);
    assert!(!caps.is_null() && err.is_null());
    api::qapi_free_MigrationCapabilityStatusList(caps);
    api::qapi_free_MigrationCapabilityStatusList(std::ptr::null_mut());
    api::qapi_free_MigrationInfo(std::ptr::null_mut());
}

/// A blocker and the capabilities are refused (-EBUSY, "in progress")
/// only while an outgoing migration is in progress, as in QEMU 7.2: an
/// incoming one reads neither, and both may change while it waits.
#[test]
fn blockers_and_capabilities_change_while_an_incoming_migration_waits() {
    use livemig::ffi::types::{MigrationCapabilityStatus, MigrationCapabilityStatusList};
    use livemig::params::MigrationCapability;
    use livemig::state::MigrationStatus;
    let (_g, _ram) = common::host();
    let mut err: *mut Error = std::ptr::null_mut();
    common::STATE.store(livemig::host::RunState::Inmigrate as u32, std::sync::atomic::Ordering::SeqCst);
    api::qemu_start_incoming_migration(c"tcp:127.0.0.1:0".as_ptr(), &mut err);
    assert_eq!(take_err(&mut err), None);
    let reason = error_new(c"device being hot-plugged".as_ptr());
    assert_eq!(api::migrate_add_blocker(reason, &mut err), 0, "{:?}", take_err(&mut err));
    api::migrate_del_blocker(reason);
    error_free(reason);
    for on in [true, false] {
        let mut cap = MigrationCapabilityStatus { capability: MigrationCapability::Xbzrle, state: on };
        let mut node = MigrationCapabilityStatusList { next: std::ptr::null_mut(), value: &mut cap };
        api::qmp_migrate_set_capabilities(&mut node, &mut err);
        assert_eq!(take_err(&mut err), None);
        assert_eq!(api::migrate_use_xbzrle(), on);
    }
    assert!(api::livemig_incoming_cancel());
    assert_eq!(common::wait_final(true, 10), MigrationStatus::Failed);
    common::STATE.store(livemig::host::RunState::Running as u32, std::sync::atomic::Ordering::SeqCst);
}

/// An `errp` that already holds an error keeps it (the first error is
/// kept); one left NULL by a call that succeeds stays NULL.
#[test]
fn errp_keeps_the_first_error_and_is_set_only_on_failure() {
    let first = error_new(c"first".as_ptr());
    let mut err: *mut Error = first;
    assert!(!livemig_fd_remove(c"contract-none".as_ptr(), &mut err));
    assert_eq!(err, first);
    assert_eq!(text(err), "first");
    error_free(err);
    let mut err: *mut Error = std::ptr::null_mut();
    assert!(livemig::ffi::host::livemig_set_io_timeout(1000, &mut err));
    assert!(err.is_null());
    assert!(!livemig::ffi::host::livemig_set_io_timeout(99, &mut err));
    assert!(take_err(&mut err).unwrap().contains("out of range"));
}

/// The host table cannot change while a migration of either direction is
/// in progress (here an incoming one waiting for its source), nor be
/// registered with a size smaller than this version's; the table in
/// place stays.
#[test]
fn host_ops_are_refused_while_a_migration_is_in_progress() {
    use livemig::ffi::host::livemig_set_host_ops;
    use livemig::state::MigrationStatus;
    let (_g, _ram) = common::host();
    let mut err: *mut Error = std::ptr::null_mut();
    let ops = common::host_ops_plain();
    let small = livemig::ffi::types::LivemigHostOps { size: 8, ..ops };
    assert!(!livemig_set_host_ops(&small, std::ptr::null_mut(), &mut err));
    assert!(take_err(&mut err).unwrap().contains("size 8"));
    assert!(!livemig_set_host_ops(std::ptr::null(), std::ptr::null_mut(), &mut err));
    assert!(take_err(&mut err).unwrap().contains("must not be NULL"));
    common::STATE.store(livemig::host::RunState::Inmigrate as u32, std::sync::atomic::Ordering::SeqCst);
    api::qemu_start_incoming_migration(c"tcp:127.0.0.1:0".as_ptr(), &mut err);
    assert_eq!(take_err(&mut err), None);
    assert!(!livemig_set_host_ops(&ops, std::ptr::null_mut(), &mut err));
    assert!(take_err(&mut err).unwrap().contains("while a migration is in progress"));
    assert!(api::livemig_incoming_cancel());
    assert_eq!(common::wait_final(true, 10), MigrationStatus::Failed);
    common::STATE.store(livemig::host::RunState::Running as u32, std::sync::atomic::Ordering::SeqCst);
    assert!(livemig_set_host_ops(&ops, std::ptr::null_mut(), &mut err), "{:?}", take_err(&mut err));
}

unsafe extern "C" fn dev_save(_f: *mut livemig::qemu_file::QemuFile, _opaque: *mut std::ffi::c_void) {}
unsafe extern "C" fn dev_load(_f: *mut livemig::qemu_file::QemuFile, _opaque: *mut std::ffi::c_void, _v: c_int) -> c_int {
    0
}

/// `livemig_unregister_savevm` refuses (-EBUSY) while a migration is in
/// progress, which would still call the handlers (here an incoming one
/// waiting for its source); once it has ended the device goes, and a
/// second call finds nothing (-ENOENT).
#[test]
fn a_device_is_not_unregistered_while_a_migration_may_call_it() {
    use livemig::ffi::savevm::livemig_unregister_savevm;
    use livemig::state::MigrationStatus;
    let (_g, _ram) = common::host();
    let mut err: *mut Error = std::ptr::null_mut();
    let mut opaque = 7u8;
    let op: *mut std::ffi::c_void = (&mut opaque as *mut u8).cast();
    let id = register_savevm(std::ptr::null_mut(), c"contract-unplug".as_ptr(), 0, 1, Some(dev_save), Some(dev_load), op);
    assert!(id >= 0, "register: {id}");
    common::STATE.store(livemig::host::RunState::Inmigrate as u32, std::sync::atomic::Ordering::SeqCst);
    api::qemu_start_incoming_migration(c"tcp:127.0.0.1:0".as_ptr(), &mut err);
    assert_eq!(take_err(&mut err), None);
    assert_eq!(livemig_unregister_savevm(c"contract-unplug".as_ptr(), op, &mut err), -libc::EBUSY);
    assert_eq!(
        take_err(&mut err).as_deref(),
        Some("savevm: 'contract-unplug' cannot be unregistered while a migration is in progress: the migration still calls its handlers")
    );
    assert!(api::livemig_incoming_cancel());
    assert_eq!(common::wait_final(true, 10), MigrationStatus::Failed);
    common::STATE.store(livemig::host::RunState::Running as u32, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(livemig_unregister_savevm(c"contract-unplug".as_ptr(), op, &mut err), 0, "{:?}", take_err(&mut err));
    assert_eq!(livemig_unregister_savevm(c"contract-unplug".as_ptr(), op, &mut err), -libc::ENOENT);
    assert_eq!(take_err(&mut err).as_deref(), Some("savevm: 'contract-unplug' is not registered with this opaque pointer"));
    assert_eq!(livemig_unregister_savevm(std::ptr::null(), op, std::ptr::null_mut()), -libc::EINVAL);
}
