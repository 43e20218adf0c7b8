//! The AVX2 encoder.
//!
//! The portable encoder loses much of its time to branch mispredictions:
//! how many runs a 64-byte block holds, and whether one continues into the
//! next, is random. This one handles the page in passes whose branches
//! are predictable, a chunk of 4096 bytes at a time (a 4 KiB page is one
//! chunk):
//!
//! 1. Compare the blocks (two 32-byte VPCMPEQB + VPMOVMSKB each) and keep
//!    each block's transition mask `t` (bit j set where "byte j differs"
//!    changes; see `encode_portable`). Then prefetch the next chunk, if
//!    any, as the passes below touch no uncached memory and would
//!    otherwise leave the memory idle.
//! 2. List the page offsets of all set bits of the chunk's masks in
//!    `pos`, so that it alternates run start, run end, start, ...: with a
//!    table lookup per mask byte, or, in chunks with few changes, with
//!    TZCNT. `pos[0]` holds the end of the previous nzrun; a run still
//!    open at the end of a chunk is carried to the next. Meanwhile, a
//!    cache line per block of the caller's next pages is prefetched
//!    (`encode_prefetching`), so that memory works while the encoder
//!    computes.
//! 3. Write the pairs a group of 8 at a time, from the zrun and nzrun
//!    lengths computed in vector registers (differences of neighbouring
//!    `pos` entries). A group of 8 short pairs (zrun below 128, 1 or 2
//!    changed bytes: at 10 % of bytes changed, 9 groups in 10) is written
//!    at once, in two 16-byte stores (see `put_short_group`).
//! 4. Any other group takes the general path. Its pairs' uleb headers (2
//!    or 3 bytes), encoded sizes, and whether each needs the checked path
//!    (nzrun longer than 16, or starting less than 16 bytes before the end
//!    of the page) are computed in vector registers too (`headers`). Then
//!    a pair is a single 8-byte store: its header ORed into the new bytes
//!    shifted up by the header length (bytes past the pair are
//!    overwritten by the next one or are scratch), plus a 16-byte store
//!    when the pair is longer than 8 bytes. A group of 8 goes without
//!    per-pair checks when the output has room for 8 pairs of the largest
//!    size; otherwise each pair is checked, and pairs that may not fit
//!    take `put_pair_slow`, whose checks are QEMU's.
//!
//! On CPUs with AVX-512 BW and VBMI2, `encode::<true>` runs passes 1 and
//! 2 with `avx512.rs` (a mask per block from one compare; boundaries
//! listed with VPCOMPRESSW); passes 3 and 4 are the same. That makes the
//! whole encode about 1.5 times as fast at 10 % of bytes changed.

use super::{put_pair_slow, BLOCK};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Whether this CPU has the features [`encode`] is compiled for.
pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("popcnt")
}

/// Bytes of the page handled per round of passes: a whole 4 KiB
/// page at once (longer pages take several rounds).
const CHUNK: usize = 4096;
const BLOCKS: usize = CHUNK / BLOCK;
/// Entries of `pos`: the previous run end, a run carried over from the
/// previous chunk, at most one boundary per byte of the chunk plus the
/// page end, and 16 padding entries that the pair writer may read.
const POS_CAP: usize = 1 + 1 + CHUNK + 1 + 16;
/// Largest size of a pair the fast path writes (3-byte header, 16
/// bytes of data), and thus the room it needs.
const PAIR_MAX: usize = 19;

/// The boundaries of a chunk's runs: the previous run end, then run
/// starts and ends, alternating. Left uninitialised (zeroing it would
/// cost about as much as encoding a sparse page); every entry is
/// written before it is read: `pos[0]` before the first chunk; the
/// listing writes `pos[1..1 + n]` for the `n` boundaries of the chunk
/// (and some entries past them); 16 padding entries then follow, so
/// that the pair writer, which reads `pos[16 g..16 g + 17]` for every
/// group `g` of 8 pairs started, reads only written entries.
type Positions = [MaybeUninit<u16>; POS_CAP];

/// The general path's per-pair figures for one group of 8 pairs (`headers`).
struct Group {
    /// Header bytes of each pair (zrun uleb, then nzrun length).
    hdr: [u32; 8],
    /// Per pair: byte 0 is 8 times the header length; byte 1 the
    /// encoded size of the pair.
    meta: [u32; 8],
    /// Per pair: page offset of the changed bytes.
    start: [u32; 8],
    /// Bit j set if pair j needs the checked path.
    bad: u8,
}

