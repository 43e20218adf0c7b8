//! The savevm handler registry and the writing side of the stream framing.
//!
//! Stream layout (QEMU 7.2, see stream-format.md in the project docs):
//!
//! ```text
//! be32 0x5145564D "QEVM", be32 3
//! [u8 0x07, be32 len, machine name]                 configuration
//! u8 0x01 START  be32 id, u8 len, idstr, be32 instance, be32 version, payload, 0x7E be32 id
//! u8 0x02 PART   be32 id, payload, 0x7E be32 id
//! u8 0x03 END    be32 id, payload, 0x7E be32 id
//! u8 0x04 FULL   (as START)
//! u8 0x00 EOF, then u8 0x06, be32 len, JSON vmdesc
//! ```
//!
//! Live handlers get a START in setup, PARTs while iterating and an END at
//! completion; non-live handlers one FULL at completion. Section ids come
//! from one counter and are never 0 for a live handler (a QEMU destination
//! resolves PART/END by id, and 0 is every entry's initial id).

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::json;

use crate::error::{MigError, Result};
use crate::qemu_file::QemuFile;

/// `QEVM`.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564D;
/// The stream version.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// Record types.
pub const QEMU_VM_EOF: u8 = 0x00;
/// Section start (live handlers, setup).
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// Section part (live handlers, iteration).
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Section end (live handlers, completion).
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// Full section (non-live handlers).
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// Subsection (inside payloads only).
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// The trailing JSON device description.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// The configuration record.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// A command record.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// A section footer.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7E;
/// Command: open the return path.
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
/// Return-path message: the destination is done (be32 status, 0 = loaded).
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// Return-path message: reply to a ping (QEMU's enum: INVALID 0, SHUT 1,
/// PONG 2, REQ_PAGES_ID 3, ...).
pub const MIG_RP_MSG_PONG: u16 = 2;

/// Which kind of section a load handler is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// START
    Start,
    /// PART
    Part,
    /// END
    End,
    /// FULL
    Full,
}

/// A savevm handler: a device's (or RAM's) state in the stream.
///
/// Thread and lock: `setup`, `iterate`, `pending` run on the migration
/// thread without the host lock; `complete` and `save_state` run on it
/// with the host lock held (the VM is stopped), `cancel` and `cleanup`
/// with the host lock held too (after a cancel or failure before the
/// switchover, the VM may be running). `load` runs on the
/// incoming thread, with the host lock held unless `load_without_host_lock`.
pub trait SaveVmHandler: Send {
    /// True for a live (iterative) handler.
    fn is_live(&self) -> bool;
    /// False to leave this handler out of a migration (e.g. no RAM).
    fn is_active(&mut self) -> bool {
        true
    }
    /// Writes the START payload.
    fn setup(&mut self, _f: &mut QemuFile) -> Result<()> {
        Ok(())
    }
    /// Writes one PART payload; `Ok(true)` when nothing is left for now.
    fn iterate(&mut self, _f: &mut QemuFile) -> Result<bool> {
        Ok(true)
    }
    /// Bytes still to send (estimate).
    fn pending(&mut self, _max_size: u64) -> u64 {
        0
    }
    /// Writes the END payload (live) — the VM is stopped.
    fn complete(&mut self, _f: &mut QemuFile) -> Result<()> {
        Ok(())
    }
    /// Writes the FULL payload (non-live) — the VM is stopped.
    fn save_state(&mut self, _f: &mut QemuFile) -> Result<()> {
        Ok(())
    }
    /// The migration failed or was cancelled after setup. A panic here is
    /// logged and keeps no other handler from being cancelled.
    fn cancel(&mut self) {}
    /// The migration is over, whatever its outcome (after `cancel`). A
    /// panic here is logged and keeps no other handler from being cleaned
    /// up.
    fn cleanup(&mut self) {}
    /// Reads one section's payload.
    fn load(&mut self, f: &mut QemuFile, version_id: u32, kind: SectionKind) -> Result<()>;
    /// A load is starting (reset per-stream state).
    fn load_begin(&mut self) {}
    /// The load is over, whatever its outcome (release per-stream state):
    /// called for every handler whose `load_begin` returned, also when
    /// another handler's `load_begin` or `load_end` panicked.
    fn load_end(&mut self) {}
    /// True when `load` may run without the host lock (RAM).
    fn load_without_host_lock(&self) -> bool {
        false
    }
    /// Another handler's section was just loaded with the host lock held:
    /// a device's load, which may have written guest RAM, so what this
    /// handler learnt about guest RAM's content during the load may no
    /// longer hold (RAM forgets which pages it knew to read as zero).
    fn guest_ram_may_have_changed(&mut self) {}
}

