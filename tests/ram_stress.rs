//! RAM pre-copy stress: a guest thread writes (random pages, random bytes,
//! identical rewrites, zeros into data, data into zero pages, discards)
//! while a migration runs; the source RAM is snapshotted in
//! vm_stop_force_state; the stream (exec:cat > file) is then loaded into
//! fresh destination memory and compared byte for byte.
//!
//! Each iteration draws its blocks (sizes, resizable or not, backing:
//! anonymous, memfd, shared or private files on tmpfs and disk), XBZRLE and
//! its cache size (resized during the migration or not), speed and
//! downtime limits, how writes are marked (`livemig_ram_mark_dirty`, the
//! dirty-log callback, both) and the guest's write pattern from its seed.
//!
//! Env: STRESS_ITERS (default 12), STRESS_SEED (first seed, default 1).

mod common;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use livemig::ffi::types::LivemigHostOps;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::params::MigrationCapability;
use livemig::state::{MigrationStatus, OUTGOING};
use livemig::transport::Uri;
use parking_lot::lock_api::RawMutex as _;

const PAGE: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Back {
    Anon,
    AnonPrefilled,
    Memfd,
    ShmFilePrivate,
    ShmFileShared,
    DiskFilePrivate,
    DiskFileShared,
}
const BACKS: [Back; 7] =
    [Back::Anon, Back::AnonPrefilled, Back::Memfd, Back::ShmFilePrivate, Back::ShmFileShared, Back::DiskFilePrivate, Back::DiskFileShared];

struct Mem {
    ptr: *mut u8,
    len: usize,
    _file: Option<std::fs::File>,
    back: Back,
}
// SAFETY: a mapping, plain memory: the guest thread writes it while
// livemig reads it, a race the dirty log resolves (what this test checks);
// it is unmapped only after both are done with it.
unsafe impl Send for Mem {}
// SAFETY: as for Send.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize, back: Back, rng: &mut Rng, tag: &str) -> Mem {
        let (flags, file) = match back {
            Back::Anon | Back::AnonPrefilled => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
            Back::Memfd => {
                // SAFETY: plain system call with a NUL-terminated name.
                let fd = unsafe { libc::memfd_create(c"stress".as_ptr(), libc::MFD_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: `fd` is a fresh descriptor owned by nobody else.
                let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                f.set_len(len as u64).unwrap();
                (libc::MAP_SHARED, Some(f))
            }
            _ => {
                let dir = if matches!(back, Back::ShmFilePrivate | Back::ShmFileShared) { "/dev/shm" } else { "/tmp" };
                let path = format!("{dir}/livemig-stress-{}-{tag}-{}", std::process::id(), rng.next());
                let f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
                f.set_len(len as u64).unwrap();
                // Some data in the file.
                use std::os::unix::fs::FileExt;
                for _ in 0..rng.below(40) {
                    let p = rng.below(len / PAGE);
                    let n = 1 + rng.below(3).min(len / PAGE - p - 1);
                    let v = vec![(rng.next() as u8) | 1; n * PAGE];
                    f.write_all_at(&v, (p * PAGE) as u64).unwrap();
                }
                // Sometimes: written zero pages (allocated, reads zero).
                for _ in 0..rng.below(5) {
                    let p = rng.below(len / PAGE);
                    f.write_all_at(&[0u8; PAGE], (p * PAGE) as u64).unwrap();
                }
                std::fs::remove_file(&path).unwrap(); // deleted: found through the fd
                let shared = matches!(back, Back::ShmFileShared | Back::DiskFileShared);
                (if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }, Some(f))
            }
        };
        let fd = file.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping of `len` bytes (of `fd`, sized to `len`, or anonymous).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let m = Mem { ptr: p.cast(), len, _file: file, back };
        if back == Back::AnonPrefilled {
            for i in 0..len / PAGE {
                if rng.below(3) != 0 {
                    // SAFETY: page `i` lies inside the mapping of `len` bytes.
                    unsafe { std::ptr::write_bytes(m.ptr.add(i * PAGE), (rng.next() as u8) | 1, PAGE) };
                }
            }
        } else {
            // Touch a few pages.
            for _ in 0..rng.below(30) {
                let i = rng.below(len / PAGE);
                // SAFETY: a byte of page `i`, inside the mapping.
                unsafe { *m.ptr.add(i * PAGE + rng.below(PAGE)) = rng.next() as u8 };
            }
        }
        m
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A source block.
struct Blk {
    name: String,
    mem: Mem,
    used: usize, // bytes
    resizable: bool,
    /// Host dirty log: one bit per page (max length).
    log: Vec<AtomicU64>,
}

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
static STATE: AtomicU32 = AtomicU32::new(RunState::Running as u32);
static PAUSE: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicBool = AtomicBool::new(false);
static SRC: Mutex<Vec<Blk>> = Mutex::new(Vec::new());
static SNAP: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static SNAPPED: AtomicBool = AtomicBool::new(false);
static STOPS: AtomicUsize = AtomicUsize::new(0);
static JUNK_BITS: AtomicBool = AtomicBool::new(false);

// SRC is only mutated between migrations; the guest thread and callbacks use
// a raw pointer to the Vec's content, valid while a migration runs.
static SRC_PTR: AtomicUsize = AtomicUsize::new(0);
static SRC_LEN: AtomicUsize = AtomicUsize::new(0);

fn src_blocks() -> &'static [Blk] {
    // SAFETY: SRC_PTR/SRC_LEN describe SRC's vector, which is only replaced between migrations, while no guest thread or callback runs.
    unsafe { std::slice::from_raw_parts(SRC_PTR.load(SeqCst) as *const Blk, SRC_LEN.load(SeqCst)) }
}

