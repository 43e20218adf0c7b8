//! Several RAM blocks, among them a resizable one and one with a 255-byte
//! name, migrated out and loaded back in this process: the block list as
//! QEMU 7.2 sends and takes it, the destination's resizable block resized
//! to the source's used length (its host told), RAM identical byte for
//! byte and nothing written past a block's used length; the block list
//! fixed while a migration runs; marks out of a block's used length refused.

mod common;

use std::ffi::CString;
use std::ptr::null_mut;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use common::{host, migrate, wait_final, wait_until, STATE};
use livemig::ffi::errors::{error_free, error_get_pretty};
use livemig::ffi::migration as api;
use livemig::host::RunState;
use livemig::qemu_file::{Direction, QemuFile};
use livemig::state::{MigrationStatus, OUTGOING};

const PAGE: usize = 4096;
const ACPI: &str = "/rom@etc/acpi/tables";

/// `len` bytes of guest memory between two PROT_NONE guard pages.
struct Mem {
    base: *mut u8,
    len: usize,
}

impl Mem {
    fn new(len: usize, fill: u8) -> Mem {
        // SAFETY: an anonymous mapping with no access; the middle is then
        // made read-write, leaving a guard page on each side.
        let base = unsafe {
            let p = libc::mmap(null_mut(), len + 2 * PAGE, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p.cast::<u8>().add(PAGE).cast(), len, libc::PROT_READ | libc::PROT_WRITE), 0);
            p.cast::<u8>()
        };
        let m = Mem { base, len };
        m.bytes().fill(fill);
        m
    }
    fn ptr(&self) -> *mut u8 {
        // SAFETY: one page into the mapping.
        unsafe { self.base.add(PAGE) }
    }
    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the read-write part of the mapping; only the test and a
        // load it waits for touch it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), self.len + 2 * PAGE) };
    }
}

fn pattern(b: &mut [u8], seed: u8) {
    for (i, page) in b.chunks_mut(PAGE).enumerate() {
        if i % 4 == 3 {
            page.fill(0);
        } else {
            page.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 7 + j) as u8 ^ seed);
        }
    }
}

static RESIZED: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

unsafe extern "C" fn resized(_: *mut std::ffi::c_void, idstr: *const std::ffi::c_char, len: u64) {
    // SAFETY: livemig passes the block's name as a C string.
    let name = unsafe { std::ffi::CStr::from_ptr(idstr) }.to_string_lossy().into_owned();
    RESIZED.lock().unwrap().push((name, len));
}

fn add_resizable(m: &Mem, used: u64) {
    let r = livemig::ram::Resized { f: resized, opaque: 0 };
    livemig::ram::block_add_resizable(ACPI, m.ptr(), used, m.len as u64, Some(r)).unwrap();
}

fn load(bytes: Vec<u8>) -> Result<(), String> {
    let mut f = QemuFile::new(Box::new(livemig::transport::mem::MemChannel::source(bytes)), Direction::Read);
    livemig::loadvm::load_stream(&mut f, None).map_err(|e| e.to_string())
}

