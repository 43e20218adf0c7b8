//! A host whose dirty-log sync writes its log over the bitmap it is
//! handed, as `KVM_GET_DIRTY_LOG` writes its buffer, instead of OR-ing it
//! in: the pages that bitmap still held (the whole first round, at the
//! setup's sync) must not be lost, and bits it sets past the end of the
//! block must not be taken for pages.

mod common;

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use livemig::outgoing;
use livemig::state::MigrationStatus;

use parking_lot::lock_api::RawMutex as _;

const PAGE: usize = 4096;
/// Not a multiple of 64: the log's last word has bits past the block.
const PAGES: usize = 200;
const WORDS: usize = PAGES.div_ceil(64);
/// The page the guest writes before the second sync.
const WRITTEN: usize = 131;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
/// The source RAM (PAGES pages), as an address.
static SRC: AtomicU64 = AtomicU64::new(0);
/// The host's dirty log of the source block.
static LOG: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
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
    if SYNCS.fetch_add(1, SeqCst) + 1 == 2 {
        // The guest writes a page the first round may have sent; the write
        // is logged.
        let p = SRC.load(SeqCst) as *mut u8;
        // SAFETY: page WRITTEN lies inside the source mapping of PAGES pages.
        unsafe { std::ptr::write_bytes(p.add(WRITTEN * PAGE), 0xee, PAGE) };
        LOG[WRITTEN / 64].fetch_or(1 << (WRITTEN % 64), SeqCst);
    }
    // SAFETY: livemig passes a bitmap of one bit per page of `length`,
    // WORDS words.
    let bm = unsafe { std::slice::from_raw_parts_mut(bitmap, WORDS) };
    // Written over, as KVM_GET_DIRTY_LOG does, and with garbage past the
    // block's last page.
    for (d, s) in bm.iter_mut().zip(&LOG) {
        *d = s.swap(0, SeqCst);
    }
    bm[WORDS - 1] |= !((1u64 << (PAGES % 64)) - 1);
    0
}

#[test]
fn a_dirty_log_written_over_the_bitmap_loses_no_page() {
    let ops = livemig::ffi::types::LivemigHostOps { dirty_log_sync: Some(log_sync), ..common::host_ops(lock, unlock) };
    livemig::host::set(ops, std::ptr::null_mut()).unwrap();
    let src = common::map_pages(PAGES);
    for i in 0..PAGES {
        // SAFETY: page i lies inside the mapping.
        unsafe { std::ptr::write_bytes(src.add(i * PAGE), (i as u8) | 1, PAGE) };
    }
    SRC.store(src as u64, SeqCst);
    let dir = common::tmpdir("ram-log-overwrite");
    let path = dir.join("s.bin");
    let st = common::migrate_block_to_file(src, PAGES, &path);
    assert_eq!(st, MigrationStatus::Completed, "{:?}", outgoing::stats().error);
    assert!(SYNCS.load(SeqCst) >= 2, "the guest's write was logged");
    // The destination has every page, the one written too.
    let dst = common::load_block_equal_to(&path, src, PAGES);
    // SAFETY: page WRITTEN lies inside the destination mapping.
    assert_eq!(unsafe { *dst.add(WRITTEN * PAGE) }, 0xee);
    // SAFETY: the mappings made above, no longer used.
    unsafe {
        libc::munmap(src.cast(), PAGES * PAGE);
        libc::munmap(dst.cast(), PAGES * PAGE);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
