//! XBZRLE ("XOR based zero run length encoding"), byte-compatible with
//! QEMU 7.2's `migration/xbzrle.c`.
//!
//! An encoded page is a delta against the content the destination already
//! holds for that page (the last version sent), as a sequence of pairs:
//!
//! ```text
//! enc   := pair*
//! pair  := zrun nzrun
//! zrun  := uleb(count of UNCHANGED bytes)       0 only in the first pair
//! nzrun := uleb(count n of CHANGED bytes), n >= 1, then the n new bytes
//! uleb  := 0xxxxxxx | 1xxxxxxx 0yyyyyyy         at most 2 bytes, < 16384
//! ```
//!
//! "Unchanged" means equal to the old byte, not zero. The writer makes every
//! run maximal and omits the trailing unchanged run, so an identical page
//! encodes to nothing. See `stream-format.md` §3.5.
//!
//! Both functions are pure and allocation-free; they run on the migration
//! thread on private copies of pages.

use std::fmt;
use std::sync::OnceLock;

/// Target page size of the x86_64 stream (`TARGET_PAGE_SIZE`).
pub const PAGE_SIZE: usize = 4096;

/// Largest value [`uleb128_encode_small`] can write (14 bits).
const ULEB_SMALL_MAX: u32 = 0x3fff;

/// Writes `n` (at most 16383) as a 1- or 2-byte uleb128 at the start of
/// `out` and returns the number of bytes written, like QEMU's
/// `uleb128_encode_small`.
///
/// # Panics
///
/// If `n > 16383` or `out` is too short.
#[inline]
pub fn uleb128_encode_small(out: &mut [u8], n: u32) -> usize {
    assert!(n <= ULEB_SMALL_MAX, "uleb128_encode_small: {n} needs more than 2 bytes");
    if n < 0x80 {
        out[0] = n as u8;
        1
    } else {
        out[0] = (n & 0x7f) as u8 | 0x80;
        out[1] = (n >> 7) as u8;
        2
    }
}

/// Reads a 1- or 2-byte uleb128 from the start of `input`, like QEMU's
/// `uleb128_decode_small`: returns the value and the number of bytes used.
///
/// Returns `None` when the second byte also has its continuation bit set
/// (a 3-byte or longer uleb) or when `input` ends inside the number.
/// Non-canonical forms such as `80 00` (= 0) are accepted, as in QEMU.
#[inline]
pub fn uleb128_decode_small(input: &[u8]) -> Option<(u32, usize)> {
    let b0 = *input.first()?;
    if b0 & 0x80 == 0 {
        return Some((u32::from(b0), 1));
    }
    let b1 = *input.get(1)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    Some((u32::from(b0 & 0x7f) | (u32::from(b1) << 7), 2))
}

/// XBZRLE-encodes `new` against `old` into `dst`, exactly as QEMU 7.2's
/// `xbzrle_encode_buffer` does.
///
/// Returns `Some(len)` with the encoded length (`Some(0)` when the pages are
/// identical: nothing needs sending), or `None` on overflow: the encoding
/// does not fit in `dst` and the caller should send the page raw.
///
/// Overflow is decided as in QEMU, so that the fallback happens on exactly
/// the same pages: before each pair and again before each nzrun length the
/// encoder requires 2 free bytes, and before copying an nzrun's data it
/// requires room for all of it. (One consequence: with fewer than 2 bytes of
/// room left, even a page whose remainder is unchanged overflows.)
///
/// Bytes of `dst` past the returned length may be overwritten; on overflow
/// the content of `dst` is unspecified.
///
/// On x86_64 CPUs with AVX2 (detected once, at the first call) this runs a
/// vectorised encoder; elsewhere a portable one. Both give the same output.
///
/// # Panics
///
/// If `old` and `new` differ in length or are longer than 16383 bytes (a run
/// length must fit a 2-byte uleb).
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode_with(Encoder::best(), old, new, dst)
}

/// [`encode`] with the portable encoder whatever the CPU: the reference the
/// vectorised one is fuzzed against (`fuzz/fuzz_targets/xbzrle_encode.rs`).
///
/// # Panics
///
/// As [`encode`].
#[doc(hidden)]
pub fn encode_portable_for_fuzzing(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode_with(Encoder::Portable, old, new, dst)
}

/// The implementations of [`encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    /// [`encode_portable`]: any CPU.
    Portable,
    /// [`avx2::encode`]: x86_64 CPUs with AVX2, BMI1, BMI2 and POPCNT.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Encoder {
    /// The fastest encoder this CPU can run, detected once.
    fn best() -> Encoder {
        static BEST: OnceLock<Encoder> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx2::supported() {
                return Encoder::Avx2;
            }
            Encoder::Portable
        })
    }
}

/// [`encode`] with the given implementation.
///
/// # Panics
///
/// As [`encode`]; also if this CPU cannot run `encoder`.
fn encode_with(encoder: Encoder, old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let len = old.len();
    assert_eq!(len, new.len(), "xbzrle encode: pages differ in length");
    assert!(len <= ULEB_SMALL_MAX as usize, "xbzrle encode: page too long");
    match encoder {
        Encoder::Portable => encode_portable(old, new, dst),
        #[cfg(target_arch = "x86_64")]
        Encoder::Avx2 => {
            assert_eq!(Encoder::best(), Encoder::Avx2, "xbzrle encode: this CPU lacks AVX2");
            // SAFETY: best() picks Avx2 only after avx2::supported() found
            // the features avx2::encode is compiled for on this CPU (they
            // do not go away), and the lengths were checked above.
            unsafe { avx2::encode(old, new, dst) }
        }
    }
}

/// The portable encoder (the caller has checked the lengths).
///
/// It walks the page a 64-byte block at a time. `m` has bit j set when byte
/// j of the block differs; `t` marks where that changes, so its set bits
/// are, in order, the start and the end of each nzrun (runs are maximal by
/// construction). An nzrun may start in one block and end in a later one,
/// or at the end of the page.
fn encode_portable(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let len = old.len();
    if len == 0 {
        return Some(0);
    }
    let mut d = 0; // bytes written
    let mut zrun_start = 0; // end of the previous nzrun
    let mut open = NO_RUN; // start of an nzrun whose end is not yet seen
    let mut carry = 0u64; // did the previous block end with a changed byte
    for b in (0..len).step_by(BLOCK) {
        let m = block_mask(old, new, b);
        let mut t = m ^ ((m << 1) | carry);
        carry = m >> 63;
        if t != 0 && open != NO_RUN {
            let e = b + t.trailing_zeros() as usize;
            t &= t - 1;
            d = put_pair(dst, d, open - zrun_start, new, open, e)?;
            (zrun_start, open) = (e, NO_RUN);
        }
        while t != 0 {
            let s = b + t.trailing_zeros() as usize;
            t &= t - 1;
            if t == 0 {
                open = s;
                break;
            }
            let e = b + t.trailing_zeros() as usize;
            t &= t - 1;
            d = put_pair(dst, d, s - zrun_start, new, s, e)?;
            zrun_start = e;
        }
    }
    if open != NO_RUN {
        d = put_pair(dst, d, open - zrun_start, new, open, len)?;
    } else if zrun_start < len && d + 2 > dst.len() {
        // QEMU's check before the (unwritten) trailing zrun; for an
        // unchanged page, its check before the first pair.
        return None;
    }
    Some(d)
}

