//! The destination side of the "ram" section: records are checked against
//! the registered blocks and written straight into them, never outside.
//! Messages follow a QEMU 7.2 destination's.

use std::sync::Arc;

use super::residency::Residency;
use super::scan::is_zero_raw;
use super::{flags, RamBlock, PAGE};
use crate::error::{MigError, Result};
use crate::qemu_file::QemuFile;

/// Per-stream load state: the last block named (CONTINUE resolves to it,
/// across sections).
pub struct Loader {
    blocks: Vec<Arc<RamBlock>>,
    /// Index in `blocks` of the last block named. (Blocks are looked up by
    /// index, not by cloning their `Arc`: a clone and a drop per page are
    /// two locked instructions, each waiting for the page's stores.)
    last_block: Option<usize>,
    page: Box<[u8; PAGE]>,
    enc: Box<[u8; PAGE]>,
    /// Which pages are backed by memory yet (faulting in, zero pages).
    residency: Residency,
}

impl Loader {
    /// A loader over the blocks registered now.
    pub fn new() -> Loader {
        Self::with_blocks(super::blocks())
    }

    /// A loader over `blocks`.
    pub(super) fn with_blocks(blocks: Vec<Arc<RamBlock>>) -> Loader {
        Loader { blocks, last_block: None, page: Box::new([0; PAGE]), enc: Box::new([0; PAGE]), residency: Residency::default() }
    }

    /// The block named `name`, compared as the C string 7.2 reads a name
    /// into (it ends at a NUL).
    fn find(&self, name: &[u8]) -> Option<usize> {
        let name = crate::loadvm::c_str(name);
        self.blocks.iter().position(|b| b.idstr.as_bytes() == name)
    }

    /// The block of a page record (its index in `blocks`): named, or the
    /// last one for CONTINUE.
    fn block_for(&mut self, f: &mut QemuFile, flg: u64, addr: u64) -> Result<usize> {
        if flg & flags::CONTINUE != 0 {
            return self.last_block.ok_or_else(|| MigError::new(format!("Ack, bad migration stream! Illegal RAM offset {addr:x}")));
        }
        let name = f.get_counted_bytes();
        f.check()?;
        let b = self.find(&name).ok_or_else(|| {
            MigError::new(format!("Can't find block {}: Illegal RAM offset {addr:x}", String::from_utf8_lossy(crate::loadvm::c_str(&name))))
        })?;
        self.last_block = Some(b);
        Ok(b)
    }

    /// The page at `addr` in `b`, or the error if it lies outside.
    fn page_ptr(b: &RamBlock, addr: u64) -> Result<*mut u8> {
        if addr >= b.length() {
            return Err(MigError::new(format!("Illegal RAM offset {addr:x}")));
        }
        Ok(b.page_ptr((addr / PAGE as u64) as usize))
    }

    /// Something other than this loader (a device's load) may have
    /// written guest RAM: the pages known to read as zero untouched are
    /// forgotten, and probed again when a zero page needs them.
    pub fn guest_ram_may_have_changed(&mut self) {
        self.residency.forget_zero_pages();
    }

