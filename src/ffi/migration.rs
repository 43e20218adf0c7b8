//! The seed's migration functions: `qmp_migrate` and friends.

use std::ffi::{c_char, c_void, CString};
use std::ptr::null_mut;

use super::errors::Error;
use super::types::*;
use super::{cstr, guard, guard_err};
use crate::error::MigError;
use crate::outgoing::OutStats;
use crate::params::{self, MigrationCapability};
use crate::qemu_file::{Direction, QemuFile};
use crate::state::{self, MigrationState, MigrationStatus, NotifierRef, INCOMING, OUTGOING};
use crate::transport::Uri;
use crate::{incoming, outgoing};

/// The current (outgoing) migration state object. Never NULL.
#[no_mangle]
pub extern "C" fn migrate_get_current() -> *mut MigrationState {
    &OUTGOING as *const MigrationState as *mut MigrationState
}

fn status_of(s: *const MigrationState) -> Option<MigrationStatus> {
    // SAFETY: a non-NULL `MigrationState *` is either from
    // migrate_get_current (static) or a notifier argument (alive during the
    // notifier call), by the API contract.
    unsafe { s.as_ref() }.map(MigrationState::status)
}

/// True while the migration is ACTIVE (as QEMU 7.2: not in setup, nor
/// cancelling). `s` is `migrate_get_current()` or a notifier's argument;
/// this and the other `migration_*` predicates answer false for NULL.
#[no_mangle]
pub extern "C" fn migration_is_active(s: *mut MigrationState) -> bool {
    status_of(s) == Some(MigrationStatus::Active)
}

/// True while the migration is in SETUP (QEMU's `migration_in_setup`, which
/// notifiers use to tell the start of a migration).
#[no_mangle]
pub extern "C" fn migration_in_setup(s: *mut MigrationState) -> bool {
    status_of(s) == Some(MigrationStatus::Setup)
}

/// True once the migration completed.
#[no_mangle]
pub extern "C" fn migration_has_finished(s: *mut MigrationState) -> bool {
    status_of(s) == Some(MigrationStatus::Completed)
}

/// True once the migration failed or was cancelled.
#[no_mangle]
pub extern "C" fn migration_has_failed(s: *mut MigrationState) -> bool {
    matches!(status_of(s), Some(MigrationStatus::Failed | MigrationStatus::Cancelled))
}

/// Whether `s` names the outgoing migration: NULL, `migrate_get_current()`
/// or the state an outgoing notification handed a notifier (QEMU's
/// notifiers get `migrate_get_current()` itself, and a host ported from it
/// passes that pointer on, e.g. to `migrate_fd_error`).
fn names_outgoing(s: *const MigrationState) -> bool {
    // SAFETY: as in status_of.
    unsafe { s.as_ref() }.is_none_or(|st| !st.is_incoming())
}

/// The status of a state object (NULL gives NONE).
#[no_mangle]
pub extern "C" fn livemig_migration_status(s: *const MigrationState) -> MigrationStatus {
    status_of(s).unwrap_or(MigrationStatus::None)
}

/// True when `s` is the destination's state (notifiers are called for both
/// directions).
#[no_mangle]
pub extern "C" fn livemig_migration_is_incoming(s: *const MigrationState) -> bool {
    // SAFETY: as in status_of.
    unsafe { s.as_ref() }.is_some_and(MigrationState::is_incoming)
}

/// The downtime limit in nanoseconds.
#[no_mangle]
pub extern "C" fn migrate_max_downtime() -> u64 {
    guard("migrate_max_downtime", 0, || params::get().downtime_ns)
}

/// True when the xbzrle capability is on.
#[no_mangle]
pub extern "C" fn migrate_use_xbzrle() -> bool {
    guard("migrate_use_xbzrle", false, || params::get().cap(MigrationCapability::Xbzrle))
}

