//! The whole loader: header, configuration, framing, commands, the "ram"
//! section (MEM_SIZE, ZERO, PAGE, XBZRLE, CONTINUE), "timer", "globalstate"
//! and the vmdesc, against a 1 MiB guarded "ram" block.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::load(data.to_vec());
});