    /// Reads one section's records up to EOS.
    pub fn load(&mut self, f: &mut QemuFile, version_id: u32) -> Result<()> {
        if version_id != 4 {
            return Err(MigError::new(format!("ram: stream version {version_id} is not supported (need 4)")));
        }
        loop {
            let header = f.get_be64();
            f.check()?;
            let addr = header & !(PAGE as u64 - 1);
            let flg = header & (PAGE as u64 - 1);
            if flg & flags::COMPRESS_PAGE != 0 {
                // As 7.2 without the compress capability: a compressed page
                // is refused whatever flags come with it, before anything
                // else is looked at.
                return Err(MigError::new("Received an unexpected compressed page"));
            }
            // As 7.2: a record with a page flag names its page (the block
            // read and found, the offset checked) before its flags are
            // looked at as a whole.
            let target = if flg & (flags::ZERO | flags::PAGE | flags::XBZRLE) != 0 {
                let i = self.block_for(f, flg, addr)?;
                Some((i, Self::page_ptr(&self.blocks[i], addr)?))
            } else {
                None
            };
            match (flg & !flags::CONTINUE, target) {
                (flags::MEM_SIZE, _) => self.load_mem_size(f, addr)?,
                (flags::ZERO, Some((i, p))) => {
                    let fill = f.get_u8();
                    f.check()?;
                    let b = &self.blocks[i];
                    let page = (addr / PAGE as u64) as usize;
                    if fill == 0 && self.residency.reads_as_zero(b, page) {
                        continue; // untouched memory: left untouched
                    }
                    // SAFETY: `p` is a whole page inside the registered block
                    // (checked); the destination VM does not run during a load.
                    unsafe {
                        if fill != 0 || !is_zero_raw(p, PAGE) {
                            std::ptr::write_bytes(p, fill, PAGE);
                            self.residency.written(b, page);
                        }
                    }
                }
                (flags::PAGE, Some((i, p))) => {
                    self.residency.before_write(&self.blocks[i], (addr / PAGE as u64) as usize);
                    // SAFETY: as above; `get_guest` writes exactly one page.
                    unsafe { f.get_guest(p, PAGE) };
                    f.check()?;
                }
                (flags::XBZRLE, Some((i, p))) => {
                    self.load_xbzrle(f, p, addr)?;
                    self.residency.written(&self.blocks[i], (addr / PAGE as u64) as usize);
                }
                // With or without CONTINUE, as in QEMU.
                (flags::EOS, _) => return Ok(()),
                // 7.2 hands any other record with the hook flag to the RDMA
                // hook, which fails without a message on other channels.
                _ if flg & flags::HOOK != 0 => return Err(MigError::new("RAM_SAVE_FLAG_HOOK (RDMA) is not supported")),
                _ => return Err(MigError::new(format!("Unknown combination of migration flags: {flg:#x}"))),
            }
        }
    }

    fn load_mem_size(&mut self, f: &mut QemuFile, total: u64) -> Result<()> {
        let mut left = total;
        while left > 0 {
            let name = f.get_counted_bytes();
            let len = f.get_be64();
            f.check()?;
            let name_s = String::from_utf8_lossy(crate::loadvm::c_str(&name)).into_owned();
            let b = self.find(&name).ok_or_else(|| MigError::new(format!("Unknown ramblock \"{name_s}\", cannot accept migration")))?;
            self.blocks[b].resize(len)?;
            left = left
                .checked_sub(len)
                .ok_or_else(|| MigError::new(format!("ram: MEM_SIZE total 0x{total:x} is less than the listed blocks")))?;
        }
        Ok(())
    }

    fn load_xbzrle(&mut self, f: &mut QemuFile, p: *mut u8, addr: u64) -> Result<()> {
        let fail = |why: &str| MigError::new(format!("Failed to load XBZRLE page - {why}: Failed to decompress XBZRLE page at {addr:x}"));
        let enc_flag = f.get_u8();
        let len = f.get_be16() as usize;
        f.check()?;
        if enc_flag != flags::ENCODING_FLAG_XBZRLE {
            return Err(fail("wrong compression!"));
        }
        if len > PAGE {
            return Err(fail("len overflow!"));
        }
        f.get_buffer(&mut self.enc[..len]);
        f.check()?;
        // Decode against the page's current content, on a private copy, so
        // a bad record cannot leave the guest page half-written.
        // SAFETY: `p` is a whole page inside the registered block; the
        // destination VM does not run during a load.
        unsafe { std::ptr::copy_nonoverlapping(p, self.page.as_mut_ptr(), PAGE) };
        super::xbzrle::decode(&self.enc[..len], &mut self.page[..]).map_err(|e| {
            log::debug!("xbzrle: {e}");
            fail("decode error!")
        })?;
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(self.page.as_ptr(), p, PAGE) };
        Ok(())
    }
}

impl Default for Loader {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_file::Direction;
    use crate::transport::mem::MemChannel;

