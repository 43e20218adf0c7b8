//! Guest RAM: registered blocks, statistics, and the built-in "ram" section
//! (idstr "ram", instance 0, version 4) on both sides.
//!
//! Record grammar inside every START/PART/END payload (stream-format §3):
//!
//! ```text
//! be64 header = offset_in_block | flags          flags = header & 0xFFF
//!   MEM_SIZE 0x04: offset = total; then per block: u8 len, name, be64 length
//!   ZERO     0x02: [name] u8 fill
//!   PAGE     0x08: [name] 4096 bytes
//!   XBZRLE   0x40: [name] u8 1, be16 len, len bytes of XBZRLE encoding
//!   EOS      0x10: end of this section's RAM data
//!   CONTINUE 0x20: the block is the last one named (no name follows),
//!                  kept across section boundaries
//! ```
//!
//! Guest RAM is written by running vCPUs on the source: pages are read with
//! raw-pointer copies ([`RamBlock::page_ptr`]) and never borrowed as Rust
//! slices while the guest may run.

mod backing;
pub mod load;
pub mod page_cache;
mod residency;
pub mod save;
pub mod scan;
pub mod xbzrle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{MigError, Result};
use crate::ffi::types::{MigrationStats, XBZRLECacheStats};
use crate::outgoing::OutStats;
use crate::params::{MigrationCapability, TARGET_PAGE_SIZE};
use scan::DirtyBitmap;

/// Page size of the stream.
pub const PAGE: usize = TARGET_PAGE_SIZE as usize;

/// Types whose all-zero bit pattern is a valid value.
///
/// # Safety
///
/// Only for such types: [`try_zeroed_vec`] hands out zeroed memory as
/// initialised values of the type.
unsafe trait ZeroIsValid: Copy {}
// SAFETY: every bit pattern is a valid integer.
unsafe impl ZeroIsValid for u8 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for u64 {}

/// `n` zeros, or None when the memory cannot be allocated. Unlike
/// `vec![0; n]`, a failure is an error, not an abort; like it, the memory
/// comes zeroed from the allocator and is not touched here: a large one
/// is fresh zero pages from the kernel, faulted in only as it is used.
fn try_zeroed_vec<T: ZeroIsValid>(n: usize) -> Option<Vec<T>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: the layout's size is not zero (n > 0, and T is u8 or u64).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` comes from the global allocator with the layout of `n`
    // T's (a Vec's layout for capacity `n`), and all `n` of them are
    // initialised: zero is a valid T (ZeroIsValid).
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// RAM record flags.
pub mod flags {
    /// Obsolete; refused.
    pub const FULL: u64 = 0x001;
    /// A page filled with one byte.
    pub const ZERO: u64 = 0x002;
    /// The block list.
    pub const MEM_SIZE: u64 = 0x004;
    /// A raw page.
    pub const PAGE: u64 = 0x008;
    /// End of section.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous record.
    pub const CONTINUE: u64 = 0x020;
    /// XBZRLE-encoded page.
    pub const XBZRLE: u64 = 0x040;
    /// RDMA hook; refused.
    pub const HOOK: u64 = 0x080;
    /// zlib page (`compress`); refused.
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// The only XBZRLE encoding.
    pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;
}

/// A block of guest RAM registered by the host.
pub struct RamBlock {
    /// Name in the stream (e.g. "ram", "pc.ram").
    pub idstr: String,
    host: usize,
    /// Used length in bytes (a multiple of the page size).
    used: AtomicU64,
    /// The length last given for it, which a stream may give in bytes
    /// (QEMU's memory region size): `used` is it rounded up to a page.
    size: AtomicU64,
    /// Largest length a resizable block may take (= used for the others).
    max_length: u64,
    /// Told when an incoming stream resizes the block.
    resized: Option<Resized>,
    /// Pages the host marked dirty itself (`livemig_ram_mark_dirty`).
    marks: Mutex<DirtyBitmap>,
    /// The final pass of an outgoing migration took the marks: a later
    /// mark cannot be sent. Read and written with `marks` held.
    sealed: AtomicBool,
}