/// A shared handle to a handler.
pub type HandlerRef = Arc<Mutex<Box<dyn SaveVmHandler>>>;

/// Send order: live and device handlers by registration; `Late` after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// RAM: first.
    Ram = 0,
    /// Host devices.
    Default = 1,
    /// globalstate: after every device, as QEMU 7.2 sends it.
    Late = 2,
}

/// One registered handler.
#[derive(Clone)]
pub struct Entry {
    /// Section name.
    pub idstr: String,
    /// Instance number.
    pub instance_id: u32,
    /// Version written; the highest accepted on load.
    pub version_id: u32,
    /// Section id written.
    pub section_id: u32,
    /// Whether the handler is live (cached from the handler).
    pub live: bool,
    /// Send order.
    pub priority: Priority,
    /// Who registered it (the host's opaque pointer), for unregistering.
    pub owner: usize,
    /// The handler.
    pub handler: HandlerRef,
}

struct Registry {
    entries: Vec<Entry>,
    next_section_id: u32,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { entries: Vec::new(), next_section_id: 0 });
static MACHINE_NAME: Mutex<Option<String>> = Mutex::new(None);

/// Registers a handler. `instance_id` -1 picks the next free instance of
/// `idstr` (other negative values are refused). Returns the section id
/// assigned.
pub fn register(
    idstr: &str,
    instance_id: i64,
    version_id: u32,
    handler: Box<dyn SaveVmHandler>,
    owner: usize,
    priority: Priority,
) -> Result<u32> {
    if idstr.is_empty() || idstr.len() > 255 || idstr.contains('\0') {
        return Err(MigError::new(format!("savevm: section name '{idstr}' must be 1 to 255 bytes without NUL")));
    }
    if instance_id > u32::MAX as i64 || instance_id < -1 {
        return Err(MigError::new(format!("savevm: instance id {instance_id} of '{idstr}' is out of range")));
    }
    if BUILTIN_SECTIONS.contains(&idstr) && owner != builtin_owner() {
        return Err(MigError::new(format!("savevm: '{idstr}' is livemig's own section; a host cannot register it")));
    }
    let mut r = REGISTRY.lock();
    // Checked under the lock: a migration takes its copy of the entries
    // after its state left idle, so a registration either lands before
    // that or is refused (a device added later would silently not be
    // migrated, or its section not be found by the load). livemig's own
    // sections register at a migration's first use.
    if owner != builtin_owner() && (crate::state::OUTGOING.status().is_active() || crate::state::INCOMING.status().is_active()) {
        return Err(MigError::with_errno(format!("savevm: '{idstr}' cannot be registered while a migration is in progress"), libc::EBUSY));
    }
    let instance_id = if instance_id < 0 {
        r.entries.iter().filter(|e| e.idstr == idstr).map(|e| e.instance_id + 1).max().unwrap_or(0)
    } else {
        instance_id as u32
    };
    if r.entries.iter().any(|e| e.idstr == idstr && e.instance_id == instance_id) {
        return Err(MigError::new(format!("savevm: '{idstr}' instance {instance_id} is already registered")));
    }
    let live = handler.is_live();
    let mut section_id = r.next_section_id;
    if live && section_id == 0 {
        section_id = 1;
    }
    r.next_section_id = section_id + 1;
    r.entries.push(Entry {
        idstr: idstr.to_string(),
        instance_id,
        version_id,
        section_id,
        live,
        priority,
        owner,
        handler: Arc::new(Mutex::new(handler)),
    });
    log::debug!(
        "savevm: registered '{idstr}' instance {instance_id} v{version_id} as section {section_id}{}",
        if live { " (live)" } else { "" }
    );
    Ok(section_id)
}

