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
/// On x86_64 CPUs with AVX2, and more so with AVX-512 BW and VBMI2
/// (detected once, at the first call), this runs a vectorised encoder;
/// elsewhere a portable one. All give the same output.
///
/// # Panics
///
/// If `old` and `new` differ in length or are longer than 16383 bytes (a run
/// length must fit a 2-byte uleb).
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode_with(Encoder::best(), old, new, dst, [std::ptr::null(); 2])
}

/// [`encode`], fetching meanwhile into the cache the `old.len()` bytes at
/// each of `next` (the next page to be encoded and its old version, say),
/// so that memory works while the encoder computes.
///
/// The pointers are only prefetched, never read: they may be null,
/// dangling or anywhere. The output is [`encode`]'s. The portable encoder
/// ignores them.
///
/// Spread over the encode, the prefetches leave the hardware prefetchers,
/// which stop at page boundaries, only the page being encoded; all
/// fetched at once, before the encode, they would make it slower.
///
/// # Panics
///
/// As [`encode`].
pub fn encode_prefetching(old: &[u8], new: &[u8], dst: &mut [u8], next: [*const u8; 2]) -> Option<usize> {
    encode_with(Encoder::best(), old, new, dst, next)
}

/// [`encode`] with the portable encoder whatever the CPU: the reference the
/// vectorised one is fuzzed against (`fuzz/fuzz_targets/xbzrle_encode.rs`).
///
/// # Panics
///
/// As [`encode`].
#[doc(hidden)]
pub fn encode_portable_for_fuzzing(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode_with(Encoder::Portable, old, new, dst, [std::ptr::null(); 2])
}

/// An encoder with [`encode`]'s signature.
#[doc(hidden)]
pub type EncodeFn = fn(&[u8], &[u8], &mut [u8]) -> Option<usize>;

/// Each encoder this CPU can run but the portable one, by name: what
/// `fuzz/fuzz_targets/xbzrle_encode.rs` compares with
/// [`encode_portable_for_fuzzing`] (so that a CPU with AVX-512 fuzzes the
/// AVX2 encoder too).
#[doc(hidden)]
pub fn vector_encoders_for_fuzzing() -> Vec<(&'static str, EncodeFn)> {
    let mut v: Vec<(&'static str, EncodeFn)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if Encoder::Avx2 <= Encoder::best() {
            v.push(("avx2", |o, n, d| encode_with(Encoder::Avx2, o, n, d, [std::ptr::null(); 2])));
        }
        if Encoder::Avx512 <= Encoder::best() {
            v.push(("avx512", |o, n, d| encode_with(Encoder::Avx512, o, n, d, [std::ptr::null(); 2])));
        }
    }
    v
}

/// The implementations of [`encode`], each able to run where the next one
/// can (AVX-512 VBMI2 implies AVX2): a CPU runs every encoder up to
/// [`Encoder::best`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Encoder {
    /// [`encode_portable`]: any CPU.
    Portable,
    /// [`avx2::encode`]: x86_64 CPUs with AVX2, BMI1, BMI2 and POPCNT.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// [`avx2::encode`] listing run boundaries with
    /// [`avx512::list_blocks`]: those CPUs with AVX-512 BW and VBMI2 too.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Encoder {
    /// The fastest encoder this CPU can run, detected once.
    fn best() -> Encoder {
        static BEST: OnceLock<Encoder> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx512::supported() {
                return Encoder::Avx512;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2::supported() {
                return Encoder::Avx2;
            }
            Encoder::Portable
        })
    }
}

/// [`encode_prefetching`] with the given implementation.
///
/// # Panics
///
/// As [`encode`]; also if this CPU cannot run `encoder`.
fn encode_with(encoder: Encoder, old: &[u8], new: &[u8], dst: &mut [u8], next: [*const u8; 2]) -> Option<usize> {
    let len = old.len();
    assert_eq!(len, new.len(), "xbzrle encode: pages differ in length");
    assert!(len <= ULEB_SMALL_MAX as usize, "xbzrle encode: page too long");
    match encoder {
        Encoder::Portable => encode_portable(old, new, dst),
        #[cfg(target_arch = "x86_64")]
        Encoder::Avx2 => {
            assert!(encoder <= Encoder::best(), "xbzrle encode: this CPU lacks AVX2");
            // SAFETY: best() is Avx2 or Avx512 only where avx2::supported()
            // found the features avx2::encode is compiled for on this CPU,
            // and the lengths were checked above.
            unsafe { avx2::encode::<false>(old, new, dst, next) }
        }
        #[cfg(target_arch = "x86_64")]
        Encoder::Avx512 => {
            assert!(encoder <= Encoder::best(), "xbzrle encode: this CPU lacks AVX-512 VBMI2");
            // SAFETY: best() is Avx512 only where avx512::supported() found
            // the features of avx2::encode and of avx512's passes on this
            // CPU, and the lengths were checked above.
            unsafe { avx2::encode::<true>(old, new, dst, next) }
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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

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
mod tests;