/// What happened after the final pass sealed the blocks. One lock, so
/// that a late mark and the switchover's commit are ordered: a mark
/// before the commit fails the migration, one after it is refused as
/// too late to reach the destination.
struct FinalPass {
    /// A page was marked dirty after its block was sealed: the
    /// switchover must not complete (the page would be lost).
    late_mark: bool,
    /// The switchover committed: the end of the stream is going out, and
    /// the migration can no longer fail because of a mark.
    committed: bool,
    /// The migration these are for: one more for each that begins.
    generation: u64,
}

static FINAL_PASS: Mutex<FinalPass> = Mutex::new(FinalPass { late_mark: false, committed: false, generation: 0 });

/// Begins an outgoing migration's final-pass bookkeeping over `blocks`:
/// marks are taken, nothing is sealed, no mark is late. The migration's
/// generation ([`final_pass_generation`]) is what ends it.
pub(crate) fn begin_final_pass(blocks: &[Arc<RamBlock>]) {
    for b in blocks {
        b.unseal();
    }
    let mut f = FINAL_PASS.lock();
    (f.late_mark, f.committed) = (false, false);
    f.generation += 1;
}

/// The generation of the migration that began last.
pub(crate) fn final_pass_generation() -> u64 {
    FINAL_PASS.lock().generation
}

/// Commits the switchover unless a page was marked dirty after the final
/// pass; from then until [`end_final_pass`], marks are refused as too
/// late.
pub(crate) fn commit_final_pass() -> Result<()> {
    let mut f = FINAL_PASS.lock();
    if f.late_mark {
        // A device marked RAM dirty after the final RAM pass (e.g. DMA
        // flushed in its save_state): that change would be lost.
        return Err(MigError::with_errno("guest RAM was marked dirty after the final RAM pass of the switchover", libc::EBUSY));
    }
    f.committed = true;
    Ok(())
}

/// Ends the final pass of the migration of `generation`, which ran on
/// `blocks` (it completed or failed): marks are taken again. From a
/// thread so late that another migration began since (its host restarted
/// the VM and migrated again), nothing: that migration's seal and late
/// mark stand.
pub(crate) fn end_final_pass(blocks: &[Arc<RamBlock>], generation: u64) {
    // Checked before and after the unseal, which takes the blocks' mark
    // locks (a mark takes them before FINAL_PASS): a migration that began
    // in between has unsealed them itself, and seals them only at its
    // switchover, long after.
    if FINAL_PASS.lock().generation != generation {
        return;
    }
    for b in blocks {
        b.unseal();
    }
    let mut f = FINAL_PASS.lock();
    if f.generation == generation {
        (f.late_mark, f.committed) = (false, false);
    }
}

/// A host callback for a resized block: `f(opaque, idstr, new_length)`.
#[derive(Clone, Copy)]
pub struct Resized {
    /// The callback.
    pub f: unsafe extern "C" fn(opaque: *mut std::ffi::c_void, idstr: *const std::ffi::c_char, new_length: u64),
    /// Its argument.
    pub opaque: usize,
}

