//! An in-process test host for the reliability tests: a Rust fake VMM
//! (host lock, run state), a guest RAM block fenced by PROT_NONE guard pages
//! (a write outside registered guest RAM kills the test), a "timer" device
//! as `qemu_peer` has, and helpers to count threads and fds, run
//! `qemu_peer`, and wait with deadlines.
#![allow(dead_code)]

use std::ffi::c_void;
use std::os::raw::c_int;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use livemig::error::{MigError, Result};
use livemig::ffi::types::LivemigHostOps;
use livemig::host::RunState;
use livemig::qemu_file::QemuFile;
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::{MigrationStatus, INCOMING, OUTGOING};
use parking_lot::lock_api::RawMutex as _;

pub mod scratch;

pub const RAM_SIZE: usize = 64 << 20;
const PAGE: usize = 4096;

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
pub static STATE: AtomicU32 = AtomicU32::new(RunState::Running as u32);
pub static STARTS: AtomicU32 = AtomicU32::new(0);
pub static STOPS: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn lock(_: *mut c_void) {
    LOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn stop(_: *mut c_void, st: RunState) -> c_int {
    STATE.store(st as u32, Ordering::SeqCst);
    STOPS.fetch_add(1, Ordering::SeqCst);
    0
}
unsafe extern "C" fn start(_: *mut c_void) -> c_int {
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    STARTS.fetch_add(1, Ordering::SeqCst);
    0
}
unsafe extern "C" fn is_running(_: *mut c_void) -> bool {
    STATE.load(Ordering::SeqCst) == RunState::Running as u32
}
unsafe extern "C" fn set(_: *mut c_void, st: RunState) {
    STATE.store(st as u32, Ordering::SeqCst);
}

/// QEMU's "timer": 24 bytes, version 2, minimum version 1 (with a 7.2
/// destination's message when the version is too old).
pub struct Timer;

impl SaveVmHandler for Timer {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        f.put_buffer(&[0u8; 24]);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, version_id: u32, _k: SectionKind) -> Result<()> {
        if version_id < 1 {
            return Err(MigError::new(format!("timer: incoming version_id {version_id} is too old for local minimum version_id  1")));
        }
        f.skip(24);
        f.check()
    }
}

/// The guest RAM: RAM_SIZE bytes between two PROT_NONE guard pages.
pub struct GuestRam {
    base: *mut u8,
}

// SAFETY: a fixed mapping, only read through raw pointers.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: the first page is the guard; RAM starts one page in.
        unsafe { self.base.add(PAGE) }
    }

    /// Fills the RAM with a pattern: page i = its index, every 3rd page zero.
    pub fn fill_pattern(&self) {
        // SAFETY: the RAM mapping is RAM_SIZE bytes, readable and writable.
        let ram = unsafe { std::slice::from_raw_parts_mut(self.ptr(), RAM_SIZE) };
        for (i, page) in ram.chunks_mut(PAGE).enumerate() {
            if i % 3 == 0 {
                page.fill(0);
            } else {
                page.fill(i as u8);
                page[..8].copy_from_slice(&(i as u64).to_be_bytes());
            }
        }
    }
}

static SERIAL: Mutex<()> = Mutex::new(());
static mut RAM: Option<GuestRam> = None;
static SETUP: Once = Once::new();

type LockFn = unsafe extern "C" fn(*mut c_void);

/// This host's table, with `lock`/`unlock` as its lock (a test may count
/// or watch the lock calls); the run state is [`STATE`].
pub fn host_ops(lock: LockFn, unlock: LockFn) -> LivemigHostOps {
    LivemigHostOps {
        version: 1,
        size: std::mem::size_of::<LivemigHostOps>() as u32,
        iothread_lock: Some(lock),
        iothread_unlock: Some(unlock),
        vm_stop_force_state: Some(stop),
        vm_start: Some(start),
        runstate_is_running: Some(is_running),
        runstate_set: Some(set),
        runstate_get: None,
        system_wakeup_request: None,
        announce_self: None,
        dirty_log_start: None,
        dirty_log_sync: None,
        dirty_log_stop: None,
        autostart: true,
    }
}

