//! `#[repr(C)]` types shared with C: QAPI result types in QEMU's layout,
//! the host callback table, the savevm handler table, `Notifier`.

use std::ffi::{c_char, c_int, c_void};

use crate::host::RunState;
use crate::params::MigrationCapability;
use crate::qemu_file::QemuFile;
use crate::state::MigrationStatus;

/// Version of `LivemigHostOps` this library understands.
pub const LIVEMIG_HOST_OPS_VERSION: u32 = 1;

/// The host VMM's callbacks, registered with `livemig_set_host_ops`.
///
/// Set `version` to `LIVEMIG_HOST_OPS_VERSION` and `size` to
/// `sizeof(LivemigHostOps)`; later versions only append fields. The table
/// is copied; `opaque` is passed back to every call.
///
/// Threads and locks: every callback may be called from livemig's own
/// threads ("livemig-out", "livemig-in"). `iothread_lock`/`unlock` guard the
/// switchover (until the whole stream is out: the wait for the
/// destination's confirmation and the channel's close, e.g. an `exec:`
/// command's exit, run without it), notifiers and device loads; `vm_stop_force_state`, `vm_start`,
/// `runstate_*`, `system_wakeup_request` and `announce_self` are called with
/// the host lock held, except that `runstate_is_running` and `runstate_get`
/// are also asked by `qmp_migrate`, `migrate_fd_connect`,
/// `qemu_start_incoming_migration` and `process_incoming_migration` on the
/// calling thread, with whatever the caller holds (as QEMU reads its run
/// state there): they must not take the host lock. `dirty_log_start` and
/// the syncs are called without it (the last sync of a migration runs
/// with it held, the VM stopped); `dirty_log_stop` with it held. A
/// device's `load_state` runs with the host lock held, but a read in it
/// that must wait for the source releases the lock while it waits and
/// takes it again before it returns (as QEMU's incoming coroutine yields
/// the BQL): other threads may take the lock between a load's reads,
/// while the VM stays stopped in inmigrate.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LivemigHostOps {
    /// `LIVEMIG_HOST_OPS_VERSION`.
    pub version: u32,
    /// `sizeof(LivemigHostOps)`.
    pub size: u32,
    /// Required: takes the host's global lock (QEMU's iothread lock).
    pub iothread_lock: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Required: releases it.
    pub iothread_unlock: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Required: stops the vCPUs and sets `state`; returns 0 or a negative
    /// errno. Returns only once the vCPUs have stopped: the final dirty-log
    /// sync and RAM pass follow at once, and a guest write made after the
    /// return may not reach the destination. Called with the host lock
    /// held: vCPUs that need that lock to pause must get it released while
    /// the host waits for them (QEMU's `pause_all_vcpus`).
    pub vm_stop_force_state: Option<unsafe extern "C" fn(opaque: *mut c_void, state: RunState) -> c_int>,
    /// Required: starts (resumes) the VM; returns 0 or a negative errno.
    pub vm_start: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// Required: true while the vCPUs run.
    pub runstate_is_running: Option<unsafe extern "C" fn(opaque: *mut c_void) -> bool>,
    /// Required: records a run state without starting or stopping anything.
    pub runstate_set: Option<unsafe extern "C" fn(opaque: *mut c_void, state: RunState)>,
    /// Optional: the current run state (sent in "globalstate"); without it
    /// livemig sends running or paused, and cannot tell a VM in
    /// postmigrate or inmigrate (left there by a failed incoming
    /// migration), which `qmp_migrate` then does not refuse (it refuses
    /// while an incoming migration runs all the same). A value
    /// that is not a `RunState` is refused: `qmp_migrate` (or the
    /// switchover, which then fails the migration) reports it.
    pub runstate_get: Option<unsafe extern "C" fn(opaque: *mut c_void) -> RunState>,
    /// Optional: wakes a suspended guest before the switchover.
    pub system_wakeup_request: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Optional: announces the VM on the network after an incoming migration.
    pub announce_self: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Optional: starts dirty logging of guest RAM; 0 or a negative errno.
    pub dirty_log_start: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// Optional: ORs the pages of block `idstr` (at `host`, `length` bytes:
    /// the used length of a resizable block) written since the last sync
    /// into `bitmap` (4 KiB pages; bit i of word i/64 = page i, as
    /// KVM_GET_DIRTY_LOG) and clears the host's log; 0 or a negative
    /// errno. `bitmap` (one word per 64 pages, rounded up) comes zeroed
    /// and is OR-ed into the pages still to send after the call, so the
    /// host may as well write its log over it (KVM_GET_DIRTY_LOG straight
    /// into it); bits past the block's last page are ignored. Without
    /// this callback, only `livemig_ram_mark_dirty` marks pages. It may call
    /// `livemig_ram_mark_dirty` for any block (a log shared by all blocks):
    /// the marks are taken once every block's log has been synced, also
    /// at the last sync.
    pub dirty_log_sync:
        Option<unsafe extern "C" fn(opaque: *mut c_void, idstr: *const c_char, host: *mut c_void, length: u64, bitmap: *mut u64) -> c_int>,
    /// Optional: stops dirty logging.
    pub dirty_log_stop: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Destination: start the VM after a load whose source was running
    /// (QEMU's `autostart`, i.e. no `-S`); otherwise it is left paused.
    pub autostart: bool,
}