/// A group of 8 pairs, one per 32-bit lane: the length of its zrun
/// and of its nzrun, and the page offset where the nzrun starts.
#[derive(Clone, Copy)]
struct GroupRuns {
    zrun: __m256i,
    nzrun: __m256i,
    start: __m256i,
}

impl GroupRuns {
    /// The group whose previous run end, then starts and ends, are
    /// `p[0..17]`.
    ///
    /// # Safety
    ///
    /// `p[0..17]` must be readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn at(p: *const u16) -> GroupRuns {
        let low16 = _mm256_set1_epi32(0xffff);
        // 32-bit lane j: start | end << 16 of pair j, and previous end
        // | start << 16; their difference is zrun | nzrun << 16.
        // SAFETY: p[0..17] is readable (our caller's promise).
        let (runs, prev) = unsafe { (_mm256_loadu_si256(p.add(1).cast()), _mm256_loadu_si256(p.cast())) };
        let lengths = _mm256_sub_epi16(runs, prev);
        GroupRuns { zrun: _mm256_and_si256(lengths, low16), nzrun: _mm256_srli_epi32(lengths, 16), start: _mm256_and_si256(runs, low16) }
    }
}

/// Entry `b`: the positions of the set bits of `b`, ascending, then
/// zeros.
static BIT_POSITIONS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut k, mut j) = (0, 0);
        while j < 8 {
            if b & (1 << j) != 0 {
                table[b][k] = j as u8;
                k += 1;
            }
            j += 1;
        }
        b += 1;
    }
    table
};