/// The XBZRLE cache size in bytes.
#[no_mangle]
pub extern "C" fn migrate_xbzrle_cache_size() -> i64 {
    guard("migrate_xbzrle_cache_size", 0, || params::get().xbzrle_cache_size as i64)
}

/// Starts migrating to `uri` (`tcp:`, `unix:`, `exec:`, `fd:`). Returns at
/// once; the connection is made on the migration thread. Refused while a
/// migration runs, while a blocker is registered (with its message), while
/// the VM waits for an incoming migration (its run state is inmigrate, as
/// in QEMU) or is in postmigrate, for block migration (`blk`/`inc`), and
/// for a URI that cannot be used (one that does not parse, an `fd:NAME`
/// not registered), reported after the others as QEMU 7.2 orders them:
/// then nothing changes (7.2 leaves its state FAILED for a bad URI;
/// livemig keeps the last migration's). With `fd:N` livemig owns
/// descriptor N from the call on, and closes it when it refuses; a
/// descriptor that is not open is refused at once. A named fd (`fd:NAME`,
/// `livemig_fd_add`) is taken by the call once it is accepted, and stays
/// registered when the call is refused. `detach` is accepted and ignored
/// (the call never waits). `exec:CMD` runs `/bin/sh -c CMD` in a process
/// group of its own: a command killed (on a cancel, or when it outlasts
/// the io timeout) is killed with every process it started, and it does
/// not get the terminal's signals (Ctrl-C) meant for the host. Being in
/// the background, it cannot read the terminal either: a command that
/// would prompt (ssh asking for a password) stops, and the migration
/// fails at the io timeout; give it what it needs without a prompt (ssh
/// keys, `-o BatchMode=yes`). It gets
/// stdin, stdout and stderr only (on both sides): none of the host's
/// other descriptors, also those without FD_CLOEXEC. In a host
/// that ignores SIGCHLD the command's exit status is lost (the kernel
/// reaps it): a command that took the whole stream then counts as
/// successful, as in QEMU.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn qmp_migrate(
    uri: *const c_char,
    has_blk: bool,
    blk: bool,
    has_inc: bool,
    inc: bool,
    has_detach: bool,
    detach: bool,
    errp: *mut *mut Error,
) {
    let _ = (has_detach, detach);
    guard_err("qmp_migrate", errp, (), || {
        let uri = cstr(uri, "uri")?;
        // A URI that cannot be parsed is reported after the other
        // refusals (`start_checked`), as QEMU 7.2 orders them.
        let target = match Uri::parse(uri) {
            // Owned from here on: dropped (closed) if the call is refused;
            // one that is not open is refused at once.
            Ok(parsed @ Uri::FdNum(_)) => {
                Ok(outgoing::Target::File(QemuFile::new(crate::transport::fd_channel(&parsed, uri)?, Direction::Write)))
            }
            Ok(parsed) => Ok(outgoing::Target::Uri(parsed, uri.to_string())),
            Err(e) => Err(e),
        };
        if (has_blk && blk) || (has_inc && inc) {
            return Err(MigError::new("block migration is not supported by livemig"));
        }
        outgoing::start_checked(target)
    })
}

/// Starts a migration over a stream the host opened (e.g. `qemu_fdopen`).
/// livemig owns `f` from the call on, also when it refuses. `s` is
/// `migrate_get_current()`, NULL, or the outgoing state a notifier was
/// handed; an incoming migration's state is refused.
#[no_mangle]
pub extern "C" fn migrate_fd_connect(s: *mut MigrationState, f: *mut crate::qemu_file::QemuFile, errp: *mut *mut Error) {
    guard_err("migrate_fd_connect", errp, (), || {
        if f.is_null() {
            return Err(MigError::new("migrate_fd_connect: file must not be NULL"));
        }
        // SAFETY: `f` came from qemu_fdopen (Box::into_raw) and ownership
        // passes to livemig with this call.
        let file = unsafe { *Box::from_raw(f) };
        if !names_outgoing(s) {
            return Err(MigError::new("migrate_fd_connect: the state of an incoming migration; pass migrate_get_current() (or NULL)"));
        }
        if file.direction() != Direction::Write {
            return Err(MigError::new("migrate_fd_connect: the stream is not open for writing (qemu_fdopen mode \"wb\")"));
        }
        outgoing::start(outgoing::Target::File(file))
    })
}

