//! What backs a guest RAM block, as the kernel tells it, and which of its
//! pages read as zero without being read (nor faulted in).
//!
//! A page reads as zero untouched when
//! * it is private anonymous memory that was never written nor swapped out
//!   (`/proc/self/pagemap`: neither present nor swapped);
//! * it lies in a hole of the file a mapping maps (`SEEK_DATA`/`SEEK_HOLE`:
//!   a file system that cannot tell reports data, never a hole where data
//!   is, dirty page cache included) and, for a private mapping, has no
//!   private copy (pagemap: not present, or present as the file's page).
//!
//! A mapped file is reopened by its path or, for a memfd or a deleted
//! file, through a descriptor of this process still open on it.
//!
//! Everything else is "unknown", and read as before: shared anonymous
//! memory (its pages may live outside this process's page tables), files
//! that cannot be reopened as the very file mapped, and
//! ranges registered with userfaultfd for missing or minor faults (smaps
//! VmFlags `um`/`ui`: a missing page there comes from a handler, not as
//! zero).
//!
//! The source reads smaps once per migration, at setup: a source's RAM
//! may well be registered with userfaultfd (a VM restored lazily from a
//! snapshot). The kernel walks the page tables of every mapping to produce
//! it: about 16 ms per GiB of memory resident in 4 KiB pages here (65 ms
//! for 4 GiB), far less for huge pages; next to pre-copying that memory, a
//! few per cent. The destination reads the cheaper maps (see
//! [`Backing::for_destination`]).
//!
//! The source uses [`ZeroPages`] so that memory a guest never touched — a
//! fresh VM's, or a sparse `memory-backend-file`'s — is sent as zero pages
//! without being scanned, and without faulting it in (which, for a file,
//! would fill the page cache with zeroes). The destination leaves zero
//! pages aimed at such pages unwritten (see `residency.rs`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use super::PAGE;

/// Pages probed at once (2 MiB).
pub(super) const CHUNK_PAGES: usize = 512;
/// One bit per page of a chunk.
pub(super) type Bits = [u64; CHUNK_PAGES / 64];

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
pub(super) const PM_PRESENT: u64 = 1 << 63;
pub(super) const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// One line of /proc/self/smaps with the VmFlags that matter here.
#[derive(Debug, Clone, PartialEq)]
struct Mapping {
    lo: usize,
    hi: usize,
    perms: String,
    offset: u64,
    dev: (u32, u32),
    inode: u64,
    path: String,
    userfaultfd: bool,
}

impl Mapping {
    fn readable(&self) -> bool {
        self.perms.starts_with('r')
    }

    fn private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }

    fn anonymous(&self) -> bool {
        self.inode == 0 && (self.path.is_empty() || self.path == "[heap]" || self.path.starts_with("[anon:"))
    }
}

/// Parses the text of /proc/self/smaps (or maps, without VmFlags); None
/// on anything unexpected.
fn parse_smaps(text: &str) -> Option<Vec<Mapping>> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let Some(first) = f.next() else { continue };
        if first.ends_with(':') {
            if first == "VmFlags:" {
                let m = out.last_mut()?;
                m.userfaultfd = f.any(|flag| flag == "um" || flag == "ui");
            }
            continue;
        }
        let (lo, hi) = first.split_once('-')?;
        let (perms, offset, dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let (major, minor) = dev.split_once(':')?;
        // The path is the rest of the line (it may hold spaces).
        let path = line.splitn(6, |c: char| c.is_ascii_whitespace()).nth(5).unwrap_or("").trim_start();
        out.push(Mapping {
            lo: usize::from_str_radix(lo, 16).ok()?,
            hi: usize::from_str_radix(hi, 16).ok()?,
            perms: perms.to_string(),
            offset: u64::from_str_radix(offset, 16).ok()?,
            dev: (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
            inode: inode.parse().ok()?,
            path: path.to_string(),
            userfaultfd: false,
        });
    }
    Some(out)
}

enum Kind {
    /// Private anonymous memory.
    Anon,
    /// A mapping of `file`, whose byte `base` is mapped at the segment's
    /// start; `shared`: writes go to the file.
    File { file: File, base: u64, size: u64, shared: bool },
}

/// A range of the block with one known kind of backing.
struct Seg {
    lo: usize,
    hi: usize,
    kind: Kind,
}

/// What backs the range of one block (ranges of unknown backing left out).
pub struct Backing {
    segs: Vec<Seg>,
}