impl RamBlock {
    /// Used length in bytes.
    pub fn length(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Pages in the block's used length.
    pub fn pages(&self) -> usize {
        (self.length() / TARGET_PAGE_SIZE) as usize
    }

    /// True for a block registered as resizable.
    pub fn resizable(&self) -> bool {
        self.resized.is_some()
    }

    /// Largest length of a resizable block.
    pub fn max_length(&self) -> u64 {
        self.max_length
    }

    /// Takes the length an incoming stream gives the block, as QEMU 7.2's
    /// `qemu_ram_resize` does: the used length becomes it rounded up to a
    /// page; a fixed block accepts only a length that rounds to its own, a
    /// resizable one any up to its maximum (QEMU's messages otherwise).
    /// The host of a resizable block is told the length as given (which
    /// need not be whole pages, e.g. ACPI tables) whenever it changes.
    /// A length of 0 is refused (QEMU would empty the block).
    pub fn resize(&self, new_length: u64) -> Result<()> {
        self.resize_then(new_length, || {})
    }

    /// [`resize`](Self::resize), calling `changed` once the used length
    /// is known to change (the length is valid and rounds to another
    /// number of pages), right after the block takes it.
    fn resize_then(&self, new_length: u64, changed: impl FnOnce()) -> Result<()> {
        // Past u64::MAX when rounded: larger than any maximum.
        let aligned = new_length.checked_next_multiple_of(TARGET_PAGE_SIZE).unwrap_or(u64::MAX);
        if aligned == self.length() {
            if new_length != self.size.swap(new_length, Ordering::AcqRel) {
                self.tell_resized(new_length);
            }
            return Ok(());
        }
        if self.resized.is_none() {
            return Err(MigError::new(format!(
                "Size mismatch: {}: 0x{aligned:x} != 0x{:x}: Invalid argument (ram block '{}': stream says {new_length} bytes, host registered {})",
                self.idstr,
                self.length(),
                self.idstr,
                self.length()
            )));
        }
        if aligned > self.max_length {
            return Err(MigError::new(format!(
                "Size too large: {}: 0x{aligned:x} > 0x{:x}: Invalid argument",
                self.idstr, self.max_length
            )));
        }
        if aligned == 0 {
            return Err(MigError::new(format!("Invalid size: {}: 0x0: a block cannot be emptied", self.idstr)));
        }
        self.used.store(aligned, Ordering::Release);
        self.size.store(new_length, Ordering::Release);
        changed();
        self.tell_resized(new_length);
        Ok(())
    }

    /// Tells the host of a resizable block its new length.
    fn tell_resized(&self, length: u64) {
        let Some(r) = self.resized else { return };
        let name = std::ffi::CString::new(self.idstr.as_str()).expect("no NUL in block names");
        // SAFETY: the host registered this callback and opaque pointer
        // with the block; the name lives across the call.
        unsafe { (r.f)(r.opaque as *mut std::ffi::c_void, name.as_ptr(), length) };
    }

    /// An unregistered block over `len` bytes at `host`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(idstr: &str, host: *mut u8, len: u64) -> RamBlock {
        RamBlock {
            idstr: idstr.to_string(),
            host: host as usize,
            used: AtomicU64::new(len),
            size: AtomicU64::new(len),
            max_length: len,
            resized: None,
            marks: Mutex::new(DirtyBitmap::new((len / TARGET_PAGE_SIZE) as usize)),
            sealed: AtomicBool::new(false),
        }
    }

    /// The host address of page `page` (bounds-checked by the caller
    /// against a used length of the block: the current one, or for an
    /// outgoing migration the one at its setup; either is within the
    /// maximum, all of which is mapped).
    pub fn page_ptr(&self, page: usize) -> *mut u8 {
        debug_assert!(page < (self.max_length / TARGET_PAGE_SIZE) as usize);
        (self.host + page * PAGE) as *mut u8
    }

    /// The host address of the block.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host as *mut u8
    }

    /// Moves the host's own marks into `into` and clears them; with
    /// `seal` (the final pass), later marks are refused until [`unseal`](Self::unseal).
    fn take_marks(&self, into: &mut DirtyBitmap, seal: bool) {
        let mut m = self.marks.lock();
        for (d, s) in into.words_mut().iter_mut().zip(m.words_mut().iter_mut()) {
            *d |= std::mem::take(s);
        }
        if seal {
            self.sealed.store(true, Ordering::SeqCst);
        }
    }

    /// Accepts marks again (the migration is over).
    fn unseal(&self) {
        let _m = self.marks.lock();
        self.sealed.store(false, Ordering::SeqCst);
    }
}

static BLOCKS: Mutex<Vec<Arc<RamBlock>>> = Mutex::new(Vec::new());

/// Registers a block of guest RAM. The memory must stay mapped until the
/// block is removed (and no migration is running).
pub fn block_add(idstr: &str, host: *mut u8, length: u64) -> Result<()> {
    block_add_resizable(idstr, host, length, length, None)
}