unsafe extern "C" fn lock(_: *mut c_void) {
    LOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn stop(_: *mut c_void, st: RunState) -> c_int {
    // Pause the guest (all its writes made and marked).
    PAUSE.store(true, SeqCst);
    while GUEST_RUNNING.load(SeqCst) && !PAUSED.load(SeqCst) {
        std::hint::spin_loop();
    }
    STATE.store(st as u32, SeqCst);
    STOPS.fetch_add(1, SeqCst);
    if st == RunState::FinishMigrate {
        let mut snap = SNAP.lock().unwrap();
        snap.clear();
        for b in src_blocks() {
            // SAFETY: the first `used` bytes of the block's mapping; the guest is paused.
            let s = unsafe { std::slice::from_raw_parts(b.mem.ptr, b.used) };
            snap.push(s.to_vec());
        }
        SNAPPED.store(true, SeqCst);
    }
    0
}
unsafe extern "C" fn start(_: *mut c_void) -> c_int {
    STATE.store(RunState::Running as u32, SeqCst);
    0
}
unsafe extern "C" fn is_running(_: *mut c_void) -> bool {
    STATE.load(SeqCst) == RunState::Running as u32
}
unsafe extern "C" fn set(_: *mut c_void, st: RunState) {
    STATE.store(st as u32, SeqCst);
}
unsafe extern "C" fn log_start(_: *mut c_void) -> c_int {
    0
}
unsafe extern "C" fn log_stop(_: *mut c_void) {}
unsafe extern "C" fn log_sync(_: *mut c_void, idstr: *const c_char, _host: *mut c_void, length: u64, bitmap: *mut u64) -> c_int {
    // SAFETY: livemig passes the block's NUL-terminated name.
    let name = unsafe { CStr::from_ptr(idstr) }.to_str().unwrap();
    let pages = (length as usize) / PAGE;
    let words = pages.div_ceil(64);
    // SAFETY: livemig passes a bitmap of one bit per page of `length`, in whole words.
    let bm = unsafe { std::slice::from_raw_parts_mut(bitmap, words) };
    for b in src_blocks() {
        if b.name == name {
            for (w, d) in bm.iter_mut().enumerate() {
                *d |= b.log[w].swap(0, SeqCst);
            }
            if JUNK_BITS.load(SeqCst) && !pages.is_multiple_of(64) {
                bm[words - 1] |= !0u64 << (pages % 64);
            }
            return 0;
        }
    }
    -libc::ENOENT
}
unsafe extern "C" fn resized(_: *mut c_void, _idstr: *const c_char, _len: u64) {}

static GUEST_RUNNING: AtomicBool = AtomicBool::new(false);
static WRITES: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug)]
struct Cfg {
    xbzrle: bool,
    cache: i64,
    speed: i64,
    downtime: f64,
    resize_cache: bool,
    mark_mode: u8, // 0 = mark_dirty, 1 = dirty log, 2 = mixed
    hot: usize,
    writes_per_tick: usize,
    discard: bool,
    tick_us: u64,
}

fn mark(b: &Blk, page: usize, mode: u8, rng: &mut Rng) {
    let use_log = match mode {
        0 => false,
        1 => true,
        _ => rng.below(2) == 0,
    };
    if use_log {
        b.log[page / 64].fetch_or(1 << (page % 64), SeqCst);
    } else {
        // Marks of a range covering the page, within the block.
        let off = (page * PAGE + rng.below(PAGE)) as u64;
        let r = livemig::ram::mark_dirty(&b.name, off, 1);
        if let Err(e) = r {
            panic!("mark_dirty failed: {e}");
        }
    }
}