/// The mappings of this process (empty when they cannot be read: nothing
/// is known), from /proc/self/smaps, or from /proc/self/maps without the
/// userfaultfd flags (much cheaper: no page-table walk).
fn mappings(smaps: bool) -> Vec<Mapping> {
    let path = if smaps { "/proc/self/smaps" } else { "/proc/self/maps" };
    std::fs::read_to_string(path).ok().and_then(|t| parse_smaps(&t)).unwrap_or_default()
}

/// The first range within `[start, end)` that this process has not mapped
/// readable and writable, or None when it all is. None too when the
/// mappings cannot be read: nothing is known then, and nothing refused.
pub fn not_mapped_rw(start: usize, end: usize) -> Option<(usize, usize)> {
    let maps = mappings(false);
    if maps.is_empty() {
        return None;
    }
    let mut at = start;
    // /proc/self/maps lists the mappings in address order.
    for m in maps.iter().filter(|m| m.hi > start && m.lo < end) {
        if m.lo > at {
            return Some((at, m.lo));
        }
        if !m.perms.starts_with("rw") {
            return Some((at, m.hi.min(end)));
        }
        at = m.hi;
        if at >= end {
            return None;
        }
    }
    (at < end).then_some((at, end))
}

impl Backing {
    /// The backing of `[start, start + len)`; the files it maps are opened
    /// (and held until the `Backing` is dropped).
    pub fn of(start: usize, len: usize) -> Backing {
        Self::from_mappings(&mappings(true), start, start + len)
    }

    /// [`Backing::of`] for a destination, which loads into memory it owns
    /// and runs no guest yet: from the cheaper /proc/self/maps, as a
    /// destination's RAM is not registered with userfaultfd (that is
    /// postcopy's, which livemig does not do).
    pub fn for_destination(start: usize, len: usize) -> Backing {
        Self::from_mappings(&mappings(false), start, start + len)
    }

    /// True when nothing about the range is known.
    pub fn is_unknown(&self) -> bool {
        self.segs.is_empty()
    }

    fn from_mappings(maps: &[Mapping], start: usize, end: usize) -> Backing {
        let mut segs = Vec::new();
        for m in maps.iter().filter(|m| m.hi > start && m.lo < end) {
            if !m.readable() || m.userfaultfd {
                continue;
            }
            let kind = if m.anonymous() {
                if !m.private() {
                    continue; // shared anonymous: pages may be elsewhere
                }
                Kind::Anon
            } else {
                match same_file(m) {
                    Some((file, size)) => Kind::File { file, base: m.offset, size, shared: !m.private() },
                    None => continue,
                }
            };
            segs.push(Seg { lo: m.lo, hi: m.hi, kind });
        }
        Backing { segs }
    }

    /// The pages of `[lo, lo + n * PAGE)` (inside one chunk) that read as
    /// zero untouched; `pagemap` is /proc/self/pagemap, opened on first use.
    pub fn zero_bits(&self, lo: usize, n: usize, pagemap: &mut Option<File>) -> Bits {
        let mut bits = Bits::default();
        let hi = lo + n * PAGE;
        let Some(seg) = self.segs.iter().find(|s| s.lo <= lo && hi <= s.hi) else {
            return bits; // not known, or across two mappings
        };
        match &seg.kind {
            Kind::Anon => {
                let Some(pm) = pagemap_entries(lo, n, pagemap) else { return bits };
                for (i, e) in pm[..n].iter().enumerate() {
                    if e & (PM_PRESENT | PM_SWAPPED) == 0 {
                        bits[i / 64] |= 1 << (i % 64);
                    }
                }
            }
            Kind::File { file, base, size, shared } => {
                let first = base + (lo - seg.lo) as u64;
                if !holes(file, first, n, *size, &mut bits) || *shared {
                    return bits;
                }
                // Private: a page with a private copy holds that copy.
                let Some(pm) = pagemap_entries(lo, n, pagemap) else { return Bits::default() };
                for (i, e) in pm[..n].iter().enumerate() {
                    let file_page = e & PM_SWAPPED == 0 && (e & PM_PRESENT == 0 || e & PM_FILE != 0);
                    if !file_page {
                        bits[i / 64] &= !(1 << (i % 64));
                    }
                }
            }
        }
        bits
    }
}

