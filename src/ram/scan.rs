//! Hot-path helpers for the RAM pass: zero-page detection and the dirty
//! bitmap.
//!
//! [`is_zero`] works on private copies of pages; [`is_zero_raw`] on guest
//! RAM that a running vCPU may be writing. [`DirtyBitmap`] holds one bit per
//! target page in the layout of Linux/KVM's dirty log (bit `i` of word `w` is
//! page `w * 64 + i`), so a host can OR its log straight into
//! [`DirtyBitmap::words_mut`].

/// Bytes checked per step of [`is_zero`]: a branch per 64 bytes, with the
/// eight word loads OR-ed together (the compiler vectorises this).
const CHUNK: usize = 64;

/// Whether every byte of `page` is zero. Stops at the first 64-byte chunk
/// that is not all zero.
pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(CHUNK);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for w in chunk.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Like [`is_zero`], over memory that another party (a running guest) may
/// write at the same time, read with volatile loads and never through a
/// Rust reference.
///
/// The answer describes some interleaving of the guest's writes and may be
/// stale by the time it is returned. That is acceptable for migration: a
/// page written after the dirty-log sync that preceded this check has its
/// dirty bit set again, so it is sent again in a later pass (and the final
/// pass runs with the guest stopped).
///
/// # Safety
///
/// `ptr` must be valid for reads of `len` bytes for the whole call (mapped,
/// and not unmapped or resized concurrently) and 8-byte aligned. Concurrent
/// writes by the guest are allowed; concurrent writes through a Rust
/// reference are not (there must be none to guest RAM).
pub unsafe fn is_zero_raw(ptr: *const u8, len: usize) -> bool {
    debug_assert!(ptr.cast::<u64>().is_aligned(), "is_zero_raw: pointer not 8-byte aligned");
    let words = len / 8;
    let wptr = ptr.cast::<u64>();
    let mut w = 0;
    while w + 8 <= words {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: w + k < words, so the 8 bytes at wptr + w + k lie
            // within the `len` bytes the caller guarantees readable, and are
            // 8-byte aligned because ptr is. The read is volatile because the
            // guest may write this memory concurrently: the memory is outside
            // the Rust abstract machine's view (like device memory), no
            // reference to it exists, and a torn or stale value only affects
            // this advisory answer (see the function docs).
            acc |= unsafe { core::ptr::read_volatile(wptr.add(w + k)) };
        }
        if acc != 0 {
            return false;
        }
        w += 8;
    }
    while w < words {
        // SAFETY: as above, w < words.
        if unsafe { core::ptr::read_volatile(wptr.add(w)) } != 0 {
            return false;
        }
        w += 1;
    }
    for i in words * 8..len {
        // SAFETY: i < len; bytes have no alignment requirement.
        if unsafe { core::ptr::read_volatile(ptr.add(i)) } != 0 {
            return false;
        }
    }
    true
}

const BITS: usize = 64;