/// `Notifier`, with QEMU's layout: `notify` first, then the list links
/// (reserved for the host; livemig does not touch them).
#[repr(C)]
pub struct Notifier {
    /// Called with the notifier and a `MigrationState *` (valid during the call).
    pub notify: Option<unsafe extern "C" fn(notifier: *mut Notifier, data: *mut c_void)>,
    /// QLIST_ENTRY: next.
    pub le_next: *mut Notifier,
    /// QLIST_ENTRY: prev.
    pub le_prev: *mut *mut Notifier,
}

/// Marker for QEMU's `DeviceState` (unused by livemig; may be NULL).
pub struct DeviceState {
    _private: [u8; 0],
}

/// Writes a non-live device's state (FULL section).
pub type SaveStateHandler = Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void)>;
/// Reads a device's state; returns 0 or a negative errno.
pub type LoadStateHandler = Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void, version_id: c_int) -> c_int>;

/// A live handler table, as QEMU's `SaveVMHandlers`.
///
/// `save_live_setup`, `save_live_iterate`, `save_live_complete`,
/// `save_live_pending` and `load_state` are required. `iterate` returns < 0
/// on error, 0 while it has more to send, > 0 when it is done for now.
/// Setup/iterate/pending run without the host lock; complete with it (VM
/// stopped); cancel with it too, the VM possibly running (a cancel or
/// failure before the switchover); `load_state` with it on the
/// destination (released while a read waits for the source; see
/// `LivemigHostOps`). `save_live_pending` gets a NULL `QEMUFile *`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SaveVMHandlers {
    /// Writes a FULL section (for non-live use; unused for live handlers).
    pub save_state: SaveStateHandler,
    /// Writes the START payload.
    pub save_live_setup: Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void) -> c_int>,
    /// Writes a PART payload.
    pub save_live_iterate: Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void) -> c_int>,
    /// Writes the END payload.
    pub save_live_complete: Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void) -> c_int>,
    /// Bytes still to send (called with a NULL `QEMUFile *`); counted into
    /// the switchover's estimate. `max_size` is the bytes the link moves
    /// within the downtime limit, as in QEMU.
    pub save_live_pending: Option<unsafe extern "C" fn(f: *mut QemuFile, opaque: *mut c_void, max_size: u64) -> u64>,
    /// Optional: the migration failed or was cancelled before this
    /// handler's `save_live_complete` succeeded (returned 0 or more, even
    /// if the stream failed during it). Each migration that ran
    /// `save_live_setup` ends for the handler in exactly one of the two
    /// (a failure after a successful complete, e.g. a closing `exec:`
    /// command that exits non-zero, calls no `cancel`), so either may free
    /// what the migration holds.
    pub cancel: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Reads a START, PART, END or FULL payload (which of them is not
    /// passed: as in QEMU, a payload must tell what it holds).
    pub load_state: LoadStateHandler,
    /// Optional: false leaves the handler out of a migration.
    pub is_active: Option<unsafe extern "C" fn(opaque: *mut c_void) -> bool>,
}

/// RAM statistics, QAPI `MigrationStats`: QEMU's fields up to
/// `dirty_pages_rate` in its order, then the rest (`skipped`, which QEMU
/// lists after `duplicate`, comes last).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MigrationStats {
    /// RAM bytes sent.
    pub transferred: i64,
    /// Dirty bytes left (0 once completed).
    pub remaining: i64,
    /// Total RAM bytes.
    pub total: i64,
    /// Zero pages sent.
    pub duplicate: i64,
    /// Full pages sent.
    pub normal: i64,
    /// Bytes of full pages sent.
    pub normal_bytes: i64,
    /// Pages dirtied per second (0 once completed, as in QEMU 7.2).
    pub dirty_pages_rate: i64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Dirty bitmap syncs.
    pub dirty_sync_count: i64,
    /// Always 0.
    pub postcopy_requests: i64,
    /// Target page size.
    pub page_size: i64,
    /// Always 0.
    pub multifd_bytes: i64,
    /// Pages sent per second.
    pub pages_per_second: i64,
    /// RAM bytes sent while the VM ran (none when it ran neither at the
    /// start nor at the switchover).
    pub precopy_bytes: i64,
    /// RAM bytes sent while the VM was stopped: from the switchover on,
    /// or all of them when it ran neither at the start nor at the
    /// switchover (as QEMU 7.2 counts them).
    pub downtime_bytes: i64,
    /// Always 0.
    pub postcopy_bytes: i64,
    /// Always 0.
    pub dirty_sync_missed_zero_copy: i64,
    /// Pages not sent because XBZRLE found them unchanged.
    pub skipped: i64,
}