/// Registers a block whose used length an incoming stream may change up to
/// `max_length` (QEMU's resizable blocks, e.g. ACPI tables); `resized` is
/// told of every change. With `resized` None the block is fixed.
pub fn block_add_resizable(idstr: &str, host: *mut u8, length: u64, max_length: u64, resized: Option<Resized>) -> Result<()> {
    if idstr.is_empty() || idstr.len() > 255 || idstr.contains('\0') {
        return Err(MigError::new(format!("ram block name '{idstr}' must be 1 to 255 bytes without NUL")));
    }
    if host.is_null() || !(host as usize).is_multiple_of(PAGE) {
        return Err(MigError::new(format!("ram block '{idstr}': host address {host:p} must be non-NULL and page aligned")));
    }
    if length == 0 || !length.is_multiple_of(TARGET_PAGE_SIZE) {
        return Err(MigError::new(format!("ram block '{idstr}': length {length} must be a non-zero multiple of {TARGET_PAGE_SIZE}")));
    }
    if max_length < length || !max_length.is_multiple_of(TARGET_PAGE_SIZE) {
        return Err(MigError::new(format!(
            "ram block '{idstr}': maximum length {max_length} must be a multiple of {TARGET_PAGE_SIZE} and at least {length}"
        )));
    }
    if (host as u64).checked_add(max_length).is_none_or(|end| usize::try_from(end).is_err()) {
        return Err(MigError::new(format!("ram block '{idstr}': {max_length} bytes at {host:p} run past the end of the address space")));
    }
    // Memory that is not there would be a fault of the migration thread
    // (source) or of the loader (destination), not an error.
    if let Some((lo, hi)) = backing::not_mapped_rw(host as usize, host as usize + max_length as usize) {
        return Err(MigError::new(format!(
            "ram block '{idstr}': its memory at 0x{lo:x}..0x{hi:x} is not mapped readable and writable in this process"
        )));
    }
    let mut b = BLOCKS.lock();
    busy_check()?;
    if b.iter().any(|x| x.idstr == idstr) {
        return Err(MigError::new(format!("ram block '{idstr}' is already registered")));
    }
    // Two blocks over the same memory would load one's pages into the
    // other's (the checks above keep `host + max_length` from overflowing).
    let (start, end) = (host as u64, host as u64 + max_length);
    if let Some(x) = b.iter().find(|x| start < x.host as u64 + x.max_length && (x.host as u64) < end) {
        return Err(MigError::new(format!("ram block '{idstr}': its memory overlaps that of block '{}'", x.idstr)));
    }
    let pages = (max_length / TARGET_PAGE_SIZE) as usize;
    // Allocated fallibly: a length beyond any mapping must be an error,
    // not an abort of the host process.
    let marks = DirtyBitmap::try_new(pages).ok_or_else(|| {
        MigError::new(format!("ram block '{idstr}': cannot allocate a dirty bitmap for its {max_length} bytes ({pages} pages)"))
    })?;
    b.push(Arc::new(RamBlock {
        idstr: idstr.to_string(),
        host: host as usize,
        used: AtomicU64::new(length),
        size: AtomicU64::new(length),
        max_length,
        resized,
        marks: Mutex::new(marks),
        sealed: AtomicBool::new(false),
    }));
    log::info!("ram block '{idstr}' registered: {length} bytes at {host:p}");
    Ok(())
}

/// Removes a block.
pub fn block_remove(idstr: &str) -> Result<()> {
    let mut b = BLOCKS.lock();
    busy_check()?;
    let i = b.iter().position(|x| x.idstr == idstr).ok_or_else(|| MigError::new(format!("ram block '{idstr}' is not registered")))?;
    b.remove(i);
    Ok(())
}

/// The host resizes block `idstr` (QEMU 7.2's `qemu_ram_resize`, e.g.
/// ACPI tables rebuilt on a guest reset): the lengths taken, the
/// messages and the host's `resized` callback are
/// [`RamBlock::resize`]'s. An outgoing migration in progress fails with
/// "RAM block '…' resized during precopy." (QEMU cancels it; failing
/// says why in `error_desc`), the VM running on: its stream announced the
/// old length, which it keeps to. A length that rounds to the same
/// number of pages does not fail it. Refused while an incoming migration
/// is in progress: its stream sets the block's length.
pub fn block_resize(idstr: &str, new_length: u64) -> Result<()> {
    if crate::state::INCOMING.status().is_active() {
        return Err(MigError::new(format!(
            "ram block '{idstr}' cannot be resized while an incoming migration is in progress (the stream sets its length)"
        )));
    }
    let b = BLOCKS.lock().iter().find(|x| x.idstr == idstr).cloned();
    let b = b.ok_or_else(|| MigError::new(format!("ram block '{idstr}' is not registered")))?;
    // The outgoing migration is asked after the block took the length: one
    // that starts later reads the new length at its setup; one that
    // started earlier is in progress here, and fails.
    b.resize_then(new_length, || {
        if crate::state::OUTGOING.status().is_active() {
            log::warn!("ram block '{idstr}' resized to {new_length} bytes during an outgoing migration: it fails");
            crate::outgoing::host_error(format!("RAM block '{idstr}' resized during precopy."));
        }
    })
}