/// The file `m` maps, with its size: opened by its path, or else through
/// a descriptor of this process open on it (a memfd, a deleted file), and
/// checked to be that very file: a regular file with the mapping's device
/// and inode, before and after the open, so nothing else is ever opened.
fn same_file(m: &Mapping) -> Option<(File, u64)> {
    let same = |meta: &std::fs::Metadata| {
        let dev = meta.dev();
        meta.file_type().is_file() && meta.ino() == m.inode && (libc::major(dev), libc::minor(dev)) == m.dev
    };
    // Non-blocking: should a path have become a FIFO since it was checked,
    // the open does not wait for a writer.
    let open = |path: &std::path::Path| -> Option<(File, u64)> {
        if !same(&std::fs::metadata(path).ok()?) {
            return None;
        }
        let file = File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).ok()?;
        let meta = file.metadata().ok()?;
        same(&meta).then_some((file, meta.size()))
    };
    if m.path.starts_with('/') && !m.path.ends_with(" (deleted)") {
        if let Some(found) = open(std::path::Path::new(&m.path)) {
            return Some(found);
        }
    }
    std::fs::read_dir("/proc/self/fd").ok()?.flatten().find_map(|e| open(&e.path()))
}

/// Marks in `bits` the pages of `n` from file offset `first` that lie
/// wholly in holes (and before the end of the file); true when any does.
fn holes(file: &File, first: u64, n: usize, size: u64, bits: &mut Bits) -> bool {
    let page = PAGE as u64;
    let end = (first + n as u64 * page).min(size);
    let seek = |at: u64, whence: i32| -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; it moves only that file's
        // offset, which nothing else uses.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r >= 0 {
            Some(r as u64)
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            Some(size) // no data past `at`
        } else {
            None
        }
    };
    let mut any = false;
    let mut at = first;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA) else { return false };
        // [at, data) is a hole: the pages wholly inside it.
        let hole_end = data.min(end);
        let mut p = (at - first).div_ceil(page);
        while first + (p + 1) * page <= hole_end {
            bits[p as usize / 64] |= 1 << (p % 64);
            any = true;
            p += 1;
        }
        if data >= end {
            break;
        }
        let Some(next) = seek(data, libc::SEEK_HOLE) else { return false };
        if next <= data {
            return false;
        }
        at = next;
    }
    any
}

/// The pagemap entries of `n` pages from address `lo`.
pub(super) fn pagemap_entries(lo: usize, n: usize, pagemap: &mut Option<File>) -> Option<[u64; CHUNK_PAGES]> {
    if pagemap.is_none() {
        *pagemap = Some(File::open("/proc/self/pagemap").ok()?);
    }
    let pm = pagemap.as_ref()?;
    let mut raw = [0u8; CHUNK_PAGES * 8];
    pm.read_exact_at(&mut raw[..n * 8], (lo / PAGE * 8) as u64).ok()?;
    let mut out = [0u64; CHUNK_PAGES];
    for (o, e) in out.iter_mut().zip(raw[..n * 8].chunks_exact(8)) {
        *o = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
    }
    Some(out)
}

/// The source's view: per pass (dirty-log generation), which pages of the
/// chunk being sent read as zero untouched.
///
/// Why a page found zero this way may be sent as zero: the probe runs after
/// the dirty log was started, so a guest write after it is in the log and
/// the page is sent again after the next sync; and a probe is used only in
/// the generation (between two syncs) it was made in, so the page's next
/// transmission probes (or reads) it anew.
#[derive(Default)]
pub struct ZeroPages {
    pagemap: Option<File>,
    /// (block, chunk, generation) the bits are for.
    cur: Option<(usize, usize, u64)>,
    bits: Bits,
}