#[test]
fn several_blocks_round_trip_with_a_resizable_one() {
    let (_g, ram) = host();
    let long = "b".repeat(255);
    assert!(livemig::ram::block_add(&"b".repeat(256), null_mut(), 4096).unwrap_err().to_string().contains("1 to 255 bytes"));
    ram.fill_pattern();
    let acpi = Mem::new(0x200000, 0xee);
    pattern(&mut acpi.bytes()[..0x20000], 1);
    add_resizable(&acpi, 0x20000);
    let named = Mem::new(0x3000, 0);
    pattern(named.bytes(), 2);
    livemig::ram::block_add(&long, named.ptr(), 0x3000).unwrap();
    let order: Vec<_> = livemig::ram::blocks().iter().map(|b| b.idstr.clone()).collect();
    assert_eq!(order, ["ram", ACPI, long.as_str()], "largest maximum first");

    let dir = common::tmpdir("ram-blocks");
    let file = dir.join("s.bin");
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate(&format!("exec:cat > {}", file.display())), "");
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let stream = std::fs::read(&file).unwrap();

    let ram_bytes = || {
        // SAFETY: the host's RAM mapping, RAM_SIZE bytes; nothing writes it
        // while it is read here.
        unsafe { std::slice::from_raw_parts(ram.ptr(), common::RAM_SIZE) }.to_vec()
    };
    let want_ram = ram_bytes();
    let want_acpi = acpi.bytes()[..0x20000].to_vec();
    let want_named = named.bytes().to_vec();
    // The destination: its resizable block smaller, everything cleared.
    livemig::ram::block_remove(ACPI).unwrap();
    let acpi2 = Mem::new(0x200000, 0xcc);
    add_resizable(&acpi2, 0x10000);
    named.bytes().fill(0);
    // SAFETY: the host's RAM mapping; nothing else uses it now.
    unsafe { std::ptr::write_bytes(ram.ptr(), 0, common::RAM_SIZE) };
    RESIZED.lock().unwrap().clear();
    let r = load(stream.clone());
    let got_ram = ram_bytes();
    let len = livemig::ram::blocks().iter().find(|b| b.idstr == ACPI).unwrap().length();
    let got = (acpi2.bytes()[..0x20000].to_vec(), acpi2.bytes()[0x20000..].iter().all(|&b| b == 0xcc), named.bytes().to_vec());

    // A stream that shrinks it and then addresses a page past its used
    // length (inside its maximum): refused, nothing written there.
    let mut s = b"QEVM\0\0\0\x03\x07\0\0\0\x04none".to_vec();
    s.extend([1, 0, 0, 0, 2, 3]);
    s.extend(b"ram");
    s.extend([0, 0, 0, 0, 0, 0, 0, 4]);
    s.extend((0x10000u64 | 4).to_be_bytes());
    s.push(ACPI.len() as u8);
    s.extend(ACPI.as_bytes());
    s.extend(0x10000u64.to_be_bytes());
    s.extend((0x18000u64 | 8).to_be_bytes());
    s.push(ACPI.len() as u8);
    s.extend(ACPI.as_bytes());
    s.extend([0x11; PAGE]);
    let beyond = load(s);
    let untouched = acpi2.bytes()[0x18000..0x19000] == want_acpi[0x18000..0x19000];

    livemig::ram::block_remove(ACPI).unwrap();
    livemig::ram::block_remove(&long).unwrap();
    assert_eq!(r, Ok(()));
    assert!(got_ram == want_ram, "ram differs");
    assert_eq!(len, 0x20000, "resized to the source's used length");
    assert!(got.0 == want_acpi, "acpi tables differ");
    assert!(got.1, "nothing written past the used length");
    assert!(got.2 == want_named, "255-byte-named block differs");
    assert_eq!(RESIZED.lock().unwrap()[..], [(ACPI.to_string(), 0x20000), (ACPI.to_string(), 0x10000)]);
    assert!(beyond.as_ref().is_err_and(|e| e.ends_with(": Illegal RAM offset 18000")), "{beyond:?}");
    assert!(untouched, "a page past the used length is not written");
}