/// Refuses a change of the block list while a migration runs. Called with
/// `BLOCKS` held: a migration takes its copy of the list under that lock,
/// after its state left idle, so a change either lands before the copy
/// or is refused.
fn busy_check() -> Result<()> {
    if crate::state::OUTGOING.status().is_active() || crate::state::INCOMING.status().is_active() {
        return Err(MigError::new("ram blocks cannot change while a migration is in progress"));
    }
    Ok(())
}

/// The registered blocks, largest first (QEMU's MEM_SIZE order).
pub fn blocks() -> Vec<Arc<RamBlock>> {
    let mut v = BLOCKS.lock().clone();
    v.sort_by_key(|b| std::cmp::Reverse(b.max_length));
    v
}

/// Marks `[offset, offset + len)` of block `idstr` dirty (a write the dirty
/// log does not see, e.g. device DMA).
pub fn mark_dirty(idstr: &str, offset: u64, len: u64) -> Result<()> {
    let b = BLOCKS.lock().iter().find(|x| x.idstr == idstr).cloned();
    let b = b.ok_or_else(|| MigError::new(format!("ram block '{idstr}' is not registered")))?;
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= b.length())
        .ok_or_else(|| MigError::new(format!("ram block '{idstr}': range {offset:#x}+{len:#x} exceeds its length {:#x}", b.length())))?;
    if len == 0 {
        return Ok(());
    }
    let first = (offset / TARGET_PAGE_SIZE) as usize;
    let last = ((end - 1) / TARGET_PAGE_SIZE) as usize;
    let mut m = b.marks.lock();
    if b.sealed.load(Ordering::SeqCst) {
        let mut f = FINAL_PASS.lock();
        if f.committed {
            return Err(MigError::with_errno(
                format!("ram block '{idstr}': marked dirty after the switchover committed; the change will not reach the destination"),
                libc::EBUSY,
            ));
        }
        // The pages went out in the final pass: the switchover would lose
        // this change, so it is abandoned and the VM keeps running here.
        f.late_mark = true;
        return Err(MigError::with_errno(
            format!("ram block '{idstr}': marked dirty after the final RAM pass of the switchover; the migration fails"),
            libc::EBUSY,
        ));
    }
    m.set_range(first, last - first + 1);
    Ok(())
}

/// Counters of the current or last outgoing RAM migration.
#[derive(Default)]
pub struct RamCounters {
    /// Dirty bytes left.
    pub remaining: AtomicU64,
    /// Total RAM bytes.
    pub total: AtomicU64,
    /// RAM bytes written to the stream.
    pub transferred: AtomicU64,
    /// Zero pages sent.
    pub duplicate: AtomicU64,
    /// Full pages sent.
    pub normal: AtomicU64,
    /// Bitmap syncs.
    pub dirty_sync_count: AtomicU64,
    /// Nanoseconds the iterate calls spent in runs of zero pages.
    pub zero_scan_ns: AtomicU64,
    /// Pages the first round has not reached yet (as of the last pending
    /// query): never sent, so not known to hold guest writes.
    pub first_round_left: AtomicU64,
    /// How long the last bitmap sync took, in microseconds (the final one
    /// runs with the VM stopped, so it is part of the downtime estimate).
    pub last_sync_us: AtomicU64,
    /// Pages dirtied per second (last sync period).
    pub dirty_pages_rate: AtomicU64,
    /// Pages sent per second (last sync period).
    pub pages_per_second: AtomicU64,
    /// Pages skipped (XBZRLE: unchanged).
    pub skipped: AtomicU64,
    /// XBZRLE pages sent (encoded; query-migrate's `pages` also counts
    /// the cache hits that were skipped or overflowed: [`xbzrle_hits`]).
    pub xbzrle_pages: AtomicU64,
    /// XBZRLE bytes, as QEMU 7.2 counts them: each encoded page's bytes
    /// on the wire less 8 header bytes, and a page size per overflow.
    pub xbzrle_bytes: AtomicU64,
    /// XBZRLE cache misses.
    pub xbzrle_cache_miss: AtomicU64,
    /// XBZRLE overflows.
    pub xbzrle_overflow: AtomicU64,
    /// Pages re-sent after the first pass.
    pub resent: AtomicU64,
    /// Cache miss rate of the last period that sent pages (its misses
    /// over the pages it sent, as QEMU 7.2), as f64 bits.
    pub xbzrle_cache_miss_rate: AtomicU64,
    /// Encoding rate of the last period, as f64 bits.
    pub xbzrle_encoding_rate: AtomicU64,
}