unsafe extern "C" fn get(_: *mut c_void) -> RunState {
    RunState::from_u32(STATE.load(Ordering::SeqCst)).unwrap_or(RunState::Running)
}

/// This host's table as `host()` registers it.
pub fn host_ops_plain() -> LivemigHostOps {
    host_ops(lock, unlock)
}

/// This host's table with `runstate_get` as well: the exact run state
/// ([`STATE`]), not only whether the VM runs.
pub fn host_ops_exact() -> LivemigHostOps {
    LivemigHostOps { runstate_get: Some(get), ..host_ops(lock, unlock) }
}

/// Sets the host up once and returns the RAM and a guard serialising tests.
pub fn host() -> (MutexGuard<'static, ()>, &'static GuestRam) {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    SETUP.call_once(|| {
        livemig::host::set(host_ops(lock, unlock), std::ptr::null_mut()).unwrap();
        let len = RAM_SIZE + 2 * PAGE;
        // SAFETY: anonymous mapping with no access; the middle is then made
        // read-write, leaving a guard page on each side.
        let base = unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p.cast::<u8>().add(PAGE).cast(), RAM_SIZE, libc::PROT_READ | libc::PROT_WRITE), 0);
            p.cast::<u8>()
        };
        let ram = GuestRam { base };
        livemig::ram::block_add("ram", ram.ptr(), RAM_SIZE as u64).unwrap();
        livemig::savevm::register("timer", 0, 2, Box::new(Timer), 0, Priority::Default).unwrap();
        livemig::savevm::set_machine_name(Some("none")).unwrap();
        livemig::transport::set_stall_timeout(1000).unwrap();
        // SAFETY: written once, here, before any reader (Once).
        unsafe { RAM = Some(ram) };
    });
    // SAFETY: initialised above and never written again.
    let ram = unsafe { (*std::ptr::addr_of!(RAM)).as_ref().unwrap() };
    (g, ram)
}

fn raw_counts() -> (usize, usize) {
    let n = |d: &str| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (n("/proc/self/task"), n("/proc/self/fd"))
}