/// [`super::encode_prefetching`] for CPUs with AVX2, BMI1, BMI2 and
/// POPCNT; with `WIDE`, passes 1 and 2 are `avx512::transitions` and
/// `avx512::list_blocks`.
///
/// # Safety
///
/// The CPU must support those features (see [`supported`]), and, with
/// `WIDE`, those of `avx512::supported`; `old` and `new` must have the
/// same length, at most 16383.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
pub(super) unsafe fn encode<const WIDE: bool>(old: &[u8], new: &[u8], dst: &mut [u8], next: [*const u8; 2]) -> Option<usize> {
    let len = old.len();
    debug_assert!(len == new.len() && len <= super::ULEB_SMALL_MAX as usize);
    if len == 0 {
        return Some(0);
    }
    // The first output lines are likely not cached (the caller's
    // buffer): start fetching them while the first chunk is compared.
    for off in (0..dst.len().min(512)).step_by(64) {
        // SAFETY: off < dst.len(); a prefetch has no effect beyond the
        // cache.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(dst.as_ptr().add(off).cast()) };
    }
    // What pass 2 prefetches, a line per block: the caller's next pages,
    // or else this page (cached by pass 1, so next to free).
    let ahead = next.map(|p| if p.is_null() { new.as_ptr() } else { p });
    let mut positions: Positions = [MaybeUninit::uninit(); POS_CAP];
    let pos = positions.as_mut_ptr().cast::<u16>();
    // SAFETY: pos has POS_CAP > 0 entries.
    unsafe { pos.write(0) }; // no nzrun yet: zruns count from 0
    let (mut d, mut n) = (0, 0); // bytes written; boundaries in pos[1..]
    let mut carry = 0; // does the previous block end with a changed byte
    for base in (0..len).step_by(CHUNK) {
        let clen = CHUNK.min(len - base);
        let (old_c, new_c) = (&old[base..base + clen], &new[base..base + clen]);
        // Pass 1: transition masks.
        let mut tmask = [0u64; BLOCKS];
        let mut count = 0;
        let (blocks_o, blocks_n) = (old_c.chunks_exact(BLOCK), new_c.chunks_exact(BLOCK));
        let (rest_o, rest_n) = (blocks_o.remainder(), blocks_n.remainder());
        let full = clen / BLOCK;
        if WIDE {
            // SAFETY: the CPU has avx512::supported()'s features (our
            // caller's promise).
            count = unsafe { super::avx512::transitions(old_c, new_c, &mut carry, &mut tmask) };
        } else {
            for ((o, nw), t) in blocks_o.zip(blocks_n).zip(tmask.iter_mut()) {
                let m = diff_mask64(o.try_into().unwrap(), nw.try_into().unwrap());
                *t = m ^ ((m << 1) | carry);
                carry = m >> 63;
                count += t.count_ones() as usize;
            }
        }
        // Start fetching the next chunk now: the passes below touch no
        // uncached memory, so the hardware prefetcher would not run
        // ahead, and pass 1 of the next chunk would wait for memory.
        for off in (base + CHUNK..len.min(base + 2 * CHUNK)).step_by(64) {
            // SAFETY: off < len; a prefetch has no effect beyond the cache.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(old.as_ptr().add(off).cast());
                _mm_prefetch::<_MM_HINT_T0>(new.as_ptr().add(off).cast());
            }
        }
        // Pass 2: boundaries. Each list_* call writes below
        // pos[1 + n + 64] (n <= 1 + 64 k before block k), so below
        // POS_CAP - 17.
        if WIDE {
            // SAFETY: the CPU has avx512::supported()'s features (our
            // caller's promise); offsets stay below len <= 16383; the
            // bound is the one above.
            n = unsafe { super::avx512::list_blocks(pos.add(1 + n), n, base, &tmask[..full], &ahead) };
        } else if count <= 2 * full {
            for (k, &t) in tmask[..full].iter().enumerate() {
                prefetch_line(&ahead, base + k * BLOCK);
                // SAFETY: see above.
                n = unsafe { list_sparse(pos.add(1 + n), n, base + k * BLOCK, t) };
            }
        } else {
            for (k, t) in tmask[..full].iter().enumerate() {
                prefetch_line(&ahead, base + k * BLOCK);
                // SAFETY: see above.
                n = unsafe { list_dense(pos.add(1 + n), n, base + k * BLOCK, t) };
            }
        }
        if !rest_o.is_empty() {
            // Last, partial block: pad both with the same bytes. Its
            // mask has no bits past the page, so a run that reaches the
            // end of the page ends at `len` (the bit past the data).
            let (mut o, mut nw) = ([0u8; BLOCK], [0u8; BLOCK]);
            o[..rest_o.len()].copy_from_slice(rest_o);
            nw[..rest_n.len()].copy_from_slice(rest_n);
            let m = diff_mask64(&o, &nw);
            let t = m ^ ((m << 1) | carry);
            carry = 0;
            // SAFETY: as above (this is block number `full` < BLOCKS).
            n = unsafe { list_sparse(pos.add(1 + n), n, base + full * BLOCK, t) };
        } else if n % 2 == 1 && base + clen == len {
            // A run still open at the end of the page ends there.
            // SAFETY: 1 + n <= 2 + CHUNK < POS_CAP.
            unsafe { pos.add(1 + n).write(len as u16) };
            n += 1;
        }
        // SAFETY: 1 + n + 16 <= POS_CAP; the padding the pair writer
        // may read (its value does not matter).
        unsafe { _mm256_storeu_si256(pos.add(1 + n).cast(), _mm256_setzero_si256()) };
        let pairs = n / 2;
        // Passes 3 and 4.
        // SAFETY: pos[..1 + n + 16] is written, pairs = n / 2.
        d = unsafe { put_pairs(pos, pairs, dst, d, new) }?;
        // The end of the last nzrun, and a run still open, move to the
        // front.
        // SAFETY: pos[2 pairs] and, if n is odd, pos[n] = pos[2 pairs
        // + 1] are written entries.
        unsafe {
            pos.write(pos.add(2 * pairs).read());
            if n % 2 == 1 {
                pos.add(1).write(pos.add(n).read());
            }
        }
        n %= 2;
    }
    // SAFETY: pos[0] is written.
    let zrun_start = usize::from(unsafe { pos.read() });
    if zrun_start < len && d + 2 > dst.len() {
        // QEMU's check before the (unwritten) trailing zrun; for an
        // unchanged page, its check before the first pair.
        return None;
    }
    Some(d)
}

/// Starts fetching the cache line at offset `off` of each of `ahead`.
#[inline(always)]
pub(super) fn prefetch_line(ahead: &[*const u8; 2], off: usize) {
    for p in ahead {
        // SAFETY: a prefetch never faults and has no effect beyond the
        // cache; `wrapping_add` makes the address without claiming it is
        // in bounds of anything.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
    }
}

