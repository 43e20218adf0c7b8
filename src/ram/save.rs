//! The "ram" section's handler: the source side (dirty-page pre-copy with
//! zero pages and XBZRLE) and, through [`super::load`], the destination.
//!
//! Source, as QEMU 7.2 `migration/ram.c` does it:
//! - setup: every page dirty, dirty log started and synced once, the block
//!   list (MEM_SIZE) and EOS written;
//! - iterate: walk the dirty bitmaps from where the last pass stopped,
//!   sending each dirty page (ZERO for all-zero pages, XBZRLE when enabled
//!   and it pays, else PAGE) until the rate limit or 50 ms; EOS;
//! - pending: dirty bytes; when they fit in `max_size`, sync the dirty log
//!   first (a new pass);
//! - complete (VM stopped): a last sync, then every dirty page; EOS.
//!
//! XBZRLE starts after the first complete round over RAM, as in 7.2: a page
//! enters the cache when it is re-sent (as a normal page) and is delta
//! encoded from its third transmission on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backing::{Backing, ZeroPages};
use super::load::Loader;
use super::page_cache::PageCache;
use super::scan::{is_zero_raw, DirtyBitmap};
use super::{flags, RamBlock, COUNTERS, PAGE};
use crate::error::{MigError, Result};
use crate::host::Host;
use crate::params::{self, MigrationCapability};
use crate::qemu_file::QemuFile;
use crate::savevm::{SaveVmHandler, SectionKind};

/// Longest one iterate call works before yielding (QEMU's MAX_WAIT).
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Shortest period the dirty and page rates are measured over.
const RATE_PERIOD: Duration = Duration::from_millis(250);

struct BlockState {
    block: Arc<RamBlock>,
    /// Sized at setup to the block's used length then, which is what the
    /// stream announced: the migration keeps to it (a host that resizes
    /// the block meanwhile fails the migration; see `ram::block_resize`).
    bitmap: DirtyBitmap,
    /// What backs it: which pages read as zero untouched.
    backing: Backing,
    /// Offset of the block in the cache's address space.
    base: u64,
}

impl BlockState {
    /// Pages of the block as the migration knows it (its length at setup).
    fn pages(&self) -> usize {
        self.bitmap.pages()
    }

    /// Bytes of the block as the migration knows it.
    fn length(&self) -> u64 {
        (self.pages() * PAGE) as u64
    }
}

/// What XBZRLE made of a page.
enum Xbz {
    /// Same as the cached copy: nothing to send.
    Unchanged,
    /// Encoded into the xbzrle `enc` buffer, this many bytes.
    Encoded(usize),
    /// Not encodable (not cached, or the encoding would overflow): send
    /// the private copy whole.
    Raw,
}

struct Xbzrle {
    cache: PageCache,
    /// The cache's token (see `xbzrle_cache_for_migration`).
    token: u64,
    page: Box<[u8; PAGE]>,
    enc: Box<[u8; PAGE]>,
    /// Counters at the last sync, for the per-period rates.
    last_pages: u64,
    last_miss: u64,
    last_bytes: u64,
    /// Pages sent (zero, normal or encoded) at the last rate update.
    last_sent: u64,
}

impl Drop for Xbzrle {
    fn drop(&mut self) {
        super::xbzrle_cache_released(self.token);
    }
}

/// The source side of one migration.
pub struct Saver {
    blocks: Vec<BlockState>,
    host: Option<Host>,
    cur_block: usize,
    cur_page: usize,
    last_sent_block: Option<usize>,
    dirty_pages: u64,
    xbzrle: Option<Xbzrle>,
    xbzrle_enabled: bool,
    /// Pages known to read as zero without reading them.
    zero: ZeroPages,
    last_stage: bool,
    logging: bool,
    /// Start of the current dirty-rate period, and what it has counted so far.
    rate_start: Instant,
    rate_dirtied: u64,
    /// Start of the current send-rate period (`pages_per_second`, updated
    /// by the passes, also in a first round with no syncs), and its pages.
    sent_start: Instant,
    rate_sent: u64,
    rounds: u64,
    /// Dirty-log syncs of this migration (what a zero probe is valid for).
    syncs: u64,
    /// A sync in `pending` failed: the writes the host's log held may be
    /// lost, so the next iterate or complete fails the migration.
    sync_error: Option<MigError>,
    /// What the host's dirty-log sync of one block writes into, zeroed
    /// before each call and then OR-ed into the block's bitmap: a host
    /// may write its log over the buffer (as `KVM_GET_DIRTY_LOG` does),
    /// which must not clear pages still to send. As many words as the
    /// largest block's bitmap (none without a dirty log).
    log: Vec<u64>,
}

