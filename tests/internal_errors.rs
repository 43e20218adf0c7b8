//! A panic on a migration thread (a bug in livemig, or in a handler
//! registered from Rust) ends that migration like any other failure: the
//! source ends FAILED with the reason and its VM running again if it was
//! stopped; the destination ends FAILED without starting its VM; the
//! process lives on, nothing leaks, and the next migration works.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use livemig::error::Result;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::qemu_file::QemuFile;
use livemig::savevm::{Priority, SaveVmHandler, SectionKind};
use livemig::state::MigrationStatus;
use livemig::transport::Uri;

/// Where the test handlers panic.
static MODE: AtomicU32 = AtomicU32::new(BEHAVE);
const BEHAVE: u32 = 0;
const PANIC_ITERATE: u32 = 1;
const PANIC_SAVE: u32 = 2;
const PANIC_LOAD: u32 = 3;
const PANIC_CANCEL: u32 = 4;
const PANIC_CLEANUP: u32 = 5;
const PANIC_LOAD_END: u32 = 6;

const OWNER: usize = 0xb00;

/// Loads of the device handler that ended (`load_end`).
static LOAD_ENDS: AtomicU32 = AtomicU32::new(0);

/// Calls of the witness handler's `cancel` and `cleanup`.
static WITNESS_CANCELS: AtomicU32 = AtomicU32::new(0);
static WITNESS_CLEANUPS: AtomicU32 = AtomicU32::new(0);

/// A live handler: an empty iterative section, which panics in `iterate`
/// in PANIC_ITERATE, in `cancel` in PANIC_CANCEL, in `cleanup` in
/// PANIC_CLEANUP and in `load_end` in PANIC_LOAD_END.
struct Live;