/// The names of livemig's own sections, which only livemig registers
/// (some of them at a migration's first use).
const BUILTIN_SECTIONS: [&str; 2] = ["ram", "globalstate"];

/// The owner of livemig's own sections ("ram", "globalstate"): the address
/// of a private static, which no host's opaque pointer can equal, so that
/// `unregister_savevm(NULL, "ram", NULL)` cannot remove them.
pub(crate) fn builtin_owner() -> usize {
    static BUILTIN: u8 = 0;
    &BUILTIN as *const u8 as usize
}

/// Removes the handlers registered as `idstr` by `owner`; returns how many.
pub fn unregister(idstr: &str, owner: usize) -> usize {
    REGISTRY.lock().remove(idstr, owner)
}

/// [`unregister`], refused (EBUSY) while a migration is in progress: it
/// calls the handlers from its own copy of the entries until it ends, so
/// a host that freed what they use would have them called on freed
/// memory (QEMU 7.2 refuses `device_del` while migrating, for the same
/// reason). Checked under the registry's lock, as `register` checks.
/// Refused too (ENOENT) when nothing is registered as `idstr` with `owner`.
pub fn unregister_checked(idstr: &str, owner: usize) -> Result<()> {
    let mut r = REGISTRY.lock();
    if crate::state::OUTGOING.status().is_active() || crate::state::INCOMING.status().is_active() {
        return Err(MigError::with_errno(
            format!("savevm: '{idstr}' cannot be unregistered while a migration is in progress: the migration still calls its handlers"),
            libc::EBUSY,
        ));
    }
    match r.remove(idstr, owner) {
        0 => Err(MigError::with_errno(format!("savevm: '{idstr}' is not registered with this opaque pointer"), libc::ENOENT)),
        _ => Ok(()),
    }
}

impl Registry {
    /// Removes the entries registered as `idstr` by `owner`; how many.
    fn remove(&mut self, idstr: &str, owner: usize) -> usize {
        let r = self;
        let before = r.entries.len();
        r.entries.retain(|e| !(e.idstr == idstr && e.owner == owner));
        before - r.entries.len()
    }
}

/// The registered entries in send order (a snapshot for one migration).
pub fn entries() -> Vec<Entry> {
    crate::globalstate::register();
    crate::ram::register();
    let mut v = REGISTRY.lock().entries.clone();
    v.sort_by_key(|e| e.priority);
    v
}

/// Sets (or clears) the machine name sent and checked in the configuration
/// record. With no name, no configuration is sent and none is expected.
pub fn set_machine_name(name: Option<&str>) -> Result<()> {
    if let Some(n) = name {
        if n.len() > 255 || n.contains('\0') {
            return Err(MigError::new("machine name must be at most 255 bytes without NUL"));
        }
    }
    *MACHINE_NAME.lock() = name.map(str::to_string);
    Ok(())
}

/// The machine name, if the host set one.
pub fn machine_name() -> Option<String> {
    MACHINE_NAME.lock().clone()
}

fn section_header(f: &mut QemuFile, kind: u8, e: &Entry) {
    f.put_u8(kind);
    f.put_be32(e.section_id);
    if kind == QEMU_VM_SECTION_START || kind == QEMU_VM_SECTION_FULL {
        f.put_counted_str(&e.idstr);
        f.put_be32(e.instance_id);
        f.put_be32(e.version_id);
    }
}

fn section_footer(f: &mut QemuFile, e: &Entry) {
    f.put_u8(QEMU_VM_SECTION_FOOTER);
    f.put_be32(e.section_id);
}

fn handler_error(e: &Entry, what: &str, err: MigError) -> MigError {
    err.context(format!("savevm: {what} of '{}' instance {}", e.idstr, e.instance_id))
}

/// The outgoing side of one migration: the entries taking part and what
/// the vmdesc will say.
pub struct SaveState {
    entries: Vec<Entry>,
    vmdesc: Vec<serde_json::Value>,
    /// The handlers' cleanup ran (it runs once).
    cleaned_up: bool,
}