/// The counters.
pub static COUNTERS: once_cell::sync::Lazy<RamCounters> = once_cell::sync::Lazy::new(RamCounters::default);

/// Bytes of dirty RAM handled so far (pages × page size, however each
/// went on the wire): what the pending figure counts down. Every page
/// handled counts in exactly one of these counters.
pub fn dirty_bytes_done() -> u64 {
    let c = &*COUNTERS;
    let pages = [&c.duplicate, &c.normal, &c.xbzrle_pages, &c.skipped].iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();
    pages * TARGET_PAGE_SIZE
}

/// Of the pending dirty bytes, those of pages the first round has not
/// reached yet (often untouched, zero pages: a scan, not a page on the link).
pub fn first_round_left_bytes() -> u64 {
    COUNTERS.first_round_left.load(Ordering::Relaxed) * TARGET_PAGE_SIZE
}

/// Bytes of pages sent again (after the first round reached them).
pub fn resent_bytes() -> u64 {
    COUNTERS.resent.load(Ordering::Relaxed) * TARGET_PAGE_SIZE
}

/// Time the iterate calls have spent in runs of zero pages so far.
pub fn zero_scan_time() -> std::time::Duration {
    std::time::Duration::from_nanos(COUNTERS.zero_scan_ns.load(Ordering::Relaxed))
}

/// How long the last dirty-log sync took.
pub fn last_sync_time() -> std::time::Duration {
    std::time::Duration::from_micros(COUNTERS.last_sync_us.load(Ordering::Relaxed))
}

/// The XBZRLE cache of the migration in progress: which one is in use
/// (a token) and the size it will have, and a cache of that size made for
/// it by [`set_xbzrle_cache_size`], which its next iteration takes.
struct CacheSlot {
    in_use: Option<(u64, u64)>,
    replacement: Option<page_cache::PageCache>,
    tokens: u64,
}

static XBZRLE_CACHE: Mutex<CacheSlot> = Mutex::new(CacheSlot { in_use: None, replacement: None, tokens: 0 });

/// A cache of the size parameter for a migration starting, and its token
/// (for [`take_xbzrle_replacement`] and [`xbzrle_cache_released`]).
pub(crate) fn xbzrle_cache_for_migration() -> Result<(page_cache::PageCache, u64)> {
    let mut s = XBZRLE_CACHE.lock();
    let size = crate::params::get().xbzrle_cache_size;
    let cache = page_cache::PageCache::new(size).map_err(MigError::new)?;
    s.tokens += 1;
    s.in_use = Some((s.tokens, size));
    s.replacement = None;
    Ok((cache, s.tokens))
}

/// The cache with `token` is no longer used.
pub(crate) fn xbzrle_cache_released(token: u64) {
    let mut s = XBZRLE_CACHE.lock();
    if s.in_use.is_some_and(|(t, _)| t == token) {
        s.in_use = None;
        s.replacement = None;
    }
}

/// The cache made for the one with `token` since it last asked, if any.
/// Never waits: a cache being made is taken at a later call.
pub(crate) fn take_xbzrle_replacement(token: u64) -> Option<page_cache::PageCache> {
    let mut s = XBZRLE_CACHE.try_lock()?;
    if s.in_use.is_some_and(|(t, _)| t == token) {
        s.replacement.take()
    } else {
        None
    }
}