/// Fails the current migration with `error`'s message (or a generic one):
/// the source VM is restarted and the state becomes FAILED. The migration
/// thread stops at once, also while it waits out a spent window under the
/// speed limit, and a later `qmp_migrate_cancel` does not turn it into
/// CANCELLED. No effect when no migration runs, nor, as for a cancel,
/// once the switchover is sending the end of the stream. `s` is
/// `migrate_get_current()`, NULL, or the outgoing state a notifier was
/// handed (so a notifier may report an error with its own argument); an
/// incoming migration's state is ignored (logged). `error` stays the
/// caller's to free. May be called from a notifier, with the host lock
/// held.
#[no_mangle]
pub extern "C" fn migrate_fd_error(s: *mut MigrationState, error: *const Error) {
    guard("migrate_fd_error", (), || {
        if !names_outgoing(s) {
            log::warn!("migrate_fd_error: the state of an incoming migration, not the outgoing one: ignored");
            return;
        }
        let msg = Error::message(error).unwrap_or_else(|| "migration failed: reported by the host".to_string());
        outgoing::host_error(msg);
    })
}

/// Requests a cancel: the migration thread stops, cancels the handlers,
/// restarts the VM and ends in CANCELLED (or, when the VM cannot be
/// started again, in FAILED with that reason: CANCELLED means the VM
/// runs here again). No effect when nothing runs or the
/// migration already completed, nor once the switchover has sent all but
/// the end of the stream: from then on the destination may load it and
/// start the VM, so the source must not run it again (the cancel is
/// logged and ignored; the migration ends COMPLETED, or FAILED if the
/// stream itself fails). Ignored too once the migration has failed, or
/// the host has reported an error (`migrate_fd_error`): it ends FAILED
/// with that error.
#[no_mangle]
pub extern "C" fn qmp_migrate_cancel(errp: *mut *mut Error) {
    guard_err("qmp_migrate_cancel", errp, (), || {
        outgoing::cancel();
        Ok(())
    })
}

/// Sets the bandwidth limit in bytes/s (0: unlimited). The limit is
/// enforced per 100 ms window (a tenth of it each); during a migration a
/// new limit applies at once to the window in progress, whose bytes
/// already sent count against it, and a migration waiting out a spent
/// window resumes at once under a raised limit. As in QEMU, each window
/// sends at least one page, so a limit below about 41 KB/s moves a page
/// per window.
#[no_mangle]
pub extern "C" fn qmp_migrate_set_speed(value: i64, errp: *mut *mut Error) {
    guard_err("qmp_migrate_set_speed", errp, (), || params::set_speed(value))
}

/// Sets the downtime limit in seconds (0 to 2000; NaN/negative refused),
/// kept in whole milliseconds, truncated, as QEMU 7.2 keeps it (0.0105 s
/// is 10 ms).
#[no_mangle]
pub extern "C" fn qmp_migrate_set_downtime(value: f64, errp: *mut *mut Error) {
    guard_err("qmp_migrate_set_downtime", errp, (), || params::set_downtime(value))
}

/// Sets the XBZRLE cache size in bytes (a power of two, at least one page,
/// as in QEMU 7.2); also resizes the cache of a running migration, whose
/// new cache is allocated by this call: a size that cannot be allocated
/// is refused then, and nothing changes.
#[no_mangle]
pub extern "C" fn qmp_migrate_set_cache_size(value: i64, errp: *mut *mut Error) {
    guard_err("qmp_migrate_set_cache_size", errp, (), || crate::ram::set_xbzrle_cache_size(value))
}