const BLOCK: usize = 64;
const NO_RUN: usize = usize::MAX;

/// Writes the pair (zrun, `new[s..e]`) at `dst[d..]`; returns the new
/// output length, or `None` on overflow. QEMU's three checks (2 bytes free
/// before each length, room for the data) hold exactly when the whole pair
/// fits, as each part takes at least one byte; so the fast path, which
/// needs 10 bytes of room, never overflows.
#[inline(always)]
fn put_pair(dst: &mut [u8], d: usize, zrun: usize, new: &[u8], s: usize, e: usize) -> Option<usize> {
    let n = e - s;
    if zrun < 0x80 && n <= 8 && d + 10 <= dst.len() && s + 8 <= new.len() {
        // Short runs (the common case): 1-byte lengths and a fixed 8-byte
        // copy; the bytes written past the pair are scratch.
        let w = &mut dst[d..d + 10];
        w[0] = zrun as u8;
        w[1] = n as u8;
        w[2..].copy_from_slice(&new[s..s + 8]);
        return Some(d + 2 + n);
    }
    put_pair_slow(dst, d, zrun, &new[s..e])
}

/// Writes the pair (`zrun`, `data`) at `dst[d..]` with QEMU's overflow
/// checks; returns the new output length, or `None` on overflow.
#[cold]
#[inline(never)]
fn put_pair_slow(dst: &mut [u8], mut d: usize, zrun: usize, data: &[u8]) -> Option<usize> {
    if d + 2 > dst.len() {
        return None;
    }
    d += uleb128_encode_small(&mut dst[d..], zrun as u32);
    if d + 2 > dst.len() {
        return None;
    }
    d += uleb128_encode_small(&mut dst[d..], data.len() as u32);
    if d + data.len() > dst.len() {
        return None;
    }
    dst[d..d + data.len()].copy_from_slice(data);
    Some(d + data.len())
}

/// Bit j of the result is set iff `old[b + j] != new[b + j]`; bits for
/// bytes past the end are clear.
#[inline(always)]
fn block_mask(old: &[u8], new: &[u8], b: usize) -> u64 {
    if let (Some(o), Some(n)) = (old.get(b..b + BLOCK), new.get(b..b + BLOCK)) {
        let (o, n) = (o.try_into().unwrap(), n.try_into().unwrap());
        return diff_mask64(o, n);
    }
    // Last, partial block: pad both with the same bytes.
    let (mut o, mut n) = ([0u8; BLOCK], [0u8; BLOCK]);
    o[..old.len() - b].copy_from_slice(&old[b..]);
    n[..new.len() - b].copy_from_slice(&new[b..]);
    diff_mask64(&o, &n)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn diff_mask64(o: &[u8; BLOCK], n: &[u8; BLOCK]) -> u64 {
    // SAFETY: SSE2 is part of the x86_64 baseline, so the target feature
    // that diff_mask64_sse2 is compiled for is always present.
    unsafe { diff_mask64_sse2(o, n) }
}

/// PCMPEQB + PMOVMSKB: 16 bytes compared per instruction pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn diff_mask64_sse2(o: &[u8; BLOCK], n: &[u8; BLOCK]) -> u64 {
    use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8};
    let (o, n) = (o.as_ptr().cast::<__m128i>(), n.as_ptr().cast::<__m128i>());
    let mut equal = 0u64;
    for k in 0..BLOCK / 16 {
        // SAFETY: o and n point to 64 readable bytes, so the 16-byte
        // vectors 0..4 are in bounds; loadu has no alignment requirement.
        let (a, b) = unsafe { (_mm_loadu_si128(o.add(k)), _mm_loadu_si128(n.add(k))) };
        let bits = _mm_movemask_epi8(_mm_cmpeq_epi8(a, b)) as u32 as u64;
        equal |= bits << (k * 16);
    }
    !equal
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn diff_mask64(o: &[u8; BLOCK], n: &[u8; BLOCK]) -> u64 {
    diff_mask64_swar(o, n)
}

/// Portable version: a word-wide XOR, then one bit per non-zero byte.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn diff_mask64_swar(o: &[u8; BLOCK], n: &[u8; BLOCK]) -> u64 {
    let mut m = 0u64;
    for k in 0..BLOCK / 8 {
        let x = load_le(&o[k * 8..]) ^ load_le(&n[k * 8..]);
        m |= nonzero_byte_bits(x) << (k * 8);
    }
    m
}

