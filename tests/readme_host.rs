//! README's "A minimal host" is a program a host author copies: built as
//! written (C11, every warning an error) and linked against the library
//! built with this test, it migrates to a livemig destination in this
//! process (the README's destination: the same "regs" handler, the VM not
//! running) and exits 0 once the migration has completed. Only the
//! example's documentation address (192.0.2.10) is replaced by the
//! destination's. A migration that completes prints nothing (logging goes
//! to stderr, warnings and errors only by default).

#[path = "common/scratch.rs"]
mod scratch;

use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use parking_lot::lock_api::RawMutex as _;

use livemig::ffi::errors::{error_free, error_get_pretty, Error};
use livemig::ffi::host::livemig_set_host_ops;
use livemig::ffi::migration::{livemig_incoming_port, livemig_query_incoming, qapi_free_MigrationInfo, qemu_start_incoming_migration};
use livemig::ffi::savevm::register_savevm;
use livemig::ffi::types::{LivemigHostOps, LIVEMIG_HOST_OPS_VERSION};
use livemig::host::RunState;
use livemig::qemu_file::QemuFile;
use livemig::state::MigrationStatus;

/// The address the README's example migrates to.
const README_URI: &str = "tcp:192.0.2.10:4444";

static LOCK: parking_lot::RawMutex = parking_lot::RawMutex::INIT;
static STATE: AtomicU32 = AtomicU32::new(RunState::Inmigrate as u32);
static STARTS: AtomicU32 = AtomicU32::new(0);
static LOADS: AtomicU32 = AtomicU32::new(0);
static REGS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

unsafe extern "C" fn lock(_: *mut c_void) {
    LOCK.lock();
}
unsafe extern "C" fn unlock(_: *mut c_void) {
    // SAFETY: livemig pairs every unlock with its own earlier lock.
    unsafe { LOCK.unlock() };
}
unsafe extern "C" fn stop(_: *mut c_void, st: RunState) -> c_int {
    STATE.store(st as u32, Ordering::SeqCst);
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
unsafe extern "C" fn regs_save(_: *mut QemuFile, _: *mut c_void) {}
unsafe extern "C" fn regs_load(f: *mut QemuFile, _: *mut c_void, version_id: c_int) -> c_int {
    assert_eq!(version_id, 1);
    let regs: Vec<u32> = (0..16).map(|_| livemig::ffi::file::qemu_get_be32(f)).collect();
    *REGS.lock().unwrap() = regs;
    LOADS.fetch_add(1, Ordering::SeqCst);
    livemig::ffi::file::qemu_file_get_error(f)
}

fn take_err(err: &mut *mut Error) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: a live error made by livemig; its text is a C string it owns.
    let s = unsafe { std::ffi::CStr::from_ptr(error_get_pretty(*err)) }.to_string_lossy().into_owned();
    error_free(*err);
    *err = std::ptr::null_mut();
    Some(s)
}

/// The destination's status and error, as `livemig_query_incoming` gives them.
fn incoming() -> (MigrationStatus, Option<String>) {
    let info = livemig_query_incoming(std::ptr::null_mut());
    assert!(!info.is_null());
    // SAFETY: a MigrationInfo made by livemig, freed right after.
    let r = unsafe {
        let e = (*info).error_desc;
        ((*info).status, (!e.is_null()).then(|| std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()))
    };
    qapi_free_MigrationInfo(info);
    r
}

/// The C example under "## A minimal host" in README.md.
fn readme_example() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let section = &readme[readme.find("\n## A minimal host\n").expect("README has \"A minimal host\"")..];
    let start = section.find("```c\n").expect("the section has a C example") + 5;
    let len = section[start..].find("```").expect("the C example ends");
    section[start..start + len].to_string()
}

#[test]
fn readme_minimal_host_migrates_as_written() {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("skipped: no C compiler (cc)");
        return;
    }
    // The destination, as README's closing paragraph describes it.
    let ops = LivemigHostOps {
        version: LIVEMIG_HOST_OPS_VERSION,
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
    };
    let mut err: *mut Error = std::ptr::null_mut();
    assert!(livemig_set_host_ops(&ops, std::ptr::null_mut(), &mut err), "{:?}", take_err(&mut err));
    assert!(register_savevm(std::ptr::null_mut(), c"regs".as_ptr(), 0, 1, Some(regs_save), Some(regs_load), std::ptr::null_mut()) >= 0);
    qemu_start_incoming_migration(c"tcp:127.0.0.1:0".as_ptr(), &mut err);
    assert_eq!(take_err(&mut err), None);
    let port = livemig_incoming_port();
    assert!(port > 0);

    // The example as written, but for the address.
    let src = readme_example();
    assert_eq!(src.matches(README_URI).count(), 1, "README's example no longer migrates to {README_URI}:\n{src}");
    let src = src.replace(README_URI, &format!("tcp:127.0.0.1:{port}"));
    let root = env!("CARGO_MANIFEST_DIR");
    // The library built with this test: target/PROFILE/, above deps/.
    let libdir: PathBuf = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    assert!(libdir.join("liblivemig.so").exists(), "no liblivemig.so in {libdir:?}");
    let dir = scratch::dir("readme-host");
    // The SONAME the program records, next to it (as `make -C c-tests lib` adds it).
    std::os::unix::fs::symlink(libdir.join("liblivemig.so"), dir.join("liblivemig.so.0")).unwrap();
    std::fs::write(dir.join("host.c"), &src).unwrap();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(format!("{root}/include"))
        .arg(dir.join("host.c"))
        .arg("-o")
        .arg(dir.join("host"))
        .arg(format!("-L{}", libdir.display()))
        .arg("-llivemig")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-lpthread")
        .output()
        .unwrap();
    assert!(out.status.success(), "README's C example does not build:\n{}", String::from_utf8_lossy(&out.stderr));

    let mut child = Command::new(dir.join("host"))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("README's example did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(status.success(), "README's example exited with {status}:\n{text}");
    // The library logs to stderr, never stdout, and by default (no
    // RUST_LOG) only warnings and errors, of which a migration that
    // completes has none.
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "README's example printed:\n{text}");

    // The destination loaded the device and started the VM (the source ran).
    let deadline = Instant::now() + Duration::from_secs(30);
    while incoming().0 != MigrationStatus::Completed {
        assert!(Instant::now() < deadline, "destination: {:?}", incoming());
        assert_ne!(incoming().0, MigrationStatus::Failed, "destination: {:?}", incoming());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(LOADS.load(Ordering::SeqCst), 1);
    assert_eq!(*REGS.lock().unwrap(), vec![0u32; 16]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while STARTS.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the destination's VM was not started");
        std::thread::sleep(Duration::from_millis(10));
    }
}