impl SaveVmHandler for Live {
    fn is_live(&self) -> bool {
        true
    }
    fn iterate(&mut self, _f: &mut QemuFile) -> Result<bool> {
        if MODE.load(Ordering::SeqCst) == PANIC_ITERATE {
            panic!("boom in iterate");
        }
        Ok(true)
    }
    fn cancel(&mut self) {
        if MODE.load(Ordering::SeqCst) == PANIC_CANCEL {
            panic!("boom in cancel");
        }
    }
    fn cleanup(&mut self) {
        if MODE.load(Ordering::SeqCst) == PANIC_CLEANUP {
            panic!("boom in cleanup");
        }
    }
    fn load_end(&mut self) {
        if MODE.load(Ordering::SeqCst) == PANIC_LOAD_END {
            panic!("boom in load_end");
        }
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

/// A device: 4 bytes at the switchover; panics in `save_state` in
/// PANIC_SAVE and in `load` in PANIC_LOAD.
struct Device;

impl SaveVmHandler for Device {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        if MODE.load(Ordering::SeqCst) == PANIC_SAVE {
            panic!("boom in save_state");
        }
        f.put_be32(0xb00b);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        if MODE.load(Ordering::SeqCst) == PANIC_LOAD {
            panic!("boom in load");
        }
        let v = f.get_be32();
        f.check()?;
        assert_eq!(v, 0xb00b, "device payload");
        Ok(())
    }
    fn load_end(&mut self) {
        LOAD_ENDS.fetch_add(1, Ordering::SeqCst);
    }
}

/// A live handler registered after `Live`, counting what it is told.
struct Witness;

impl SaveVmHandler for Witness {
    fn is_live(&self) -> bool {
        true
    }
    fn cancel(&mut self) {
        WITNESS_CANCELS.fetch_add(1, Ordering::SeqCst);
    }
    fn cleanup(&mut self) {
        WITNESS_CLEANUPS.fetch_add(1, Ordering::SeqCst);
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        f.check()
    }
}

fn register() {
    livemig::savevm::register("boom-live", 0, 1, Box::new(Live), OWNER, Priority::Default).unwrap();
    livemig::savevm::register("boom-device", 0, 1, Box::new(Device), OWNER, Priority::Default).unwrap();
    livemig::savevm::register("boom-witness", 0, 1, Box::new(Witness), OWNER, Priority::Default).unwrap();
}

fn unregister() {
    livemig::savevm::unregister("boom-live", OWNER);
    livemig::savevm::unregister("boom-device", OWNER);
    livemig::savevm::unregister("boom-witness", OWNER);
}

/// Migrates into `path` (exec:), returning the final state.
fn migrate_to(path: &std::path::Path) -> MigrationStatus {
    let uri = format!("exec:cat > {}", path.display());
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    wait_final(false, 30)
}

#[test]
fn source_panic_fails_the_migration_and_keeps_the_vm() {
    let (_g, ram) = host();
    ram.fill_pattern();
    register();
    let dir = tmpdir("panic-source");
    for (mode, what, stopped) in [(PANIC_ITERATE, "boom in iterate", false), (PANIC_SAVE, "boom in save_state", true)] {
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
        let before = counts();
        let (starts, stops) = (STARTS.load(Ordering::SeqCst), STOPS.load(Ordering::SeqCst));
        MODE.store(mode, Ordering::SeqCst);
        let st = migrate_to(&dir.join("s.bin"));
        let e = outgoing::stats().error.unwrap_or_default();
        assert_eq!(st, MigrationStatus::Failed, "{what}: source {} ({e})", st.name());
        assert_eq!(e, format!("internal error in the migration thread: {what}"));
        assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "{what}: the source VM runs");
        let stopped_now = STOPS.load(Ordering::SeqCst) - stops;
        assert_eq!(stopped_now > 0, stopped, "{what}: VM stopped for the switchover");
        assert_eq!(STARTS.load(Ordering::SeqCst) - starts, stopped_now, "{what}: a VM stopped for the switchover is started again");
        assert_no_leak(before, what);
        // Nothing is wedged: the next migration completes.
        MODE.store(BEHAVE, Ordering::SeqCst);
        assert_eq!(migrate_to(&dir.join("s.bin")), MigrationStatus::Completed, "{what}: the next migration");
    }
    unregister();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A handler that panics in `cancel` or `cleanup` does not keep the others
/// from being cancelled and cleaned up: RAM's cleanup (dirty log stopped,
/// bitmaps, XBZRLE cache and /proc/self/pagemap released) runs, nothing is
/// left open, and a panic in `cleanup` after the stream went out does not
/// turn a completed migration into a failed one that restarts the VM.
#[test]
fn a_panic_in_cancel_or_cleanup_still_cancels_and_cleans_up_every_handler() {
    let (_g, ram) = host();
    ram.fill_pattern();
    register();
    let dir = tmpdir("panic-cleanup");
    for (mode, uri, want) in [
        (PANIC_CANCEL, "exec:false".to_string(), MigrationStatus::Failed),
        (PANIC_CLEANUP, "exec:false".to_string(), MigrationStatus::Failed),
        (PANIC_CLEANUP, format!("exec:cat > {}", dir.join("s.bin").display()), MigrationStatus::Completed),
    ] {
        let what = format!("mode {mode}, {uri}");
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
        let before = counts();
        let (cancels, cleanups, starts) =
            (WITNESS_CANCELS.load(Ordering::SeqCst), WITNESS_CLEANUPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst));
        MODE.store(mode, Ordering::SeqCst);
        outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
        let st = wait_final(false, 30);
        MODE.store(BEHAVE, Ordering::SeqCst);
        let e = outgoing::stats().error.unwrap_or_default();
        assert_eq!(st, want, "{what}: source {} ({e})", st.name());
        let cancelled = u32::from(want == MigrationStatus::Failed);
        assert_eq!(WITNESS_CANCELS.load(Ordering::SeqCst) - cancels, cancelled, "{what}: the other handler's cancel");
        assert_eq!(WITNESS_CLEANUPS.load(Ordering::SeqCst) - cleanups, 1, "{what}: the other handler's cleanup");
        if want == MigrationStatus::Completed {
            assert_eq!(STATE.load(Ordering::SeqCst), RunState::Postmigrate as u32, "{what}: the VM stays stopped");
            assert_eq!(STARTS.load(Ordering::SeqCst), starts, "{what}: the VM was started again");
        } else {
            assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "{what}: the source VM runs");
        }
        assert_no_leak(before, &what);
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
        assert_eq!(migrate_to(&dir.join("s.bin")), MigrationStatus::Completed, "{what}: the next migration");
    }
    unregister();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn destination_panic_fails_the_load_and_leaves_the_vm_stopped() {
    let (_g, ram) = host();
    ram.fill_pattern();
    register();
    let dir = tmpdir("panic-destination");
    let stream = dir.join("s.bin");
    MODE.store(BEHAVE, Ordering::SeqCst);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate_to(&stream), MigrationStatus::Completed, "the stream is made");
    let src = format!("exec:cat {}", stream.display());
    for (mode, want) in
        [(PANIC_LOAD, MigrationStatus::Failed), (PANIC_LOAD_END, MigrationStatus::Failed), (BEHAVE, MigrationStatus::Completed)]
    {
        STATE.store(RunState::Prelaunch as u32, Ordering::SeqCst);
        let before = counts();
        let (starts, load_ends) = (STARTS.load(Ordering::SeqCst), LOAD_ENDS.load(Ordering::SeqCst));
        MODE.store(mode, Ordering::SeqCst);
        livemig::incoming::start_uri(&src).unwrap();
        let st = wait_final(true, 30);
        // The handlers' loads end, panic or not (they release what the
        // load held), also when another handler's load_end panics.
        assert_eq!(LOAD_ENDS.load(Ordering::SeqCst), load_ends + 1, "mode {mode}: load_end runs once");
        let e = livemig::incoming::error().unwrap_or_default();
        assert_eq!(st, want, "mode {mode}: destination {} ({e})", st.name());
        if want == MigrationStatus::Failed {
            let what = if mode == PANIC_LOAD { "boom in load" } else { "boom in load_end" };
            assert_eq!(e, format!("internal error in the incoming migration thread: {what}"));
            assert_eq!(STARTS.load(Ordering::SeqCst), starts, "the destination VM is not started");
            assert_ne!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "the destination VM is not running");
        } else {
            assert_eq!(STARTS.load(Ordering::SeqCst), starts + 1, "the destination VM starts after a good load");
        }
        assert_no_leak(before, "incoming");
    }
    MODE.store(BEHAVE, Ordering::SeqCst);
    unregister();
    let _ = std::fs::remove_dir_all(&dir);
}
