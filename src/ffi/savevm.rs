//! Savevm handler registration for C devices: `register_savevm_live`,
//! `register_savevm`, `unregister_savevm`, and the adapter that lets the
//! core call a C handler table.

use std::ffi::{c_char, c_int, c_void};

use super::errors::Error;
use super::types::{DeviceState, LoadStateHandler, SaveStateHandler, SaveVMHandlers};
use super::{cstr, guard_err};
use crate::error::{MigError, Result};
use crate::qemu_file::QemuFile;
use crate::savevm::{self, Priority, SaveVmHandler, SectionKind};

/// A C handler: a live table, or a save/load pair.
struct CHandler {
    idstr: String,
    live: Option<SaveVMHandlers>,
    save_state: SaveStateHandler,
    load_state: LoadStateHandler,
    opaque: usize,
    /// `save_live_complete` succeeded in the migration under way: the host
    /// has released what the migration held (as the docs tell it to), so
    /// a failure after it does not call `cancel` for it again. Reset by
    /// `cleanup`, which ends every migration.
    completed: bool,
}

// SAFETY: the host registers handlers for use from livemig's threads (the
// threading contract in the header); the table holds function pointers and
// the host's opaque pointer only.
unsafe impl Send for CHandler {}

impl CHandler {
    fn opaque(&self) -> *mut c_void {
        self.opaque as *mut c_void
    }

    fn check(&self, what: &str, ret: c_int, f: &QemuFile) -> Result<()> {
        if let Some(e) = f.error() {
            return Err(e.clone());
        }
        if ret < 0 {
            return Err(MigError::from_host(format!("'{}' {what} handler failed ({ret})", self.idstr), ret));
        }
        Ok(())
    }
}

impl SaveVmHandler for CHandler {
    fn is_live(&self) -> bool {
        self.live.is_some()
    }

    fn is_active(&mut self) -> bool {
        match self.live.and_then(|t| t.is_active) {
            // SAFETY: host callback registered with this opaque pointer.
            Some(f) => unsafe { f(self.opaque()) },
            None => true,
        }
    }

    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        let cb = self.live.and_then(|t| t.save_live_setup).expect("checked at registration");
        // SAFETY: host callback; `f` is valid and exclusively the handler's
        // for the call.
        let r = unsafe { cb(f, self.opaque()) };
        self.check("setup", r, f)
    }

    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        let cb = self.live.and_then(|t| t.save_live_iterate).expect("checked at registration");
        // SAFETY: as in setup.
        let r = unsafe { cb(f, self.opaque()) };
        self.check("iterate", r, f)?;
        Ok(r > 0)
    }

    fn pending(&mut self, max_size: u64) -> u64 {
        let cb = self.live.and_then(|t| t.save_live_pending).expect("checked at registration");
        // SAFETY: host callback; the file argument is unused by contract
        // (QEMU passes it but pending must not write), so NULL is passed.
        unsafe { cb(std::ptr::null_mut(), self.opaque(), max_size) }
    }

    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        let cb = self.live.and_then(|t| t.save_live_complete).expect("checked at registration");
        // SAFETY: as in setup.
        let r = unsafe { cb(f, self.opaque()) };
        self.completed = r >= 0;
        self.check("complete", r, f)
    }

    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        if let Some(cb) = self.save_state {
            // SAFETY: as in setup.
            unsafe { cb(f, self.opaque()) };
        }
        self.check("save", 0, f)
    }

    fn cancel(&mut self) {
        if self.completed {
            // Its complete ran: the migration ended for this handler there.
            return;
        }
        if let Some(cb) = self.live.and_then(|t| t.cancel) {
            // SAFETY: host callback registered with this opaque pointer.
            unsafe { cb(self.opaque()) }
        }
    }

    fn cleanup(&mut self) {
        self.completed = false;
    }

    fn load(&mut self, f: &mut QemuFile, version_id: u32, _kind: SectionKind) -> Result<()> {
        let cb = self.load_state.expect("checked at registration");
        // SAFETY: as in setup.
        let r = unsafe { cb(f, self.opaque(), version_id as c_int) };
        self.check("load", r, f)
    }
}

fn register(idstr: *const c_char, instance_id: c_int, version_id: c_int, h: impl FnOnce(String) -> Result<CHandler>) -> Result<u32> {
    let idstr = cstr(idstr, "idstr")?;
    if version_id < 0 {
        return Err(MigError::new(format!("savevm: version {version_id} of '{idstr}' must not be negative")));
    }
    let handler = h(idstr.to_string())?;
    let owner = handler.opaque;
    savevm::register(idstr, instance_id as i64, version_id as u32, Box::new(handler), owner, Priority::Default)
}

/// A registration's result for C: the section id, or the negative errno
/// of the error (which is set in `errp`): -EBUSY while a migration is in
/// progress, -EINVAL for a bad argument.
fn id_or_errno(r: Result<u32>, errp: *mut *mut Error) -> Result<c_int> {
    match r {
        Ok(id) => Ok(id as c_int),
        Err(e) => {
            super::errors::set(errp, &e);
            Ok(-e.errno())
        }
    }
}

