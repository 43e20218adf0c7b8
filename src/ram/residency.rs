//! What the destination knows about which guest pages are backed by memory
//! yet, so that loading RAM neither faults pages in one at a time nor
//! touches pages that need no write at all.
//!
//! * Before the first raw page lands in a 2 MiB chunk, the whole chunk is
//!   faulted in with one `MADV_POPULATE_WRITE` (unless mincore(2) says it
//!   already is: a prefaulted host pays nothing).
//! * A zero page needs no write when the guest page already reads as zero.
//!   Checking that by reading it would fault in every page of a fresh
//!   destination (and, for a file or a memfd, fill its page cache with
//!   zeroes); instead, pages that read as zero untouched (see
//!   `backing.rs`: untouched private anonymous memory, holes of a mapped
//!   file or memfd) are left alone. Other memory is checked by reading it,
//!   as before.
//!
//! Contract (the design's, restated): while an incoming migration loads
//! RAM, nothing but the loader writes guest RAM, so what was learnt about
//! a chunk stays true until the loader itself writes into it. A device's
//! load may write guest RAM (as a QEMU device's may): after each device
//! section, what was learnt is forgotten ([`Residency::forget_zero_pages`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::backing::{Backing, Bits, CHUNK_PAGES};
use super::{RamBlock, PAGE};

/// MADV_POPULATE_WRITE (Linux 5.14); off after the first refusal.
const MADV_POPULATE_WRITE: i32 = 23;
static POPULATE_OK: AtomicBool = AtomicBool::new(true);

/// Per incoming migration: what is known about the blocks' pages.
#[derive(Default)]
pub struct Residency {
    /// Per block (host address): which chunks were faulted in.
    populated: HashMap<usize, Vec<u64>>,
    /// Per block (host address): what backs it (files it maps are held
    /// open until the load ends).
    backing: HashMap<usize, Backing>,
    /// Per (block, chunk): pages known to read as zero untouched.
    absent: HashMap<(usize, usize), Bits>,
    /// The (block, chunk) the last raw page went to: pages arrive in
    /// runs, and the common case needs no lookup at all.
    last_written: Option<(usize, usize)>,
}

impl Residency {
    /// Called before a raw page is written at page `page` of `b`: faults in
    /// its chunk in one call the first time.
    pub fn before_write(&mut self, b: &RamBlock, page: usize) {
        let chunk = page / CHUNK_PAGES;
        let key = (b.host_ptr() as usize, chunk);
        if self.last_written == Some(key) {
            return;
        }
        self.last_written = Some(key);
        self.absent.remove(&key);
        if !POPULATE_OK.load(Ordering::Relaxed) {
            return;
        }
        let bits = self.populated.entry(b.host_ptr() as usize).or_insert_with(|| vec![0; b.pages() / CHUNK_PAGES / 64 + 1]);
        let (w, m) = (chunk / 64, 1u64 << (chunk % 64));
        if w >= bits.len() {
            bits.resize(w + 1, 0); // the block grew (resizable)
        }
        if bits[w] & m != 0 {
            return;
        }
        bits[w] |= m;
        let first = chunk * CHUNK_PAGES;
        let len = CHUNK_PAGES.min(b.pages() - first) * PAGE;
        let base = b.page_ptr(first);
        if resident(base, len) {
            return; // already faulted in (a prefaulted host): nothing to do
        }
        // SAFETY: the range lies inside the registered block; the advice only
        // faults pages in (their content is unchanged).
        let r = unsafe { libc::madvise(base.cast(), len, MADV_POPULATE_WRITE) };
        if r != 0 {
            log::debug!("MADV_POPULATE_WRITE unavailable ({}); faulting page by page", std::io::Error::last_os_error());
            POPULATE_OK.store(false, Ordering::Relaxed);
        }
    }

