//! The host's dirty log failing during a migration: the writes it held
//! are unknown, so the migration must not complete with them missing.
//!
//! A host's `dirty_log_sync` may fail after its log was consumed (KVM's
//! GET_DIRTY_LOG clears the kernel's bitmap before it copies it out, and
//! fails with EFAULT if the copy does): a page written just before such a
//! sync is reported by no later sync.

mod common;

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use livemig::host::RunState;
use livemig::outgoing;
use livemig::state::MigrationStatus;

use parking_lot::lock_api::RawMutex as _;

const PAGE: usize = 4096;
const PAGES: usize = 256;
/// The page the guest writes just before the failing sync.
const WRITTEN: usize = 7;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
/// The source RAM (PAGES pages), as an address.
static SRC: AtomicU64 = AtomicU64::new(0);
/// The host's dirty log of the source block.
static LOG: [AtomicU64; PAGES / 64] = [const { AtomicU64::new(0) }; PAGES / 64];
static SYNCS: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn lock(_: *mut c_void) {
    LOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn log_sync(_: *mut c_void, _idstr: *const c_char, _host: *mut c_void, length: u64, bitmap: *mut u64) -> c_int {
    assert_eq!(length as usize, PAGES * PAGE);
    let n = SYNCS.fetch_add(1, SeqCst) + 1;
    if n == 2 {
        // The guest writes a page the first round has sent; the write is
        // logged.
        let p = SRC.load(SeqCst) as *mut u8;
        // SAFETY: page WRITTEN lies inside the source mapping of PAGES pages.
        unsafe { std::ptr::write_bytes(p.add(WRITTEN * PAGE), 0xee, PAGE) };
        LOG[WRITTEN / 64].fetch_or(1 << (WRITTEN % 64), SeqCst);
    }
    // The host's log is consumed...
    let taken: Vec<u64> = LOG.iter().map(|w| w.swap(0, SeqCst)).collect();
    if n == 2 {
        // ... and this sync fails before it reports it.
        return -libc::EIO;
    }
    // SAFETY: livemig passes a bitmap of one bit per page of `length`.
    let bm = unsafe { std::slice::from_raw_parts_mut(bitmap, PAGES / 64) };
    for (d, s) in bm.iter_mut().zip(taken) {
        *d |= s;
    }
    0
}

#[test]
fn a_failed_dirty_log_sync_fails_the_migration_instead_of_losing_writes() {
    let ops = livemig::ffi::types::LivemigHostOps { dirty_log_sync: Some(log_sync), ..common::host_ops(lock, unlock) };
    livemig::host::set(ops, std::ptr::null_mut()).unwrap();
    let src = common::map_pages(PAGES);
    for i in 0..PAGES {
        // SAFETY: page i lies inside the mapping.
        unsafe { std::ptr::write_bytes(src.add(i * PAGE), (i as u8) | 1, PAGE) };
    }
    SRC.store(src as u64, SeqCst);
    let dir = common::tmpdir("ram-sync");
    let path = dir.join("s.bin");
    let st = common::migrate_block_to_file(src, PAGES, &path);
    assert!(SYNCS.load(SeqCst) >= 2, "the failing sync was reached");
    if st == MigrationStatus::Completed {
        // Then the destination must have every write (this fails, naming
        // the first page the failed sync held that is missing).
        common::load_block_equal_to(&path, src, PAGES);
    }
    assert_eq!(st, MigrationStatus::Failed, "a failed dirty-log sync fails the migration");
    let err = outgoing::stats().error.unwrap_or_default();
    assert!(err.contains("failed to sync the dirty log of 'ram'"), "{err}");
    assert_eq!(common::STATE.load(SeqCst), RunState::Running as u32, "the VM runs on here");
    let _ = std::fs::remove_dir_all(&dir);
}