/// The XBZRLE cache size in bytes.
#[no_mangle]
pub extern "C" fn qmp_query_migrate_cache_size(errp: *mut *mut Error) -> i64 {
    guard_err("qmp_query_migrate_cache_size", errp, 0, || Ok(params::get().xbzrle_cache_size as i64))
}

/// Every capability and its state; free with
/// `qapi_free_MigrationCapabilityStatusList`.
#[no_mangle]
pub extern "C" fn qmp_query_migrate_capabilities(errp: *mut *mut Error) -> *mut MigrationCapabilityStatusList {
    guard_err("qmp_query_migrate_capabilities", errp, null_mut(), || {
        let p = params::get();
        let mut head: *mut MigrationCapabilityStatusList = null_mut();
        for cap in MigrationCapability::all().into_iter().rev() {
            let value = Box::into_raw(Box::new(MigrationCapabilityStatus { capability: cap, state: p.cap(cap) }));
            head = Box::into_raw(Box::new(MigrationCapabilityStatusList { next: head, value }));
        }
        Ok(head)
    })
}

/// Longest capability list taken: far more than the capabilities there
/// are (a list may name one several times), and an end to a list that
/// loops back on itself.
const MAX_CAPABILITY_NODES: usize = 4096;

/// Applies a list of capability states, all or none. Refused while an
/// outgoing migration is in progress (a destination reads none: they may
/// change while an incoming migration runs), for capabilities livemig
/// does not implement, and for a list of more than 4096 nodes.
#[no_mangle]
pub extern "C" fn qmp_migrate_set_capabilities(params: *mut MigrationCapabilityStatusList, errp: *mut *mut Error) {
    guard_err("qmp_migrate_set_capabilities", errp, (), || {
        let mut list = Vec::new();
        let mut node = params as *const MigrationCapabilityStatusList;
        // SAFETY: the caller passes a well-formed, NULL-terminated list
        // that stays alive during the call; NULL values are refused.
        while let Some(n) = unsafe { node.as_ref() } {
            if list.len() == MAX_CAPABILITY_NODES {
                return Err(MigError::new(format!("capability list longer than {MAX_CAPABILITY_NODES} nodes (does it loop?)")));
            }
            let v = n.value;
            if v.is_null() {
                return Err(MigError::new("capability list node with a NULL value"));
            }
            // Read the fields through raw pointers, the enum as an integer
            // first: C may pass any value, and no Rust reference to an
            // invalid enum may exist.
            // SAFETY: `v` is non-NULL and points to a caller-owned
            // MigrationCapabilityStatus (repr(C): a C int, then a bool).
            let (raw, state) =
                unsafe { (std::ptr::addr_of!((*v).capability).cast::<u32>().read(), std::ptr::addr_of!((*v).state).cast::<u8>().read()) };
            let cap = MigrationCapability::from_u32(raw).ok_or_else(|| MigError::new(format!("unknown capability {raw}")))?;
            list.push((cap, state != 0));
            node = n.next;
        }
        params::set_capabilities(&list)
    })
}

/// Frees a capability list made by livemig (NULL is ignored).
#[no_mangle]
pub extern "C" fn qapi_free_MigrationCapabilityStatusList(list: *mut MigrationCapabilityStatusList) {
    let mut node = list;
    while !node.is_null() {
        // SAFETY: nodes and values were made with Box::into_raw by
        // qmp_query_migrate_capabilities; each is freed once.
        let n = unsafe { Box::from_raw(node) };
        if !n.value.is_null() {
            // SAFETY: as above: the value was made with Box::into_raw and
            // belongs to this node alone.
            drop(unsafe { Box::from_raw(n.value) });
        }
        node = n.next;
    }
}