/// One bit per page, in the Linux/KVM dirty-log layout: bit `i` (value
/// `1 << i`) of word `w` is page `w * 64 + i`. Bits past `pages` in the last
/// word are kept clear by this type and ignored if a host sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// A bitmap of `pages` bits, all clear.
    pub fn new(pages: usize) -> DirtyBitmap {
        DirtyBitmap { words: vec![0; pages.div_ceil(BITS)], pages }
    }

    /// A bitmap of `pages` bits, all clear, or None when its memory cannot
    /// be allocated (a length no host can have mapped).
    /// Like `new`, the memory is allocated zeroed, and not touched here.
    pub fn try_new(pages: usize) -> Option<DirtyBitmap> {
        Some(DirtyBitmap { words: super::try_zeroed_vec(pages.div_ceil(BITS))?, pages })
    }

    /// Number of pages (bits) covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    #[inline]
    fn check(&self, page: usize) {
        assert!(page < self.pages, "dirty bitmap: page {page} out of range ({} pages)", self.pages);
    }

    /// Mask of the valid bits of the last word.
    #[inline]
    fn last_mask(&self) -> u64 {
        match self.pages % BITS {
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }

    /// Marks `page` dirty. Panics if `page >= pages()`.
    #[inline]
    pub fn set(&mut self, page: usize) {
        self.check(page);
        self.words[page / BITS] |= 1 << (page % BITS);
    }

    /// Marks pages `first .. first + n` dirty, a word at a time. Panics if
    /// the range goes past `pages()`.
    pub fn set_range(&mut self, first: usize, n: usize) {
        let end = first.checked_add(n).filter(|&e| e <= self.pages);
        assert!(end.is_some(), "dirty bitmap: range {first}+{n} out of range ({} pages)", self.pages);
        let end = first + n;
        let mut p = first;
        while p < end {
            let bit = p % BITS;
            let take = (BITS - bit).min(end - p);
            let mask = if take == BITS { !0 } else { ((1u64 << take) - 1) << bit };
            self.words[p / BITS] |= mask;
            p += take;
        }
    }

    /// Whether `page` is dirty. Panics if `page >= pages()`.
    #[inline]
    pub fn test(&self, page: usize) -> bool {
        self.check(page);
        self.words[page / BITS] & (1 << (page % BITS)) != 0
    }

    /// Marks `page` clean. Panics if `page >= pages()`.
    #[inline]
    pub fn clear(&mut self, page: usize) {
        self.check(page);
        self.words[page / BITS] &= !(1 << (page % BITS));
    }

    /// Marks `page` clean and returns whether it was dirty. Panics if
    /// `page >= pages()`.
    #[inline]
    pub fn test_and_clear(&mut self, page: usize) -> bool {
        self.check(page);
        let word = &mut self.words[page / BITS];
        let bit = 1 << (page % BITS);
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        let Some((last, full)) = self.words.split_last() else {
            return 0;
        };
        let n: u32 = full.iter().map(|w| w.count_ones()).sum();
        (n + (last & self.last_mask()).count_ones()) as usize
    }

    /// The first dirty page at or after `from`, or `None`.
    pub fn find_next(&self, from: usize) -> Option<usize> {
        self.find_next_within(from, usize::MAX)
    }

    /// [`find_next`](Self::find_next), looking no further than the
    /// 64-page word after `from`'s: a peek that reads at most two words.
    pub fn find_next_near(&self, from: usize) -> Option<usize> {
        self.find_next_within(from, 2)
    }

    /// The first dirty page at or after `from` in the `words` bitmap words
    /// starting with `from`'s.
    fn find_next_within(&self, from: usize, words: usize) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let first = from / BITS;
        let mut word = self.words[first] & (!0u64 << (from % BITS));
        for w in first..first.saturating_add(words) {
            if w > first {
                word = *self.words.get(w)?;
            }
            if word != 0 {
                let page = w * BITS + word.trailing_zeros() as usize;
                // A host may have set bits past the end in the last word.
                return (page < self.pages).then_some(page);
            }
        }
        None
    }

    /// The raw words, for hosts that OR their dirty log in. Bits past
    /// `pages()` are ignored by [`count`](Self::count) and
    /// [`find_next`](Self::find_next).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// ORs `log`, words in this layout (a host's dirty log of the same
    /// pages), into the bitmap; bits past `pages()` are ignored, as are
    /// words past the bitmap's.
    pub fn or_words(&mut self, log: &[u64]) {
        for (d, s) in self.words.iter_mut().zip(log) {
            *d |= s;
        }
        let mask = self.last_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= mask;
        }
    }

    /// The raw words, read-only.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks every page dirty (bits past `pages()` stay clear).
    pub fn fill(&mut self) {
        self.words.fill(!0);
        let mask = self.last_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= mask;
        }
    }

    /// Marks every page clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        for len in [0usize, 1, 7, 8, 63, 64, 65, 100, 4096] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "len {len}");
            for pos in 0..len {
                buf[pos] = 0x80;
                assert!(!is_zero(&buf), "len {len} pos {pos}");
                buf[pos] = 0;
            }
        }
    }

    #[test]
    fn is_zero_raw_matches_is_zero() {
        // u64 storage for 8-byte alignment.
        let mut store = vec![0u64; 4096 / 8 + 1];
        for len in [0usize, 1, 9, 64, 72, 127, 4096, 4100] {
            for pos in std::iter::once(None).chain((0..len).step_by(7).map(Some)) {
                store.fill(0);
                if let Some(p) = pos {
                    store[p / 8] = 1u64 << (8 * (p % 8));
                }
                let bytes: Vec<u8> = store.iter().flat_map(|w| w.to_ne_bytes()).collect();
                // SAFETY: store holds 4104 readable, 8-byte aligned bytes
                // and len <= 4100.
                let raw = unsafe { is_zero_raw(store.as_ptr().cast(), len) };
                assert_eq!(raw, is_zero(&bytes[..len]), "len {len} pos {pos:?}");
                assert_eq!(raw, pos.is_none());
            }
        }
    }

    #[test]
    fn try_new_is_new_or_none() {
        assert_eq!(DirtyBitmap::try_new(0), Some(DirtyBitmap::new(0)));
        assert_eq!(DirtyBitmap::try_new(130), Some(DirtyBitmap::new(130)));
        // More than the address space can hold: refused, not an abort.
        assert_eq!(DirtyBitmap::try_new(usize::MAX / 2), None);
    }

    #[test]
    fn set_test_clear() {
        let mut b = DirtyBitmap::new(130);
        assert_eq!(b.words().len(), 3);
        assert_eq!(b.pages(), 130);
        for p in [0, 63, 64, 129] {
            assert!(!b.test(p));
            b.set(p);
            assert!(b.test(p));
        }
        assert_eq!(b.words(), &[1 | 1 << 63, 1, 2]);
        assert_eq!(b.count(), 4);
        b.clear(63);
        assert!(!b.test(63));
        assert!(b.test_and_clear(64));
        assert!(!b.test_and_clear(64));
        assert_eq!(b.count(), 2);
        b.clear_all();
        assert_eq!(b.count(), 0);
        assert_eq!(b.find_next(0), None);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_past_end_panics() {
        DirtyBitmap::new(65).set(65);
    }

    #[test]
    fn set_range_across_words() {
        let mut b = DirtyBitmap::new(200);
        b.set_range(60, 70);
        assert_eq!(b.count(), 70);
        assert!(!b.test(59) && b.test(60) && b.test(129) && !b.test(130));
        b.set_range(0, 0);
        b.set_range(200, 0);
        assert_eq!(b.count(), 70);
        b.set_range(64, 64); // exactly one whole word
        assert_eq!(b.words()[1], !0);
        b.set_range(0, 200);
        assert_eq!(b.count(), 200);
        assert_eq!(b.words()[3], (1 << 8) - 1);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_range_past_end_panics() {
        DirtyBitmap::new(100).set_range(90, 11);
    }

    #[test]
    fn find_next_across_words_and_last_partial_word() {
        let mut b = DirtyBitmap::new(150);
        for p in [3, 63, 64, 127, 149] {
            b.set(p);
        }
        let mut found = vec![];
        let mut from = 0;
        while let Some(p) = b.find_next(from) {
            found.push(p);
            from = p + 1;
        }
        assert_eq!(found, [3, 63, 64, 127, 149]);
        assert_eq!(b.find_next(65), Some(127));
        assert_eq!(b.find_next(128), Some(149));
        assert_eq!(b.find_next(150), None);
        assert_eq!(b.find_next(usize::MAX), None);
        b.clear(149);
        assert_eq!(b.find_next(128), None);
    }

    #[test]
    fn find_next_near_looks_one_word_ahead() {
        let mut b = DirtyBitmap::new(200);
        for p in [3, 70, 199] {
            b.set(p);
        }
        assert_eq!(b.find_next_near(0), Some(3));
        assert_eq!(b.find_next_near(4), Some(70)); // in the next word
        assert_eq!(b.find_next_near(71), None); // 199 is two words on
        assert_eq!(b.find_next(71), Some(199));
        assert_eq!(b.find_next_near(128), Some(199));
        assert_eq!(b.find_next_near(200), None);
        assert_eq!(b.find_next_near(usize::MAX), None);
        b.words_mut()[3] |= 1 << 10; // page 202: past the end
        b.clear(199);
        assert_eq!(b.find_next_near(150), None);
    }

    #[test]
    fn stray_host_bits_past_the_end_are_ignored() {
        let mut b = DirtyBitmap::new(70);
        b.words_mut()[1] |= 1 << 10; // page 74: past the end
        assert_eq!(b.count(), 0);
        assert_eq!(b.find_next(0), None);
        b.words_mut()[1] |= 1 << 5; // page 69: valid
        assert_eq!(b.count(), 1);
        assert_eq!(b.find_next(0), Some(69));
    }

    #[test]
    fn fill_keeps_bits_past_the_end_clear() {
        for pages in [0usize, 1, 63, 64, 65, 128, 130] {
            let mut b = DirtyBitmap::new(pages);
            b.fill();
            assert_eq!(b.count(), pages);
            let ones: u32 = b.words().iter().map(|w| w.count_ones()).sum();
            assert_eq!(ones as usize, pages);
            assert_eq!(b.find_next(0), (pages > 0).then_some(0));
            if pages > 0 {
                assert_eq!(b.find_next(pages - 1), Some(pages - 1));
            }
        }
    }

    #[test]
    fn or_words_keeps_what_was_dirty_and_drops_bits_past_the_end() {
        let mut b = DirtyBitmap::new(70);
        b.set(3);
        b.or_words(&[1 << 5, (1 << 5) | (1 << 10) | (1 << 63), 7]);
        assert_eq!(b.words(), &[(1 << 3) | (1 << 5), 1 << 5]);
        assert_eq!((b.count(), b.find_next(4), b.find_next(6)), (3, Some(5), Some(69)));
    }
}