/// Registers a live device with a handler table (copied). Returns the
/// section id (≥ 0) or a negative errno; `livemig_register_savevm_live`
/// reports why. `instance_id` -1 picks the next free instance (other
/// negative values are refused). Refused (-EBUSY) while a migration of
/// either direction is in progress (an incoming one from
/// `qemu_start_incoming_migration` on, though it takes its list of
/// devices only when the source connects): register every device first.
#[no_mangle]
pub extern "C" fn register_savevm_live(
    dev: *mut DeviceState,
    idstr: *const c_char,
    instance_id: c_int,
    version_id: c_int,
    ops: *const SaveVMHandlers,
    opaque: *mut c_void,
) -> c_int {
    let mut err: *mut Error = std::ptr::null_mut();
    let r = livemig_register_savevm_live(dev, idstr, instance_id, version_id, ops, opaque, &mut err);
    super::errors::log_and_free(err, "register_savevm_live");
    r
}

/// `register_savevm_live` with an error saying why a registration was
/// refused (e.g. which required callback is NULL).
#[no_mangle]
pub extern "C" fn livemig_register_savevm_live(
    dev: *mut DeviceState,
    idstr: *const c_char,
    instance_id: c_int,
    version_id: c_int,
    ops: *const SaveVMHandlers,
    opaque: *mut c_void,
    errp: *mut *mut Error,
) -> c_int {
    let _ = dev;
    guard_err("register_savevm_live", errp, -libc::EINVAL, || {
        // SAFETY: a non-NULL table is a live SaveVMHandlers; it is copied.
        let ops = unsafe { ops.as_ref() }.copied().ok_or_else(|| MigError::new("register_savevm_live: ops must not be NULL"))?;
        let id = register(idstr, instance_id, version_id, |idstr| {
            let required = [
                ("save_live_setup", ops.save_live_setup.is_some()),
                ("save_live_iterate", ops.save_live_iterate.is_some()),
                ("save_live_complete", ops.save_live_complete.is_some()),
                ("save_live_pending", ops.save_live_pending.is_some()),
                ("load_state", ops.load_state.is_some()),
            ];
            if let Some((name, _)) = required.iter().find(|(_, p)| !p) {
                return Err(MigError::new(format!("register_savevm_live('{idstr}'): required callback '{name}' is NULL")));
            }
            Ok(CHandler { idstr, live: Some(ops), save_state: None, load_state: ops.load_state, opaque: opaque as usize, completed: false })
        });
        id_or_errno(id, errp)
    })
}

/// Registers a non-live device: `save_state` writes its FULL section at the
/// switchover (VM stopped, host lock held), `load_state` reads it on the
/// destination (host lock held, released while a read waits for the
/// source; see `LivemigHostOps`). Both required. Returns the section id or a
/// negative errno (-EBUSY while a migration is in progress, as for
/// `register_savevm_live`).
#[no_mangle]
pub extern "C" fn register_savevm(
    dev: *mut DeviceState,
    idstr: *const c_char,
    instance_id: c_int,
    version_id: c_int,
    save_state: SaveStateHandler,
    load_state: LoadStateHandler,
    opaque: *mut c_void,
) -> c_int {
    let _ = dev;
    let mut err: *mut Error = std::ptr::null_mut();
    let errp: *mut *mut Error = &mut err;
    let r = guard_err("register_savevm", errp, -libc::EINVAL, || {
        let id = register(idstr, instance_id, version_id, |idstr| {
            if save_state.is_none() || load_state.is_none() {
                let which = if save_state.is_none() { "save_state" } else { "load_state" };
                return Err(MigError::new(format!("register_savevm('{idstr}'): required callback '{which}' is NULL")));
            }
            Ok(CHandler { idstr, live: None, save_state, load_state, opaque: opaque as usize, completed: false })
        });
        id_or_errno(id, errp)
    });
    super::errors::log_and_free(err, "register_savevm");
    r
}

/// Removes the handlers registered as `idstr` with `opaque`. A migration
/// in progress calls them from its own copy of the list until it ends, so
/// what they use must stay valid until then: a host that frees it at once
/// (a device unplugged) calls `livemig_unregister_savevm`, which refuses
/// while a migration is in progress, as QEMU 7.2 refuses `device_del`.
#[no_mangle]
pub extern "C" fn unregister_savevm(dev: *mut DeviceState, idstr: *const c_char, opaque: *mut c_void) {
    let _ = dev;
    let mut err: *mut Error = std::ptr::null_mut();
    guard_err("unregister_savevm", &mut err, (), || {
        let idstr = cstr(idstr, "idstr")?;
        if savevm::unregister(idstr, opaque as usize) == 0 {
            log::warn!("unregister_savevm: '{idstr}' was not registered with this opaque pointer");
        }
        Ok(())
    });
    super::errors::log_and_free(err, "unregister_savevm");
}

/// Removes the handlers registered as `idstr` with `opaque`, or refuses:
/// -EBUSY while a migration (outgoing or incoming) is in progress, since it
/// still calls them; -ENOENT when nothing is registered so; -EINVAL for a
/// NULL `idstr`. Returns 0 on success; `errp` is set on failure. After a
/// success no migration calls the handlers, and the host may free what
/// they use.
#[no_mangle]
pub extern "C" fn livemig_unregister_savevm(idstr: *const c_char, opaque: *mut c_void, errp: *mut *mut Error) -> c_int {
    guard_err("livemig_unregister_savevm", errp, -libc::EINVAL, || {
        let r = cstr(idstr, "idstr")
            .map_err(|e| MigError::with_errno(e.to_string(), libc::EINVAL))
            .and_then(|idstr| savevm::unregister_checked(idstr, opaque as usize));
        id_or_errno(r.map(|()| 0), errp)
    })
}