/// The incoming side's info: its status and, once failed, the reason,
/// read together (see `incoming::status_and_error`). For query-migrate
/// (`listening_is_none`), a destination that listens has no status.
fn incoming_info(listening_is_none: bool) -> MigrationInfo {
    let (status, error) = incoming::status_and_error();
    let status = match status {
        // A destination that listens is NONE to QEMU 7.2 until the stream
        // arrives (it goes from NONE to ACTIVE): no status, as QEMU shows.
        MigrationStatus::Setup if listening_is_none => MigrationStatus::None,
        s => s,
    };
    let mut info = empty_info(status);
    set_error(&mut info, status, error);
    info
}

fn empty_info(status: MigrationStatus) -> MigrationInfo {
    MigrationInfo {
        has_status: status != MigrationStatus::None,
        status,
        has_ram: false,
        ram: null_mut(),
        has_disk: false,
        disk: null_mut(),
        has_xbzrle_cache: false,
        xbzrle_cache: null_mut(),
        has_total_time: false,
        total_time: 0,
        has_expected_downtime: false,
        expected_downtime: 0,
        has_downtime: false,
        downtime: 0,
        has_setup_time: false,
        setup_time: 0,
        has_error_desc: false,
        error_desc: null_mut(),
        has_blocked_reasons: false,
        blocked_reasons: null_mut(),
    }
}

/// A C string of `s` (a NUL in it, which C cannot hold, becomes a space).
fn c_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', " ")).expect("NULs replaced").into_raw()
}

/// Sets `blocked_reasons` from the registered blockers, as QEMU 7.2 does
/// in every query-migrate.
fn set_blocked_reasons(info: &mut MigrationInfo) {
    let mut head: *mut strList = null_mut();
    for r in outgoing::blocker_reasons().iter().rev() {
        head = Box::into_raw(Box::new(strList { next: head, value: c_string(r) }));
    }
    info.has_blocked_reasons = !head.is_null();
    info.blocked_reasons = head;
}

fn set_error(info: &mut MigrationInfo, status: MigrationStatus, error: Option<String>) {
    if let (MigrationStatus::Failed, Some(e)) = (status, error) {
        info.has_error_desc = true;
        info.error_desc = c_string(&e);
    }
}

/// The outgoing side's info for `status`, with `st`, its figures (read
/// with it under one lock: see `outgoing::with_stats`).
fn outgoing_info(status: MigrationStatus, st: &OutStats) -> MigrationInfo {
    let mut info = empty_info(status);
    // The figures where QEMU 7.2 shows them: while active or
    // cancelling, and once completed. In setup and once cancelled only
    // the status, once failed the status and the error.
    if matches!(status, MigrationStatus::Active | MigrationStatus::Cancelling | MigrationStatus::Completed) {
        let (mut ram, xbz) = crate::ram::query_stats(st);
        if status == MigrationStatus::Completed {
            // As QEMU 7.2 (populate_ram_info): nothing is left to send
            // once completed, and no dirty rate is reported.
            ram.remaining = 0;
            ram.dirty_pages_rate = 0;
        }
        info.has_ram = true;
        info.ram = Box::into_raw(Box::new(ram));
        if let Some(x) = xbz {
            info.has_xbzrle_cache = true;
            info.xbzrle_cache = Box::into_raw(Box::new(x));
        }
        info.has_total_time = true;
        info.total_time = st.total_time_ms as i64;
        info.has_setup_time = true;
        info.setup_time = st.setup_time_ms as i64;
        // While active or cancelling, and (unlike QEMU) once completed:
        // then the estimate the switchover was decided on, to compare
        // with `downtime`.
        info.has_expected_downtime = true;
        info.expected_downtime = st.expected_downtime_ms as i64;
    }
    if let (MigrationStatus::Completed, Some(d)) = (status, st.downtime_ms) {
        info.has_downtime = true;
        info.downtime = d as i64;
    }
    set_error(&mut info, status, st.error.clone());
    info
}

