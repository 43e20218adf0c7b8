//! The destination side of the "ram" section: records are checked against
//! the registered blocks and written straight into them, never outside.
//! Messages follow a QEMU 7.2 destination's.

use std::sync::Arc;

use super::scan::is_zero_raw;
use super::{flags, RamBlock, PAGE};
use crate::error::{MigError, Result};
use crate::qemu_file::QemuFile;

/// Per-stream load state: the last block named (CONTINUE resolves to it,
/// across sections).
pub struct Loader {
    blocks: Vec<Arc<RamBlock>>,
    last_block: Option<Arc<RamBlock>>,
    page: Box<[u8; PAGE]>,
    enc: Box<[u8; PAGE]>,
    /// Per block (by host address): which 2 MiB chunks were faulted in.
    populated: std::collections::HashMap<usize, Vec<u64>>,
}

/// Chunk faulted in at once before the first page is written into it.
const POPULATE_CHUNK: u64 = 2 << 20;
/// MADV_POPULATE_WRITE (Linux 5.14); off after the first refusal.
const MADV_POPULATE_WRITE: i32 = 23;
static POPULATE_OK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Faults in the 2 MiB chunk of `b` holding `addr` in one call, the first
/// time a page lands in it: far cheaper than one page fault per page.
fn populate(populated: &mut std::collections::HashMap<usize, Vec<u64>>, b: &RamBlock, addr: u64) {
    use std::sync::atomic::Ordering;
    if !POPULATE_OK.load(Ordering::Relaxed) {
        return;
    }
    let chunk = (addr / POPULATE_CHUNK) as usize;
    let bits = populated.entry(b.host_ptr() as usize).or_insert_with(|| vec![0; (b.length() / POPULATE_CHUNK) as usize / 64 + 1]);
    let (w, m) = (chunk / 64, 1u64 << (chunk % 64));
    if bits[w] & m != 0 {
        return;
    }
    bits[w] |= m;
    let start = chunk as u64 * POPULATE_CHUNK;
    let len = POPULATE_CHUNK.min(b.length() - start) as usize;
    // SAFETY: the range lies inside the registered block; the advice only
    // faults pages in (their content is unchanged).
    let r = unsafe { libc::madvise(b.host_ptr().add(start as usize).cast(), len, MADV_POPULATE_WRITE) };
    if r != 0 {
        log::debug!("MADV_POPULATE_WRITE unavailable ({}); faulting page by page", std::io::Error::last_os_error());
        POPULATE_OK.store(false, Ordering::Relaxed);
    }
}

impl Loader {
    /// A loader over the blocks registered now.
    pub fn new() -> Loader {
        Loader {
            blocks: super::blocks(),
            last_block: None,
            page: Box::new([0; PAGE]),
            enc: Box::new([0; PAGE]),
            populated: std::collections::HashMap::new(),
        }
    }

    fn find(&self, name: &[u8]) -> Option<Arc<RamBlock>> {
        self.blocks.iter().find(|b| b.idstr.as_bytes() == name).cloned()
    }

    /// The block of a page record: named, or the last one for CONTINUE.
    fn block_for(&mut self, f: &mut QemuFile, flg: u64, addr: u64) -> Result<Arc<RamBlock>> {
        if flg & flags::CONTINUE != 0 {
            return self.last_block.clone().ok_or_else(|| MigError::new(format!("Ack, bad migration stream! Illegal RAM offset {addr:x}")));
        }
        let name = f.get_counted_bytes();
        f.check()?;
        let b = self
            .find(&name)
            .ok_or_else(|| MigError::new(format!("Can't find block {}: Illegal RAM offset {addr:x}", String::from_utf8_lossy(&name))))?;
        self.last_block = Some(b.clone());
        Ok(b)
    }

    /// The page at `addr` in `b`, or the error if it lies outside.
    fn page_ptr(b: &RamBlock, addr: u64) -> Result<*mut u8> {
        if addr >= b.length() {
            return Err(MigError::new(format!("Illegal RAM offset {addr:x}")));
        }
        Ok(b.page_ptr((addr / PAGE as u64) as usize))
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
            if flg & flags::HOOK != 0 {
                return Err(MigError::new("RAM_SAVE_FLAG_HOOK (RDMA) is not supported"));
            }
            match flg & !flags::CONTINUE {
                flags::MEM_SIZE => self.load_mem_size(f, addr)?,
                flags::ZERO => {
                    let b = self.block_for(f, flg, addr)?;
                    let fill = f.get_u8();
                    f.check()?;
                    let p = Self::page_ptr(&b, addr)?;
                    // SAFETY: `p` is a whole page inside the registered block
                    // (checked); the destination VM does not run during a load.
                    unsafe {
                        if fill != 0 || !is_zero_raw(p, PAGE) {
                            std::ptr::write_bytes(p, fill, PAGE);
                        }
                    }
                }
                flags::PAGE => {
                    let b = self.block_for(f, flg, addr)?;
                    let p = Self::page_ptr(&b, addr)?;
                    populate(&mut self.populated, &b, addr);
                    // SAFETY: as above; `get_guest` writes exactly one page.
                    unsafe { f.get_guest(p, PAGE) };
                    f.check()?;
                }
                flags::XBZRLE => {
                    let b = self.block_for(f, flg, addr)?;
                    let p = Self::page_ptr(&b, addr)?;
                    self.load_xbzrle(f, p, addr)?;
                }
                flags::EOS if flg == flags::EOS => return Ok(()),
                flags::COMPRESS_PAGE => return Err(MigError::new("Received an unexpected compressed page")),
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
            let name_s = String::from_utf8_lossy(&name).into_owned();
            let b = self.find(&name).ok_or_else(|| MigError::new(format!("Unknown ramblock \"{name_s}\", cannot accept migration")))?;
            if len != b.length() {
                if !b.resizable() {
                    return Err(MigError::new(format!(
                        "Size mismatch: {name_s}: 0x{len:x} != 0x{:x}: Invalid argument (ram block '{name_s}': stream says {len} bytes, host registered {})",
                        b.length(),
                        b.length()
                    )));
                }
                b.resize(len)?;
            }
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
