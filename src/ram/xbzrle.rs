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
/// # Panics
///
/// If `old` and `new` differ in length or are longer than 16383 bytes (a run
/// length must fit a 2-byte uleb).
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let len = old.len();
    assert_eq!(len, new.len(), "xbzrle encode: pages differ in length");
    assert!(len <= ULEB_SMALL_MAX as usize, "xbzrle encode: page too long");
    if len == 0 {
        return Some(0);
    }
    // Walk the page a 64-byte block at a time. `m` has bit j set when byte
    // j of the block differs; `t` marks where that changes, so its set bits
    // are, in order, the start and the end of each nzrun (runs are maximal
    // by construction). An nzrun may start in one block and end in a later
    // one, or at the end of the page.
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
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_movemask_epi8, _mm_set_epi64x};
    let mut equal = 0u64;
    for k in 0..BLOCK / 16 {
        let lo = k * 16;
        let a = _mm_set_epi64x(load_le(&o[lo + 8..]) as i64, load_le(&o[lo..]) as i64);
        let b = _mm_set_epi64x(load_le(&n[lo + 8..]) as i64, load_le(&n[lo..]) as i64);
        let bits = _mm_movemask_epi8(_mm_cmpeq_epi8(a, b)) as u32 as u64;
        equal |= bits << lo;
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
            page[d] = src[i]; // the common case; skips a memcpy call
        } else {
            page[d..d + n].copy_from_slice(&src[i..i + n]);
        }
        d += n;
        i += n;
    }
    Ok(())
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

    #[test]
    fn random_pages_match_reference_and_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        for round in 0..3000 {
            let len = if round % 5 == 0 { rng.below(300) } else { PAGE_SIZE };
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
            let full = reference_encode(&old, &new, &mut vec![0u8; 3 * PAGE_SIZE]).unwrap();
            let dlen = match round % 3 {
                0 => PAGE_SIZE,
                1 => rng.below(PAGE_SIZE + 1),
                _ => (full + rng.below(5)).saturating_sub(2).min(PAGE_SIZE),
            };
            let got = encode(&old, &new, &mut a[..dlen]);
            let want = reference_encode(&old, &new, &mut b[..dlen]);
            assert_eq!(got, want, "round {round}");
            if let Some(n) = got {
                assert_eq!(a[..n], b[..n], "round {round}");
                let mut page = old.clone();
                decode(&a[..n], &mut page).unwrap();
                assert_eq!(page, new, "round {round}");
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
