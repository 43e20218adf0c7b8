//! The RAM record parser: the input is the payload of a "ram" START
//! section. The target supplies the header, configuration "none" and the
//! START header (section id 2, "ram", instance 0, version 4); the input must
//! supply the records, EOS, footer and whatever follows (PART/END sections,
//! EOF), or fail.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

/// Header, configuration "none", START of "ram" as section 2.
pub const PREFIX: &[u8] = &[
    0x51, 0x45, 0x56, 0x4d, 0x00, 0x00, 0x00, 0x03, // QEVM, version 3
    0x07, 0x00, 0x00, 0x00, 0x04, b'n', b'o', b'n', b'e', // configuration "none"
    0x01, 0x00, 0x00, 0x00, 0x02, 0x03, b'r', b'a', b'm', // START, id 2, "ram"
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, // instance 0, version 4
];

fuzz_target!(|data: &[u8]| {
    let mut s = Vec::with_capacity(PREFIX.len() + data.len());
    s.extend_from_slice(PREFIX);
    s.extend_from_slice(data);
    common::load(s);
});
