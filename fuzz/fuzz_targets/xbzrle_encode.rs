//! Every vectorised XBZRLE encoder this CPU can run (AVX2, and AVX-512
//! where the CPU has it), and the one `encode` picks, against the portable
//! one, byte for byte.
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
use livemig::ram::xbzrle::{decode, encode, encode_portable_for_fuzzing, vector_encoders_for_fuzzing, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let dlen = usize::from(u16::from_le_bytes(*head)) % (3 * PAGE_SIZE);
    let len = (rest.len() / 2).min(PAGE_SIZE);
    let (old, mask) = (&rest[..len], &rest[len..2 * len]);
    let new: Vec<u8> = old.iter().zip(mask).map(|(&o, &m)| if m < 0x20 { o ^ (m | 1) } else { o }).collect();

    // Buffers one byte longer than dlen whose last byte must stay as it is.
    let mut portable = vec![0x5au8; dlen + 1];
    let want = encode_portable_for_fuzzing(old, &new, &mut portable[..dlen]);
    assert_eq!(portable[dlen], 0x5a, "the portable encoder wrote past its output buffer");
    let mut encoders = vector_encoders_for_fuzzing();
    encoders.push(("picked by encode", encode));
    for (name, enc) in encoders {
        let mut fast = vec![0xa5u8; dlen + 1];
        let got = enc(old, &new, &mut fast[..dlen]);
        assert_eq!(got, want, "{name} and portable disagree on the result (output buffer {dlen} bytes)");
        assert_eq!(fast[dlen], 0xa5, "{name} wrote past its output buffer");
        if let Some(n) = got {
            assert!(fast[..n] == portable[..n], "{name} and portable disagree on the bytes");
        }
    }
    if let Some(n) = want {
        let mut page = old.to_vec();
        decode(&portable[..n], &mut page).expect("the encoding decodes");
        assert!(page == new, "the encoding does not restore the new page");
    }
});