fn guest(cfg: Cfg, seed: u64) {
    let mut rng = Rng(seed | 1);
    let blocks = src_blocks();
    let total: usize = blocks.iter().map(|b| b.used / PAGE).sum();
    let mut buf = vec![0u8; PAGE];
    while GUEST_RUNNING.load(SeqCst) {
        if PAUSE.load(SeqCst) {
            PAUSED.store(true, SeqCst);
            while PAUSE.load(SeqCst) && GUEST_RUNNING.load(SeqCst) {
                std::thread::sleep(Duration::from_micros(200));
            }
            PAUSED.store(false, SeqCst);
            continue;
        }
        for _ in 0..cfg.writes_per_tick {
            // pick a page
            let (b, page) = {
                let mut g = if rng.below(2) == 0 { rng.below(cfg.hot.min(total)) } else { rng.below(total) };
                let mut bi = 0;
                while g >= blocks[bi].used / PAGE {
                    g -= blocks[bi].used / PAGE;
                    bi += 1;
                }
                (&blocks[bi], g)
            };
            // SAFETY: `page` is below the block's used pages, inside its mapping.
            let p = unsafe { b.mem.ptr.add(page * PAGE) };
            // SAFETY: page `p` of the block's mapping, offsets below PAGE;
            // `fallocate`/`madvise` on that page only.
            unsafe {
                match rng.below(10) {
                    0 => std::ptr::write_bytes(p, 0, PAGE), // zeros
                    1 => {
                        // identical rewrite
                        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), PAGE);
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, PAGE);
                    }
                    2 => {
                        // one non-zero byte into the page (maybe a zero page)
                        std::ptr::write_volatile(p.add(rng.below(PAGE)), (rng.next() as u8) | 1);
                    }
                    3 => {
                        // full random page
                        for c in buf.chunks_mut(8) {
                            c.copy_from_slice(&rng.next().to_ne_bytes());
                        }
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, PAGE);
                    }
                    4 if cfg.discard => {
                        // discard (balloon): reads as zero afterwards (private
                        // file mapping: reads the file's page)
                        match b.mem.back {
                            Back::Memfd | Back::ShmFileShared | Back::DiskFileShared => {
                                libc::fallocate(
                                    b.mem._file.as_ref().unwrap().as_raw_fd(),
                                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                    (page * PAGE) as i64,
                                    PAGE as i64,
                                );
                            }
                            _ => {
                                libc::madvise(p.cast(), PAGE, libc::MADV_DONTNEED);
                            }
                        }
                    }
                    5 => {
                        // restore the byte to zero at a random offset (small change)
                        std::ptr::write_volatile(p.add(rng.below(PAGE)), 0);
                    }
                    _ => {
                        // a few random bytes
                        for _ in 0..1 + rng.below(16) {
                            let o = rng.below(PAGE);
                            std::ptr::write_volatile(p.add(o), rng.next() as u8);
                        }
                    }
                }
            }
            mark(b, page, cfg.mark_mode, &mut rng);
            WRITES.fetch_add(1, SeqCst);
        }
        let until = Instant::now() + Duration::from_micros(cfg.tick_us);
        while Instant::now() < until {
            std::thread::yield_now();
        }
    }
}

fn setup_host() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The common table, with this file's callbacks throughout.
        let ops = LivemigHostOps {
            vm_stop_force_state: Some(stop),
            vm_start: Some(start),
            runstate_is_running: Some(is_running),
            runstate_set: Some(set),
            dirty_log_start: Some(log_start),
            dirty_log_sync: Some(log_sync),
            dirty_log_stop: Some(log_stop),
            ..common::host_ops(lock, unlock)
        };
        livemig::host::set(ops, std::ptr::null_mut()).unwrap();
        livemig::savevm::set_machine_name(Some("none")).unwrap();
        livemig::transport::set_stall_timeout(30000).unwrap();
    });
}