impl SaveState {
    /// The handlers of a migration: every registered one, live ones only
    /// when active.
    pub fn registered() -> SaveState {
        let mut entries = entries();
        entries.retain(|e| !e.live || e.handler.lock().is_active());
        SaveState { entries, vmdesc: Vec::new(), cleaned_up: false }
    }

    /// Writes the header, the configuration, the return-path command when
    /// that capability is on, and every live START section. On error,
    /// [`cancel`](Self::cancel) and [`cleanup`](Self::cleanup) reach every
    /// handler, set up or not (as in QEMU).
    pub fn begin(&mut self, f: &mut QemuFile) -> Result<()> {
        let return_path = crate::params::get().cap(crate::params::MigrationCapability::ReturnPath);
        if return_path && !f.bidirectional() {
            return Err(MigError::new(format!(
                "capability 'return-path' needs a socket (tcp:, unix: or a socket fd), not {}",
                f.describe()
            )));
        }
        f.put_be32(QEMU_VM_FILE_MAGIC);
        f.put_be32(QEMU_VM_FILE_VERSION);
        if let Some(name) = machine_name() {
            f.put_u8(QEMU_VM_CONFIGURATION);
            f.put_be32(name.len() as u32);
            f.put_buffer(name.as_bytes());
        }
        if return_path {
            f.put_u8(QEMU_VM_COMMAND);
            f.put_be16(MIG_CMD_OPEN_RETURN_PATH);
            f.put_be16(0);
            f.return_path = true;
        }
        for e in self.entries.iter().filter(|e| e.live) {
            section_header(f, QEMU_VM_SECTION_START, e);
            e.handler.lock().setup(f).map_err(|err| handler_error(e, "setup", err))?;
            section_footer(f, e);
            f.check()?;
        }
        Ok(())
    }