    /// Called after something other than a whole-chunk populate wrote page
    /// `page` of `b` (a filled zero page, an XBZRLE page).
    pub fn written(&mut self, b: &RamBlock, page: usize) {
        if let Some(bits) = self.absent.get_mut(&(b.host_ptr() as usize, page / CHUNK_PAGES)) {
            let i = page % CHUNK_PAGES;
            bits[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Forgets which pages were known to read as zero untouched: something
    /// other than the loader (a device's load) may have written them since.
    /// They are probed again when a zero page needs them.
    pub fn forget_zero_pages(&mut self) {
        self.absent.clear();
    }

    /// True when page `page` of `b` is known to read as zero without being
    /// touched (false means "unknown": read it to find out).
    pub fn reads_as_zero(&mut self, b: &RamBlock, page: usize) -> bool {
        let key = (b.host_ptr() as usize, page / CHUNK_PAGES);
        if self.last_written == Some(key) {
            return false; // being written: probe it again once the run moves on
        }
        let bits = match self.absent.get(&key) {
            Some(bits) => *bits,
            None => {
                let bits = self.probe(b, key.1).unwrap_or_default();
                self.absent.insert(key, bits);
                bits
            }
        };
        let i = page % CHUNK_PAGES;
        bits[i / 64] & (1 << (i % 64)) != 0
    }

    /// The pages of chunk `chunk` of `b` that read as zero untouched (None
    /// when nothing can be known).
    fn probe(&mut self, b: &RamBlock, chunk: usize) -> Option<Bits> {
        let host = b.host_ptr() as usize;
        let backing = self.backing.entry(host).or_insert_with(|| Backing::for_destination(host, b.length() as usize));
        if backing.is_unknown() {
            return None;
        }
        let first = chunk * CHUNK_PAGES;
        let n = CHUNK_PAGES.min(b.pages().checked_sub(first)?);
        // pagemap is opened per probe (one per 2 MiB).
        Some(backing.zero_bits(host + first * PAGE, n, &mut None))
    }
}

/// True when every page of `[base, base + len)` is resident, as far as
/// mincore(2) can tell (false when it cannot): a walk of the page tables,
/// much cheaper than asking the kernel to fault in what is already there.
fn resident(base: *mut u8, len: usize) -> bool {
    let mut vec = [0u8; CHUNK_PAGES];
    let pages = len.div_ceil(PAGE);
    if pages > vec.len() || !(base as usize).is_multiple_of(PAGE) {
        return false;
    }
    // SAFETY: `vec` has room for one byte per page of the range; mincore
    // only reads the page tables of our own mapping.
    let r = unsafe { libc::mincore(base.cast(), len, vec.as_mut_ptr()) };
    r == 0 && vec[..pages].iter().all(|v| v & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh anonymous mapping: untouched pages read as zero, touched
    /// ones are "unknown" until the loader is told it wrote them.
    #[test]
    fn untouched_anonymous_pages_read_as_zero() {
        let len = 2 * CHUNK_PAGES * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: page 3 lies inside the mapping.
        unsafe { *p.cast::<u8>().add(3 * PAGE) = 1 };
        let b = RamBlock::for_test("pm", p.cast(), len as u64);
        let mut r = Residency::default();
        assert!(r.reads_as_zero(&b, 0));
        assert!(!r.reads_as_zero(&b, 3), "a touched page is not known to be zero");
        assert!(r.reads_as_zero(&b, CHUNK_PAGES + 7));
        r.written(&b, 0);
        assert!(!r.reads_as_zero(&b, 0), "written pages are no longer assumed zero");
        // SAFETY: page CHUNK_PAGES + 7 lies inside the mapping.
        unsafe { *p.cast::<u8>().add((CHUNK_PAGES + 7) * PAGE) = 1 };
        r.before_write(&b, CHUNK_PAGES);
        assert!(!r.reads_as_zero(&b, CHUNK_PAGES + 7), "a populated chunk is probed again");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
    }
}