/// Bit j of the result is set iff `o[j] != n[j]`.
#[target_feature(enable = "avx2")]
#[inline]
fn diff_mask64(o: &[u8; BLOCK], n: &[u8; BLOCK]) -> u64 {
    let (o, n) = (o.as_ptr().cast::<__m256i>(), n.as_ptr().cast::<__m256i>());
    // SAFETY: o and n point to 64 readable bytes: two 32-byte vectors
    // each; loadu has no alignment requirement.
    let (o0, o1, n0, n1) =
        unsafe { (_mm256_loadu_si256(o), _mm256_loadu_si256(o.add(1)), _mm256_loadu_si256(n), _mm256_loadu_si256(n.add(1))) };
    let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(o0, n0)) as u32 as u64;
    let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(o1, n1)) as u32 as u64;
    !(lo | hi << 32)
}

/// Writes `base + j` for each set bit j of `t`, ascending, to `p[0..]`
/// and returns `n` plus their count. Uses TZCNT; suits masks with few
/// bits.
///
/// # Safety
///
/// `p` must be valid for writing `max(4, t.count_ones())` entries.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
unsafe fn list_sparse(p: *mut u16, n: usize, base: usize, mut t: u64) -> usize {
    let count = t.count_ones() as usize;
    // Page offsets are below 16384.
    let base = base as u16;
    // Four unconditionally (extra ones are overwritten later or
    // ignored), so that the common case has no data-dependent branch.
    // The volatile stores keep LLVM from gathering the values into a
    // vector register first, which is slower.
    for i in 0..4 {
        // SAFETY: i < 4, within the caller's bound.
        unsafe { p.add(i).write_volatile(base + t.trailing_zeros() as u16) };
        t &= t.wrapping_sub(1);
    }
    let mut i = 4;
    while t != 0 {
        // SAFETY: i < count, within the caller's bound.
        unsafe { p.add(i).write(base + t.trailing_zeros() as u16) };
        t &= t.wrapping_sub(1);
        i += 1;
    }
    n + count
}

/// As [`list_sparse`], with a table lookup per byte of `t`: no
/// branches, whatever the number of bits. Each byte is read from
/// memory on its own (volatile reads, as LLVM would otherwise load the
/// word and shift it, an extra instruction per byte), and its entry is
/// widened to 16 bits as it is loaded (VPMOVZXBW).
///
/// # Safety
///
/// `p` must be valid for writing 64 entries.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
unsafe fn list_dense(mut p: *mut u16, n: usize, base: usize, t: &u64) -> usize {
    // Page offsets are below 16384.
    let mut offsets = _mm_set1_epi16(base as i16);
    let bytes = (t as *const u64).cast::<u8>();
    for i in 0..8 {
        // SAFETY: t is 8 readable bytes; the entry is 8 readable
        // bytes. p is at most 8 i entries past the caller's pointer,
        // so the 8 entries written here are within its 64.
        unsafe {
            let byte = usize::from(bytes.add(i).read_volatile());
            let v = _mm_cvtepu8_epi16(_mm_loadl_epi64(BIT_POSITIONS[byte].as_ptr().cast()));
            _mm_storeu_si128(p.cast(), _mm_add_epi16(v, offsets));
            p = p.add(byte.count_ones() as usize);
        }
        offsets = _mm_add_epi16(offsets, _mm_set1_epi16(8));
    }
    n + t.count_ones() as usize
}