/// One migration; returns a description of the first difference.
fn one(iter: u64, seed: u64) -> Option<String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e3779b97f4a7c15) | 1);
    let nblocks = 1 + rng.below(4);
    let sizes_pages = [16384usize, 8192, 4096 + 37, 1000, 37, 513, 2049, 64 * 33 + 1, 1];
    let mut src = Vec::new();
    for i in 0..nblocks {
        let pages = if i == 0 { [16384, 8192, 12288 + 5][rng.below(3)] } else { sizes_pages[rng.below(sizes_pages.len())] };
        let resizable = i > 0 && rng.below(3) == 0;
        let max_pages = if resizable { pages + rng.below(700) } else { pages };
        let back = BACKS[rng.below(BACKS.len())];
        let mem = Mem::new(max_pages * PAGE, back, &mut rng, &format!("s{i}"));
        let log = (0..max_pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        src.push(Blk { name: format!("blk{i}.ram"), mem, used: pages * PAGE, resizable, log });
    }
    let cfg = Cfg {
        xbzrle: rng.below(3) != 0,
        cache: [4096i64, 16384, 65536, 1 << 20, 8 << 20][rng.below(5)],
        speed: [0i64, 5_000_000, 10_000_000, 20_000_000, 50_000_000][rng.below(5)],
        downtime: [0.0, 0.0, 0.0, 0.001, 0.005, 0.02][rng.below(6)],
        resize_cache: rng.below(2) == 0,
        mark_mode: rng.below(3) as u8,
        hot: [16usize, 64, 700, 5000][rng.below(4)],
        writes_per_tick: [1usize, 4, 16, 64][rng.below(4)],
        discard: rng.below(2) == 0,
        tick_us: [0u64, 10, 50][rng.below(3)],
    };
    JUNK_BITS.store(rng.below(2) == 0, SeqCst);
    let backs: Vec<_> = src.iter().map(|b| (b.name.clone(), b.used / PAGE, b.mem.len / PAGE, b.mem.back)).collect();
    let desc = format!("iter {iter} seed {seed}: {cfg:?} blocks {backs:?} junk {}", JUNK_BITS.load(SeqCst));
    eprintln!("{desc}");

    // Register the source blocks.
    for b in &src {
        if b.resizable {
            livemig::ram::block_add_resizable(
                &b.name,
                b.mem.ptr,
                b.used as u64,
                b.mem.len as u64,
                Some(livemig::ram::Resized { f: resized, opaque: 0 }),
            )
            .unwrap();
        } else {
            livemig::ram::block_add(&b.name, b.mem.ptr, b.used as u64).unwrap();
        }
    }
    {
        let mut g = SRC.lock().unwrap();
        *g = src;
        SRC_PTR.store(g.as_ptr() as usize, SeqCst);
        SRC_LEN.store(g.len(), SeqCst);
    }
    livemig::params::set_capabilities(&[(MigrationCapability::Xbzrle, cfg.xbzrle)]).unwrap();
    livemig::params::set_cache_size(cfg.cache).unwrap();
    livemig::params::set_speed(cfg.speed).unwrap();
    livemig::params::set_downtime(cfg.downtime).unwrap();

    STATE.store(RunState::Running as u32, SeqCst);
    PAUSE.store(false, SeqCst);
    PAUSED.store(false, SeqCst);
    SNAPPED.store(false, SeqCst);
    GUEST_RUNNING.store(true, SeqCst);
    let gseed = rng.next();
    let g = std::thread::spawn(move || guest(cfg, gseed));
    // Let the guest dirty for a little while before starting sometimes.
    std::thread::sleep(Duration::from_millis(rng.below(30) as u64));

    let path = format!("/dev/shm/livemig-stress-{}.bin", std::process::id());
    let uri = format!("exec:cat > {path}");
    eprintln!("  writes before start {}", WRITES.load(SeqCst));
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    // Controller: resize the cache; after a while, lift the speed limit and
    // slow the guest, so the migration converges.
    let t0 = Instant::now();
    let lift_at = Duration::from_millis(300 + rng.below(2700) as u64);
    let mut lifted = false;
    let mut crng = Rng(rng.next() | 1);
    loop {
        let s = OUTGOING.status();
        if matches!(s, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled) {
            break;
        }
        if cfg.resize_cache && cfg.xbzrle {
            let v = [4096i64, 8192, 16384, 65536, 1 << 20, 4 << 20][crng.below(6)];
            let mut err = std::ptr::null_mut();
            livemig::ffi::migration::qmp_migrate_set_cache_size(v, &mut err);
        }
        if !lifted && t0.elapsed() > lift_at {
            livemig::params::set_speed(0).unwrap();
            livemig::params::set_downtime(0.5).unwrap();
            lifted = true;
        }
        if t0.elapsed() > lift_at + Duration::from_millis(1500) {
            // Stop dirtying (the guest idles; still running).
            PAUSE.store(true, SeqCst);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            outgoing::cancel();
        }
        std::thread::sleep(Duration::from_millis(5 + crng.below(40) as u64));
    }
    let st = common::wait_final(false, 60);
    GUEST_RUNNING.store(false, SeqCst);
    g.join().unwrap();
    PAUSE.store(false, SeqCst);
    let mut result = None;
    if st != MigrationStatus::Completed {
        let info = outgoing::stats();
        eprintln!("  outgoing ended {} ({:?})", st.name(), info.error);
        result = Some(format!("{desc}: outgoing {}", st.name()));
    }
    let stats = livemig::ram::query_stats(&outgoing::stats());
    eprintln!(
        "  writes {} {:?} syncs {} normal {} dup {} xbz {:?} skipped {}",
        WRITES.swap(0, SeqCst),
        t0.elapsed(),
        stats.0.dirty_sync_count,
        stats.0.normal,
        stats.0.duplicate,
        stats.1.map(|x| (x.pages, x.cache_miss, x.overflow)),
        stats.0.skipped
    );
    // Source blocks out.
    let src = std::mem::take(&mut *SRC.lock().unwrap());
    for b in &src {
        livemig::ram::block_remove(&b.name).unwrap();
    }
    if result.is_some() {
        return result;
    }
    assert!(SNAPPED.load(SeqCst));
    // Destination.
    let mut dst = Vec::new();
    for (i, b) in src.iter().enumerate() {
        let back = BACKS[rng.below(BACKS.len())];
        let dmem = Mem::new(b.mem.len, back, &mut rng, &format!("d{i}"));
        if b.resizable {
            let used = (1 + rng.below(b.mem.len / PAGE)) * PAGE;
            livemig::ram::block_add_resizable(
                &b.name,
                dmem.ptr,
                used as u64,
                b.mem.len as u64,
                Some(livemig::ram::Resized { f: resized, opaque: 0 }),
            )
            .unwrap();
        } else {
            livemig::ram::block_add(&b.name, dmem.ptr, b.used as u64).unwrap();
        }
        dst.push(dmem);
    }
    STATE.store(RunState::Prelaunch as u32, SeqCst);
    livemig::incoming::start_uri(&format!("exec:cat {path}")).unwrap();
    let ist = common::wait_final(true, 60);
    if ist != MigrationStatus::Completed {
        result = Some(format!("{desc}: incoming {} {:?}", ist.name(), livemig::incoming::error()));
    } else {
        let snap = SNAP.lock().unwrap();
        let dbacks: Vec<_> = dst.iter().map(|d| d.back).collect();
        for ((b, d), s) in src.iter().zip(&dst).zip(snap.iter()) {
            // SAFETY: the first `used` bytes of the destination mapping, which
            // nothing writes any more.
            let dm = unsafe { std::slice::from_raw_parts(d.ptr, b.used) };
            if dm != &s[..] {
                let diffs: Vec<usize> =
                    (0..b.used / PAGE).filter(|&p| dm[p * PAGE..(p + 1) * PAGE] != s[p * PAGE..(p + 1) * PAGE]).collect();
                let p = diffs[0];
                let first = (0..PAGE).find(|&o| dm[p * PAGE + o] != s[p * PAGE + o]).unwrap();
                let smz = s[p * PAGE..(p + 1) * PAGE].iter().all(|&x| x == 0);
                let dmz = dm[p * PAGE..(p + 1) * PAGE].iter().all(|&x| x == 0);
                result = Some(format!(
                    "{desc} dst backs {dbacks:?}: block {} ({:?}) differs in {} pages, first page {p} byte {first}: src {:#x} dst {:#x} (src page zero {smz}, dst page zero {dmz}); pages {:?}",
                    b.name,
                    b.mem.back,
                    diffs.len(),
                    s[p * PAGE + first],
                    dm[p * PAGE + first],
                    &diffs[..diffs.len().min(10)]
                ));
                break;
            }
        }
    }
    for b in &src {
        livemig::ram::block_remove(&b.name).unwrap();
    }
    let _ = std::fs::remove_file(&path);
    drop(dst);
    drop(src);
    STATE.store(RunState::Running as u32, SeqCst);
    result
}

#[test]
fn ram_precopy_loses_no_write() {
    let _ = env_logger::builder().is_test(true).try_init();
    setup_host();
    let iters: u64 = std::env::var("STRESS_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let seed0: u64 = std::env::var("STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut fails = Vec::new();
    for i in 0..iters {
        if let Some(f) = one(i, seed0 + i) {
            eprintln!("FAIL: {f}");
            fails.push(f);
        }
    }
    eprintln!("{} iterations, {} failures", iters, fails.len());
    assert!(fails.is_empty(), "{fails:#?}");
}
