//! The XBZRLE decoder and encoder.
//!
//! - Any input is decoded against a 4096-byte page (pre-filled from the
//!   input, so that unchanged runs keep something recognisable); it must
//!   return Ok or Err, never panic. If it succeeds, re-encoding the result
//!   against the original page and decoding that again must give the same
//!   page.
//! - With at least 8192 bytes, the first 4096 are an old page and the next
//!   4096 a new one: encode(old, new) must decode back to exactly `new`, or
//!   overflow only when the encoding really needs more than 4096 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig::ram::xbzrle::{decode, encode, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    // 1. Decode arbitrary input.
    let mut old = [0u8; PAGE_SIZE];
    for (i, b) in old.iter_mut().enumerate() {
        *b = data.get(i % data.len().max(1)).copied().unwrap_or(0).wrapping_add(i as u8);
    }
    let mut page = old;
    let src = &data[..data.len().min(PAGE_SIZE * 4)];
    if decode(src, &mut page).is_ok() {
        // Every byte that changed came from the input; re-encode and compare.
        let mut enc = vec![0u8; PAGE_SIZE * 4];
        let n = encode(&old, &page, &mut enc).expect("a 16 KiB buffer always holds an encoding");
        let mut again = old;
        decode(&enc[..n], &mut again).expect("own encoding decodes");
        assert!(again == page, "decode(encode(old, decode(src, old))) differs");
    }

    // 2. Round trip of a page pair.
    if data.len() >= 2 * PAGE_SIZE {
        let old: &[u8] = &data[..PAGE_SIZE];
        let new: &[u8] = &data[PAGE_SIZE..2 * PAGE_SIZE];
        let mut dst = [0u8; PAGE_SIZE];
        let mut big = vec![0u8; PAGE_SIZE * 4];
        let big_n = encode(old, new, &mut big).expect("a 16 KiB buffer always holds an encoding");
        match encode(old, new, &mut dst) {
            Some(n) => {
                assert!(n <= PAGE_SIZE);
                assert!(dst[..n] == big[..big_n], "the encoding depends on the buffer size");
                assert_eq!(n == 0, old == new, "empty encoding iff the pages are equal");
                let mut page = [0u8; PAGE_SIZE];
                page.copy_from_slice(old);
                decode(&dst[..n], &mut page).expect("encode's output decodes");
                assert!(page[..] == *new, "round trip does not restore the new page");
            }
            None => {
                // Overflow: a big enough buffer must hold an encoding longer
                // than (or, by QEMU's 2-byte rule, near) the page.
                let n = big_n;
                assert!(n + 2 > PAGE_SIZE, "overflowed with an encoding of only {n} bytes");
                let mut page = [0u8; PAGE_SIZE];
                page.copy_from_slice(old);
                decode(&big[..n], &mut page).expect("encode's output decodes");
                assert!(page[..] == *new, "round trip (large buffer) does not restore the new page");
            }
        }
    }
});