#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn load_le(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// Bit k (k < 8) of the result is set iff byte k of `x` (little-endian
/// order) is non-zero.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline(always)]
fn nonzero_byte_bits(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Per byte: (x & 0x7f) + 0x7f carries into bit 7 iff the low 7 bits are
    // non-zero, and never into the next byte.
    let hi = (((x & LOW7) + LOW7) | x) & HIGH;
    // Gather the eight flags (now at bits 0, 8, .., 56) into bits 56..63.
    ((hi >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// The AVX2 encoder.
///
/// The portable encoder loses much of its time to branch mispredictions:
/// how many runs a 64-byte block holds, and whether one continues into the
/// next, is random. This one handles the page in passes whose branches
/// are predictable, a chunk of 4096 bytes at a time (a 4 KiB page is one
/// chunk):
///
/// 1. Compare the blocks (two 32-byte VPCMPEQB + VPMOVMSKB each) and keep
///    each block's transition mask `t` (bit j set where "byte j differs"
///    changes; see `encode_portable`). Then prefetch the next chunk, if
///    any, as the passes below touch no uncached memory and would
///    otherwise leave the memory idle.
/// 2. List the page offsets of all set bits of the chunk's masks in
///    `pos`, so that it alternates run start, run end, start, ...: with a
///    table lookup per mask byte, or, in chunks with few changes, with
///    TZCNT. `pos[0]` holds the end of the previous nzrun; a run still
///    open at the end of a chunk is carried to the next.
/// 3. Write the pairs a group of 8 at a time, from the zrun and nzrun
///    lengths computed in vector registers (differences of neighbouring
///    `pos` entries). A group of 8 short pairs (zrun below 128, 1 or 2
///    changed bytes: at 10 % of bytes changed, 9 groups in 10) is written
///    at once, in two 16-byte stores (see `put_short_group`).
/// 4. Any other group takes the general path. Its pairs' uleb headers (2
///    or 3 bytes), encoded sizes, and whether each needs the checked path
///    (nzrun longer than 16, or starting less than 16 bytes before the end
///    of the page) are computed in vector registers too (`headers`). Then
///    a pair is a single 8-byte store: its header ORed into the new bytes
///    shifted up by the header length (bytes past the pair are
///    overwritten by the next one or are scratch), plus a 16-byte store
///    when the pair is longer than 8 bytes. A group of 8 goes without
///    per-pair checks when the output has room for 8 pairs of the largest
///    size; otherwise each pair is checked, and pairs that may not fit
///    take `put_pair_slow`, whose checks are QEMU's.
#[cfg(target_arch = "x86_64")]
mod avx2 {
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
            GroupRuns {
                zrun: _mm256_and_si256(lengths, low16),
                nzrun: _mm256_srli_epi32(lengths, 16),
                start: _mm256_and_si256(runs, low16),
            }
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

    /// [`super::encode`] for CPUs with AVX2, BMI1, BMI2 and POPCNT.
    ///
    /// # Safety
    ///
    /// The CPU must support those features (see [`supported`]), and `old`
    /// and `new` must have the same length, at most 16383.
    #[target_feature(enable = "avx2,bmi1,bmi2,popcnt")]
    pub(super) unsafe fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
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
            for ((o, nw), t) in blocks_o.zip(blocks_n).zip(tmask.iter_mut()) {
                let m = diff_mask64(o.try_into().unwrap(), nw.try_into().unwrap());
                *t = m ^ ((m << 1) | carry);
                carry = m >> 63;
                count += t.count_ones() as usize;
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
            if count <= 2 * full {
                for (k, &t) in tmask[..full].iter().enumerate() {
                    // SAFETY: see above.
                    n = unsafe { list_sparse(pos.add(1 + n), n, base + k * BLOCK, t) };
                }
            } else {
                for (k, t) in tmask[..full].iter().enumerate() {
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
}

/// Which run length of a pair a [`DecodeError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// The count of unchanged bytes.
    Zrun,
    /// The count of changed bytes that precedes their data.
    Nzrun,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if *self == Run::Zrun { "zrun" } else { "nzrun" })
    }
}

/// Why an XBZRLE buffer was rejected; see [`DecodeError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// Fewer than 2 input bytes (the count given) where a run length starts.
    Truncated(Run, usize),
    /// A run length of 3 or more uleb bytes.
    LongUleb,
    /// A zrun of 0 after the first pair.
    ZeroZrun,
    /// An nzrun of 0.
    ZeroNzrun,
    /// The run would end at this page offset, past the end of the page.
    PastPage(Run, usize),
    /// The nzrun announces this many data bytes, more than the input has.
    PastInput(usize),
}

/// A malformed XBZRLE buffer. QEMU 7.2 rejects all of these ("Failed to
/// load XBZRLE page - decode error!").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// Offset in the encoded input of the run length that was rejected.
    pub offset: usize,
    pub kind: DecodeErrorKind,
    /// Length of the page decoded into.
    pub page_len: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "xbzrle decode error at input byte {}: ", self.offset)?;
        match self.kind {
            DecodeErrorKind::Truncated(run, left) => {
                write!(f, "{run} length needs at least 2 bytes, {left} left")
            }
            DecodeErrorKind::LongUleb => write!(f, "run length longer than 2 uleb128 bytes"),
            DecodeErrorKind::ZeroZrun => write!(f, "zrun of length 0 after the first pair"),
            DecodeErrorKind::ZeroNzrun => write!(f, "nzrun of length 0"),
            DecodeErrorKind::PastPage(run, end) => {
                let len = self.page_len;
                write!(f, "{run} ends at page offset {end}, past the {len}-byte page")
            }
            DecodeErrorKind::PastInput(n) => {
                write!(f, "nzrun of {n} bytes runs past the end of the input")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Applies the XBZRLE buffer `src` to `page` in place, with QEMU 7.2's
/// `xbzrle_decode_buffer` rules: unchanged runs keep the page's current
/// bytes, changed runs are copied from `src`.
///
/// Every rule QEMU enforces is enforced here: at least 2 input bytes before
/// each zrun and each nzrun length; uleb lengths of at most 2 bytes
/// (non-canonical `80 00` accepted); a zrun of 0 only in the first pair; an
/// nzrun of at least 1; no run past the page or past the input. An empty
/// `src` is valid and leaves the page unchanged.
///
/// Like QEMU, this writes as it goes: on error the pairs before the bad one
/// have already been applied.
pub fn decode(src: &[u8], page: &mut [u8]) -> Result<(), DecodeError> {
    use DecodeErrorKind::*;
    let (slen, page_len) = (src.len(), page.len());
    let err = |offset, kind| DecodeError { offset, kind, page_len };
    // Reads the run length at src[i..], QEMU's way: 2 bytes must remain.
    let length = |i: usize, run| {
        if slen - i < 2 {
            return Err(err(i, Truncated(run, slen - i)));
        }
        uleb128_decode_small(&src[i..]).ok_or_else(|| err(i, LongUleb))
    };
    let (mut i, mut d) = (0usize, 0usize);

    while i < slen {
        // Fast path for the common pair: 1-byte lengths, a zrun of 1 to 127
        // bytes (0 goes the checked way, as it is valid only first), 1 to
        // 16 changed bytes, and at least 18 input bytes left. It takes only
        // pairs that pass every check below (2 input bytes at each length:
        // yes, as 18 are left; nzrun >= 1; within the page and the input)
        // and does the same writes; any other pair, valid or not, goes
        // through the checks below.
        let (sp, pp) = (src.as_ptr(), page.as_mut_ptr());
        while i + 18 <= slen {
            // SAFETY: i + 18 <= slen: src[i] and src[i + 1] are in bounds.
            let (z, n) = unsafe { (usize::from(*sp.add(i)), usize::from(*sp.add(i + 1))) };
            let at = d + z;
            if z.wrapping_sub(1) >= 0x7f || n.wrapping_sub(1) >= 16 || at + n > page_len {
                break;
            }
            // SAFETY: page[at..at + n] is in bounds (checked just above),
            // src[i + 2..i + 2 + n] too (n <= 16, i + 18 <= slen); they do
            // not overlap (page and src are distinct borrows).
            unsafe { copy_short(pp.add(at), sp.add(i + 2), n) };
            d = at + n;
            i += 2 + n;
        }
        if i >= slen {
            break;
        }

        let (count, used) = length(i, Run::Zrun)?;
        if i != 0 && count == 0 {
            return Err(err(i, ZeroZrun));
        }
        d += count as usize;
        if d > page_len {
            return Err(err(i, PastPage(Run::Zrun, d)));
        }
        i += used;

        let (count, used) = length(i, Run::Nzrun)?;
        let n = count as usize;
        if n == 0 {
            return Err(err(i, ZeroNzrun));
        }
        if d + n > page_len {
            return Err(err(i, PastPage(Run::Nzrun, d + n)));
        }
        if i + used + n > slen {
            return Err(err(i, PastInput(n)));
        }
        i += used;
        if n == 1 {
            page[d] = src[i]; // common with 2-byte zruns; no memcpy call
        } else {
            page[d..d + n].copy_from_slice(&src[i..i + n]);
        }
        d += n;
        i += n;
    }
    Ok(())
}

/// Copies `n` bytes, 1 to 16, from `src` to `dst`, with two overlapping
/// stores of 8 or 4 bytes, or three of one byte (offsets 0, n / 2 and
/// n - 1 cover n = 1, 2 or 3).
///
/// # Safety
///
/// `src` must be valid for reading and `dst` for writing `n` bytes, and
/// they must not overlap.
#[inline(always)]
unsafe fn copy_short(dst: *mut u8, src: *const u8, n: usize) {
    debug_assert!((1..=16).contains(&n));
    // SAFETY: every access is within the first n bytes of each (our
    // caller's promise).
    unsafe {
        if n >= 8 {
            dst.cast::<u64>().write_unaligned(src.cast::<u64>().read_unaligned());
            dst.add(n - 8).cast::<u64>().write_unaligned(src.add(n - 8).cast::<u64>().read_unaligned());
        } else if n >= 4 {
            dst.cast::<u32>().write_unaligned(src.cast::<u32>().read_unaligned());
            dst.add(n - 4).cast::<u32>().write_unaligned(src.add(n - 4).cast::<u32>().read_unaligned());
        } else {
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: small deterministic PRNG for the tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Straightforward byte-at-a-time model of QEMU's encoder, overflow
    /// checks included, to compare the fast one against.
    fn reference_encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
        let (len, dlen) = (old.len(), dst.len());
        let run_end = |from: usize, same: bool| (from..len).find(|&k| (old[k] == new[k]) != same).unwrap_or(len);
        let (mut i, mut d) = (0, 0);
        while i < len {
            if d + 2 > dlen {
                return None;
            }
            let nz = run_end(i, true);
            if nz == len {
                return Some(d); // the trailing zrun, or the whole page (d == 0)
            }
            d += uleb128_encode_small(&mut dst[d..], (nz - i) as u32);
            if d + 2 > dlen {
                return None;
            }
            i = run_end(nz, false);
            d += uleb128_encode_small(&mut dst[d..], (i - nz) as u32);
            if d + (i - nz) > dlen {
                return None;
            }
            dst[d..i - nz + d].copy_from_slice(&new[nz..i]);
            d += i - nz;
        }
        Some(d)
    }

    fn enc(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
        let mut dst = vec![0u8; PAGE_SIZE];
        encode(old, new, &mut dst).map(|n| dst[..n].to_vec())
    }

    #[test]
    fn uleb_round_trip_and_boundaries() {
        let mut buf = [0u8; 2];
        for n in 0..=ULEB_SMALL_MAX {
            let w = uleb128_encode_small(&mut buf, n);
            assert_eq!(uleb128_decode_small(&buf[..w]), Some((n, w)));
        }
        for (n, bytes) in [(127, &[0x7f][..]), (128, &[0x80, 0x01]), (16383, &[0xff, 0x7f])] {
            let w = uleb128_encode_small(&mut buf, n);
            assert_eq!(&buf[..w], bytes);
        }
        // QEMU's invalid case (continuation bit in the second byte), a
        // truncated one, and the accepted non-canonical 80 00.
        assert_eq!(uleb128_decode_small(&[0x80, 0x80]), None);
        assert_eq!(uleb128_decode_small(&[0x80]), None);
        assert_eq!(uleb128_decode_small(&[0x80, 0x00]), Some((0, 2)));
    }

    #[test]
    #[should_panic]
    fn uleb_encode_too_big_panics() {
        uleb128_encode_small(&mut [0u8; 2], 16384);
    }

    #[test]
    fn unchanged_pages_and_one_byte_changes() {
        let zero = vec![0u8; PAGE_SIZE];
        let page: Vec<u8> = (0..PAGE_SIZE).map(|k| if (1000..3000).contains(&k) { k as u8 } else { 0 }).collect();
        assert_eq!(enc(&zero, &zero), Some(vec![]));
        assert_eq!(enc(&page, &page), Some(vec![]));
        let expected = [(0, &[0x00, 0x01, 0x01][..]), (2049, &[0x81, 0x10, 0x01, 0x01]), (4095, &[0xff, 0x1f, 0x01, 0x01])];
        for (pos, expect) in expected {
            let mut new = zero.clone();
            new[pos] = 1;
            let e = enc(&zero, &new).unwrap();
            assert_eq!(e, expect, "change at {pos}");
            let mut page = zero.clone();
            decode(&e, &mut page).unwrap();
            assert_eq!(page, new);
        }
    }

    #[test]
    fn overflow_returns_none_and_caller_falls_back() {
        // QEMU's test: every other byte of the first 4094 changed.
        let old = vec![0u8; PAGE_SIZE];
        let mut new = vec![0u8; PAGE_SIZE];
        for k in 0..PAGE_SIZE / 2 - 1 {
            new[k * 2] = 1;
        }
        assert_eq!(enc(&old, &new), None);
        // The caller's fallback is the raw page; a large enough buffer
        // still encodes it, and that round-trips.
        let mut big = vec![0u8; 4 * PAGE_SIZE];
        let n = encode(&old, &new, &mut big).unwrap();
        let mut page = old.clone();
        decode(&big[..n], &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn overflow_boundaries_match_qemu() {
        let old = vec![0u8; 64];
        let mut new = old.clone();
        new[10] = 7; // encodes to 0a 01 07
                     // 0a 01 07 is 3 bytes, but unchanged bytes follow, and QEMU wants 2
                     // free bytes before looking at them.
        assert_eq!(encode(&old, &new, &mut [0u8; 4]), None);
        assert_eq!(encode(&old, &new, &mut [0u8; 5]), Some(3));
        new[63] = 9; // now the page ends changed: 0a 01 07 34 01 09
        assert_eq!(encode(&old, &new, &mut [0u8; 5]), None);
        assert_eq!(encode(&old, &new, &mut [0u8; 6]), Some(6));
        // QEMU checks for 2 free bytes before looking at the page at all.
        assert_eq!(encode(&old, &old, &mut [0u8; 1]), None);
        assert_eq!(encode(&old, &old, &mut [0u8; 2]), Some(0));
        // ...and before each later pair, even if only unchanged bytes remain.
        let mut new2 = old.clone();
        new2[0] = 1; // 00 01 01, then a trailing zrun
        assert_eq!(encode(&old, &new2, &mut [0u8; 4]), None);
        assert_eq!(encode(&old, &new2, &mut [0u8; 5]), Some(3));
        // A page that ends changed has no trailing check: the output may
        // fill dst exactly, also when the last block is partial.
        for len in [64, 100] {
            let (old, mut new) = (vec![0u8; len], vec![0u8; len]);
            new[len - 1] = 1;
            assert_eq!(encode(&old, &new, &mut [0u8; 3]), Some(3), "len {len}");
        }
    }

    #[test]
    fn qemu_range_case_round_trips() {
        // QEMU's encode_decode_range: two patterned stretches that differ
        // everywhere, plus two single changed bytes after them.
        let mut rng = Rng(0x1234_5678);
        for _ in 0..2000 {
            let diff_len = rng.below(PAGE_SIZE - 1006);
            let (mut buffer, mut test) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
            for k in 1..=diff_len {
                (buffer[1000 + k], test[1000 + k]) = (k as u8, (k + 4) as u8);
            }
            (buffer[1000 + diff_len + 3], test[1000 + diff_len + 3]) = (103, 107);
            (buffer[1000 + diff_len + 5], test[1000 + diff_len + 5]) = (105, 109);
            let e = enc(&test, &buffer).unwrap();
            assert!(e.len() < PAGE_SIZE);
            decode(&e, &mut test).unwrap();
            assert_eq!(test, buffer);
        }
    }

    /// The encoders this CPU can run, each of which the tests compare with
    /// `reference_encode`.
    fn encoders() -> Vec<Encoder> {
        #[cfg(target_arch = "x86_64")]
        if avx2::supported() {
            return vec![Encoder::Portable, Encoder::Avx2];
        }
        eprintln!("note: no vectorised XBZRLE encoder for this CPU; only the portable one is tested");
        vec![Encoder::Portable]
    }

    #[test]
    fn best_encoder_is_detected_once_and_used() {
        assert!(encoders().contains(&Encoder::best()));
        assert_eq!(Encoder::best(), Encoder::best());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(Encoder::best() == Encoder::Avx2, avx2::supported());
    }

    /// Checks every encoder against `reference_encode` for `(old, new)` with
    /// `dst` of length `dlen`: same result, same bytes, and the encoding
    /// decodes to `new`.
    fn check_encoders(old: &[u8], new: &[u8], dlen: usize, what: &str) {
        let mut want_buf = vec![0u8; dlen];
        let want = reference_encode(old, new, &mut want_buf);
        for encoder in encoders() {
            // Garbage in dst must not matter, and nothing past it may be
            // written.
            let mut got_buf = vec![0xa5u8; dlen + 64];
            let got = encode_with(encoder, old, new, &mut got_buf[..dlen]);
            assert!(got_buf[dlen..].iter().all(|&b| b == 0xa5), "{encoder:?}, {what}: wrote past dst");
            assert_eq!(got, want, "{encoder:?}, {what}, dst length {dlen}");
            if let Some(n) = got {
                assert_eq!(got_buf[..n], want_buf[..n], "{encoder:?}, {what}, dst length {dlen}");
                let mut page = old.to_vec();
                decode(&got_buf[..n], &mut page).unwrap();
                assert!(page == new, "{encoder:?}, {what}: round trip");
            }
        }
    }

    /// `check_encoders` with room to spare, and with every destination
    /// length from 0 to a little past the encoding (`all_lengths`) or
    /// around it (the overflow boundary is at the encoded length, or 2
    /// bytes past it when unchanged bytes end the page).
    fn check_encoders_all_room(old: &[u8], new: &[u8], all_lengths: bool, what: &str) {
        let full = reference_encode(old, new, &mut vec![0u8; 4 * old.len() + 8]).unwrap();
        let lengths: Vec<usize> = if all_lengths {
            (0..=full + 40).collect()
        } else {
            let mut l: Vec<usize> = (full.saturating_sub(40)..=full + 40).collect();
            l.extend([0, 1, 2, 3, full / 2, full + 200, 4 * old.len() + 8]);
            l
        };
        for dlen in lengths {
            check_encoders(old, new, dlen, what);
        }
    }

    #[test]
    fn random_pages_match_reference_and_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let len = match round % 5 {
                0 => rng.below(300),
                1 => 1 + rng.below(ULEB_SMALL_MAX as usize),
                _ => PAGE_SIZE,
            };
            let old: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut new = old.clone();
            // Densities from "a few bytes" to "almost all", sometimes in bursts.
            let per_mille = [1, 10, 100, 300, 700, 1000][rng.below(6)];
            let mut k = 0;
            while k < len {
                if rng.below(1000) < per_mille {
                    let burst = if rng.below(4) == 0 { 1 + rng.below(40) } else { 1 };
                    for j in k..(k + burst).min(len) {
                        new[j] = old[j].wrapping_add(1 + rng.below(255) as u8);
                    }
                    k += burst;
                }
                k += 1;
            }
            // Output room: plenty, random, or right at the exact length.
            let full = reference_encode(&old, &new, &mut vec![0u8; 4 * len + 8]).unwrap();
            let dlen = match round % 3 {
                0 => PAGE_SIZE,
                1 => rng.below(PAGE_SIZE + 1),
                _ => (full + rng.below(5)).saturating_sub(2).min(PAGE_SIZE),
            };
            check_encoders(&old, &new, dlen, &format!("round {round}"));
        }
    }

    #[test]
    fn encoder_edge_cases_match_reference() {
        // Each case: the page length and the changed ranges.
        #[rustfmt::skip]
        let cases: &[(usize, &[(usize, usize)])] = &[
            (PAGE_SIZE, &[]),
            (PAGE_SIZE, &[(0, 1)]),                   // first byte
            (PAGE_SIZE, &[(4095, 4096)]),             // last byte
            (PAGE_SIZE, &[(0, 1), (4095, 4096)]),
            (PAGE_SIZE, &[(0, 4096)]),                // all changed
            (PAGE_SIZE, &[(1, 4096)]),
            (PAGE_SIZE, &[(0, 4095)]),
            (PAGE_SIZE, &[(60, 70), (127, 129), (191, 192), (192, 193)]), // across 64-byte blocks
            (PAGE_SIZE, &[(63, 64), (64, 65), (255, 257), (319, 384)]),
            (PAGE_SIZE, &[(1000, 1100), (2040, 2060), (3071, 3073)]), // across 1 KiB boundaries
            (PAGE_SIZE, &[(1023, 1024), (2048, 2049), (3000, 3072)]),
            (PAGE_SIZE, &[(100, 108), (200, 209), (300, 316), (400, 417)]), // 8, 9, 16, 17 bytes
            (PAGE_SIZE, &[(127, 128), (256, 257), (384, 390), (4000, 4016)]), // zruns 127, 128, 127, 3610
            (PAGE_SIZE, &[(4079, 4080), (4081, 4082), (4090, 4096)]), // runs in the last 16 bytes
            (PAGE_SIZE, &[(4070, 4096)]),
            (PAGE_SIZE, &[(10, 11), (4064, 4096)]),
            (0, &[]),
            (1, &[]),
            (1, &[(0, 1)]),
            (17, &[(16, 17)]),
            (63, &[(0, 63)]),
            (63, &[(62, 63)]),
            (64, &[(63, 64)]),
            (65, &[(63, 65)]),
            (65, &[(64, 65)]),
            (100, &[(5, 6), (99, 100)]),
            (1023, &[(1000, 1023)]),
            (1024, &[(1023, 1024)]),
            (1025, &[(1023, 1025)]),
            (1088, &[(1024, 1088)]),
            (5000, &[(4095, 4097), (4990, 5000)]),
            (4097, &[(4095, 4097)]),                  // across 4096-byte chunks
            (4160, &[(4096, 4160)]),
            (8192, &[(4000, 4100), (8100, 8192)]),
            (ULEB_SMALL_MAX as usize, &[(16382, 16383)]), // the longest zrun
            (ULEB_SMALL_MAX as usize, &[(0, 16383)]),
            (ULEB_SMALL_MAX as usize, &[(5, 6), (8000, 8200), (16300, 16383)]),
        ];
        for (i, &(len, changed)) in cases.iter().enumerate() {
            let old: Vec<u8> = (0..len).map(|k| (k * 7 + 3) as u8).collect();
            let mut new = old.clone();
            for &(s, e) in changed {
                for b in &mut new[s..e] {
                    *b ^= 0x5a;
                }
            }
            check_encoders_all_room(&old, &new, len <= 1100, &format!("case {i}"));
        }
        // Pairs of the largest size the AVX2 encoder writes without
        // checks (zrun >= 128, 16 changed bytes), then smaller ones.
        let mut new = vec![0u8; PAGE_SIZE];
        for k in 0..7 {
            new[128 + 144 * k..144 + 144 * k].fill(1);
        }
        new[1009..1023].fill(1);
        new[1030..1046].fill(1);
        check_encoders_all_room(&vec![0u8; PAGE_SIZE], &new, true, "largest pairs");
        // Every other byte changed (the most pairs), and every third.
        for step in [2, 3] {
            for len in [PAGE_SIZE, 1000, 1025] {
                let old = vec![0u8; len];
                let new: Vec<u8> = (0..len).map(|k| u8::from(k % step == 0)).collect();
                check_encoders_all_room(&old, &new, false, &format!("every {step}, length {len}"));
            }
        }
    }

    /// A buffer that ends right before an inaccessible page, so that
    /// reading or writing past its end faults.
    #[cfg(unix)]
    struct Guarded {
        map: *mut u8,
        map_len: usize,
        /// Offset of the buffer in the mapping.
        start: usize,
    }

    #[cfg(unix)]
    impl Guarded {
        fn new(content: &[u8]) -> Guarded {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let map_len = content.len().div_ceil(page) * page + page;
            // SAFETY: a new anonymous private mapping; the result is checked.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(map, libc::MAP_FAILED);
            let map = map.cast::<u8>();
            // SAFETY: the last page of the mapping is ours to protect.
            let rc = unsafe { libc::mprotect(map.add(map_len - page).cast(), page, libc::PROT_NONE) };
            assert_eq!(rc, 0);
            let mut g = Guarded { map, map_len, start: map_len - page - content.len() };
            g.as_mut().copy_from_slice(content);
            g
        }

        fn as_mut(&mut self) -> &mut [u8] {
            let len = self.map_len - self.guard() - self.start;
            // SAFETY: the bytes from start to the guard page are mapped
            // read-write, and only self hands out references to them.
            unsafe { std::slice::from_raw_parts_mut(self.map.add(self.start), len) }
        }

        /// Length of the guard page.
        fn guard(&self) -> usize {
            // SAFETY: sysconf has no preconditions.
            unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
        }
    }

    #[cfg(unix)]
    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: map and map_len describe the mapping made in new.
            unsafe { libc::munmap(self.map.cast(), self.map_len) };
        }
    }

    #[test]
    #[cfg(unix)]
    fn encoders_and_decoder_stay_within_their_buffers() {
        // Pages, outputs and inputs that end right before an inaccessible
        // page: any read or write past them crashes the test.
        let mut rng = Rng(99);
        for round in 0..400 {
            let len = [PAGE_SIZE, 1, 15, 16, 17, 63, 64, 100, 1025, 5000][round % 10];
            let old: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut new = old.clone();
            // Changes concentrated near the end, where reads could overrun.
            let per_mille = [30, 300, 1000][rng.below(3)];
            for b in &mut new[len.saturating_sub(40)..] {
                if rng.below(1000) < per_mille {
                    *b = !*b;
                }
            }
            for _ in 0..rng.below(50) {
                let k = rng.below(len);
                new[k] = !new[k];
            }
            let (mut g_old, mut g_new) = (Guarded::new(&old), Guarded::new(&new));
            let full = reference_encode(&old, &new, &mut vec![0u8; 4 * len + 8]).unwrap();
            for dlen in [full, full + 1, full + 2, full.saturating_sub(1), full.saturating_sub(5), PAGE_SIZE] {
                let want = reference_encode(&old, &new, &mut vec![0u8; dlen]);
                let mut g_dst = Guarded::new(&vec![0u8; dlen]);
                for encoder in encoders() {
                    let got = encode_with(encoder, g_old.as_mut(), g_new.as_mut(), g_dst.as_mut());
                    assert_eq!(got, want, "{encoder:?}, round {round}, dst length {dlen}");
                }
                if let Some(n) = want {
                    let mut g_src = Guarded::new(&g_dst.as_mut()[..n]);
                    let mut g_page = Guarded::new(&old);
                    decode(g_src.as_mut(), g_page.as_mut()).unwrap();
                    assert!(g_page.as_mut() == &new[..]);
                }
            }
        }
    }

    #[test]
    fn short_pair_groups_match_reference() {
        // Runs of pairs like those the AVX2 encoder writes 8 at a time
        // (zrun below 128, 1 or 2 changed bytes, starting at least 4 bytes
        // before the end), with one pair at or just past each limit: a
        // zrun of 127 or 128, 2 or 3 changed bytes, and the last pair
        // starting 1 to 6 bytes before the end. `new` ends right before an
        // inaccessible page, so a read past it crashes the test.
        let mut rng = Rng(17);
        for len in [PAGE_SIZE, 1000, 64] {
            let old: Vec<u8> = (0..len).map(|k| (k * 5 + 1) as u8).collect();
            for tail in 1..=6 {
                for (zrun, nz) in [(3, 1), (127, 1), (128, 1), (127, 2), (5, 2), (5, 3)] {
                    for special in 0..10 {
                        // Pairs from the last one backwards: the last
                        // starts at len - tail.
                        let mut new = old.clone();
                        let mut start = len - tail;
                        for k in 0..40 {
                            let (z, n) = if k == special { (zrun, nz) } else { (1 + rng.below(9), 1 + rng.below(2)) };
                            let n = n.min(len - start);
                            for b in &mut new[start..start + n] {
                                *b = !*b;
                            }
                            let next = 1 + rng.below(2);
                            if start < z + next {
                                break;
                            }
                            start -= z + next;
                        }
                        let what = format!("length {len}, tail {tail}, pair ({zrun}, {nz}) at {special} from the end");
                        let mut g_new = Guarded::new(&new);
                        let full = reference_encode(&old, &new, &mut vec![0u8; 4 * len + 8]).unwrap();
                        for dlen in [full.saturating_sub(1), full, full + 40, PAGE_SIZE] {
                            let mut want_buf = vec![0u8; dlen];
                            let want = reference_encode(&old, &new, &mut want_buf);
                            for encoder in encoders() {
                                let mut got_buf = vec![0u8; dlen];
                                let got = encode_with(encoder, &old, g_new.as_mut(), &mut got_buf);
                                assert_eq!(got, want, "{encoder:?}, {what}, dst length {dlen}");
                                if let Some(n) = got {
                                    assert_eq!(got_buf[..n], want_buf[..n], "{encoder:?}, {what}, dst length {dlen}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn encoders_match_reference_on_patterns_near_chunk_ends() {
        // Runs of every length 1..40 starting at every offset around the
        // 64-byte block and the AVX2 encoder's 4096-byte chunk boundaries,
        // after zruns of 100..140 bytes (the 1- to 2-byte uleb step).
        let len = 2 * 4096 + 100;
        let old: Vec<u8> = (0..len).map(|k| (k * 13) as u8).collect();
        for run in 1..40 {
            for start in (4096 - 40..4096 + 8usize).chain(64 * 5 - 20..64 * 5 + 4) {
                for gap in [100, 127, 128, 140] {
                    let mut new = old.clone();
                    let first = start.saturating_sub(gap + 3);
                    for b in &mut new[first..first + 3] {
                        *b = !*b;
                    }
                    for b in &mut new[start..start + run] {
                        *b = !*b;
                    }
                    let full = reference_encode(&old, &new, &mut vec![0u8; 4 * len]).unwrap();
                    for dlen in [full - 1, full, full + 1, full + 2, PAGE_SIZE] {
                        check_encoders(&old, &new, dlen, &format!("run {run} at {start}, gap {gap}"));
                    }
                }
            }
        }
    }

    #[test]
    fn capture_record() {
        // qemu72_pc_kvm_m64_dirtybios_xbzrle.bin, page 0x10000.
        let mut old = vec![0u8; PAGE_SIZE];
        for (k, b) in old.iter_mut().enumerate() {
            *b = (k * 7 + 3) as u8;
        }
        old[256] = 0xe8;
        let mut page = old.clone();
        decode(&[0x80, 0x02, 0x01, 0xe9], &mut page).unwrap();
        assert_eq!(page[256], 0xe9);
        page[256] = 0xe8;
        assert_eq!(page, old);

        let mut new = old.clone();
        new[256] = 0xe9;
        assert_eq!(enc(&old, &new).unwrap(), [0x80, 0x02, 0x01, 0xe9]);
    }

    /// The decoder without its fast path, to compare the fast one against.
    fn reference_decode(src: &[u8], page: &mut [u8]) -> Result<(), DecodeError> {
        use DecodeErrorKind::*;
        let (slen, page_len) = (src.len(), page.len());
        let err = |offset, kind| DecodeError { offset, kind, page_len };
        let length = |i: usize, run| {
            if slen - i < 2 {
                return Err(err(i, Truncated(run, slen - i)));
            }
            uleb128_decode_small(&src[i..]).ok_or_else(|| err(i, LongUleb))
        };
        let (mut i, mut d) = (0usize, 0usize);
        while i < slen {
            let (count, used) = length(i, Run::Zrun)?;
            if i != 0 && count == 0 {
                return Err(err(i, ZeroZrun));
            }
            d += count as usize;
            if d > page_len {
                return Err(err(i, PastPage(Run::Zrun, d)));
            }
            i += used;
            let (count, used) = length(i, Run::Nzrun)?;
            let n = count as usize;
            if n == 0 {
                return Err(err(i, ZeroNzrun));
            }
            if d + n > page_len {
                return Err(err(i, PastPage(Run::Nzrun, d + n)));
            }
            if i + used + n > slen {
                return Err(err(i, PastInput(n)));
            }
            i += used;
            page[d..d + n].copy_from_slice(&src[i..i + n]);
            d += n;
            i += n;
        }
        Ok(())
    }

    #[test]
    fn decoder_matches_reference_on_any_input() {
        // Mostly well-formed pair sequences with small lengths (the fast
        // path), with random damage: zero lengths, long ulebs, runs past
        // the page or the input, truncation. Result, error and the page
        // (written up to the error) must all agree.
        let mut rng = Rng(0xdec0de);
        for round in 0..20000 {
            let page_len = [PAGE_SIZE, 64, 300][round % 3];
            let mut src = Vec::new();
            for p in 0..1 + rng.below(60) {
                let z = match rng.below(20) {
                    0 => 0,
                    1 => 128 + rng.below(300),
                    2 => rng.below(page_len + 50),
                    _ => rng.below(30) + usize::from(p > 0),
                };
                let n = match rng.below(20) {
                    0 => 0,
                    1 => 17 + rng.below(200),
                    _ => 1 + rng.below(16),
                };
                for v in [z, n] {
                    if v < 128 && rng.below(50) != 0 {
                        src.push(v as u8);
                    } else {
                        src.extend([(v & 0x7f) as u8 | 0x80, (v >> 7) as u8]);
                        if rng.below(100) == 0 {
                            *src.last_mut().unwrap() |= 0x80; // 3-byte uleb
                        }
                    }
                }
                src.extend((0..n).map(|_| rng.next() as u8));
            }
            match rng.below(4) {
                0 => src.truncate(rng.below(src.len() + 1)),
                1 => src.iter_mut().take(1).for_each(|b| *b = rng.next() as u8),
                _ => {}
            }
            let base: Vec<u8> = (0..page_len).map(|_| rng.next() as u8).collect();
            let (mut got, mut want) = (base.clone(), base);
            let got_result = decode(&src, &mut got);
            assert_eq!(got_result, reference_decode(&src, &mut want), "round {round}");
            assert!(got == want, "round {round}: pages differ");
        }
        // Arbitrary bytes.
        for round in 0..20000 {
            let src: Vec<u8> = (0..rng.below(64)).map(|_| (rng.next() % [256, 20][round % 2]) as u8).collect();
            let (mut got, mut want) = (vec![7u8; 100], vec![7u8; 100]);
            assert_eq!(decode(&src, &mut got), reference_decode(&src, &mut want), "bytes {src:?}");
            assert!(got == want, "bytes {src:?}: pages differ");
        }
    }

    #[test]
    fn copy_short_copies_every_length() {
        for n in 1..=16 {
            let src: Vec<u8> = (1..=n as u8).collect();
            let mut dst = vec![0u8; n + 2];
            // SAFETY: dst[1..n + 1] and src[..n] are in bounds and apart.
            unsafe { copy_short(dst.as_mut_ptr().add(1), src.as_ptr(), n) };
            assert_eq!(dst[1..n + 1], src[..], "length {n}");
            assert_eq!((dst[0], dst[n + 1]), (0, 0), "length {n}");
        }
    }

    fn decode_err(src: &[u8]) -> (usize, DecodeErrorKind) {
        let e = decode(src, &mut vec![0u8; PAGE_SIZE]).unwrap_err();
        (e.offset, e.kind)
    }

    #[test]
    fn decoder_rejects_what_qemu_rejects() {
        use DecodeErrorKind::*;
        // zrun 0 in the second pair.
        assert_eq!(decode_err(b"\x01\x01A\x00\x01B"), (3, ZeroZrun));
        // zrun 4095 then nzrun 2 runs past the page; a zrun alone too.
        let past = decode_err(&[0xff, 0x1f, 0x02, b'A', b'B']);
        assert_eq!(past, (2, PastPage(Run::Nzrun, 4097)));
        let past = decode_err(&[0x81, 0x20, 0x01, 0x00]);
        assert_eq!(past, (0, PastPage(Run::Zrun, 4097)));
        // A lone byte, alone or after a complete pair.
        assert_eq!(decode_err(&[0x05]), (0, Truncated(Run::Zrun, 1)));
        let lone = decode_err(&[0x00, 0x01, b'A', 0x05]);
        assert_eq!(lone, (3, Truncated(Run::Zrun, 1)));
        // A zrun with nothing after it.
        let zrun_only = decode_err(&[0x00, 0x01, b'A', 0x80, 0x01]);
        assert_eq!(zrun_only, (5, Truncated(Run::Nzrun, 0)));
        // 3-byte uleb, in a zrun and in an nzrun.
        assert_eq!(decode_err(&[0x80, 0x80, 0x01, 0x01, 0x01]), (0, LongUleb));
        assert_eq!(decode_err(&[0x01, 0x81, 0x80, 0x01]), (1, LongUleb));
        // nzrun of 0; nzrun longer than the remaining input.
        assert_eq!(decode_err(&[0x01, 0x00, 0x00]), (1, ZeroNzrun));
        assert_eq!(decode_err(&[0x00, 0x03, b'A', b'B']), (1, PastInput(3)));
    }

    #[test]
    fn decoder_accepts_edge_cases() {
        let mut page = vec![0x11u8; PAGE_SIZE];
        decode(&[], &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x11));
        // Non-canonical uleb 80 00 = zrun 0.
        decode(&[0x80, 0x00, 0x01, 0xaa], &mut page).unwrap();
        assert_eq!(page[0], 0xaa);
        assert!(page[1..].iter().all(|&b| b == 0x11));
        // A run ending exactly at the page end; zrun 0 in the first pair.
        decode(&[0xff, 0x1f, 0x01, 0xbb], &mut page).unwrap();
        assert_eq!(page[PAGE_SIZE - 1], 0xbb);
        decode(&[0x00, 0x02, 1, 2, 0x01, 0x01, 3], &mut page).unwrap();
        assert_eq!(page[..4], [1, 2, 0x11, 3]);
    }

    #[test]
    fn error_messages_are_specific() {
        let msg = |src: &[u8]| decode(src, &mut [0u8; PAGE_SIZE]).unwrap_err().to_string();
        assert_eq!(msg(&[0x01, 0x00, 0x00]), "xbzrle decode error at input byte 1: nzrun of length 0");
        let e = msg(&[0xff, 0x1f, 0x02, b'A', b'B']);
        assert_eq!(e, "xbzrle decode error at input byte 2: nzrun ends at page offset 4097, past the 4096-byte page");
        let e: Box<dyn std::error::Error> = decode(&[5], &mut []).unwrap_err().into();
        assert_eq!(e.to_string(), "xbzrle decode error at input byte 0: zrun length needs at least 2 bytes, 1 left");
    }

    #[test]
    fn block_masks() {
        assert_eq!(nonzero_byte_bits(0x8000_0100_0000_0001), 0xa1);
        let mut rng = Rng(7);
        for _ in 0..1000 {
            let o: Vec<u8> = (0..BLOCK).map(|_| rng.next() as u8).collect();
            let mut n = o.clone();
            let want = rng.next();
            for (j, b) in n.iter_mut().enumerate() {
                *b ^= ((want >> j) & 1) as u8 * (1 + rng.below(255) as u8);
            }
            let (o, n) = (o[..].try_into().unwrap(), n[..].try_into().unwrap());
            assert_eq!(diff_mask64(o, n), want);
            assert_eq!(diff_mask64_swar(o, n), want);
        }
        // A partial last block has no bits past the end.
        let (o, n) = ([0u8; 70], [1u8; 70]);
        assert_eq!(block_mask(&o, &n, 64), 0x3f);
    }
}