impl Saver {
    /// A saver over `blocks`, using `host`'s dirty log when it has one.
    pub fn new(blocks: Vec<Arc<RamBlock>>, host: Option<Host>) -> Result<Saver> {
        Self::with_xbzrle(blocks, host, params::get().cap(MigrationCapability::Xbzrle))
    }

    /// [`new`](Self::new) with XBZRLE on or off whatever the capability.
    fn with_xbzrle(blocks: Vec<Arc<RamBlock>>, host: Option<Host>, xbzrle: bool) -> Result<Saver> {
        super::begin_final_pass(&blocks);
        let mut base = 0;
        let blocks = blocks
            .into_iter()
            .map(|block| {
                // One read of the length: the host may resize the block
                // meanwhile (which fails this migration).
                let mut bitmap = DirtyBitmap::new(block.pages());
                bitmap.fill();
                let backing = Backing::of(block.host_ptr() as usize, bitmap.pages() * PAGE);
                let s = BlockState { bitmap, base, block, backing };
                base += s.length();
                s
            })
            .collect::<Vec<_>>();
        let xbzrle = if xbzrle {
            let (cache, token) = super::xbzrle_cache_for_migration()?;
            Some(Xbzrle {
                cache,
                token,
                page: Box::new([0; PAGE]),
                enc: Box::new([0; PAGE]),
                last_pages: 0,
                last_miss: 0,
                last_bytes: 0,
                last_sent: 0,
            })
        } else {
            None
        };
        let dirty_pages = blocks.iter().map(|b| b.pages() as u64).sum();
        let log_words = if host.is_some_and(|h| h.has_dirty_log()) { blocks.iter().map(|b| b.bitmap.words().len()).max() } else { None };
        Ok(Saver {
            blocks,
            host,
            cur_block: 0,
            cur_page: 0,
            last_sent_block: None,
            dirty_pages,
            xbzrle,
            xbzrle_enabled: false,
            zero: ZeroPages::default(),
            last_stage: false,
            logging: false,
            rate_start: Instant::now(),
            rate_dirtied: 0,
            sent_start: Instant::now(),
            rate_sent: 0,
            rounds: 0,
            syncs: 0,
            sync_error: None,
            log: vec![0; log_words.unwrap_or(0)],
        })
    }

    fn total(&self) -> u64 {
        self.blocks.iter().map(BlockState::length).sum()
    }

