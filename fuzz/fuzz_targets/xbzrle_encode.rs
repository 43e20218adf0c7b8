//! The XBZRLE encoder this CPU runs (the AVX2 one on x86_64 CPUs that have
//! it) against the portable one, byte for byte.
//!
//! Input: 2 bytes of output length (little-endian, modulo 3 × 4096), then
//! the old page (the first half of the rest, at most 4096 bytes) and, as
//! long, a change mask: byte i of the new page is old[i] ^ (mask[i] | 1)
//! where mask[i] < 0x20 (about one byte in eight for random input), else
//! old[i]. Both encoders must return the same result (`None` for the same
//! overflow, or the same length) and, for `Some(n)`, the same n bytes, and
//! those must decode back to the new page. Neither may write past the end
//! of its output buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig::ram::xbzrle::{decode, encode, encode_portable_for_fuzzing, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let dlen = usize::from(u16::from_le_bytes(*head)) % (3 * PAGE_SIZE);
    let len = (rest.len() / 2).min(PAGE_SIZE);
    let (old, mask) = (&rest[..len], &rest[len..2 * len]);
    let new: Vec<u8> = old.iter().zip(mask).map(|(&o, &m)| if m < 0x20 { o ^ (m | 1) } else { o }).collect();

    // Buffers one byte longer than dlen whose last byte must stay as it is.
    let (mut fast, mut portable) = (vec![0xa5u8; dlen + 1], vec![0x5au8; dlen + 1]);
    let got = encode(old, &new, &mut fast[..dlen]);
    let want = encode_portable_for_fuzzing(old, &new, &mut portable[..dlen]);
    assert_eq!(got, want, "encoders disagree on the result (output buffer {dlen} bytes)");
    assert_eq!((fast[dlen], portable[dlen]), (0xa5, 0x5a), "an encoder wrote past its output buffer");
    if let Some(n) = got {
        assert!(fast[..n] == portable[..n], "encoders disagree on the bytes");
        let mut page = old.to_vec();
        decode(&fast[..n], &mut page).expect("the encoding decodes");
        assert!(page == new, "the encoding does not restore the new page");
    }
});
