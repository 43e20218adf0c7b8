//! The XBZRLE page cache, modelled on QEMU's `migration/page_cache.c`.
//!
//! The source keeps, for some pages, a copy of the content last sent to the
//! destination; XBZRLE encodes a page as a delta against that copy. The
//! cache is direct-mapped: page address `addr` lives in slot
//! `(addr / 4096) % num_pages`, and `num_pages` is a power of two.
//!
//! Each slot records the address it holds and an *age*: the dirty-sync
//! generation (QEMU's `dirty_sync_count`) at which it was last inserted or
//! hit. The replacement rule is QEMU's `cache_insert`:
//!
//! * a slot that is empty, or already holds `addr`, is always (re)written;
//! * a slot holding another page is replaced only when that page is at least
//!   `CACHED_PAGE_LIFETIME` (2) generations old, i.e. when
//!   `age + 2 <= generation`. A page inserted or hit in the current or the
//!   previous generation is "fresh" and is kept; the insert is refused.
//!
//! The cache belongs to the migration thread (QEMU guards it with
//! `XBZRLE.lock` only because QMP can resize it from the main thread).
//!
//! Memory: one buffer of `num_pages * 4096` bytes and one 16-byte header per
//! slot, allocated when the cache is created; there is no per-page
//! allocation. Allocation failure is reported as an error, not an abort.

use super::xbzrle::PAGE_SIZE;

/// A page inserted or hit within this many generations is not evicted
/// (QEMU's `CACHED_PAGE_LIFETIME`).
const CACHED_PAGE_LIFETIME: u64 = 2;

/// Address of an empty slot (QEMU's `it_addr = -1`); page-aligned addresses
/// never take this value.
const EMPTY: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Item {
    addr: u64,
    age: u64,
}

/// Direct-mapped cache of page contents keyed by page address.
pub struct PageCache {
    items: Vec<Item>,
    /// `items.len() * PAGE_SIZE` bytes; slot `k` is at `k * PAGE_SIZE`.
    data: Vec<u8>,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("num_pages", &self.items.len())
            .field("used", &self.items.iter().filter(|it| it.addr != EMPTY).count())
            .finish()
    }
}

/// Number of slots for a cache of `size_bytes`: pages rounded down to a
/// power of two.
fn slots_for(size_bytes: u64) -> Result<usize, String> {
    let page = PAGE_SIZE as u64;
    if size_bytes < page {
        return Err(format!("xbzrle cache size {size_bytes} is smaller than one page ({PAGE_SIZE})"));
    }
    let pages = size_bytes / page;
    let pages = 1u64 << (63 - pages.leading_zeros());
    usize::try_from(pages)
        .ok()
        .filter(|&p| p.checked_mul(PAGE_SIZE).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| format!("xbzrle cache size {size_bytes} exceeds the address space"))
}

impl PageCache {
    /// Creates an empty cache of `cache_size_bytes`, rounded down to a
    /// power-of-two number of 4096-byte pages.
    ///
    /// The size parameter is a power of two (`set_cache_size` refuses
    /// others, as QEMU 7.2 does); the rounding only guards this type.
    pub fn new(cache_size_bytes: u64) -> Result<PageCache, String> {
        let slots = slots_for(cache_size_bytes)?;
        let alloc_err = || format!("cannot allocate an xbzrle cache of {cache_size_bytes} bytes");
        // The pages first: a size the host cannot back fails here, before
        // the slot table (a 16th of it) is filled for nothing.
        // Zeroed by the allocator, not by a pass over it: a large cache is
        // fresh zero pages from the kernel, touched only as slots fill (a
        // pass over 64 MiB took about 70 ms of the migration's setup).
        let data = super::try_zeroed_vec(slots * PAGE_SIZE).ok_or_else(alloc_err)?;
        let mut items = Vec::new();
        items.try_reserve_exact(slots).map_err(|_| alloc_err())?;
        items.resize(slots, Item { addr: EMPTY, age: 0 });
        log::debug!(target: "livemig::ram", "xbzrle cache: {slots} pages");
        Ok(PageCache { items, data })
    }

    /// Number of page slots (a power of two).
    pub fn num_pages(&self) -> usize {
        self.items.len()
    }

    /// Capacity in bytes: `num_pages() * 4096`.
    pub fn size_bytes(&self) -> u64 {
        self.items.len() as u64 * PAGE_SIZE as u64
    }

    #[inline]
    fn slot(&self, addr: u64) -> usize {
        // num_pages is a power of two, so the modulo is a mask.
        ((addr / PAGE_SIZE as u64) & (self.items.len() as u64 - 1)) as usize
    }