    /// Loads one RAM section payload `s` (EOS appended) into `block`.
    fn load_payload(block: Arc<RamBlock>, mut s: Vec<u8>) {
        s.extend_from_slice(&flags::EOS.to_be_bytes());
        let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
        Loader::with_blocks(vec![block]).load(&mut f, 4).expect("load");
    }

    /// Whether every byte of page `pg` from `base` is `v`.
    ///
    /// # Safety
    ///
    /// The page must lie inside a mapping nothing writes meanwhile.
    unsafe fn filled(base: *const u8, pg: usize, v: u8) -> bool {
        // SAFETY: per the function's contract.
        (0..PAGE).all(|i| unsafe { *base.add(pg * PAGE + i) } == v)
    }

    /// A memfd (as vhost-user hosts back guest RAM with): a zero page
    /// aimed at a hole leaves it a hole (no page allocated), one aimed at
    /// written data clears it.
    #[test]
    fn zero_pages_on_a_memfd() {
        use std::os::fd::AsRawFd;
        let len = 4 << 20;
        // SAFETY: a NUL-terminated name; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"livemig-dst".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a descriptor we own from here on.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).expect("size");
        // SAFETY: a fresh shared mapping of the memfd, unmapped at the end.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        // SAFETY: page 1 lies inside the mapping.
        unsafe { std::ptr::write_bytes(base.add(PAGE), 0x77, PAGE) };
        let block = Arc::new(RamBlock::for_test("ram", base, len as u64));
        let mut s = Vec::new();
        for (i, (page, fill)) in [(1u64, 0u8), (600, 0), (601, 0x5a)].into_iter().enumerate() {
            s.extend_from_slice(&((page * PAGE as u64) | flags::ZERO | if i == 0 { 0 } else { flags::CONTINUE }).to_be_bytes());
            if i == 0 {
                s.push(3);
                s.extend_from_slice(b"ram");
            }
            s.push(fill);
        }
        load_payload(block, s);
        // SAFETY: the pages lie inside the mapping.
        unsafe {
            assert!(filled(base, 1, 0), "page 1 cleared");
            assert!(filled(base, 601, 0x5a), "page 601 filled");
        }
        // SAFETY: lseek on our descriptor.
        let data = unsafe { libc::lseek(file.as_raw_fd(), 600 * PAGE as libc::off_t, libc::SEEK_DATA) };
        assert_eq!(data, 601 * PAGE as libc::off_t, "page 600 is still a hole");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
    }

    /// A fresh anonymous mapping: zero pages for untouched memory leave
    /// it untouched, a zero page over loaded data clears it, and a page
    /// filled with a byte is written.
    #[test]
    fn zero_pages_on_fresh_and_loaded_memory() {
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        let block = Arc::new(RamBlock::for_test("ram", base, len as u64));
        let page = PAGE as u64;
        let mut s = Vec::new();
        let rec = |s: &mut Vec<u8>, addr: u64, flag: u64, first: bool| {
            s.extend_from_slice(&(addr | flag | if first { 0 } else { flags::CONTINUE }).to_be_bytes());
            if first {
                s.push(3);
                s.extend_from_slice(b"ram");
            }
        };
        // Page 1 loaded with data, then cleared; page 2 filled with 0x5a;
        // page 600 (another chunk, untouched) sent as zero.
        rec(&mut s, page, flags::PAGE, true);
        s.extend_from_slice(&[0xab; PAGE]);
        rec(&mut s, page, flags::ZERO, false);
        s.push(0);
        rec(&mut s, 2 * page, flags::ZERO, false);
        s.push(0x5a);
        rec(&mut s, 600 * page, flags::ZERO, false);
        s.push(0);
        load_payload(block, s);
        // SAFETY: the pages lie inside the mapping.
        unsafe {
            assert!(filled(base, 1, 0), "page 1 cleared");
            assert!(filled(base, 2, 0x5a), "page 2 filled");
        }
        let mut vec = [0u8; 1];
        // SAFETY: one page inside the mapping, one byte of output.
        assert_eq!(unsafe { libc::mincore(base.add(600 * PAGE).cast(), PAGE, vec.as_mut_ptr()) }, 0);
        assert_eq!(vec[0] & 1, 0, "an untouched page stays untouched");
        // SAFETY: the page lies inside the mapping.
        assert!(unsafe { filled(base, 600, 0) });
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
    }

