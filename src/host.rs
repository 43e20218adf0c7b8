//! The host VMM's callbacks, behind safe methods. This is the only module
//! that calls the host's function pointers.
//!
//! The table is copied at registration; the host's `opaque` pointer is
//! passed back unchanged to every call. Which thread calls what, and under
//! which lock, is documented on `LivemigHostOps` in the header.

use std::cell::Cell;
use std::ffi::{c_void, CString};

use parking_lot::RwLock;

use crate::error::{MigError, Result};
use crate::ffi::types::LivemigHostOps;

/// The VM run state, numbered as QEMU 7.2's QAPI `RunState`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// debug
    Debug = 0,
    /// inmigrate: waiting for an incoming migration
    Inmigrate = 1,
    /// internal-error
    InternalError = 2,
    /// io-error
    IoError = 3,
    /// paused
    Paused = 4,
    /// postmigrate: the source after a completed migration
    Postmigrate = 5,
    /// prelaunch: created but never started
    Prelaunch = 6,
    /// finish-migrate: stopped for the switchover
    FinishMigrate = 7,
    /// restore-vm
    RestoreVm = 8,
    /// running
    Running = 9,
    /// save-vm
    SaveVm = 10,
    /// shutdown
    Shutdown = 11,
    /// suspended
    Suspended = 12,
    /// watchdog
    Watchdog = 13,
    /// guest-panicked
    GuestPanicked = 14,
    /// colo
    Colo = 15,
}

const RUNSTATE_NAMES: [&str; 16] = [
    "debug",
    "inmigrate",
    "internal-error",
    "io-error",
    "paused",
    "postmigrate",
    "prelaunch",
    "finish-migrate",
    "restore-vm",
    "running",
    "save-vm",
    "shutdown",
    "suspended",
    "watchdog",
    "guest-panicked",
    "colo",
];

impl RunState {
    /// Every state in QAPI order.
    pub fn all() -> [RunState; 16] {
        use RunState::*;
        [
            Debug,
            Inmigrate,
            InternalError,
            IoError,
            Paused,
            Postmigrate,
            Prelaunch,
            FinishMigrate,
            RestoreVm,
            Running,
            SaveVm,
            Shutdown,
            Suspended,
            Watchdog,
            GuestPanicked,
            Colo,
        ]
    }

    /// QEMU's name (as carried by the "globalstate" section).
    pub fn name(self) -> &'static str {
        RUNSTATE_NAMES[self as usize]
    }

    /// Looks a name up.
    pub fn from_name(name: &str) -> Option<RunState> {
        RUNSTATE_NAMES.iter().position(|n| *n == name).map(|i| Self::all()[i])
    }

    /// From the numeric value (as a C host returns it: any integer).
    pub fn from_u32(v: u32) -> Option<RunState> {
        Self::all().get(v as usize).copied()
    }
}

/// The registered host: a copy of its table and its opaque pointer.
#[derive(Clone, Copy)]
pub struct Host {
    ops: LivemigHostOps,
    opaque: usize,
}

// SAFETY: the table holds plain function pointers and the host's opaque
// pointer, which the host promises (header: threading contract) may be used
// from livemig's threads.
unsafe impl Send for Host {}
// SAFETY: as above; the table is never mutated after registration.
unsafe impl Sync for Host {}

static HOST: RwLock<Option<Host>> = RwLock::new(None);

/// Registers the host's table (checked: every required entry present).
pub fn set(ops: LivemigHostOps, opaque: *mut c_void) -> Result<()> {
    let required: [(&str, bool); 6] = [
        ("iothread_lock", ops.iothread_lock.is_some()),
        ("iothread_unlock", ops.iothread_unlock.is_some()),
        ("vm_stop_force_state", ops.vm_stop_force_state.is_some()),
        ("vm_start", ops.vm_start.is_some()),
        ("runstate_is_running", ops.runstate_is_running.is_some()),
        ("runstate_set", ops.runstate_set.is_some()),
    ];
    if let Some((name, _)) = required.iter().find(|(_, present)| !present) {
        return Err(MigError::new(format!("host operations: required callback '{name}' is NULL")));
    }
    // Checked under the lock: a migration reads the table after its state
    // left idle, so a change either lands before that or is refused.
    let mut h = HOST.write();
    if crate::state::OUTGOING.status().is_active() || crate::state::INCOMING.status().is_active() {
        return Err(MigError::new("host operations cannot change while a migration is in progress"));
    }
    *h = Some(Host { ops, opaque: opaque as usize });
    Ok(())
}