/// Passes 3 and 4 for the chunk's `pairs` pairs: writes them at
/// `dst[d..]` and returns the new output length, or `None` on overflow.
///
/// # Safety
///
/// `pos[..2 pairs + 17]` must be written and hold the previous run end,
/// then the `pairs` runs' starts and ends, all at most `new.len()` and
/// in increasing order.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
unsafe fn put_pairs(pos: *const u16, pairs: usize, dst: &mut [u8], mut d: usize, new: &[u8]) -> Option<usize> {
    let mut k = 0;
    while k < pairs {
        // SAFETY: pair k exists, so pos[2 k..2 k + 17] are written
        // entries (as promised by our caller, with the padding for the
        // last group).
        let (p, runs) = unsafe { (pos.add(2 * k), GroupRuns::at(pos.add(2 * k))) };
        let whole = k + 8 <= pairs && d + 8 * PAIR_MAX <= dst.len();
        if whole {
            // SAFETY: these are 8 pairs of the page, within `new`; the
            // room for 8 pairs of at most PAIR_MAX bytes was checked.
            if let Some(end) = unsafe { put_short_group(&runs, dst, d, new) } {
                d = end;
                k += 8;
                continue;
            }
        }
        let grp = headers(&runs, new.len());
        if whole && grp.bad == 0 {
            for j in 0..8 {
                // SAFETY: pair j is good (its start is at most
                // new.len() - 16, and it has at most 16 changed
                // bytes); the room for 8 pairs of at most PAIR_MAX
                // bytes was checked.
                d = unsafe { put_pair_fast(dst, d, new, grp.start[j], grp.hdr[j], grp.meta[j]) };
            }
            k += 8;
            continue;
        }
        for j in 0..(pairs - k).min(8) {
            if (grp.bad >> j) & 1 == 0 && d + PAIR_MAX <= dst.len() {
                // SAFETY: as above, for one pair.
                d = unsafe { put_pair_fast(dst, d, new, grp.start[j], grp.hdr[j], grp.meta[j]) };
            } else {
                // SAFETY: 2 j + 2 <= 2 (pairs - k): written entries.
                let (prev_end, s, e) = unsafe {
                    let q = p.add(2 * j);
                    (usize::from(q.read()), usize::from(q.add(1).read()), usize::from(q.add(2).read()))
                };
                d = put_pair_slow(dst, d, s - prev_end, &new[s..e])?;
            }
        }
        k = pairs.min(k + 8);
    }
    Some(d)
}

/// The 8 pairs `runs`, in one go, when each has fewer than 128 unchanged
/// bytes, 1 or 2 changed ones, and starts at least 4 bytes before the
/// end of the page (at 10 % of bytes changed, 9 groups in 10). Each
/// pair is then 4 bytes in a 32-bit lane, [zrun, nzrun, the changed
/// bytes read by one VPGATHERDD], and a PSHUFB per 4 pairs drops the
/// second byte of single-byte pairs. Returns the new output length, or
/// `None`, having written nothing, for the other groups.
///
/// # Safety
///
/// The runs must be 8 pairs of a page of `new.len()` bytes, and
/// `d + 32 <= dst.len()`.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
unsafe fn put_short_group(runs: &GroupRuns, dst: &mut [u8], d: usize, new: &[u8]) -> Option<usize> {
    let GroupRuns { zrun, nzrun, start: s } = *runs;
    let other = _mm256_or_si256(
        _mm256_or_si256(_mm256_cmpgt_epi32(zrun, _mm256_set1_epi32(0x7f)), _mm256_cmpgt_epi32(nzrun, _mm256_set1_epi32(2))),
        _mm256_cmpgt_epi32(s, _mm256_set1_epi32(new.len() as i32 - 4)),
    );
    if _mm256_testz_si256(other, other) == 0 {
        return None;
    }
    // SAFETY: every lane's start s is at most new.len() - 4 (checked
    // above), so each reads new[s..s + 4].
    let data = unsafe { _mm256_i32gather_epi32::<1>(new.as_ptr().cast(), s) };
    let packed = _mm256_or_si256(_mm256_or_si256(zrun, _mm256_slli_epi32(nzrun, 8)), _mm256_slli_epi32(data, 16));
    let single = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(nzrun, _mm256_set1_epi32(1)))) as usize;
    let (k0, k1) = (single & 15, single >> 4);
    let out = dst.as_mut_ptr();
    // SAFETY: the table entries are 16 readable bytes; the two stores
    // write dst[d..d + 16] and dst[d + l0..d + l0 + 16] with l0 <= 16,
    // within d + 32 <= dst.len() (our caller's promise). Bytes past the
    // pairs are overwritten by the next ones or are scratch.
    unsafe {
        let lo = _mm_shuffle_epi8(_mm256_castsi256_si128(packed), _mm_loadu_si128(PACK4[k0].as_ptr().cast()));
        let hi = _mm_shuffle_epi8(_mm256_extracti128_si256::<1>(packed), _mm_loadu_si128(PACK4[k1].as_ptr().cast()));
        _mm_storeu_si128(out.add(d).cast(), lo);
        let d = d + 16 - k0.count_ones() as usize;
        _mm_storeu_si128(out.add(d).cast(), hi);
        Some(d + 16 - k1.count_ones() as usize)
    }
}