/// The state and figures of the outgoing migration or, if none has run in
/// this process, of the incoming one (as QEMU 7.2, whose destination has
/// no status while it waits for the stream: `livemig_query_incoming`
/// reports that as SETUP), and, whatever the state, the blockers
/// registered (`blocked_reasons`). Free with `qapi_free_MigrationInfo`,
/// which frees `ram`, `xbzrle_cache`, `error_desc` and `blocked_reasons`
/// with it. NULL (with `errp` set) only on an internal error.
#[no_mangle]
pub extern "C" fn qmp_query_migrate(errp: *mut *mut Error) -> *mut MigrationInfo {
    guard_err("qmp_query_migrate", errp, null_mut(), || {
        let out = OUTGOING.status();
        let inc = INCOMING.status();
        let info = if out == MigrationStatus::None && !matches!(inc, MigrationStatus::None | MigrationStatus::Setup) {
            incoming_info(true)
        } else {
            outgoing::with_stats(outgoing_info)
        };
        let mut info = info;
        set_blocked_reasons(&mut info);
        Ok(Box::into_raw(Box::new(info)))
    })
}

/// The state of the incoming migration (status and error_desc; SETUP from
/// `qemu_start_incoming_migration` until the stream arrives, NONE before
/// any). Free with `qapi_free_MigrationInfo`. NULL (with `errp` set) only
/// on an internal error.
#[no_mangle]
pub extern "C" fn livemig_query_incoming(errp: *mut *mut Error) -> *mut MigrationInfo {
    guard_err("livemig_query_incoming", errp, null_mut(), || Ok(Box::into_raw(Box::new(incoming_info(false)))))
}

/// Frees a `MigrationInfo` made by livemig (NULL is ignored).
#[no_mangle]
pub extern "C" fn qapi_free_MigrationInfo(info: *mut MigrationInfo) {
    if info.is_null() {
        return;
    }
    // SAFETY: `info` and its members were made with Box::into_raw /
    // CString::into_raw by this module; each is freed once.
    unsafe {
        let i = Box::from_raw(info);
        if !i.ram.is_null() {
            drop(Box::from_raw(i.ram));
        }
        if !i.disk.is_null() {
            drop(Box::from_raw(i.disk));
        }
        if !i.xbzrle_cache.is_null() {
            drop(Box::from_raw(i.xbzrle_cache));
        }
        if !i.error_desc.is_null() {
            drop(CString::from_raw(i.error_desc));
        }
        let mut node = i.blocked_reasons;
        while !node.is_null() {
            let n = Box::from_raw(node);
            if !n.value.is_null() {
                drop(CString::from_raw(n.value));
            }
            node = n.next;
        }
    }
}

/// Frees a `MigrationStats` made by livemig and detached from its
/// `MigrationInfo` (set `info->ram` to NULL first: `qapi_free_MigrationInfo`
/// frees the members it still holds). NULL is ignored.
#[no_mangle]
pub extern "C" fn qapi_free_MigrationStats(s: *mut MigrationStats) {
    if !s.is_null() {
        // SAFETY: made with Box::into_raw by this module.
        drop(unsafe { Box::from_raw(s) });
    }
}

/// Frees an `XBZRLECacheStats` made by livemig and detached from its
/// `MigrationInfo` (set `info->xbzrle_cache` to NULL first: `qapi_free_MigrationInfo`
/// frees the members it still holds). NULL is ignored.
#[no_mangle]
pub extern "C" fn qapi_free_XBZRLECacheStats(s: *mut XBZRLECacheStats) {
    if !s.is_null() {
        // SAFETY: made with Box::into_raw by this module.
        drop(unsafe { Box::from_raw(s) });
    }
}