impl ZeroPages {
    /// True when page `page` of block number `bi` (at `host`, `pages`
    /// long, backed as `backing` says) reads as zero untouched.
    pub fn known_zero(&mut self, backing: &Backing, bi: usize, host: usize, pages: usize, page: usize, generation: u64) -> bool {
        if backing.is_unknown() {
            return false;
        }
        let chunk = page / CHUNK_PAGES;
        if self.cur != Some((bi, chunk, generation)) {
            let first = chunk * CHUNK_PAGES;
            let n = CHUNK_PAGES.min(pages - first);
            self.bits = backing.zero_bits(host + first * PAGE, n, &mut self.pagemap);
            self.cur = Some((bi, chunk, generation));
        }
        let i = page % CHUNK_PAGES;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac sd 
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac sd 
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
7f0000200000-7f0000300000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f0000300000-7f0000400000 rw-p 00001000 fd:01 5678                       /tmp/ram img
7f0000400000-7f0000401000 ---p 00000000 00:00 0 
7f0000500000-7f0000600000 rw-p 00000000 00:00 0                          [anon:guest-ram]
7f0000600000-7f0000700000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac sd um 
";

    #[test]
    fn smaps_parsed() {
        let m = parse_smaps(SMAPS).expect("parses");
        assert_eq!(m.len(), 8);
        assert_eq!(m[4].path, "/tmp/ram img");
        assert_eq!((m[4].offset, m[4].dev, m[4].inode), (0x1000, (0xfd, 1), 5678));
        assert!(m[7].userfaultfd && !m[1].userfaultfd);
        assert!(parse_smaps("garbage").is_none());
        assert!(parse_smaps("VmFlags: um").is_none(), "flags before any mapping");
    }

    impl Backing {
        /// The segments as (start, end, kind).
        fn kinds(&self) -> Vec<(usize, usize, &'static str)> {
            self.segs.iter().map(|s| (s.lo, s.hi, if matches!(s.kind, Kind::Anon) { "anon" } else { "file" })).collect()
        }

        /// True when one segment of `kind` covers `[lo, hi)` (the kernel
        /// may have merged the mapping with a neighbour of the same kind).
        fn covered(&self, lo: usize, hi: usize, kind: &str) -> bool {
            matches!(self.kinds()[..], [(a, b, k)] if a <= lo && hi <= b && k == kind)
        }
    }

    #[test]
    fn segments_from_mappings() {
        let m = parse_smaps(SMAPS).expect("parses");
        let kinds = |lo, hi| Backing::from_mappings(&m, lo, hi).kinds();
        // Two adjacent anonymous mappings, each its own segment.
        assert_eq!(
            kinds(0x7f0000080000, 0x7f0000180000),
            [(0x7f0000000000, 0x7f0000100000, "anon"), (0x7f0000100000, 0x7f0000200000, "anon")]
        );
        assert_eq!(kinds(0x55d0c0000000, 0x55d0c0001000), [(0x55d0c0000000, 0x55d0c0021000, "anon")]);
        assert_eq!(kinds(0x7f0000500000, 0x7f0000600000), [(0x7f0000500000, 0x7f0000600000, "anon")]);
        // Shared anonymous, a file that is not the one mapped, no access,
        // userfaultfd: unknown, left out.
        assert_eq!(kinds(0x7f0000200000, 0x7f0000201000), []);
        assert_eq!(kinds(0x7f0000300000, 0x7f0000301000), []);
        assert_eq!(kinds(0x7f0000400000, 0x7f0000401000), []);
        assert_eq!(kinds(0x7f0000600000, 0x7f0000601000), []);
        assert!(Backing::from_mappings(&m, 0x7f0000401000, 0x7f0000402000).is_unknown());
    }

    fn map(len: usize, prot_flags: i32, fd: i32) -> *mut u8 {
        // SAFETY: a fresh mapping the caller unmaps.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, prot_flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    fn bit(b: &Bits, i: usize) -> bool {
        b[i / 64] & (1 << (i % 64)) != 0
    }

    #[test]
    fn untouched_anonymous_pages() {
        let len = CHUNK_PAGES * PAGE;
        let p = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        // SAFETY: pages 3 and 4 lie inside the mapping; page 4 is read only.
        let _ = unsafe {
            *p.add(3 * PAGE) = 1;
            std::ptr::read_volatile(p.add(4 * PAGE))
        };
        let b = Backing::of(p as usize, len);
        assert!(b.covered(p as usize, p as usize + len, "anon"), "{:?}", b.kinds());
        let bits = b.zero_bits(p as usize, CHUNK_PAGES, &mut None);
        assert!(bit(&bits, 0) && bit(&bits, 511));
        assert!(!bit(&bits, 3), "a written page is not known zero");
        assert!(!bit(&bits, 4), "a page read (mapped to the zero page) is read again: safe side");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p.cast(), len) };
    }

    /// Memory registered with userfaultfd for missing pages is never
    /// taken for zero: a handler, not the kernel, fills its pages.
    #[test]
    fn userfaultfd_ranges_are_unknown() {
        const UFFD_USER_MODE_ONLY: libc::c_long = 1;
        const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
        const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
        // SAFETY: the userfaultfd syscall takes flags only.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::c_long::from(libc::O_CLOEXEC | libc::O_NONBLOCK) | UFFD_USER_MODE_ONLY) };
        if fd < 0 {
            eprintln!("userfaultfd unavailable ({}): test skipped", std::io::Error::last_os_error());
            return;
        }
        let fd = fd as i32;
        let len = CHUNK_PAGES * PAGE;
        let p = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        let before = Backing::of(p as usize, len).zero_bits(p as usize, CHUNK_PAGES, &mut None);
        assert!(bit(&before, 0), "fresh anonymous memory reads as zero");
        let mut api = [0xaau64, 0, 0]; // api, features, ioctls
        let mut reg = [p as u64, len as u64, 1, 0]; // range start and length, mode MISSING, ioctls
                                                    // SAFETY: the structures have the layout the ioctls expect; the
                                                    // range is our own mapping, which is never touched while registered.
        let ok = unsafe { libc::ioctl(fd, UFFDIO_API, api.as_mut_ptr()) == 0 && libc::ioctl(fd, UFFDIO_REGISTER, reg.as_mut_ptr()) == 0 };
        if ok {
            let bits = Backing::of(p as usize, len).zero_bits(p as usize, CHUNK_PAGES, &mut None);
            assert_eq!(bits, Bits::default(), "a userfaultfd range is not known to be zero");
        } else {
            eprintln!("UFFDIO_REGISTER failed ({}): test skipped", std::io::Error::last_os_error());
        }
        // SAFETY: our descriptor and mapping, no longer used (closing the
        // descriptor unregisters the range).
        unsafe {
            libc::close(fd);
            libc::munmap(p.cast(), len);
        }
    }

    /// A memfd (shared memory, as vhost-user hosts back guest RAM with)
    /// is found through its descriptor: its holes are pages never written.
    #[test]
    fn memfd_holes() {
        let len = CHUNK_PAGES * PAGE;
        // SAFETY: a NUL-terminated name; the descriptor is closed below.
        let fd = unsafe { libc::memfd_create(c"livemig-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is ours.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        let p = map(len, libc::MAP_SHARED, fd);
        // SAFETY: pages 7 and 300 lie inside the mapping.
        unsafe {
            *p.add(7 * PAGE) = 1;
            *p.add(300 * PAGE + 5) = 2;
        }
        let bits = Backing::of(p as usize, len).zero_bits(p as usize, CHUNK_PAGES, &mut None);
        assert!(bit(&bits, 0) && bit(&bits, 8) && bit(&bits, 511), "never written");
        assert!(!bit(&bits, 7) && !bit(&bits, 300), "written");
        // Without a descriptor open on it, a memfd cannot be reopened:
        // nothing is known.
        // SAFETY: our descriptor; the mapping keeps the memfd alive.
        unsafe { libc::close(fd) };
        let bits = Backing::of(p as usize, len).zero_bits(p as usize, CHUNK_PAGES, &mut None);
        assert_eq!(bits, Bits::default());
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p.cast(), len) };
    }

    /// A sparse file: private and shared mappings see its holes; a private
    /// copy and data are not holes; past the end is unknown.
    #[test]
    fn file_holes() {
        let dir = std::env::temp_dir().join(format!("livemig-backing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("ram.img");
        let mut f = File::create(&path).expect("create");
        let len = CHUNK_PAGES * PAGE;
        f.set_len(len as u64 - 4 * PAGE as u64).expect("truncate"); // 4 pages past the end
        f.write_all_at(&[7u8; 2 * PAGE], 64 * PAGE as u64).expect("data at pages 64, 65");
        f.flush().expect("flush");
        let f = File::options().read(true).write(true).open(&path).expect("reopen");
        for shared in [false, true] {
            // The block as registered: the file's pages and 4 beyond its end.
            let p = map(len, if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }, f.as_raw_fd());
            // SAFETY: pages 10 and 11 lie inside the mapping and the file.
            unsafe {
                *p.add(10 * PAGE) = 9;
                std::ptr::read_volatile(p.add(11 * PAGE));
            }
            let b = Backing::of(p as usize, len);
            assert!(b.covered(p as usize, p as usize + len, "file"), "{:?}", b.kinds());
            let bits = b.zero_bits(p as usize, CHUNK_PAGES, &mut None);
            assert!(bit(&bits, 0) && bit(&bits, 63) && bit(&bits, 66) && bit(&bits, 507));
            assert!(!bit(&bits, 64) && !bit(&bits, 65), "data");
            assert!(bit(&bits, 11), "a page read from a hole is the file's page");
            // Private: a private copy; shared: data in the file.
            assert!(!bit(&bits, 10), "written page (shared: {shared})");
            assert!(!bit(&bits, 508) && !bit(&bits, 511), "past the end of the file");
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p.cast(), len) };
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