/// Entry `k`: the PSHUFB control that packs four 4-byte pairs
/// [zrun, nzrun, byte, byte], dropping the last byte of pair j when bit
/// j of `k` is set (a single changed byte); the unused tail is zeros.
static PACK4: [[u8; 16]; 16] = {
    let mut table = [[0x80u8; 16]; 16];
    let mut k = 0;
    while k < 16 {
        let (mut i, mut j) = (0, 0);
        while j < 4 {
            let n = if k & (1 << j) != 0 { 3 } else { 4 };
            let mut b = 0;
            while b < n {
                table[k][i] = (4 * j + b) as u8;
                i += 1;
                b += 1;
            }
            j += 1;
        }
        k += 1;
    }
    table
};

/// The general path's figures for the group of 8 pairs `runs`, of a
/// page of `len` bytes.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
fn headers(runs: &GroupRuns, len: usize) -> Group {
    let GroupRuns { zrun, nzrun, start: s } = *runs;
    let last_start = _mm256_set1_epi32(len as i32 - 16);
    // zrun < 128: bytes zrun, nzrun. Otherwise zrun takes 2 uleb
    // bytes (zrun < 16384): (zrun & 0x7f) | 0x80, zrun >> 7.
    let long = _mm256_cmpgt_epi32(zrun, _mm256_set1_epi32(0x7f));
    let short_hdr = _mm256_or_si256(zrun, _mm256_slli_epi32(nzrun, 8));
    let long_hdr = _mm256_or_si256(
        _mm256_or_si256(_mm256_and_si256(zrun, _mm256_set1_epi32(0x7f)), _mm256_set1_epi32(0x80)),
        _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(zrun, _mm256_set1_epi32(0x3f80)), 1), _mm256_slli_epi32(nzrun, 16)),
    );
    let header = _mm256_blendv_epi8(short_hdr, long_hdr, long);
    let hdr_len = _mm256_sub_epi32(_mm256_set1_epi32(2), long);
    let size = _mm256_add_epi32(hdr_len, nzrun);
    let info = _mm256_or_si256(_mm256_slli_epi32(hdr_len, 3), _mm256_slli_epi32(size, 8));
    // The fast path copies 16 bytes from the start of the run.
    let slow = _mm256_or_si256(_mm256_cmpgt_epi32(nzrun, _mm256_set1_epi32(16)), _mm256_cmpgt_epi32(s, last_start));
    let mut grp = Group { hdr: [0; 8], meta: [0; 8], start: [0; 8], bad: 0 };
    // SAFETY: each array is 32 writable bytes.
    unsafe {
        _mm256_storeu_si256(grp.hdr.as_mut_ptr().cast(), header);
        _mm256_storeu_si256(grp.meta.as_mut_ptr().cast(), info);
        _mm256_storeu_si256(grp.start.as_mut_ptr().cast(), s);
    }
    grp.bad = _mm256_movemask_ps(_mm256_castsi256_ps(slow)) as u8;
    grp
}

/// Writes one pair in at most 19 bytes at `dst[d..]`; returns the new
/// output length.
///
/// # Safety
///
/// `d + PAIR_MAX <= dst.len()`, `s + 16 <= new.len()`, and `hdr`,
/// `meta` are [`headers`]' entries for a pair with at most 16
/// changed bytes.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
#[inline]
unsafe fn put_pair_fast(dst: &mut [u8], d: usize, new: &[u8], s: u32, hdr: u32, meta: u32) -> usize {
    let (s, shift, size) = (s as usize, meta & 0xff, ((meta >> 8) & 0xff) as usize);
    let (out, src) = (dst.as_mut_ptr(), new.as_ptr());
    // SAFETY: new[s..s + 16] and dst[d..d + 19] are in bounds (our
    // caller's promise); the pair takes size <= 19 bytes, of which the
    // header shift / 8 <= 3.
    unsafe {
        let data = src.add(s).cast::<u64>().read_unaligned();
        out.add(d).cast::<u64>().write_unaligned(data << shift | u64::from(hdr));
        if size > 8 {
            let data = _mm_loadu_si128(src.add(s).cast());
            _mm_storeu_si128(out.add(d + (shift / 8) as usize).cast(), data);
        }
    }
    d + size
}
