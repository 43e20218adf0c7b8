//! A device's load may write guest RAM (as a QEMU device's may): a zero
//! page the stream sends for such a page afterwards must clear it, as
//! QEMU 7.2 clears any page that does not read as zero. What the RAM load
//! learnt about untouched memory before a device section ran no longer
//! holds after it.

use std::ptr::null_mut;

use livemig::error::Result;
use livemig::loadvm::load_stream;
use livemig::qemu_file::{Direction, QemuFile};
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::transport::mem::MemChannel;

const PAGE: usize = 4096;
const LEN: usize = 4 << 20;

/// Where the device writes: the guest RAM's base address.
static BASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A live device whose load writes 0xaa over guest page 1 (e.g. a device
/// restoring a ring it keeps in guest memory).
struct Scribbler;

impl SaveVmHandler for Scribbler {
    fn is_live(&self) -> bool {
        true
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        let base = BASE.load(std::sync::atomic::Ordering::SeqCst) as *mut u8;
        // SAFETY: page 1 lies inside the registered block; nothing else
        // touches it during the load.
        unsafe { std::ptr::write_bytes(base.add(PAGE), 0xaa, PAGE) };
        f.check()
    }
}

/// A RAM page record: `page`, `flags`, the block's name unless CONTINUE.
fn record(s: &mut Vec<u8>, page: u64, flags: u64, name: Option<&str>) {
    s.extend_from_slice(&((page * PAGE as u64) | flags).to_be_bytes());
    if let Some(n) = name {
        s.push(n.len() as u8);
        s.extend_from_slice(n.as_bytes());
    }
}

fn section_start(s: &mut Vec<u8>, id: u32, name: &str, version: u32) {
    s.push(0x01);
    s.extend_from_slice(&id.to_be_bytes());
    s.push(name.len() as u8);
    s.extend_from_slice(name.as_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&version.to_be_bytes());
}

fn footer(s: &mut Vec<u8>, id: u32) {
    s.push(0x7e);
    s.extend_from_slice(&id.to_be_bytes());
}

#[test]
fn a_zero_page_after_a_device_section_clears_what_the_device_wrote() {
    // SAFETY: a fresh private anonymous mapping (untouched: it reads as
    // zero without being read), never unmapped.
    let ram = unsafe { libc::mmap(null_mut(), LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(ram, libc::MAP_FAILED);
    let base = ram.cast::<u8>();
    BASE.store(base as usize, std::sync::atomic::Ordering::SeqCst);
    livemig::ram::block_add("ram", base, LEN as u64).unwrap();
    livemig::savevm::register("scribbler", 0, 1, Box::new(Scribbler), 0x5c, Priority::Default).unwrap();

    let mut s = b"QEVM\0\0\0\x03".to_vec();
    // ram START: the block list, then a zero page in the first 2 MiB
    // (what the loader learns there: untouched, reads as zero).
    section_start(&mut s, 1, "ram", 4);
    s.extend_from_slice(&(LEN as u64 | 0x04).to_be_bytes());
    s.push(3);
    s.extend_from_slice(b"ram");
    s.extend_from_slice(&(LEN as u64).to_be_bytes());
    record(&mut s, 0, 0x02, Some("ram"));
    s.push(0);
    s.extend_from_slice(&0x10u64.to_be_bytes());
    footer(&mut s, 1);
    // The device's START: its load writes guest page 1.
    section_start(&mut s, 2, "scribbler", 1);
    footer(&mut s, 2);
    // ram END: page 1 is a zero page at the source.
    s.push(0x03);
    s.extend_from_slice(&1u32.to_be_bytes());
    record(&mut s, 1, 0x02 | 0x20, None);
    s.push(0);
    s.extend_from_slice(&0x10u64.to_be_bytes());
    footer(&mut s, 1);
    s.push(0x00);

    let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
    let r = load_stream(&mut f, None).map_err(|e| e.to_string());
    livemig::savevm::unregister("scribbler", 0x5c);
    assert_eq!(r, Ok(()));
    // SAFETY: page 1 lies inside the mapping; the load is over.
    let page1 = unsafe { std::slice::from_raw_parts(base.add(PAGE), PAGE) };
    assert!(page1.iter().all(|&b| b == 0), "page 1 keeps the device's 0x{:02x}: the source's zero page was not applied", page1[0]);
}
