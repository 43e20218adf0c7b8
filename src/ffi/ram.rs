//! Guest RAM registration and host-side dirty marking.

use std::ffi::{c_char, c_void};

use super::errors::Error;
use super::{cstr, guard_err};

/// Registers a block of guest RAM as `idstr` (the name in the stream, e.g.
/// "ram" or "pc.ram"): `length` bytes at `host`, page aligned. The memory
/// must stay mapped until `livemig_ram_block_remove`, and while a
/// migration runs the mapping must not be replaced by another (discarding
/// pages, e.g. `MADV_DONTNEED` or punching holes in its file, is fine): the
/// source learns at setup which memory backs the block, and sends pages it
/// knows read as zero (untouched anonymous memory, holes of a mapped file)
/// without reading them. Refused while a migration runs, for memory that
/// overlaps a registered block's or would run past the end of the address
/// space, and for memory this process has not mapped readable and
/// writable (checked in /proc/self/maps at the call).
#[no_mangle]
pub extern "C" fn livemig_ram_block_add(idstr: *const c_char, host: *mut c_void, length: u64, errp: *mut *mut Error) -> bool {
    guard_err("livemig_ram_block_add", errp, false, || {
        crate::ram::block_add(cstr(idstr, "idstr")?, host.cast(), length)?;
        Ok(true)
    })
}

/// Unregisters a block (refused while a migration runs).
#[no_mangle]
pub extern "C" fn livemig_ram_block_remove(idstr: *const c_char, errp: *mut *mut Error) -> bool {
    guard_err("livemig_ram_block_remove", errp, false, || {
        crate::ram::block_remove(cstr(idstr, "idstr")?)?;
        Ok(true)
    })
}

/// Marks `[offset, offset + length)` of block `idstr` dirty: writes the
/// dirty log does not see (device DMA, emulated devices). Any thread.
/// Refused (false, with an `Error`, EBUSY) once the switchover's final RAM
/// pass has taken the marks, until the migration ends: the page could no
/// longer be sent, so the migration then fails rather than lose it (a
/// device must quiesce its DMA when the VM stops, before its
/// `save_state`). A migration that fails or is cancelled takes marks
/// again once that is decided, before its handlers' `cancel`, the dirty
/// log's stop and its notifiers run. Once the switchover has committed
/// (the end of the stream is going out; a return-path wait may follow) a
/// mark can no longer fail the migration: it is refused as too late ("the
/// change will not reach the destination") until the migration ends,
/// which may still be FAILED for another reason (the stream, the
/// destination).
#[no_mangle]
pub extern "C" fn livemig_ram_mark_dirty(idstr: *const c_char, offset: u64, length: u64, errp: *mut *mut Error) -> bool {
    guard_err("livemig_ram_mark_dirty", errp, false, || {
        crate::ram::mark_dirty(cstr(idstr, "idstr")?, offset, length)?;
        Ok(true)
    })
}

/// Called when an incoming stream changes the length of a resizable block,
/// with the length as the stream gives it, which need not be whole pages
/// (on the incoming thread, without the host lock).
pub type LivemigRamResized = Option<unsafe extern "C" fn(opaque: *mut c_void, idstr: *const c_char, new_length: u64)>;

/// Resizes block `idstr` to `new_length` bytes (QEMU 7.2's
/// `qemu_ram_resize`): a resizable block takes any non-zero length that,
/// rounded up to 4096, is at most its maximum, and its `resized` callback
/// is called with the length as given whenever that changes; a fixed
/// block only a length that rounds to its own. Refused otherwise, with
/// QEMU's messages ("Size mismatch", "Size too large"), changing nothing.
/// An outgoing migration in progress fails with "RAM block 'IDSTR'
/// resized during precopy." and the VM keeps running (QEMU 7.2 cancels
/// it instead, keeping the reason to its log): the stream has announced
/// the old length. Refused while an incoming migration is in progress.
/// Call it under the host lock, as QEMU calls `qemu_ram_resize` under the
/// BQL.
#[no_mangle]
pub extern "C" fn livemig_ram_block_resize(idstr: *const c_char, new_length: u64, errp: *mut *mut Error) -> bool {
    guard_err("livemig_ram_block_resize", errp, false, || {
        crate::ram::block_resize(cstr(idstr, "idstr")?, new_length)?;
        Ok(true)
    })
}

/// Registers a resizable block (QEMU's resizable RAM, e.g. ACPI tables):
/// `used_length` bytes now, up to `max_length` mapped at `host`. An
/// incoming stream may give it any non-zero length that, rounded up to
/// 4096, is at most the maximum, as QEMU 7.2 takes it: the used length
/// becomes the rounded one, and `resized` (required) is called with the
/// length as given (which need not be whole pages) whenever that changes.
/// Longer lengths are refused with QEMU's "Size too large" message, 0 with
/// "Invalid size". Refused as `livemig_ram_block_add` refuses, over all
/// `max_length` bytes.
#[no_mangle]
pub extern "C" fn livemig_ram_block_add_resizable(
    idstr: *const c_char,
    host: *mut c_void,
    used_length: u64,
    max_length: u64,
    resized: LivemigRamResized,
    opaque: *mut c_void,
    errp: *mut *mut Error,
) -> bool {
    guard_err("livemig_ram_block_add_resizable", errp, false, || {
        let f = resized.ok_or_else(|| crate::error::MigError::new("livemig_ram_block_add_resizable: resized must not be NULL"))?;
        let r = crate::ram::Resized { f, opaque: opaque as usize };
        crate::ram::block_add_resizable(cstr(idstr, "idstr")?, host.cast(), used_length, max_length, Some(r))?;
        Ok(true)
    })
}