    /// A compressed page is refused with 7.2's message whatever flags
    /// come with it (7.2 checks for it before anything else), and the
    /// stream is not read further.
    #[test]
    fn compressed_page_refused_with_any_flags() {
        let mut mem = vec![0u8; PAGE];
        let block = Arc::new(RamBlock::for_test("ram", mem.as_mut_ptr(), mem.len() as u64));
        for flg in [0x100, 0x120, 0x108, 0x102, 0x140, 0x180, 0x110, 0x300, 0x104] {
            let mut s = (flg as u64).to_be_bytes().to_vec();
            s.push(0xee);
            let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
            let e = Loader::with_blocks(vec![block.clone()]).load(&mut f, 4).expect_err("refused");
            assert_eq!(e.to_string(), "Received an unexpected compressed page", "flags {flg:#x}");
            assert_eq!(f.get_u8(), 0xee, "flags {flg:#x}: nothing read after the header");
        }
    }

    /// A record with a page flag (ZERO, PAGE, XBZRLE) among others names
    /// its page first, as in 7.2: a block not found or an offset outside
    /// it is what is reported (what a 7.2 destination printed for each),
    /// and only a page that exists gets "Unknown combination".
    #[test]
    fn a_page_is_resolved_before_the_flags_are_judged() {
        let mut mem = vec![0u8; 2 * PAGE];
        let block = Arc::new(RamBlock::for_test("ram", mem.as_mut_ptr(), mem.len() as u64));
        let rec = |header: u64, name: &[u8]| {
            let mut s = header.to_be_bytes().to_vec();
            if !name.is_empty() {
                s.push(name.len() as u8);
                s.extend_from_slice(name);
            }
            s.push(0);
            s
        };
        for (s, want) in [
            (rec(0x100a, b"nosuch"), "Can't find block nosuch: Illegal RAM offset 1000"),
            (rec(0x200a, b"ram"), "Illegal RAM offset 2000"),
            (rec(0x1082, b"nosuch"), "Can't find block nosuch: Illegal RAM offset 1000"),
            (rec(0x1032, b""), "Ack, bad migration stream! Illegal RAM offset 1000"),
            (rec(0x2048, b"ram"), "Illegal RAM offset 2000"),
            (rec(0x100a, b"ram"), "Unknown combination of migration flags: 0xa"),
            (rec(0x1012, b"ram"), "Unknown combination of migration flags: 0x12"),
            (rec(0x1082, b"ram"), "RAM_SAVE_FLAG_HOOK (RDMA) is not supported"),
            (rec(0x84, b""), "RAM_SAVE_FLAG_HOOK (RDMA) is not supported"),
        ] {
            let mut f = QemuFile::new(Box::new(MemChannel::source(s.clone())), Direction::Read);
            let e = Loader::with_blocks(vec![block.clone()]).load(&mut f, 4).expect_err("refused");
            assert_eq!(e.to_string(), want, "{s:02x?}");
        }
        assert!(mem.iter().all(|&b| b == 0), "nothing written");
    }

    /// EOS ends the section with CONTINUE set too (QEMU switches on the
    /// flags without CONTINUE), and nothing after it is read.
    #[test]
    fn eos_with_continue_ends_the_section() {
        let mut mem = vec![0u8; 2 * PAGE];
        let block = Arc::new(RamBlock::for_test("ram", mem.as_mut_ptr(), mem.len() as u64));
        let mut s = (PAGE as u64 | flags::ZERO).to_be_bytes().to_vec();
        s.push(3);
        s.extend_from_slice(b"ram");
        s.push(0x5a);
        s.extend_from_slice(&(flags::EOS | flags::CONTINUE).to_be_bytes());
        s.push(0xee); // what follows the section
        let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
        Loader::with_blocks(vec![block]).load(&mut f, 4).expect("EOS|CONTINUE ends the section");
        assert_eq!(f.get_u8(), 0xee, "the section ends at EOS");
        assert!(mem[PAGE..].iter().all(|&b| b == 0x5a), "the page before EOS is loaded");
    }