    /// Writes the block list and EOS (the START payload).
    pub fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        let c = &*COUNTERS;
        super::reset_counters();
        c.total.store(self.total(), Ordering::Relaxed);
        if let Some(h) = &self.host {
            h.dirty_log_start()?;
            self.logging = true;
        }
        self.sync()?;
        f.put_be64(self.total() | flags::MEM_SIZE);
        for b in &self.blocks {
            f.put_counted_str(&b.block.idstr);
            f.put_be64(b.length());
        }
        f.put_be64(flags::EOS);
        f.check()
    }

    /// Pulls the host's dirty log and marks into the bitmaps; updates the
    /// rates of the period since the last sync. Every block's log is
    /// synced before any block's marks are taken: a host whose sync of one
    /// block marks pages of another (a log shared by all of them) has
    /// those marks taken too, also by the final pass, which seals them.
    fn sync(&mut self) -> Result<()> {
        let before = self.dirty_pages;
        let started = Instant::now();
        self.syncs += 1;
        if let Some(h) = self.host.filter(Host::has_dirty_log) {
            for b in &mut self.blocks {
                let log = &mut self.log[..b.bitmap.words().len()];
                log.fill(0);
                h.dirty_log_sync(&b.block.idstr, b.block.host_ptr(), b.length(), log)?;
                b.bitmap.or_words(log);
            }
        }
        for b in &mut self.blocks {
            b.block.take_marks(&mut b.bitmap, self.last_stage);
        }
        self.dirty_pages = self.blocks.iter().map(|b| b.bitmap.count() as u64).sum();
        let c = &*COUNTERS;
        c.last_sync_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let n = c.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1;
        let newly = self.dirty_pages.saturating_sub(before);
        // Rates over periods of at least RATE_PERIOD: syncs can be a few ms
        // apart, and a guest dirties in bursts.
        if n > 1 {
            self.rate_dirtied += newly;
        }
        let secs = self.rate_start.elapsed().as_secs_f64();
        if secs >= RATE_PERIOD.as_secs_f64() || self.last_stage {
            if n > 1 {
                c.dirty_pages_rate.store((self.rate_dirtied as f64 / secs.max(1e-3)) as u64, Ordering::Relaxed);
            }
            self.rate_start = Instant::now();
            self.rate_dirtied = 0;
        }
        if let Some(x) = &mut self.xbzrle {
            // As QEMU 7.2 (migration_update_rates): over the pages sent
            // since the last update (its target_page_count: zero, normal
            // and encoded pages; an unchanged page is not sent); a period
            // that sent none leaves the rates and their bases as they were.
            let sent = [&c.duplicate, &c.normal, &c.xbzrle_pages].iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();
            let page_count = sent - x.last_sent;
            x.last_sent = sent;
            if page_count > 0 {
                let miss = c.xbzrle_cache_miss.load(Ordering::Relaxed);
                let pages = super::xbzrle_hits(c);
                let bytes = c.xbzrle_bytes.load(Ordering::Relaxed);
                c.xbzrle_cache_miss_rate.store(((miss - x.last_miss) as f64 / page_count as f64).to_bits(), Ordering::Relaxed);
                // 0 for a period with no page found in the cache or no
                // bytes encoded.
                let rate = if pages == x.last_pages || bytes == x.last_bytes {
                    0.0
                } else {
                    ((pages - x.last_pages) * PAGE as u64) as f64 / (bytes - x.last_bytes) as f64
                };
                c.xbzrle_encoding_rate.store(rate.to_bits(), Ordering::Relaxed);
                (x.last_miss, x.last_pages, x.last_bytes) = (miss, pages, bytes);
            }
        }
        log::debug!("ram: dirty sync {n}: {} dirty pages ({newly} new)", self.dirty_pages);
        c.remaining.store(self.dirty_pages * PAGE as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next dirty page at or after the walk position, wrapping around
    /// once; a wrap completes a round (and enables XBZRLE).
    fn next_dirty(&mut self) -> Option<(usize, usize)> {
        let n = self.blocks.len();
        for _ in 0..=n {
            if n == 0 || self.dirty_pages == 0 {
                return None;
            }
            if let Some(p) = self.blocks[self.cur_block].bitmap.find_next(self.cur_page) {
                return Some((self.cur_block, p));
            }
            self.cur_block += 1;
            self.cur_page = 0;
            if self.cur_block == n {
                self.cur_block = 0;
                self.rounds += 1;
                if self.xbzrle.is_some() && !self.xbzrle_enabled {
                    log::debug!("ram: first round complete, XBZRLE enabled");
                    self.xbzrle_enabled = true;
                }
            }
        }
        None
    }

    fn record_header(&mut self, f: &mut QemuFile, bi: usize, page: usize, flag: u64) -> u64 {
        let offset = (page * PAGE) as u64;
        if self.last_sent_block == Some(bi) {
            f.put_be64(offset | flag | flags::CONTINUE);
            8
        } else {
            f.put_be64(offset | flag);
            f.put_counted_str(&self.blocks[bi].block.idstr);
            self.last_sent_block = Some(bi);
            9 + self.blocks[bi].block.idstr.len() as u64
        }
    }

    /// Sends one dirty page (and clears its bit); true when it went as a
    /// zero page.
    fn save_page(&mut self, f: &mut QemuFile, bi: usize, page: usize) -> bool {
        self.blocks[bi].bitmap.clear(page);
        self.dirty_pages -= 1;
        self.cur_page = page + 1;
        self.rate_sent += 1;
        if self.rounds > 0 {
            COUNTERS.resent.fetch_add(1, Ordering::Relaxed);
        }
        let ptr = self.blocks[bi].block.page_ptr(page);
        let addr = self.blocks[bi].base + (page * PAGE) as u64;
        let generation = COUNTERS.dirty_sync_count.load(Ordering::Relaxed);
        let c = &*COUNTERS;
        let b = &self.blocks[bi];
        // Only the first round meets untouched memory: a page dirty again
        // was written since, and probing a chunk per scattered dirty page
        // would cost more than reading the page.
        let untouched = self.rounds == 0 && self.zero.known_zero(&b.backing, bi, b.block.host_ptr() as usize, b.pages(), page, self.syncs);
        // SAFETY: `page < pages()` (from the bitmap of this block), so the
        // page lies inside the registered, mapped block; 4096-aligned.
        if untouched || unsafe { is_zero_raw(ptr, PAGE) } {
            let n = self.record_header(f, bi, page, flags::ZERO);
            f.put_u8(0);
            c.duplicate.fetch_add(1, Ordering::Relaxed);
            c.transferred.fetch_add(n + 1, Ordering::Relaxed);
            if self.xbzrle_enabled {
                if let Some(x) = &mut self.xbzrle {
                    x.cache.insert(addr, &[0u8; PAGE], generation);
                }
            }
            return true;
        }
        if self.xbzrle_enabled {
            // The next dirty page, if near, to fetch while this one is
            // encoded.
            let next = b.bitmap.find_next_near(page + 1).map(|q| (b.block.page_ptr(q), b.base + (q * PAGE) as u64));
            match self.try_xbzrle(ptr, addr, generation, next) {
                Xbz::Unchanged => {}
                Xbz::Encoded(len) => {
                    let n = self.record_header(f, bi, page, flags::XBZRLE);
                    let x = self.xbzrle.as_ref().expect("enabled implies a cache");
                    f.put_u8(flags::ENCODING_FLAG_XBZRLE);
                    f.put_be16(len as u16);
                    f.put_buffer(&x.enc[..len]);
                    c.xbzrle_pages.fetch_add(1, Ordering::Relaxed);
                    // As QEMU 7.2: the page's bytes less 8 of its header.
                    c.xbzrle_bytes.fetch_add(n - 8 + 3 + len as u64, Ordering::Relaxed);
                    c.transferred.fetch_add(n + 3 + len as u64, Ordering::Relaxed);
                }
                Xbz::Raw => {
                    // Not encoded: send the private copy taken for the attempt.
                    let n = self.record_header(f, bi, page, flags::PAGE);
                    let x = self.xbzrle.as_ref().expect("enabled implies a cache");
                    f.put_buffer(&x.page[..]);
                    c.normal.fetch_add(1, Ordering::Relaxed);
                    c.transferred.fetch_add(n + PAGE as u64, Ordering::Relaxed);
                }
            }
            return false;
        }
        let n = self.record_header(f, bi, page, flags::PAGE);
        // SAFETY: as above: a page inside the registered block.
        unsafe { f.put_guest(ptr, PAGE) };
        c.normal.fetch_add(1, Ordering::Relaxed);
        c.transferred.fetch_add(n + PAGE as u64, Ordering::Relaxed);
        false
    }

    /// Tries XBZRLE on a private copy of the page (left in the xbzrle
    /// buffer either way), keeping the cache up to date. `next` is the
    /// page likely to come next (its host address and RAM address),
    /// prefetched during the encode.
    fn try_xbzrle(&mut self, ptr: *mut u8, addr: u64, generation: u64, next: Option<(*mut u8, u64)>) -> Xbz {
        let last_stage = self.last_stage;
        let c = &*COUNTERS;
        let x = self.xbzrle.as_mut().expect("enabled implies a cache");
        // SAFETY: `ptr` is a page inside a registered block; the copy may
        // race with the guest, which the dirty log makes good.
        unsafe { std::ptr::copy_nonoverlapping(ptr, x.page.as_mut_ptr(), PAGE) };
        if !x.cache.is_cached(addr, generation) {
            c.xbzrle_cache_miss.fetch_add(1, Ordering::Relaxed);
            if !last_stage {
                x.cache.insert(addr, &x.page[..], generation);
            }
            return Xbz::Raw;
        }
        let ahead = next.map_or([std::ptr::null(); 2], |(p, a)| [p.cast_const(), x.cache.get(a).map_or(std::ptr::null(), <[u8]>::as_ptr)]);
        let old = x.cache.get(addr).expect("is_cached");
        match super::xbzrle::encode_prefetching(old, &x.page[..], &mut x.enc[..], ahead) {
            None => {
                c.xbzrle_overflow.fetch_add(1, Ordering::Relaxed);
                // As QEMU 7.2: an overflow counts a whole page into the
                // encoded bytes (the encoding rate then shows it).
                c.xbzrle_bytes.fetch_add(PAGE as u64, Ordering::Relaxed);
                if !last_stage {
                    x.cache.insert(addr, &x.page[..], generation);
                }
                Xbz::Raw
            }
            Some(0) => {
                c.skipped.fetch_add(1, Ordering::Relaxed);
                Xbz::Unchanged
            }
            Some(len) => {
                if !last_stage {
                    x.cache.insert(addr, &x.page[..], generation);
                }
                Xbz::Encoded(len)
            }
        }
    }

    /// One PART payload; true when no dirty page is left.
    pub fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        if let Some(e) = self.sync_error.take() {
            return Err(e);
        }
        if let Some(x) = &mut self.xbzrle {
            if let Some(new) = super::take_xbzrle_replacement(x.token) {
                x.cache.resize_into(new);
            }
        }
        let start = Instant::now();
        let mut done = false;
        let mut i = 0u32;
        // Time spent in runs of zero pages (a scan each, next to nothing on
        // the wire), so that the link's rate can be told from the rest.
        let mut zero_run: Option<Instant> = None;
        let mut zero_time = Duration::ZERO;
        while !f.rate_limit_exceeded() {
            let Some((bi, page)) = self.next_dirty() else {
                done = true;
                break;
            };
            let zero = self.save_page(f, bi, page);
            match (zero, zero_run) {
                (true, None) => zero_run = Some(Instant::now()),
                (false, Some(t)) => {
                    zero_time += t.elapsed();
                    zero_run = None;
                }
                _ => {}
            }
            i += 1;
            if i.is_multiple_of(64) {
                // What query-migrate reports as remaining, kept current.
                COUNTERS.remaining.store(self.dirty_pages * PAGE as u64, Ordering::Relaxed);
                if start.elapsed() > MAX_WAIT {
                    break;
                }
            }
        }
        if let Some(t) = zero_run {
            zero_time += t.elapsed();
        }
        COUNTERS.zero_scan_ns.fetch_add(zero_time.as_nanos() as u64, Ordering::Relaxed);
        let secs = self.sent_start.elapsed().as_secs_f64();
        if secs >= RATE_PERIOD.as_secs_f64() {
            COUNTERS.pages_per_second.store((self.rate_sent as f64 / secs) as u64, Ordering::Relaxed);
            (self.sent_start, self.rate_sent) = (Instant::now(), 0);
        }
        f.put_be64(flags::EOS);
        COUNTERS.transferred.fetch_add(8, Ordering::Relaxed);
        COUNTERS.remaining.store(self.dirty_pages * PAGE as u64, Ordering::Relaxed);
        f.check()?;
        Ok(done)
    }

    /// Dirty bytes left; syncs the dirty log first when they fit in
    /// `max_size` (also when both are 0, so a zero downtime limit keeps
    /// syncing rather than switching over on a momentarily clean bitmap).
    ///
    /// A failed sync may have lost the pages the host's log held (a host
    /// can consume its log and then fail, as KVM's GET_DIRTY_LOG does when
    /// it cannot copy the bitmap out): the error is kept for the next
    /// iterate (or complete) to fail the migration with, and all is
    /// reported pending, so that the migration iterates into that failure
    /// rather than stopping the VM for a switchover first.
    pub fn pending(&mut self, max_size: u64) -> u64 {
        if self.sync_error.is_some() {
            return u64::MAX;
        }
        let mut remaining = self.dirty_pages * PAGE as u64;
        if remaining <= max_size {
            if let Err(e) = self.sync() {
                log::error!("ram: dirty log sync failed: {e}");
                self.sync_error = Some(e);
                return u64::MAX;
            }
            remaining = self.dirty_pages * PAGE as u64;
        }
        let left = if self.rounds == 0 {
            let later: usize = self.blocks.iter().skip(self.cur_block + 1).map(BlockState::pages).sum();
            later + self.blocks.get(self.cur_block).map_or(0, |b| b.pages().saturating_sub(self.cur_page))
        } else {
            0
        };
        COUNTERS.first_round_left.store(left as u64, Ordering::Relaxed);
        remaining
    }

    /// The END payload: a last sync with the VM stopped, every dirty page, EOS.
    pub fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        if let Some(e) = self.sync_error.take() {
            return Err(e);
        }
        self.last_stage = true;
        self.sync()?;
        while let Some((bi, page)) = self.next_dirty() {
            self.save_page(f, bi, page);
            f.check()?;
        }
        f.put_be64(flags::EOS);
        COUNTERS.transferred.fetch_add(8, Ordering::Relaxed);
        COUNTERS.remaining.store(0, Ordering::Relaxed);
        f.check()
    }

    /// Stops the dirty log. The blocks stay sealed until the migration
    /// has ended ([`end_final_pass`](super::end_final_pass)).
    pub fn cleanup(&mut self) {
        if self.logging {
            if let Some(h) = &self.host {
                h.dirty_log_stop();
            }
            self.logging = false;
        }
    }
}

