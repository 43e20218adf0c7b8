//! Passes 1 and 2 of the vectorised encoder (see `avx2.rs`) with AVX-512
//! BW and VBMI2.
//!
//! Pass 1 compares a block with one VPCMPNEQB into a mask register. Pass
//! 2 lists the boundaries with VPCOMPRESSW, which packs the 16-bit lanes
//! of a vector that a mask selects to its low lanes: given the page
//! offsets of a block's 64 bytes, two of them (one per half of the
//! block's transition mask) list its boundaries, where `avx2.rs` needs a
//! table lookup per mask byte. At 10 % of bytes changed, pass 2 took two
//! thirds of the AVX2 encode.

use super::avx2::prefetch_line;
use super::BLOCK;
use std::arch::x86_64::*;

/// Whether this CPU has the features [`list_blocks`] is compiled for, on
/// top of those of `avx2::encode`.
pub(super) fn supported() -> bool {
    super::avx2::supported()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi2")
}

/// Pass 1 of `avx2::encode` for the whole blocks of `old` and `new`
/// (equally long): writes each block's transition mask to `tmask` (one
/// VPCMPNEQB per block), updates `carry` (whether the previous block
/// ended with a changed byte) and returns the count of set bits.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt,avx512f,avx512bw,avx512vbmi2")]
pub(super) fn transitions(old: &[u8], new: &[u8], carry: &mut u64, tmask: &mut [u64]) -> usize {
    let mut count = 0;
    for ((o, n), t) in old.chunks_exact(BLOCK).zip(new.chunks_exact(BLOCK)).zip(tmask.iter_mut()) {
        // SAFETY: o and n are 64 readable bytes each; loadu has no
        // alignment requirement.
        let m = unsafe { _mm512_cmpneq_epi8_mask(_mm512_loadu_si512(o.as_ptr().cast()), _mm512_loadu_si512(n.as_ptr().cast())) };
        *t = m ^ ((m << 1) | *carry);
        *carry = m >> 63;
        count += t.count_ones() as usize;
    }
    count
}

/// 0, 1, .., 31: the offsets of a half block's bytes.
static IOTA: [u16; 32] = {
    let mut v = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        v[i] = i as u16;
        i += 1;
    }
    v
};

/// Writes, for the blocks whose transition masks are `tmask` (block `k`
/// at page offset `base + 64 k`), the page offset of each set bit,
/// ascending, to `p[0..]`, and returns `n` plus their count. Meanwhile
/// it prefetches a line of each of `ahead` per block, as pass 2 of
/// `avx2::encode` does.
///
/// # Safety
///
/// The CPU must support the features of [`supported`]; `base + 64
/// tmask.len()` must be at most 16384; `p` must be valid for writing
/// `c + 64` entries, where `c` is the count of set bits of all masks
/// but the last.
#[target_feature(enable = "avx2,bmi1,bmi2,popcnt,avx512f,avx512bw,avx512vbmi2")]
pub(super) unsafe fn list_blocks(mut p: *mut u16, n: usize, base: usize, tmask: &[u64], ahead: &[*const u8; 2]) -> usize {
    // SAFETY: IOTA is 64 readable bytes.
    let iota = unsafe { _mm512_loadu_si512(IOTA.as_ptr().cast()) };
    // Offsets fit 16 bits: below 16384 (our caller's promise).
    let mut lo = _mm512_add_epi16(iota, _mm512_set1_epi16(base as i16));
    let half = _mm512_set1_epi16(32);
    let mut count = 0;
    for (k, &t) in tmask.iter().enumerate() {
        prefetch_line(ahead, base + k * BLOCK);
        let (m0, m1) = (t as u32, (t >> 32) as u32);
        let hi = _mm512_add_epi16(lo, half);
        // SAFETY: each store writes 32 entries: the first at the block's
        // own start, the second at most 32 entries past it, so the block
        // writes below 64 entries past the count before it (within our
        // caller's bound).
        unsafe {
            _mm512_storeu_si512(p.cast(), _mm512_maskz_compress_epi16(m0, lo));
            p = p.add(m0.count_ones() as usize);
            _mm512_storeu_si512(p.cast(), _mm512_maskz_compress_epi16(m1, hi));
            p = p.add(m1.count_ones() as usize);
        }
        lo = _mm512_add_epi16(hi, half);
        count += t.count_ones() as usize;
    }
    n + count
}
