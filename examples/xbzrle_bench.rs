//! XBZRLE encode and decode throughput on 4 KiB pages with 1 %, 10 % and
//! 50 % of their bytes changed at random places. Prints one line per
//! density: `xbzrle changed=P encode_GBps=X encode_unhinted_GBps=U
//! encode_cached_GBps=C decode_GBps=Y` (medians of 5; GB of page data
//! processed per second, one core). X streams 16 MiB of old and 16 MiB of
//! new pages from memory, each encode prefetching the next page's two as
//! the sending side does (`encode_prefetching`); U is the same without
//! the prefetch (`encode`); C encodes the same number of pages from 8
//! pages that stay in cache.

use std::time::Instant;

use livemig::ram::xbzrle::{decode, encode, encode_prefetching};

fn main() {
    let pages = 4096;
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for pct in [1u64, 10, 50] {
        let old: Vec<u8> = (0..pages * 4096).map(|_| rnd() as u8).collect();
        let mut new = old.clone();
        for b in new.iter_mut() {
            if rnd() % 100 < pct {
                *b = b.wrapping_add(1 + (rnd() % 255) as u8);
            }
        }
        let mut enc = vec![0u8; pages * 4096];
        let mut lens = vec![None; pages];
        // The timed encodes write to one page-sized buffer, as the sending
        // side does; the encodings are kept for the decode below.
        let mut scratch = vec![0u8; 4096];
        // Alternated, so that both see the same state of the machine.
        let (mut enc_t, mut plain_t) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            for (p, len) in lens.iter_mut().enumerate() {
                let r = p * 4096..(p + 1) * 4096;
                let next = (p + 1).min(pages - 1) * 4096;
                *len = encode_prefetching(&old[r.clone()], &new[r], &mut scratch, [new[next..].as_ptr(), old[next..].as_ptr()]);
            }
            enc_t.push((pages * 4096) as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for (p, len) in lens.iter_mut().enumerate() {
                let r = p * 4096..(p + 1) * 4096;
                *len = encode(&old[r.clone()], &new[r], &mut scratch);
            }
            plain_t.push((pages * 4096) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        // The same work on 8 pages that stay in cache: the encoder's own
        // speed, without the memory traffic of 32 MiB of pages.
        let mut hot_t = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            for q in 0..pages {
                let p = q % 8;
                let r = p * 4096..(p + 1) * 4096;
                std::hint::black_box(encode(&old[r.clone()], &new[r], &mut scratch));
            }
            hot_t.push((pages * 4096) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        for (p, len) in lens.iter_mut().enumerate() {
            let r = p * 4096..(p + 1) * 4096;
            *len = encode(&old[r.clone()], &new[r.clone()], &mut enc[r]);
        }
        let mut dec_t = Vec::new();
        let mut page = vec![0u8; 4096];
        for _ in 0..5 {
            let mut bytes = 0usize;
            let t = Instant::now();
            for (p, len) in lens.iter().enumerate() {
                if let Some(n) = *len {
                    page.copy_from_slice(&old[p * 4096..(p + 1) * 4096]);
                    decode(&enc[p * 4096..p * 4096 + n], &mut page).unwrap();
                    bytes += 4096;
                }
            }
            if bytes > 0 {
                dec_t.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        let overflow = lens.iter().filter(|l| l.is_none()).count();
        enc_t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        dec_t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        hot_t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        plain_t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let dec = dec_t.get(dec_t.len() / 2).map_or("n/a".to_string(), |d| format!("{d:.2}"));
        println!(
            "xbzrle changed={pct}% encode_GBps={:.2} encode_unhinted_GBps={:.2} encode_cached_GBps={:.2} decode_GBps={dec} overflow_pages={overflow}/{pages}",
            enc_t[2], plain_t[2], hot_t[2]
        );
    }
}