/// XBZRLE statistics, QAPI `XBZRLECacheStats`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct XBZRLECacheStats {
    /// Cache size in bytes.
    pub cache_size: i64,
    /// Encoded bytes, as QEMU 7.2 counts them: each encoded page's bytes
    /// less 8 header bytes, and a page size for each overflow.
    pub bytes: i64,
    /// Pages found in the cache (encoded, unchanged or overflowed), as
    /// QEMU 7.2 counts them; the unchanged ones are also in `skipped`.
    pub pages: i64,
    /// Pages not found in the cache.
    pub cache_miss: i64,
    /// Pages whose encoding overflowed (sent in full).
    pub overflow: i64,
    /// Misses / pages sent (zero, normal or encoded) of the last period
    /// that sent pages, as QEMU 7.2 counts it.
    pub cache_miss_rate: f64,
    /// Raw bytes of the pages found in the cache / encoded bytes, of the
    /// last period (0 when it had none).
    pub encoding_rate: f64,
}

/// QAPI `MigrationInfo`: QEMU's field order, newer fields appended.
/// Free with `qapi_free_MigrationInfo`. As in QEMU 7.2, the source's
/// figures (`ram`, `xbzrle_cache`, the times) are set while ACTIVE or
/// CANCELLING and once COMPLETED; in SETUP and once CANCELLED only the
/// status is, once FAILED the status and `error_desc`.
#[repr(C)]
pub struct MigrationInfo {
    /// Whether `status` is set.
    pub has_status: bool,
    /// The state.
    pub status: MigrationStatus,
    /// Whether `ram` is set.
    pub has_ram: bool,
    /// RAM figures.
    pub ram: *mut MigrationStats,
    /// Always false (no block migration).
    pub has_disk: bool,
    /// Always NULL.
    pub disk: *mut MigrationStats,
    /// Whether `xbzrle_cache` is set.
    pub has_xbzrle_cache: bool,
    /// XBZRLE figures (when the capability is on).
    pub xbzrle_cache: *mut XBZRLECacheStats,
    /// Whether `total_time` is set.
    pub has_total_time: bool,
    /// Milliseconds since the start (or in all, once finished).
    pub total_time: i64,
    /// Whether `expected_downtime` is set (while active or cancelling, and
    /// once completed: then it is the estimate the switchover was decided
    /// on).
    pub has_expected_downtime: bool,
    /// Expected downtime in ms: the downtime limit until the link has
    /// been measured (as QEMU 7.2), then the estimate for the pending
    /// bytes.
    pub expected_downtime: i64,
    /// Whether `downtime` is set (once completed).
    pub has_downtime: bool,
    /// Downtime in ms, to the nearest: from just before the VM was stopped
    /// until the whole stream was written and the channel closed (with a
    /// return path, once the destination had also confirmed the load).
    pub downtime: i64,
    /// Whether `setup_time` is set.
    pub has_setup_time: bool,
    /// Setup time in ms.
    pub setup_time: i64,
    /// Whether `error_desc` is set (failed).
    pub has_error_desc: bool,
    /// Why the migration failed.
    pub error_desc: *mut c_char,
    /// Whether `blocked_reasons` is set: while a blocker is registered
    /// (`qmp_query_migrate`, whatever the state, as QEMU 7.2).
    pub has_blocked_reasons: bool,
    /// The registered blockers' texts, oldest first, as QEMU 7.2 lists
    /// them (`qmp_migrate` refuses with the newest's).
    pub blocked_reasons: *mut strList,
}

/// QAPI's list of strings.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct strList {
    /// The next node, or NULL.
    pub next: *mut strList,
    /// This node's string.
    pub value: *mut c_char,
}

/// One capability and its state.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// A list of capability states (QEMU 7.2's QAPI list layout). Lists made
/// by livemig are freed with `qapi_free_MigrationCapabilityStatusList`.
#[repr(C)]
pub struct MigrationCapabilityStatusList {
    /// The next node or NULL.
    pub next: *mut MigrationCapabilityStatusList,
    /// This node's value.
    pub value: *mut MigrationCapabilityStatus,
}