fn call_notifier(n: NotifierRef, snap: &MigrationState) {
    let p = n.0 as *mut Notifier;
    // SAFETY: the host registered this Notifier and keeps it alive until it
    // removes it (QEMU's contract); `snap` outlives the call.
    unsafe {
        if let Some(f) = (*p).notify {
            f(p, snap as *const MigrationState as *mut c_void);
        }
    }
}

/// Adds a state-change notifier. It is called on livemig's thread, with the
/// host lock held, once per transition of either direction, with a
/// `MigrationState *` valid during the call. The host keeps `notify` alive
/// until it removes it. Unlike QEMU 7.2, which notifies the source only
/// (setup, then the final state), livemig also notifies ACTIVE and
/// CANCELLING and the destination's transitions: a notifier written for
/// QEMU returns early when `livemig_migration_is_incoming(s)`, and tests
/// the state with `migration_in_setup`, `migration_has_finished` and
/// `migration_has_failed`, which the extra states do not match.
#[no_mangle]
pub extern "C" fn add_migration_state_change_notifier(notify: *mut Notifier) {
    guard("add_migration_state_change_notifier", (), || {
        if notify.is_null() {
            log::warn!("add_migration_state_change_notifier: NULL notifier ignored");
            return;
        }
        state::set_notify_fn(call_notifier);
        state::add_notifier(NotifierRef(notify as usize));
    })
}

/// Removes a notifier. Safe from inside a notifier. If the notifier is
/// being called on another thread, waits until that call has returned,
/// so the notifier may be freed once this returns. Notifiers are called
/// with the host lock held: a notifier that releases it and waits to take
/// it again must not be removed by a thread that holds it (that removal
/// would wait for the call, and the call for the lock).
#[no_mangle]
pub extern "C" fn remove_migration_state_change_notifier(notify: *mut Notifier) {
    guard("remove_migration_state_change_notifier", (), || state::remove_notifier(NotifierRef(notify as usize)))
}

/// Registers a migration blocker: while it is registered `qmp_migrate`
/// fails with `reason`'s message. The caller keeps `reason` (also when the
/// call is refused), passes the same pointer to `migrate_del_blocker`,
/// and frees it after that. Returns 0, or a negative errno with `errp`
/// set: -EBUSY while an outgoing migration is in progress (as in QEMU
/// 7.2, an incoming one does not refuse it), -EINVAL for a NULL `reason`.
#[no_mangle]
pub extern "C" fn migrate_add_blocker(reason: *mut Error, errp: *mut *mut Error) -> i32 {
    guard_err("migrate_add_blocker", errp, -libc::EINVAL, || {
        let msg = Error::message(reason).ok_or_else(|| MigError::new("migrate_add_blocker: reason must not be NULL"))?;
        outgoing::add_blocker(reason as usize, msg).map(|()| 0).or_else(|e| {
            super::errors::set(errp, &e);
            Ok(-e.errno())
        })
    })
}

/// Removes a blocker registered with `migrate_add_blocker` (one not
/// registered, or NULL, is ignored); `reason` stays the caller's to free.
#[no_mangle]
pub extern "C" fn migrate_del_blocker(reason: *mut Error) {
    guard("migrate_del_blocker", (), || outgoing::del_blocker(reason as usize))
}

