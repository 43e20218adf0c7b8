//! Shared destination for the stream targets: a "none" machine with a
//! 1 MiB "ram" block (and a small resizable "rom" block), both fenced by
//! PROT_NONE guard pages, and QEMU's 24-byte "timer" device. Set up once per
//! process; a write outside registered guest RAM faults and the fuzzer
//! reports it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use livemig::error::{MigError, Result};
use livemig::qemu_file::{Direction, QemuFile};
use livemig::savevm::{self, Priority, SaveVmHandler, SectionKind};
use livemig::transport::mem::MemChannel;

pub const PAGE: usize = 4096;
/// The "ram" block: 1 MiB, fixed size.
pub const RAM_LEN: usize = 1 << 20;
/// The "rom" block: 64 KiB used, resizable up to 128 KiB.
pub const ROM_LEN: usize = 64 << 10;
pub const ROM_MAX: usize = 128 << 10;

/// QEMU's "timer" device: 24 bytes, version 2, minimum version 1.
struct Timer;

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

/// `len` bytes of read-write memory between two PROT_NONE guard pages;
/// never unmapped (it lives for the whole fuzzing process).
fn guarded(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping, checked for failure; only its
    // inner part is made accessible.
    unsafe {
        let total = len + 2 * PAGE;
        let p = libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let inner = p.cast::<u8>().add(PAGE);
        assert_eq!(libc::mprotect(inner.cast(), len, libc::PROT_READ | libc::PROT_WRITE), 0, "mprotect");
        inner
    }
}

/// Host address of the "rom" block's memory (set once by `setup`).
static ROM: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn resized(_: *mut std::ffi::c_void, _: *const std::ffi::c_char, new_length: u64) {
    assert!(new_length as usize <= ROM_MAX && new_length > 0, "resized to {new_length}");
}

fn add_rom(host: *mut u8) {
    let r = livemig::ram::Resized { f: resized, opaque: 0 };
    livemig::ram::block_add_resizable("rom", host, ROM_LEN as u64, ROM_MAX as u64, Some(r)).expect("rom block");
}

/// Registers the machine (once per process).
pub fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        savevm::register("timer", 0, 2, Box::new(Timer), 0, Priority::Default).expect("timer");
        savevm::set_machine_name(Some("none")).expect("machine name");
        livemig::ram::block_add("ram", guarded(RAM_LEN), RAM_LEN as u64).expect("ram block");
        let rom = guarded(ROM_MAX);
        ROM.store(rom as usize, Ordering::Relaxed);
        add_rom(rom);
    });
}

/// A stream may resize "rom": put it back to its registered length so that
/// every input starts from the same machine.
fn reset_rom() {
    let b = livemig::ram::blocks().into_iter().find(|b| b.idstr == "rom").expect("rom registered");
    if b.length() != ROM_LEN as u64 {
        drop(b);
        livemig::ram::block_remove("rom").expect("remove rom");
        add_rom(ROM.load(Ordering::Relaxed) as *mut u8);
    }
}

/// Loads `bytes` as a whole stream; errors are expected, panics are bugs.
pub fn load(bytes: Vec<u8>) {
    setup();
    let mut f = QemuFile::new(Box::new(MemChannel::source(bytes)), Direction::Read);
    let _ = livemig::loadvm::load_stream(&mut f, None);
    reset_rom();
}
