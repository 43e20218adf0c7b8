//! Unit tests of the XBZRLE encoders and decoder.

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
    if avx512::supported() {
        return vec![Encoder::Portable, Encoder::Avx2, Encoder::Avx512];
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::supported() {
        eprintln!("note: this CPU lacks AVX-512 VBMI2; its XBZRLE encoder is not tested");
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
    assert_eq!(
        Encoder::best(),
        if avx512::supported() {
            Encoder::Avx512
        } else if avx2::supported() {
            Encoder::Avx2
        } else {
            Encoder::Portable
        }
    );
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
        // Whatever the prefetch hints point at: nothing, real pages,
        // or addresses that are not mapped.
        for next in prefetch_hints(old, new) {
            let mut got_buf = vec![0xa5u8; dlen + 64];
            let got = encode_with(encoder, old, new, &mut got_buf[..dlen], next);
            assert!(got_buf[dlen..].iter().all(|&b| b == 0xa5), "{encoder:?}, {what}: wrote past dst");
            assert_eq!(got, want, "{encoder:?}, {what}, dst length {dlen}, hints {next:?}");
            if let Some(n) = got {
                assert_eq!(got_buf[..n], want_buf[..n], "{encoder:?}, {what}, dst length {dlen}, hints {next:?}");
                let mut page = old.to_vec();
                decode(&got_buf[..n], &mut page).unwrap();
                assert!(page == new, "{encoder:?}, {what}: round trip");
            }
        }
    }
}

/// Prefetch hints for `encode_with`: none, the pages themselves, and
/// addresses no page is mapped at (near 0 and at the top of the address
/// space).
fn prefetch_hints(old: &[u8], new: &[u8]) -> [[*const u8; 2]; 3] {
    [[std::ptr::null(); 2], [new.as_ptr(), old.as_ptr()], [8 as *const u8, usize::MAX as *const u8]]
}

#[test]
fn prefetch_hints_do_not_change_the_output() {
    let mut rng = Rng(0x51ed_270b_2c3a_91f7);
    let old: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.next() as u8).collect();
    let mut new = old.clone();
    for _ in 0..400 {
        let i = rng.below(PAGE_SIZE);
        new[i] = new[i].wrapping_add(1);
    }
    let mut plain = vec![0u8; PAGE_SIZE];
    let want = encode(&old, &new, &mut plain).expect("fits");
    for next in prefetch_hints(&old, &new) {
        let mut got = vec![0u8; PAGE_SIZE];
        assert_eq!(encode_prefetching(&old, &new, &mut got, next), Some(want), "hints {next:?}");
        assert_eq!(got[..want], plain[..want], "hints {next:?}");
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
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
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
                let got = encode_with(encoder, g_old.as_mut(), g_new.as_mut(), g_dst.as_mut(), [std::ptr::null(); 2]);
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
                            let got = encode_with(encoder, &old, g_new.as_mut(), &mut got_buf, [std::ptr::null(); 2]);
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