/// The registered host, or an error saying it is missing.
pub fn get() -> Result<Host> {
    HOST.read().ok_or_else(|| MigError::new("no host operations registered: call livemig_set_host_ops first"))
}

/// Holds the host lock until dropped.
pub struct HostLockGuard<'a>(&'a Host);

impl Drop for HostLockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the lock it releases.
        unsafe { self.0.unlock() }
    }
}

thread_local! {
    /// The host whose lock this thread holds for loading a device section
    /// ([`Host::lock_for_load`]): a wait for the source releases it.
    static LOADING_UNDER: Cell<Option<Host>> = const { Cell::new(None) };
}

/// Holds the host lock for a device section's load until dropped; while
/// the section waits for bytes from the source, the lock is released
/// ([`unlocked_while_waiting`]).
pub struct LoadLockGuard<'a> {
    _lock: HostLockGuard<'a>,
}

impl Drop for LoadLockGuard<'_> {
    fn drop(&mut self) {
        // Before the lock is released (the field is dropped after this).
        LOADING_UNDER.with(|c| c.set(None));
    }
}

/// Runs `wait`, a wait for the peer, with the host lock released if this
/// thread holds it for a device section's load, and takes the lock again
/// afterwards, before the section goes on. As QEMU 7.2's destination,
/// whose incoming coroutine yields the BQL to the main loop while the
/// channel has no data: a source that stalls within a section does not
/// keep the host's other threads out for the io timeout. Elsewhere (the
/// source's switchover) the lock stays held.
pub fn unlocked_while_waiting<T>(wait: impl FnOnce() -> T) -> T {
    let Some(host) = LOADING_UNDER.with(|c| c.take()) else {
        return wait();
    };
    /// Takes the lock again however `wait` ends, so that the load's guard
    /// releases a lock it holds.
    struct Relock(Host);
    impl Drop for Relock {
        fn drop(&mut self) {
            std::mem::forget(self.0.lock());
            LOADING_UNDER.with(|c| c.set(Some(self.0)));
        }
    }
    // SAFETY: this thread holds the lock (LOADING_UNDER is set only
    // while a LoadLockGuard holds it), and Relock takes it again.
    unsafe { host.unlock() };
    let _relock = Relock(host);
    wait()
}

impl Host {
    fn opaque(&self) -> *mut c_void {
        self.opaque as *mut c_void
    }

    /// Releases the host lock.
    ///
    /// # Safety
    ///
    /// This thread must hold it, taken by [`Host::lock`].
    unsafe fn unlock(&self) {
        let f = self.ops.iothread_unlock.expect("checked at registration");
        // SAFETY: the host registered this function for its opaque pointer;
        // this thread holds the lock (our caller's promise).
        unsafe { f(self.opaque()) }
    }