/// Threads and open fds of this process, once settled: a migration thread
/// that has just set its final state may still be on its way out.
pub fn counts() -> (usize, usize) {
    let mut last = raw_counts();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        let now = raw_counts();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits (bounded) until the thread and fd counts are back to `before`.
pub fn assert_no_leak(before: (usize, usize), what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = raw_counts();
        if now == before {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: threads/fds {before:?} before, {now:?} after: leaked");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) for a final state of one direction.
pub fn wait_final(incoming: bool, secs: u64) -> MigrationStatus {
    let st = if incoming { &INCOMING } else { &OUTGOING };
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = st.status();
        if matches!(s, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled) {
            return s;
        }
        assert!(Instant::now() < deadline, "still {} after {secs} s", s.name());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of c-tests/build/qemu_peer (built once).
pub fn qemu_peer() -> PathBuf {
    static BUILT: Once = Once::new();
    BUILT.call_once(|| {
        let st = Command::new("make").args(["-s", "-C"]).arg(root().join("c-tests")).arg("build/qemu_peer").status().expect("make");
        assert!(st.success(), "building qemu_peer failed");
    });
    root().join("c-tests/build/qemu_peer")
}

pub fn spawn_peer(args: &[String]) -> Child {
    Command::new(qemu_peer()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("qemu_peer starts")
}

/// A fresh directory for a test, removed when the test process exits.
pub fn tmpdir(name: &str) -> PathBuf {
    scratch::dir(name)
}

/// A stream for this host's RAM (pattern content), made once by qemu_peer
/// over `exec:`: header, configuration "none", ram, timer, globalstate.
pub fn valid_stream() -> Vec<u8> {
    static mut STREAM: Option<Vec<u8>> = None;
    static MADE: Once = Once::new();
    MADE.call_once(|| {
        let d = tmpdir("valid-stream");
        let img = d.join("ram.img");
        let mut v = vec![0u8; RAM_SIZE];
        for (i, page) in v.chunks_mut(PAGE).enumerate().filter(|(i, _)| i % 7 == 1) {
            page.fill(i as u8);
        }
        std::fs::write(&img, &v).unwrap();
        let out = Command::new(qemu_peer())
            .args(["--migrate", &format!("exec:cat > {}", d.join("s.bin").display()), "--ram-size", "64M", "--ram-file"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu_peer: {}", String::from_utf8_lossy(&out.stdout));
        // SAFETY: written once, here, before any reader (Once).
        unsafe { STREAM = Some(std::fs::read(d.join("s.bin")).unwrap()) };
        let _ = std::fs::remove_dir_all(&d);
    });
    // SAFETY: initialised above and never written again.
    unsafe { (*std::ptr::addr_of!(STREAM)).clone().unwrap() }
}

/// `qmp_migrate(uri)`: its error text, or "" when it was accepted.
pub fn migrate(uri: &str) -> String {
    let c = std::ffi::CString::new(uri).unwrap();
    let mut err = std::ptr::null_mut();
    livemig::ffi::migration::qmp_migrate(c.as_ptr(), false, false, false, false, false, false, &mut err);
    if err.is_null() {
        return String::new();
    }
    // SAFETY: a live error from livemig; its text is a C string it owns.
    let s = unsafe { std::ffi::CStr::from_ptr(livemig::ffi::errors::error_get_pretty(err)) }.to_string_lossy().into_owned();
    livemig::ffi::errors::error_free(err);
    s
}

/// A private anonymous mapping of `pages` pages, to register as guest RAM
/// (the caller unmaps it).
pub fn map_pages(pages: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping, owned by the caller.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), pages * PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// Migrates `src` (`pages` pages, registered as block "ram" for the
/// migration) into the file `path` over `exec:`, the VM running, with the
/// host table already registered; the final state.
pub fn migrate_block_to_file(src: *mut u8, pages: usize, path: &std::path::Path) -> MigrationStatus {
    livemig::ram::block_add("ram", src, (pages * PAGE) as u64).unwrap();
    let uri = format!("exec:cat > {}", path.display());
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    livemig::outgoing::start(livemig::outgoing::Target::Uri(livemig::transport::Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    let st = wait_final(false, 30);
    livemig::ram::block_remove("ram").unwrap();
    st
}

/// Loads the stream in `path` into a fresh block "ram" of `pages` pages
/// and returns it (the caller unmaps it), after checking that the load
/// completed and that every page equals `src`'s.
pub fn load_block_equal_to(path: &std::path::Path, src: *const u8, pages: usize) -> *mut u8 {
    let dst = map_pages(pages);
    livemig::ram::block_add("ram", dst, (pages * PAGE) as u64).unwrap();
    STATE.store(RunState::Prelaunch as u32, Ordering::SeqCst);
    livemig::incoming::start_uri(&format!("exec:cat {}", path.display())).unwrap();
    let st = wait_final(true, 30);
    livemig::ram::block_remove("ram").unwrap();
    assert_eq!(st, MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    // SAFETY: both mappings are `pages` pages; nothing writes them now.
    let (a, b) = unsafe { (std::slice::from_raw_parts(src, pages * PAGE), std::slice::from_raw_parts(dst, pages * PAGE)) };
    let diff = (0..pages).find(|&p| a[p * PAGE..(p + 1) * PAGE] != b[p * PAGE..(p + 1) * PAGE]);
    assert_eq!(diff, None, "first page that differs on the destination");
    dst
}