/// Sets the XBZRLE cache size (`params::set_cache_size` checks it). A
/// migration using a cache gets one of the new size, made here, as QEMU
/// 7.2's `xbzrle_cache_resize` makes it: a size that cannot be allocated
/// is refused, and nothing changes.
pub fn set_xbzrle_cache_size(value: i64) -> Result<()> {
    let size = crate::params::check_cache_size(value)?;
    let mut s = XBZRLE_CACHE.lock();
    if let Some((token, cur)) = s.in_use {
        if cur != size {
            let cache = page_cache::PageCache::new(size).map_err(|e| MigError::new(format!("Parameter 'xbzrle_cache_size': {e}")))?;
            s.replacement = Some(cache);
            s.in_use = Some((token, size));
        }
    }
    crate::params::set_cache_size(value)
}

/// Zeroes the counters: a new migration starts (none of the last one's
/// figures may show in its query-migrate).
pub fn reset_counters() {
    let c = &*COUNTERS;
    for a in [
        &c.remaining,
        &c.total,
        &c.transferred,
        &c.duplicate,
        &c.normal,
        &c.dirty_sync_count,
        &c.last_sync_us,
        &c.first_round_left,
        &c.dirty_pages_rate,
        &c.pages_per_second,
        &c.skipped,
    ]
    .into_iter()
    .chain([&c.xbzrle_pages, &c.xbzrle_bytes, &c.xbzrle_cache_miss, &c.xbzrle_overflow, &c.resent])
    {
        a.store(0, Ordering::Relaxed);
    }
    c.xbzrle_cache_miss_rate.store(0f64.to_bits(), Ordering::Relaxed);
    c.xbzrle_encoding_rate.store(0f64.to_bits(), Ordering::Relaxed);
}

/// XBZRLE pages as QEMU 7.2 counts them (save_xbzrle_page): every page
/// found in the cache, whether it was then encoded, found unchanged
/// (skipped) or overflowed (sent whole).
pub(crate) fn xbzrle_hits(c: &RamCounters) -> u64 {
    [&c.xbzrle_pages, &c.skipped, &c.xbzrle_overflow].iter().map(|a| a.load(Ordering::Relaxed)).sum()
}

/// The RAM and XBZRLE figures for query-migrate.
pub fn query_stats(out: &OutStats) -> (MigrationStats, Option<XBZRLECacheStats>) {
    let c = &*COUNTERS;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
    let transferred = ld(&c.transferred);
    // RAM bytes sent after the switchover stopped the VM; the rest of
    // `transferred` went while it ran (QEMU 7.2 counts RAM alone in both).
    // A VM that did not run: every byte went while it was stopped.
    let downtime_bytes = if out.vm_paused { transferred } else { out.downtime_bytes.min(transferred as u64) as i64 };
    let s = MigrationStats {
        transferred,
        remaining: ld(&c.remaining),
        total: ld(&c.total),
        duplicate: ld(&c.duplicate),
        normal: ld(&c.normal),
        normal_bytes: ld(&c.normal) * PAGE as i64,
        dirty_pages_rate: ld(&c.dirty_pages_rate),
        mbps: out.mbps,
        dirty_sync_count: ld(&c.dirty_sync_count),
        page_size: PAGE as i64,
        pages_per_second: ld(&c.pages_per_second),
        precopy_bytes: transferred - downtime_bytes,
        downtime_bytes,
        skipped: ld(&c.skipped),
        ..Default::default()
    };
    let p = crate::params::get();
    let x = p.cap(MigrationCapability::Xbzrle).then(|| XBZRLECacheStats {
        cache_size: p.xbzrle_cache_size as i64,
        bytes: ld(&c.xbzrle_bytes),
        pages: xbzrle_hits(c) as i64,
        cache_miss: ld(&c.xbzrle_cache_miss),
        overflow: ld(&c.xbzrle_overflow),
        cache_miss_rate: f64::from_bits(c.xbzrle_cache_miss_rate.load(Ordering::Relaxed)),
        encoding_rate: f64::from_bits(c.xbzrle_encoding_rate.load(Ordering::Relaxed)),
    });
    (s, x)
}