    /// Hostile XBZRLE records are refused with QEMU 7.2's texts, and
    /// nothing is written: not the page (a bad record is decoded on a
    /// copy), not the block's other page, not the memory around the block.
    /// A record whose header comes before any block, names an unknown
    /// block, or points past the block is refused before its payload is
    /// read.
    #[test]
    fn hostile_xbzrle_records_write_nothing() {
        // Guard pages around a 2-page block.
        let mut mem = vec![0x5au8; 4 * PAGE];
        let base = mem.as_mut_ptr().wrapping_add(PAGE);
        let block = Arc::new(RamBlock::for_test("ram", base, 2 * PAGE as u64));
        let rec = |header: u64, name: &[u8], enc_flag: u8, len: u16, data: &[u8]| {
            let mut s = header.to_be_bytes().to_vec();
            if !name.is_empty() {
                s.push(name.len() as u8);
                s.extend_from_slice(name);
            }
            s.push(enc_flag);
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(data);
            s
        };
        let fail = |why: &str, at: u64| format!("Failed to load XBZRLE page - {why}: Failed to decompress XBZRLE page at {at:x}");
        let x = flags::XBZRLE;
        let mut long_nzrun = vec![0x00, 0x80, 0x20]; // zrun 0, nzrun 4096
        long_nzrun.extend_from_slice(&[0xee; 4093]); // 3 bytes short
        for (s, want) in [
            // zrun 4095 then nzrun 2: past the page.
            (rec(0x1000 | x, b"ram", 1, 5, &[0xff, 0x1f, 0x02, 0xee, 0xee]), fail("decode error!", 0x1000)),
            // zrun 4096 then nzrun 1.
            (rec(0x1000 | x, b"ram", 1, 4, &[0x80, 0x20, 0x01, 0xee]), fail("decode error!", 0x1000)),
            // A good pair, then an nzrun past the input: the good pair is
            // not applied either.
            (rec(x, b"ram", 1, 7, &[0x00, 0x01, 0xee, 0x01, 0x05, 0xee, 0xee]), fail("decode error!", 0)),
            // An nzrun longer than the data that follows.
            (rec(x, b"ram", 1, 4096, &long_nzrun), fail("decode error!", 0)),
            (rec(x, b"ram", 1, 4097, &[0xee; 4097]), fail("len overflow!", 0)),
            (rec(x, b"ram", 2, 3, &[0x00, 0x01, 0xee]), fail("wrong compression!", 0)),
            (rec(0x2000 | x, b"ram", 1, 3, &[0x00, 0x01, 0xee]), "Illegal RAM offset 2000".to_string()),
            (rec(0xffff_ffff_ffff_f000 | x, b"ram", 1, 3, &[0x00, 0x01, 0xee]), "Illegal RAM offset fffffffffffff000".to_string()),
            (rec(x, b"nosuch", 1, 3, &[0x00, 0x01, 0xee]), "Can't find block nosuch: Illegal RAM offset 0".to_string()),
            (rec(x | flags::CONTINUE, b"", 1, 3, &[0x00, 0x01, 0xee]), "Ack, bad migration stream! Illegal RAM offset 0".to_string()),
        ] {
            let mut f = QemuFile::new(Box::new(MemChannel::source(s.clone())), Direction::Read);
            let e = Loader::with_blocks(vec![block.clone()]).load(&mut f, 4).expect_err("refused");
            assert_eq!(e.to_string(), want, "{:02x?}", &s[..s.len().min(24)]);
        }
        assert!(mem.iter().all(|&b| b == 0x5a), "nothing written");
        // The same page with a good record: only its byte changes.
        load_payload(block, rec(0x1000 | x, b"ram", 1, 4, &[0xff, 0x1f, 0x01, 0xee]));
        let changed: Vec<usize> = mem.iter().enumerate().filter(|&(_, &b)| b != 0x5a).map(|(i, _)| i).collect();
        assert_eq!(changed, [2 * PAGE + 4095]);
    }
}