    /// One iteration: a PART per live handler until the rate limit is hit.
    /// `Ok(true)` when every live handler has nothing left for now.
    pub fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        for e in self.entries.iter().filter(|e| e.live) {
            if f.rate_limit_exceeded() {
                return f.check().map(|_| false);
            }
            section_header(f, QEMU_VM_SECTION_PART, e);
            let done = e.handler.lock().iterate(f).map_err(|err| handler_error(e, "iterate", err))?;
            section_footer(f, e);
            f.check()?;
            if !done {
                // Don't move to the next handler before this one is done.
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Bytes the live handlers still have to send.
    pub fn pending(&mut self, max_size: u64) -> u64 {
        // Saturating: a handler may answer any u64, and a sum that wrapped
        // around would look small enough to switch over on.
        self.entries.iter().filter(|e| e.live).fold(0u64, |sum, e| sum.saturating_add(e.handler.lock().pending(max_size)))
    }

    /// Completion (VM stopped, host lock held): END for live handlers,
    /// FULL for the others; [`end`](Self::end) follows.
    pub fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        for e in self.entries.iter().filter(|e| e.live) {
            section_header(f, QEMU_VM_SECTION_END, e);
            e.handler.lock().complete(f).map_err(|err| handler_error(e, "complete", err))?;
            section_footer(f, e);
            f.check()?;
        }
        for e in self.entries.iter().filter(|e| !e.live) {
            section_header(f, QEMU_VM_SECTION_FULL, e);
            let start = f.tell();
            e.handler.lock().save_state(f).map_err(|err| handler_error(e, "save", err))?;
            let size = f.tell() - start;
            section_footer(f, e);
            f.check()?;
            self.vmdesc.push(json!({
                "name": e.idstr,
                "instance_id": e.instance_id,
                "vmsd_name": e.idstr,
                "version": e.version_id,
                "size": size,
                "fields": [{"name": "data", "type": "buffer", "size": size}],
            }));
        }
        Ok(())
    }

    /// Ends the stream after [`complete`](Self::complete): EOF, then the
    /// vmdesc. Buffered, for the caller to flush.
    pub fn end(&mut self, f: &mut QemuFile) {
        f.put_u8(QEMU_VM_EOF);
        let desc = vmdesc_json(std::mem::take(&mut self.vmdesc));
        f.put_u8(QEMU_VM_VMDESCRIPTION);
        f.put_be32(desc.len() as u32);
        f.put_buffer(desc.as_bytes());
    }

    /// With a return path: waits for the destination to confirm it loaded
    /// the whole stream, for the io timeout in all (no wait goes past
    /// it: neither messages that keep arriving nor the bytes of one
    /// message arriving slowly extend it). Messages are checked as QEMU
    /// 7.2's source checks them, on their header, before the body is read:
    /// a known type with its length; only PONG and SHUT are expected in
    /// pre-copy.
    pub fn await_destination(&mut self, f: &mut QemuFile) -> Result<()> {
        if !f.return_path {
            return Ok(());
        }
        let limit = crate::transport::stall_timeout();
        let deadline = std::time::Instant::now() + limit;
        let late =
            || MigError::with_errno(format!("the destination did not confirm the load within {} ms", limit.as_millis()), libc::ETIMEDOUT);
        loop {
            if std::time::Instant::now() >= deadline {
                return Err(late());
            }
            let (t, d) = f
                .rp_recv(deadline, late, |t, n| match (t, n) {
                    (MIG_RP_MSG_SHUT | MIG_RP_MSG_PONG, 4) => Ok(()),
                    (MIG_RP_MSG_SHUT | MIG_RP_MSG_PONG, n) => {
                        Err(MigError::new(format!("RP: Received message 0x{t:04x} with incorrect length {n} expecting 4")))
                    }
                    _ => Err(MigError::new(format!("RP: Received invalid message 0x{t:04x} length 0x{n:04x}"))),
                })?
                .ok_or_else(|| MigError::with_errno("the destination closed the return path without confirming the load", libc::EPIPE))?;
            let value = u32::from_be_bytes(d[..4].try_into().expect("the header check admits 4 bytes only"));
            if t == MIG_RP_MSG_SHUT {
                if value != 0 {
                    return Err(MigError::new(format!("the destination failed to load the stream (return path status {value})")));
                }
                log::info!("the destination confirmed the load");
                return Ok(());
            }
            log::debug!("return path: PONG {value}");
        }
    }

    /// The migration failed or was cancelled: tell every handler (one
    /// that panics does not keep the others from being told).
    pub fn cancel(&mut self) {
        for e in &self.entries {
            contained(e, "cancel", |h| h.cancel());
        }
    }

    /// The migration is over: tell every handler, once (a second call
    /// does nothing, so that it cannot reach a later migration's state).
    /// A handler that panics is logged; the others are still cleaned up
    /// (the "ram" handler stops the dirty log and frees its bitmaps and
    /// XBZRLE cache here).
    pub fn cleanup(&mut self) {
        if std::mem::replace(&mut self.cleaned_up, true) {
            return;
        }
        for e in &self.entries {
            contained(e, "cleanup", |h| h.cleanup());
        }
    }
}

/// Runs `f` on the handler of `e`, containing a panic (logged as an error
/// naming the handler): what every handler must be told, each is told.
fn contained(e: &Entry, what: &str, f: impl FnOnce(&mut dyn SaveVmHandler)) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut **e.handler.lock())));
    if let Err(p) = r {
        log::error!("savevm: {what} of '{}' instance {} panicked: {}", e.idstr, e.instance_id, crate::panic_message(p.as_ref()));
    }
}

/// The vmdesc document, formatted as QEMU writes it (`", "` and `": "`).
fn vmdesc_json(devices: Vec<serde_json::Value>) -> String {
    let doc = json!({"page_size": crate::params::TARGET_PAGE_SIZE, "devices": devices});
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuJsonFormatter);
    serde::Serialize::serialize(&doc, &mut ser).expect("serialising a json::Value into memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// serde_json formatter with QEMU's separators.
struct QemuJsonFormatter;

impl serde_json::ser::Formatter for QemuJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn vmdesc_uses_qemu_separators_and_key_order() {
        let s = vmdesc_json(vec![json!({"name": "timer", "instance_id": 0})]);
        assert_eq!(s, r#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}"#);
        assert_eq!(vmdesc_json(vec![]), r#"{"page_size": 4096, "devices": []}"#);
    }
}