#[test]
fn block_list_fixed_while_migrating() {
    let (_g, _ram) = host();
    let acpi = Mem::new(0x200000, 0);
    add_resizable(&acpi, 0x20000);
    let extra = Mem::new(0x1000, 0);
    let mut err = null_mut();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // A command that reads nothing: the migration stays active (its
    // writes wait on the full pipe) until it is cancelled.
    assert_eq!(migrate("exec:exec sleep 30"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    let add = livemig::ram::block_add("extra", extra.ptr(), 0x1000).map_err(|e| e.to_string());
    let remove = livemig::ram::block_remove(ACPI).map_err(|e| e.to_string());
    let past = livemig::ram::mark_dirty(ACPI, 0x20000, 1).map_err(|e| e.to_string());
    let unknown = livemig::ram::mark_dirty("nope", 0, 1).map_err(|e| e.to_string());
    let inside = livemig::ram::mark_dirty(ACPI, 0x1f000, 0x1000).map_err(|e| e.to_string());
    api::qmp_migrate_cancel(&mut err);
    assert!(err.is_null());
    let st = wait_final(false, 20);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    livemig::ram::block_remove(ACPI).unwrap();
    assert_eq!(st, MigrationStatus::Cancelled);
    assert_eq!(add, Err("ram blocks cannot change while a migration is in progress".into()));
    assert_eq!(remove, Err("ram blocks cannot change while a migration is in progress".into()));
    assert_eq!(past, Err(format!("ram block '{ACPI}': range 0x20000+0x1 exceeds its length 0x20000")));
    assert_eq!(unknown, Err("ram block 'nope' is not registered".into()));
    assert_eq!(inside, Ok(()));
}

/// `livemig_ram_block_resize` through the C entry point: `Ok` or the
/// error's text.
fn resize(idstr: Option<&str>, len: u64) -> Result<(), String> {
    let c = idstr.map(|s| CString::new(s).unwrap());
    let mut err = null_mut();
    let ok = livemig::ffi::ram::livemig_ram_block_resize(c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()), len, &mut err);
    if err.is_null() {
        assert!(ok);
        return Ok(());
    }
    assert!(!ok);
    // SAFETY: a live error from livemig.
    let s = unsafe { std::ffi::CStr::from_ptr(error_get_pretty(err)) }.to_string_lossy().into_owned();
    error_free(err);
    Err(s)
}

fn length_of(idstr: &str) -> u64 {
    livemig::ram::blocks().iter().find(|b| b.idstr == idstr).unwrap().length()
}

#[test]
fn the_host_resizes_a_block_as_qemu_ram_resize_does() {
    let (_g, _ram) = host();
    let acpi = Mem::new(0x200000, 0);
    add_resizable(&acpi, 0x20000);
    let fixed = Mem::new(0x2000, 0);
    livemig::ram::block_add("fixed", fixed.ptr(), 0x2000).unwrap();
    RESIZED.lock().unwrap().clear();
    let r = [
        resize(Some(ACPI), 0x30001),
        resize(Some(ACPI), 0x30001),
        resize(Some(ACPI), 0x30800),
        resize(Some(ACPI), 0x201000),
        resize(Some(ACPI), 0),
        resize(Some("fixed"), 0x3000),
        resize(Some("fixed"), 0x2000),
        resize(Some("nope"), 0x1000),
        resize(None, 0x1000),
    ];
    let lengths = (length_of(ACPI), length_of("fixed"));
    livemig::ram::block_remove(ACPI).unwrap();
    livemig::ram::block_remove("fixed").unwrap();
    assert_eq!(r[0], Ok(()));
    assert_eq!(r[1], Ok(()), "the same length again: nothing to do");
    assert_eq!(r[2], Ok(()), "the same pages, another size: the host is told");
    assert_eq!(r[3], Err(format!("Size too large: {ACPI}: 0x201000 > 0x200000: Invalid argument")));
    assert_eq!(r[4], Err(format!("Invalid size: {ACPI}: 0x0: a block cannot be emptied")));
    assert!(r[5].as_ref().is_err_and(|e| e.starts_with("Size mismatch: fixed: 0x3000 != 0x2000: Invalid argument")), "{:?}", r[5]);
    assert_eq!(r[6], Ok(()), "a fixed block keeps its own length");
    assert_eq!(r[7], Err("ram block 'nope' is not registered".into()));
    assert!(r[8].as_ref().is_err_and(|e| e.contains("idstr")), "{:?}", r[8]);
    assert_eq!(lengths, (0x31000, 0x2000), "refusals changed nothing");
    assert_eq!(RESIZED.lock().unwrap()[..], [(ACPI.to_string(), 0x30001), (ACPI.to_string(), 0x30800)]);
}

#[test]
fn a_block_resized_during_a_migration_fails_it_and_the_next_one_sends_the_new_length() {
    let (_g, _ram) = host();
    let acpi = Mem::new(0x200000, 0);
    pattern(&mut acpi.bytes()[..0x40000], 3);
    add_resizable(&acpi, 0x20000);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // A command that reads nothing: the migration stays active until the
    // resize fails it.
    assert_eq!(migrate("exec:exec sleep 30"), "");
    wait_until(10, "active", || OUTGOING.status() == MigrationStatus::Active);
    // The same number of pages: the stream's length still holds.
    let same = resize(Some(ACPI), 0x1f001);
    let still = OUTGOING.status();
    let grown = resize(Some(ACPI), 0x40000);
    let st = wait_final(false, 20);
    let error = livemig::outgoing::stats().error.unwrap_or_default();
    let running = STATE.load(Ordering::SeqCst) == RunState::Running as u32;

    // The next migration announces and sends the new length.
    let dir = common::tmpdir("ram-blocks-resize");
    let file = dir.join("s.bin");
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate(&format!("exec:cat > {}", file.display())), "");
    let next = wait_final(false, 60);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let want = acpi.bytes()[..0x40000].to_vec();
    livemig::ram::block_remove(ACPI).unwrap();
    let dst = Mem::new(0x200000, 0xcc);
    add_resizable(&dst, 0x10000);
    let loaded = load(std::fs::read(&file).unwrap());
    let dst_len = length_of(ACPI);
    livemig::ram::block_remove(ACPI).unwrap();

    assert_eq!(same, Ok(()));
    assert_eq!(still, MigrationStatus::Active, "a resize to the same pages does not fail the migration");
    assert_eq!(grown, Ok(()), "the host's resize is taken");
    assert_eq!(st, MigrationStatus::Failed);
    assert_eq!(error, format!("RAM block '{ACPI}' resized during precopy."));
    assert!(running, "the VM keeps running");
    assert_eq!(next, MigrationStatus::Completed);
    assert_eq!(loaded, Ok(()));
    assert_eq!(dst_len, 0x40000, "the destination takes the new length");
    assert!(dst.bytes()[..0x40000] == want[..], "the grown block's pages arrive");
}

#[test]
fn a_block_cannot_be_resized_during_an_incoming_migration() {
    let (_g, _ram) = host();
    let acpi = Mem::new(0x200000, 0);
    add_resizable(&acpi, 0x20000);
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let uri = CString::new("tcp:127.0.0.1:0").unwrap();
    let mut err = null_mut();
    api::qemu_start_incoming_migration(uri.as_ptr(), &mut err);
    assert!(err.is_null());
    let r = resize(Some(ACPI), 0x40000);
    assert!(api::livemig_incoming_cancel());
    let st = wait_final(true, 10);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let len = length_of(ACPI);
    livemig::ram::block_remove(ACPI).unwrap();
    assert_eq!(
        r,
        Err(format!("ram block '{ACPI}' cannot be resized while an incoming migration is in progress (the stream sets its length)"))
    );
    assert_eq!(len, 0x20000);
    assert_eq!(st, MigrationStatus::Failed);
}