    /// Takes the host lock for loading a device section: as [`Host::lock`],
    /// except that waits for the source release it meanwhile
    /// ([`unlocked_while_waiting`]).
    pub fn lock_for_load(&self) -> LoadLockGuard<'_> {
        let lock = self.lock();
        LOADING_UNDER.with(|c| c.set(Some(*self)));
        LoadLockGuard { _lock: lock }
    }

    /// Takes the host lock (QEMU's iothread lock / BQL).
    pub fn lock(&self) -> HostLockGuard<'_> {
        let f = self.ops.iothread_lock.expect("checked at registration");
        // SAFETY: registered host callback with its own opaque pointer.
        unsafe { f(self.opaque()) };
        HostLockGuard(self)
    }

    /// Stops the VM into `state`; `Err` with the host's code on failure.
    pub fn vm_stop_force_state(&self, state: RunState) -> Result<()> {
        let f = self.ops.vm_stop_force_state.expect("checked at registration");
        // SAFETY: registered host callback with its own opaque pointer.
        let r = unsafe { f(self.opaque(), state) };
        if r < 0 {
            return Err(MigError::from_host(format!("the host failed to stop the VM ({r})"), r));
        }
        Ok(())
    }

    /// Starts (resumes) the VM.
    pub fn vm_start(&self) -> Result<()> {
        let f = self.ops.vm_start.expect("checked at registration");
        // SAFETY: registered host callback with its own opaque pointer.
        let r = unsafe { f(self.opaque()) };
        if r < 0 {
            return Err(MigError::from_host(format!("the host failed to start the VM ({r})"), r));
        }
        Ok(())
    }

    /// True if the VM is running.
    pub fn runstate_is_running(&self) -> bool {
        let f = self.ops.runstate_is_running.expect("checked at registration");
        // SAFETY: registered host callback with its own opaque pointer.
        unsafe { f(self.opaque()) }
    }

    /// The VM's run state: the host's answer, or running/paused when the
    /// host has no `runstate_get`. An answer that is not a `RunState` is
    /// refused with an error naming it.
    pub fn runstate(&self) -> Result<RunState> {
        let Some(f) = self.ops.runstate_get else {
            return Ok(if self.runstate_is_running() { RunState::Running } else { RunState::Paused });
        };
        // The C callback returns an `enum RunState`, which C lets hold any
        // value of its integer type; read it as that integer, so that no
        // Rust `RunState` with an invalid discriminant ever exists.
        // SAFETY: a `repr(C)` fieldless enum is returned as the C enum's
        // integer type (unsigned int here: no negative variants), so the
        // same function called as returning `u32` yields the same bits;
        // the pointer is not NULL (matched above).
        let raw: unsafe extern "C" fn(*mut c_void) -> u32 = unsafe { std::mem::transmute(f) };
        // SAFETY: registered host callback with its own opaque pointer.
        let v = unsafe { raw(self.opaque()) };
        RunState::from_u32(v).ok_or_else(|| {
            MigError::new(format!("the host's runstate_get returned {v}, which is not a RunState (0 to {})", RUNSTATE_NAMES.len() - 1))
        })
    }

    /// Sets the run state without starting or stopping anything.
    pub fn runstate_set(&self, state: RunState) {
        let f = self.ops.runstate_set.expect("checked at registration");
        // SAFETY: registered host callback with its own opaque pointer.
        unsafe { f(self.opaque(), state) }
    }

    /// Wakes a suspended guest before the switchover (optional callback).
    pub fn system_wakeup_request(&self) {
        if let Some(f) = self.ops.system_wakeup_request {
            // SAFETY: registered host callback with its own opaque pointer.
            unsafe { f(self.opaque()) }
        }
    }

    /// Announces the VM's new location on the network (optional callback).
    pub fn announce_self(&self) {
        if let Some(f) = self.ops.announce_self {
            // SAFETY: registered host callback with its own opaque pointer.
            unsafe { f(self.opaque()) }
        }
    }

    /// Whether the destination starts the VM after a load.
    pub fn autostart(&self) -> bool {
        self.ops.autostart
    }

    /// True when the host tells its exact run state (`runstate_get`), not
    /// only whether the VM runs.
    pub fn has_runstate_get(&self) -> bool {
        self.ops.runstate_get.is_some()
    }

    /// True when the host has a dirty log.
    pub fn has_dirty_log(&self) -> bool {
        self.ops.dirty_log_sync.is_some()
    }

    /// Starts dirty logging (optional callback).
    pub fn dirty_log_start(&self) -> Result<()> {
        if let Some(f) = self.ops.dirty_log_start {
            // SAFETY: registered host callback with its own opaque pointer.
            let r = unsafe { f(self.opaque()) };
            if r < 0 {
                return Err(MigError::from_host(format!("the host failed to start dirty logging ({r})"), r));
            }
        }
        Ok(())
    }

    /// ORs the dirty bits of one block into `bitmap` (one bit per page).
    pub fn dirty_log_sync(&self, idstr: &str, host_ptr: *mut u8, length: u64, bitmap: &mut [u64]) -> Result<()> {
        let Some(f) = self.ops.dirty_log_sync else { return Ok(()) };
        debug_assert!(bitmap.len() as u64 * 64 >= length / crate::params::TARGET_PAGE_SIZE);
        let name = CString::new(idstr).expect("block names are checked for NUL at registration");
        // SAFETY: registered host callback; `name` lives across the call;
        // `bitmap` is a live, writable buffer of one bit per page of the block.
        let r = unsafe { f(self.opaque(), name.as_ptr(), host_ptr.cast(), length, bitmap.as_mut_ptr()) };
        if r < 0 {
            return Err(MigError::from_host(format!("the host failed to sync the dirty log of '{idstr}' ({r})"), r));
        }
        Ok(())
    }

    /// Stops dirty logging (optional callback).
    pub fn dirty_log_stop(&self) {
        if let Some(f) = self.ops.dirty_log_stop {
            // SAFETY: registered host callback with its own opaque pointer.
            unsafe { f(self.opaque()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runstate_names_round_trip() {
        for s in RunState::all() {
            assert_eq!(RunState::from_name(s.name()), Some(s));
        }
        assert_eq!(RunState::Running as u32, 9);
        assert_eq!(RunState::Prelaunch.name(), "prelaunch");
        assert_eq!(RunState::from_name("bogus"), None);
        assert_eq!(RunState::from_u32(9), Some(RunState::Running));
        assert_eq!(RunState::from_u32(16), None);
    }
}