    /// Whether the cache holds the page at `addr`. On a hit the entry's age
    /// is set to `generation`, which protects it from eviction for two more
    /// generations (QEMU's `cache_is_cached`).
    pub fn is_cached(&mut self, addr: u64, generation: u64) -> bool {
        let k = self.slot(addr);
        let it = &mut self.items[k];
        if it.addr == addr {
            it.age = generation;
            true
        } else {
            false
        }
    }

    /// The cached content of the page at `addr`, if the cache holds it.
    ///
    /// (QEMU's `get_cached_data` returns whatever its slot holds; this
    /// checks the address, so it never returns another page's data.)
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        let k = self.slot(addr);
        (self.items[k].addr == addr).then(|| &self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
    }

    /// Mutable access to the cached content of `addr`, if held; used to
    /// record what was actually sent after an XBZRLE encode.
    pub fn get_mut(&mut self, addr: u64) -> Option<&mut [u8]> {
        let k = self.slot(addr);
        if self.items[k].addr == addr {
            Some(&mut self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
        } else {
            None
        }
    }

    /// Stores a copy of `data` for `addr` with age `generation`, following
    /// QEMU's `cache_insert`. Returns `false`, storing nothing, when the slot
    /// holds a different page that is still fresh (`age + 2 > generation`);
    /// the caller then sends the page raw, as QEMU does.
    ///
    /// # Panics
    ///
    /// If `data` is not exactly one page (4096 bytes).
    pub fn insert(&mut self, addr: u64, data: &[u8], generation: u64) -> bool {
        assert_eq!(data.len(), PAGE_SIZE, "page cache insert: data is not one page");
        let k = self.slot(addr);
        let it = &mut self.items[k];
        if it.addr != EMPTY && it.addr != addr && it.age.saturating_add(CACHED_PAGE_LIFETIME) > generation {
            log::trace!(target: "livemig::ram", "xbzrle cache: {addr:#x} not cached, slot fresh");
            return false;
        }
        it.addr = addr;
        it.age = generation;
        self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].copy_from_slice(data);
        true
    }

    /// Changes the capacity to `new_size_bytes` (rounded down to a power of
    /// two pages like [`PageCache::new`]), keeping the cached pages that
    /// still fit.
    ///
    /// When several pages fall into one new slot, the most recently used
    /// (highest age) is kept; on a tie, the one met first (lowest old slot).
    /// This is the rule of QEMU's `cache_resize` before 2.11. QEMU 7.2's
    /// `xbzrle_cache_resize` instead drops every entry; keeping them is safe
    /// because each entry still equals what the destination was last sent.
    /// A resize to the same number of pages changes nothing. On error the
    /// cache is left as it was.
    pub fn resize(&mut self, new_size_bytes: u64) -> Result<(), String> {
        if slots_for(new_size_bytes)? == self.items.len() {
            return Ok(());
        }
        self.resize_into(PageCache::new(new_size_bytes)?);
        Ok(())
    }