/// Registers the built-in "ram" section (once).
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::savevm::register(
            "ram",
            0,
            4,
            Box::new(save::RamSection::new()),
            crate::savevm::builtin_owner(),
            crate::savevm::Priority::Ram,
        )
        .expect("ram registers once");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_registration_checks() {
        let mut mem = vec![0u64; 4 * PAGE / 8 + PAGE / 8];
        let base = ((mem.as_mut_ptr() as usize + PAGE - 1) & !(PAGE - 1)) as *mut u8;
        assert!(block_add("", base, 4096).unwrap_err().to_string().contains("1 to 255 bytes"));
        assert!(block_add("t.x", std::ptr::null_mut(), 4096).unwrap_err().to_string().contains("page aligned"));
        assert!(block_add("t.x", base, 4095).unwrap_err().to_string().contains("multiple of 4096"));
        block_add("t.blk", base, 4 * 4096).unwrap();
        assert!(block_add("t.blk", base, 4096).unwrap_err().to_string().contains("already registered"));
        // SAFETY: both addresses lie inside `mem`; nothing is accessed.
        let (inside, last) = unsafe { (base.add(3 * PAGE), base.add(4 * PAGE)) };
        let e = block_add_resizable("t.over", inside, 4096, 8192, None).unwrap_err().to_string();
        assert_eq!(e, "ram block 't.over': its memory overlaps that of block 't.blk'");
        let e = block_add("t.over", base, 4096).unwrap_err().to_string();
        assert_eq!(e, "ram block 't.over': its memory overlaps that of block 't.blk'");
        block_add("t.next", last, 4096).unwrap();
        block_remove("t.next").unwrap();
        mark_dirty("t.blk", 4095, 2).unwrap();
        let e = mark_dirty("t.blk", 3 * 4096, 4097).unwrap_err().to_string();
        assert_eq!(e, "ram block 't.blk': range 0x3000+0x1001 exceeds its length 0x4000");
        let b = blocks().into_iter().find(|b| b.idstr == "t.blk").unwrap();
        let mut bm = DirtyBitmap::new(4);
        b.take_marks(&mut bm, false);
        assert!(bm.test(0) && bm.test(1) && !bm.test(2) && !bm.test(3));
        block_remove("t.blk").unwrap();
        assert!(block_remove("t.blk").is_err());
    }

    /// The thread of a migration that completed may end its final pass
    /// only after the host restarted the VM and the next migration sealed
    /// the blocks in its own switchover: that must not unseal them nor
    /// forget a late mark, which would then be lost.
    #[test]
    fn a_late_end_of_a_final_pass_leaves_the_next_migration_s_standing() {
        let mut mem = vec![0u64; 2 * PAGE / 8];
        let base = ((mem.as_mut_ptr() as usize + PAGE - 1) & !(PAGE - 1)) as *mut u8;
        block_add("t.gen", base, 4096).unwrap();
        let blocks: Vec<_> = blocks().into_iter().filter(|b| b.idstr == "t.gen").collect();
        let seal = || blocks[0].take_marks(&mut DirtyBitmap::new(1), true);
        begin_final_pass(&blocks);
        let first = final_pass_generation();
        seal();
        // COMPLETED; the first thread is held up before it ends its pass.
        begin_final_pass(&blocks);
        let second = final_pass_generation();
        seal();
        end_final_pass(&blocks, first);
        let late = mark_dirty("t.gen", 0, 1).map_err(|e| e.to_string());
        let committed = commit_final_pass().map_err(|e| e.to_string());
        end_final_pass(&blocks, second);
        let after = mark_dirty("t.gen", 0, 1).map_err(|e| e.to_string());
        block_remove("t.gen").unwrap();
        assert!(late.as_ref().is_err_and(|e| e.contains("after the final RAM pass")), "a mark after the second seal: {late:?}");
        assert!(committed.as_ref().is_err_and(|e| e.contains("marked dirty after the final RAM pass")), "{committed:?}");
        assert_eq!(after, Ok(()));
    }
}