/// The handler registered as "ram": a [`Saver`] while migrating out, a
/// [`Loader`] while loading.
pub struct RamSection {
    saver: Option<Saver>,
    loader: Loader,
}

impl RamSection {
    /// A handler with nothing in progress.
    pub fn new() -> RamSection {
        RamSection { saver: None, loader: Loader::new() }
    }
}

impl Default for RamSection {
    fn default() -> Self {
        Self::new()
    }
}

impl SaveVmHandler for RamSection {
    fn is_live(&self) -> bool {
        true
    }

    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        let host = crate::host::get().ok();
        let mut s = Saver::new(super::blocks(), host)?;
        let r = s.setup(f);
        self.saver = Some(s);
        r
    }

    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        self.saver.as_mut().ok_or_else(|| MigError::new("ram: iterate before setup"))?.iterate(f)
    }

    fn pending(&mut self, max_size: u64) -> u64 {
        self.saver.as_mut().map_or(0, |s| s.pending(max_size))
    }

    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        self.saver.as_mut().ok_or_else(|| MigError::new("ram: complete before setup"))?.complete(f)
    }

    fn cleanup(&mut self) {
        if let Some(mut s) = self.saver.take() {
            s.cleanup();
        }
    }

    fn load_begin(&mut self) {
        self.loader = Loader::new();
    }

    fn load_end(&mut self) {
        // Drops what the load learnt, and the files it held open.
        self.loader = Loader::new();
    }

    fn load(&mut self, f: &mut QemuFile, version_id: u32, _kind: SectionKind) -> Result<()> {
        self.loader.load(f, version_id)
    }

    fn load_without_host_lock(&self) -> bool {
        true
    }

    fn guest_ram_may_have_changed(&mut self) {
        self.loader.guest_ram_may_have_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_file::Direction;
    use crate::transport::mem::MemChannel;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn map(len: usize, flags: i32, fd: i32) -> *mut u8 {
        // SAFETY: a fresh mapping, unmapped by the test.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    /// The tests here share the RAM counters (a migration's setup zeroes
    /// them): one at a time.
    static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

    fn present(p: *mut u8) -> bool {
        let e = super::super::backing::pagemap_entries(p as usize, 1, &mut None).expect("pagemap");
        e[0] & super::super::backing::PM_PRESENT != 0
    }

    /// A sync in the middle of the first round invalidates the probe of
    /// the chunk being sent: a fresh page the guest writes ahead of the
    /// walk, in that chunk, goes with its data, not as the zero it was.
    #[test]
    fn a_probe_does_not_outlive_its_sync() {
        let _g = SERIAL.lock();
        let len = 2 * 512 * PAGE;
        let src = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        // SAFETY: pages 0..8 lie inside the mapping.
        unsafe { std::ptr::write_bytes(src, 0x11, 8 * PAGE) };
        let block = Arc::new(RamBlock::for_test("ram", src, len as u64));
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        let mut s = Saver::new(vec![block.clone()], None).expect("saver");
        s.setup(&mut f).expect("setup");
        // Two data pages' worth, then stop: chunk 0 is probed, page 500 not
        // sent yet.
        f.set_rate_limit(2 * PAGE as u64);
        assert!(!s.iterate(&mut f).expect("iterate"), "stopped by the rate limit");
        assert!(s.blocks[0].bitmap.find_next(0).is_some_and(|p| p < 500));
        // SAFETY: inside the mapping.
        unsafe { *src.add(500 * PAGE + 3) = 0x22 };
        block.marks.lock().set_range(500, 1);
        s.pending(u64::MAX); // syncs
        f.set_rate_limit(0);
        let mut payloads = 2;
        while !s.iterate(&mut f).expect("iterate") {
            payloads += 1;
        }
        payloads += 1;
        s.complete(&mut f).expect("complete");
        s.cleanup();
        payloads += 1;
        f.flush().expect("flush");
        drop(f);
        let dst = Arc::new(RamBlock::for_test("ram", map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1), len as u64));
        let mut rf = QemuFile::new(Box::new(MemChannel::source(std::mem::take(&mut *out.lock()))), Direction::Read);
        let mut l = Loader::with_blocks(vec![dst.clone()]);
        for _ in 0..payloads {
            l.load(&mut rf, 4).expect("load");
        }
        // SAFETY: both mappings are `len` bytes, and nothing writes them now.
        let (a, b) = unsafe { (std::slice::from_raw_parts(src, len), std::slice::from_raw_parts(dst.host_ptr(), len)) };
        assert_eq!(a.iter().zip(b).position(|(x, y)| x != y), None, "first difference");
        assert_eq!(b[500 * PAGE + 3], 0x22);
        // SAFETY: the mappings made above, no longer used.
        unsafe {
            libc::munmap(src.cast(), len);
            libc::munmap(dst.host_ptr().cast(), len);
        }
    }

    /// Untouched memory (a sparse file's holes through a private mapping,
    /// fresh anonymous memory) goes as zero pages without being faulted
    /// in; data, private copies and touched pages go as they are; a hole
    /// page the guest writes after a pass goes again with its data. The
    /// destination ends with the source's bytes.
    #[test]
    fn untouched_memory_is_sent_unread() {
        let _g = SERIAL.lock();
        let len = 4 * 512 * PAGE; // 8 MiB: 4 probe chunks per block
        let dir = std::env::temp_dir().join(format!("livemig-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("ram.img");
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(len as u64).expect("truncate");
        file.write_all_at(&[0x11; 3 * PAGE], 700 * PAGE as u64).expect("data");
        file.write_all_at(&[0; PAGE], 900 * PAGE as u64).expect("written zeroes");
        let file = std::fs::File::open(&path).expect("reopen");
        let fsrc = map(len, libc::MAP_PRIVATE, file.as_raw_fd());
        let asrc = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        // SAFETY: every page touched lies inside the two mappings.
        unsafe {
            *fsrc.add(5 * PAGE + 1) = 0x22; // a private copy over a hole
            *fsrc.add(701 * PAGE + 2) = 0x33; // a private copy over data
            std::ptr::write_bytes(asrc.add(1500 * PAGE), 0x44, 2 * PAGE);
            *asrc.add(9 * PAGE) = 0; // touched, zero
        }
        let blocks = vec![Arc::new(RamBlock::for_test("file", fsrc, len as u64)), Arc::new(RamBlock::for_test("anon", asrc, len as u64))];
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        let mut s = Saver::new(blocks.clone(), None).expect("saver");
        s.setup(&mut f).expect("setup");
        let mut payloads = 1;
        let pass = |s: &mut Saver, f: &mut QemuFile| {
            let mut n = 1;
            while !s.iterate(f).expect("iterate") {
                n += 1;
            }
            n
        };
        payloads += pass(&mut s, &mut f);
        for p in [100, 101, 1000, 2047] {
            assert!(!present(fsrc.wrapping_add(p * PAGE)), "file page {p} was faulted in");
            assert!(!present(asrc.wrapping_add(p * PAGE)), "anonymous page {p} was faulted in");
        }
        // The guest writes a fresh page that went as zero, in the chunk
        // probed last (later rounds read what they send)...
        // SAFETY: inside the mapping.
        unsafe { *asrc.add(2040 * PAGE + 8) = 0x66 };
        blocks[1].marks.lock().set_range(2040, 1);
        assert_eq!(s.pending(u64::MAX), PAGE as u64, "the page written");
        payloads += pass(&mut s, &mut f);
        // ... and a hole page of the file.
        // SAFETY: inside the mapping.
        unsafe { *fsrc.add(100 * PAGE + 7) = 0x55 };
        blocks[0].marks.lock().set_range(100, 1);
        assert_eq!(s.pending(u64::MAX), PAGE as u64, "the page written");
        payloads += pass(&mut s, &mut f);
        s.complete(&mut f).expect("complete");
        s.cleanup();
        payloads += 1;
        f.flush().expect("flush");
        drop(f);

        let dst: Vec<_> = [
            ("file", map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)),
            ("anon", map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)),
        ]
        .into_iter()
        .map(|(name, p)| Arc::new(RamBlock::for_test(name, p, len as u64)))
        .collect();
        let stream = std::mem::take(&mut *out.lock());
        let mut rf = QemuFile::new(Box::new(MemChannel::source(stream)), Direction::Read);
        let mut l = Loader::with_blocks(dst.clone());
        for _ in 0..payloads {
            l.load(&mut rf, 4).expect("load");
        }
        for (src, dst) in blocks.iter().zip(&dst) {
            // SAFETY: both mappings are `len` bytes, and nothing writes them now.
            let (a, b) = unsafe { (std::slice::from_raw_parts(src.host_ptr(), len), std::slice::from_raw_parts(dst.host_ptr(), len)) };
            let diff = a.iter().zip(b).position(|(x, y)| x != y);
            assert_eq!(diff, None, "block {}: first difference", src.idstr);
        }
        // SAFETY: the spot checks lie inside the destination mappings.
        unsafe {
            assert_eq!(*dst[0].host_ptr().add(100 * PAGE + 7), 0x55);
            assert_eq!(*dst[0].host_ptr().add(701 * PAGE + 2), 0x33);
            assert_eq!(*dst[1].host_ptr().add(2040 * PAGE + 8), 0x66);
        }
        for b in blocks.iter().chain(&dst) {
            // SAFETY: the mappings made above, no longer used.
            unsafe { libc::munmap(b.host_ptr().cast(), len) };
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// As QEMU 7.2 (migration_update_rates): the cache miss rate of a
    /// period is its misses over the pages it sent, zero pages included
    /// and unchanged (skipped) pages not; a period that sent no page
    /// leaves the rates as they were.
    #[test]
    fn the_cache_miss_rate_is_over_the_pages_sent() {
        let _g = SERIAL.lock();
        let len = 8 * PAGE;
        let src = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        // Pages 0..4 data, 4..8 zero (touched, so read and found zero).
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::write_bytes(src, 0x11, 4 * PAGE);
            std::ptr::write_bytes(src.add(4 * PAGE), 0, 4 * PAGE);
        }
        let block = Arc::new(RamBlock::for_test("ram", src, len as u64));
        let (chan, _out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        let mut s = Saver::with_xbzrle(vec![block.clone()], None, true).expect("saver");
        s.setup(&mut f).expect("setup");
        let rates = || {
            let c = &*COUNTERS;
            let ld = |a: &std::sync::atomic::AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
            (ld(&c.xbzrle_cache_miss_rate), ld(&c.xbzrle_encoding_rate))
        };
        let pass = |s: &mut Saver, f: &mut QemuFile| while !s.iterate(f).expect("iterate") {};
        // The first round: no XBZRLE yet.
        pass(&mut s, &mut f);
        s.pending(u64::MAX); // syncs
        assert_eq!(rates(), (0.0, 0.0));
        // All 8 pages again: the 4 data pages miss the cache, the 4 zero
        // pages go as zero pages: 4 misses in 8 pages sent.
        block.marks.lock().set_range(0, 8);
        s.pending(u64::MAX);
        pass(&mut s, &mut f);
        s.pending(u64::MAX);
        assert_eq!(rates(), (0.5, 0.0), "4 misses over 8 pages sent");
        // Again, page 0 changed, 1..4 unchanged: 4 hits, 1 page encoded
        // and 3 skipped; the zero pages sent: no miss in 5 pages sent.
        block.marks.lock().set_range(0, 8);
        // SAFETY: inside the mapping.
        unsafe { *src.add(3) = 0x22 };
        s.pending(u64::MAX);
        pass(&mut s, &mut f);
        s.pending(u64::MAX);
        let (miss, enc) = rates();
        assert_eq!(miss, 0.0, "no miss over 5 pages sent");
        assert!(enc > 100.0, "4 pages for one short encoding: {enc}");
        // Only unchanged pages: all skipped, nothing sent; the rates stay.
        block.marks.lock().set_range(1, 3);
        s.pending(u64::MAX);
        pass(&mut s, &mut f);
        s.pending(u64::MAX);
        assert_eq!(rates(), (miss, enc), "a period that sent nothing");
        s.cleanup();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(src.cast(), len) };
    }
}