/// Starts an incoming migration from `uri` (`tcp:HOST:PORT`, port 0 for any
/// free port, with QEMU's `,to=LAST` for the first free port up to LAST
/// and `,ipv4`/`,ipv6` for one address family (`qmp_migrate` takes those
/// two as well; an IPv6 address, `[::]` included, takes IPv4 sources too
/// unless `,ipv6` is given, as in QEMU, whatever the system's
/// `bindv6only`), `unix:PATH`, `exec:CMD`, `fd:N`/`fd:NAME`). Listens (or spawns)
/// and returns; a livemig thread loads the stream, then starts the VM or
/// sets its run state. Errors in the URI or binding are reported here, and
/// so is a VM that is running (loading would write under its vCPUs; a VM
/// started before the source connects fails the migration, unloaded);
/// errors in the stream end in FAILED (see `livemig_query_incoming`). A
/// socket at a `unix:` path is replaced, as QEMU replaces it, even if
/// another listener still uses it; anything else there is refused. `fd:N`
/// is livemig's from the call on (closed if the start is refused); a
/// named fd is taken once the start is accepted (or refused only because
/// an outgoing migration started meanwhile on another thread: the URI is
/// set up before the state leaves idle, and what was set up is then
/// closed). A `tcp:` host name is resolved on the calling thread (within
/// the io timeout), holding up no query or cancel made meanwhile, and is
/// listened on at every address it resolves to, as QEMU does, on one
/// port (with port 0, the port the first address got); the start fails
/// only when none can be bound. The source is waited for without the io
/// timeout, as QEMU waits for it (`livemig_incoming_cancel` ends the
/// wait): a connection on a socket, the first byte (or the end) of an
/// `exec:` command's output or of an `fd:`; the state is SETUP meanwhile.
#[no_mangle]
pub extern "C" fn qemu_start_incoming_migration(uri: *const c_char, errp: *mut *mut Error) {
    guard_err("qemu_start_incoming_migration", errp, (), || incoming::start_uri(cstr(uri, "uri")?))
}

/// QEMU 7.2's `migrate-incoming`, for a VM started with `-incoming defer`:
/// `qemu_start_incoming_migration` for a VM in the inmigrate run state,
/// refused with 7.2's texts otherwise ("'-incoming' was not specified on
/// the command line"; a host without `runstate_get` tells only whether the
/// VM runs, and a running VM is refused) and while an incoming migration
/// is in progress ("The incoming migration has already been started"). Unlike 7.2, a
/// destination whose incoming migration failed or was cancelled may start
/// another. `fd:N` is livemig's from the call on, as there.
#[no_mangle]
pub extern "C" fn qmp_migrate_incoming(uri: *const c_char, errp: *mut *mut Error) {
    guard_err("qmp_migrate_incoming", errp, (), || incoming::start_uri_as(cstr(uri, "uri")?, incoming::Start::Deferred))
}

/// Loads an incoming migration from a stream the host opened. livemig owns
/// `f` from the call on; a refusal (a migration in progress, a running VM)
/// is logged and the stream closed. The source's first byte is waited for
/// without the io timeout (the state is SETUP meanwhile), as
/// `qemu_start_incoming_migration` waits for its source.
/// `livemig_incoming_cancel` wakes a read it waits in.
#[no_mangle]
pub extern "C" fn process_incoming_migration(f: *mut crate::qemu_file::QemuFile) {
    guard("process_incoming_migration", (), || {
        if f.is_null() {
            log::error!("process_incoming_migration: NULL file");
            return;
        }
        // SAFETY: `f` came from qemu_fdopen (Box::into_raw); ownership passes here.
        let file = unsafe { *Box::from_raw(f) };
        if file.direction() != Direction::Read {
            log::error!("process_incoming_migration: the stream is not open for reading (qemu_fdopen mode \"rb\")");
            return;
        }
        if let Err(e) = incoming::start_file(file) {
            log::error!("process_incoming_migration: {e}");
        }
    })
}

/// The TCP port of the incoming listener (useful with port 0), or -1 (no
/// listener: none was started, the source has been accepted, or the
/// incoming migration has ended).
#[no_mangle]
pub extern "C" fn livemig_incoming_port() -> i32 {
    guard("livemig_incoming_port", -1, || incoming::local_port().map_or(-1, i32::from))
}

/// Stops an incoming migration that has not finished; it ends FAILED and
/// the VM is not started (also when the whole stream was read already).
/// Returns false if none was running, or if the load is over and the VM
/// is being handed over.
#[no_mangle]
pub extern "C" fn livemig_incoming_cancel() -> bool {
    guard("livemig_incoming_cancel", false, incoming::cancel)
}