    /// Becomes `new` (an empty cache), keeping the cached pages that fit
    /// as [`resize`](Self::resize) keeps them.
    pub fn resize_into(&mut self, mut new: PageCache) {
        for (k, old) in self.items.iter().enumerate() {
            if old.addr == EMPTY {
                continue;
            }
            let n = new.slot(old.addr);
            let cur = new.items[n];
            if cur.addr != EMPTY && cur.age >= old.age {
                continue;
            }
            new.items[n] = *old;
            new.data[n * PAGE_SIZE..(n + 1) * PAGE_SIZE].copy_from_slice(&self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        }
        *self = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    }

    fn peak_resident_bytes() -> u64 {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
        ru.ru_maxrss as u64 * 1024
    }

    #[test]
    fn a_cache_too_large_to_back_fails_before_filling_its_slot_table() {
        let before = peak_resident_bytes();
        // 1 TiB: its slot table alone would be 4 GiB.
        let Err(e) = PageCache::new(1 << 40) else { panic!("a 1 TiB cache on this host") };
        assert_eq!(e, "cannot allocate an xbzrle cache of 1099511627776 bytes");
        let grown = peak_resident_bytes().saturating_sub(before);
        assert!(grown < 1 << 30, "the failed setup touched {grown} bytes");
    }

    #[test]
    fn a_new_cache_is_not_touched() {
        let before = resident_bytes();
        let c = PageCache::new(256 << 20).unwrap();
        let grown = resident_bytes().saturating_sub(before);
        assert!(grown < 32 << 20, "a 256 MiB cache made {grown} bytes resident");
        assert!(c.data.iter().step_by(4096).all(|&b| b == 0));
    }

    const P: u64 = PAGE_SIZE as u64;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    #[test]
    fn sizes_round_down_to_power_of_two_pages() {
        for (bytes, pages) in [(P, 1), (P + 1, 1), (3 * P, 2), (4 * P, 4), (7 * P + 4095, 4), (64 << 20, 16384)] {
            let c = PageCache::new(bytes).unwrap();
            assert_eq!(c.num_pages(), pages, "{bytes} bytes");
            assert_eq!(c.size_bytes(), pages as u64 * P);
        }
    }

    #[test]
    fn too_small_is_an_error() {
        let err = PageCache::new(1000).unwrap_err();
        assert_eq!(err, "xbzrle cache size 1000 is smaller than one page (4096)");
        assert!(PageCache::new(0).is_err());
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(c.resize(4095).is_err());
        assert_eq!(c.num_pages(), 4);
    }

    #[test]
    fn absurd_size_is_an_error_not_an_abort() {
        let err = PageCache::new(u64::MAX).unwrap_err();
        assert!(err.starts_with("xbzrle cache size 18446744073709551615"), "{err}");
    }

    #[test]
    fn insert_and_lookup() {
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(!c.is_cached(0x1000, 1));
        assert!(c.get(0x1000).is_none());
        assert!(c.insert(0x1000, &page(0xab), 1));
        assert!(c.is_cached(0x1000, 1));
        assert_eq!(c.get(0x1000).unwrap(), &page(0xab)[..]);
        // Same slot, other address: not a hit, no data.
        assert!(!c.is_cached(0x1000 + 4 * P, 1));
        assert!(c.get(0x1000 + 4 * P).is_none());
        // Re-inserting the same page always works.
        assert!(c.insert(0x1000, &page(0xcd), 1));
        assert_eq!(c.get(0x1000).unwrap()[0], 0xcd);
        c.get_mut(0x1000).unwrap()[5] = 1;
        assert_eq!(c.get(0x1000).unwrap()[5], 1);
        assert!(c.get_mut(0x2000).is_none());
    }

    #[test]
    fn eviction_follows_qemu_lifetime_rule() {
        let mut c = PageCache::new(4 * P).unwrap();
        let a = 0x1000;
        let b = a + 4 * P; // collides with a
        assert!(c.insert(a, &page(1), 5));
        // a is fresh in generations 5 and 6 (5 + 2 > g).
        assert!(!c.insert(b, &page(2), 5));
        assert!(!c.insert(b, &page(2), 6));
        assert!(c.is_cached(a, 6)); // a hit refreshes the age to 6
        assert!(!c.insert(b, &page(2), 7));
        assert!(c.insert(b, &page(2), 8)); // 6 + 2 <= 8: evicted
        assert!(!c.is_cached(a, 8));
        assert!(c.is_cached(b, 8));
        assert_eq!(c.get(b).unwrap()[0], 2);
        // An empty slot is filled whatever the generation.
        assert!(c.insert(0, &page(3), 0));
    }

    #[test]
    fn resize_smaller_keeps_most_recent_of_colliding_pages() {
        let mut c = PageCache::new(8 * P).unwrap();
        for k in 0..8u64 {
            assert!(c.insert(k * P, &page(k as u8), 10 + (k % 3)));
        }
        c.resize(2 * P).unwrap();
        assert_eq!(c.num_pages(), 2);
        // Slot 0 candidates: pages 0,2,4,6 with ages 10,12,11,10 -> page 2.
        // Slot 1 candidates: pages 1,3,5,7 with ages 11,10,12,11 -> page 5.
        assert_eq!(c.get(2 * P).unwrap()[0], 2);
        assert_eq!(c.get(5 * P).unwrap()[0], 5);
        for k in [0u64, 1, 3, 4, 6, 7] {
            assert!(c.get(k * P).is_none(), "page {k}");
        }
    }

    #[test]
    fn resize_larger_keeps_everything_and_ages() {
        let mut c = PageCache::new(2 * P).unwrap();
        assert!(c.insert(0, &page(7), 3));
        assert!(c.insert(5 * P, &page(8), 4));
        c.resize(16 * P + 100).unwrap();
        assert_eq!(c.num_pages(), 16);
        assert_eq!(c.get(0).unwrap()[0], 7);
        assert_eq!(c.get(5 * P).unwrap()[0], 8);
        // The age survived: page 5 is still fresh at generation 5.
        assert!(!c.insert(21 * P, &page(9), 5));
        assert!(c.insert(21 * P, &page(9), 6));
        // Same number of pages: nothing changes.
        c.resize(16 * P + 4000).unwrap();
        assert_eq!(c.get(0).unwrap()[0], 7);
    }

    #[test]
    #[should_panic(expected = "not one page")]
    fn insert_wrong_length_panics() {
        PageCache::new(P).unwrap().insert(0, &[0u8; 10], 0);
    }
}
