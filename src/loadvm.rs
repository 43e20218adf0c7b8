//! The reading side of the stream framing: QEMU 7.2's `qemu_loadvm_state`,
//! with its checks and (where a 7.2 destination has one) its messages.
//!
//! Sections are dispatched to the registered handlers: START and FULL by
//! (idstr, instance), PART and END by the section id the START carried.
//! Device handlers run with the host lock held; RAM runs without it.
//! Nothing here exits or aborts: every problem is an `Err`.

use crate::error::{MigError, Result};
use crate::host::Host;
use crate::params::MigrationCapability;
use crate::qemu_file::QemuFile;
use crate::savevm::*;

/// Largest configuration machine name accepted (QEMU names are short).
const MAX_MACHINE_NAME: u32 = 256;

struct Loaded {
    entry: Entry,
    load_section_id: Option<u32>,
    /// The version the stream's START (or FULL) gave: PART and END sections
    /// are loaded as that version, as in QEMU.
    load_version_id: u32,
}

/// Reads a whole stream into the registered handlers.
pub fn load_stream(f: &mut QemuFile, host: Option<&Host>) -> Result<()> {
    let magic = f.get_be32();
    f.check()?;
    if magic != QEMU_VM_FILE_MAGIC {
        return Err(MigError::new(format!("Not a migration stream (magic 0x{magic:08x})")));
    }
    let version = f.get_be32();
    f.check()?;
    if version == 2 {
        return Err(MigError::with_errno("SaveVM v2 format is obsolete and don't work anymore", libc::ENOTSUP));
    }
    if version != QEMU_VM_FILE_VERSION {
        return Err(MigError::with_errno(format!("Unsupported migration stream version {version}"), libc::ENOTSUP));
    }
    if let Some(local) = machine_name() {
        if f.peek_u8() != Some(QEMU_VM_CONFIGURATION) {
            f.check()?;
            return Err(MigError::new("Configuration section missing"));
        }
        f.get_u8();
        load_configuration(f, &local)?;
    }

    let mut loaded: Vec<Loaded> = entries().into_iter().map(|entry| Loaded { entry, load_section_id: None, load_version_id: 0 }).collect();
    // Every handler whose load began ends it, even when a handler (or
    // livemig) panics in the middle, in a `load_begin` or in another
    // handler's `load_end`: each panic is caught here, so that every
    // `load_end` runs outside the unwinding, and the first is then
    // carried on to the thread's guard.
    let mut begun = 0;
    let mut r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for l in &loaded {
            l.entry.handler.lock().load_begin();
            begun += 1;
        }
        load_sections(f, host, &mut loaded)
    }));
    for l in &loaded[..begun] {
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.entry.handler.lock().load_end()));
        if let Err(p) = ended {
            log::error!("load_end of '{}' instance {} panicked: {}", l.entry.idstr, l.entry.instance_id, crate::panic_message(p.as_ref()));
            if r.is_ok() {
                r = Err(p);
            }
        }
    }
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The sections up to EOF, and the vmdesc after it.
fn load_sections(f: &mut QemuFile, host: Option<&Host>, loaded: &mut [Loaded]) -> Result<()> {
    // A POSTCOPY_ADVISE was seen (7.2's incoming postcopy state left NONE).
    let mut advised = false;
    loop {
        let kind = f.get_u8();
        f.check()?;
        match kind {
            QEMU_VM_EOF => break,
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                let section_id = f.get_be32();
                let idstr = f.get_counted_bytes();
                f.check()?;
                if idstr.is_empty() {
                    return Err(MigError::new(format!("Unable to read ID string for section {section_id}")));
                }
                let instance_id = f.get_be32();
                let version_id = f.get_be32();
                f.check()?;
                // Looked up (and shown) as the C string 7.2 reads it into.
                let idstr = String::from_utf8_lossy(c_str(&idstr)).into_owned();
                let i = loaded.iter().position(|l| l.entry.idstr == idstr && l.entry.instance_id == instance_id).ok_or_else(|| {
                    MigError::new(format!(
                        "Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices"
                    ))
                })?;
                let l = &mut loaded[i];
                if kind == QEMU_VM_SECTION_START && section_id == 0 {
                    // PART/END are found by id and every entry of a 7.2
                    // destination starts at id 0: such a stream is ambiguous
                    // (7.2 hands its parts to another device).
                    return Err(MigError::new(format!("section id 0 is not valid for the iterative section '{idstr}'")));
                }
                if version_id > l.entry.version_id {
                    return Err(MigError::new(format!("savevm: unsupported version {version_id} for '{idstr}' v{}", l.entry.version_id)));
                }
                l.load_section_id = Some(section_id);
                l.load_version_id = version_id;
                let sk = if kind == QEMU_VM_SECTION_START { SectionKind::Start } else { SectionKind::Full };
                let device = load_section(f, host, &l.entry, version_id, sk)
                    .map_err(|e| e.context(format!("error while loading state for instance 0x{instance_id:x} of device '{idstr}'")))?;
                check_footer(f, section_id, &idstr)?;
                if device {
                    device_section_loaded(loaded, i);
                }
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                let section_id = f.get_be32();
                f.check()?;
                let i = loaded
                    .iter()
                    .position(|l| l.load_section_id == Some(section_id))
                    .ok_or_else(|| MigError::new(format!("Unknown savevm section {section_id}")))?;
                let l = &loaded[i];
                let sk = if kind == QEMU_VM_SECTION_PART { SectionKind::Part } else { SectionKind::End };
                let device = load_section(f, host, &l.entry, l.load_version_id, sk)
                    .map_err(|e| e.context(format!("error while loading state section id {section_id}({})", l.entry.idstr)))?;
                check_footer(f, section_id, &l.entry.idstr.clone())?;
                if device {
                    device_section_loaded(loaded, i);
                }
            }
            QEMU_VM_COMMAND => {
                if load_command(f, &mut advised)? {
                    f.return_path = true;
                }
            }
            other => return Err(MigError::new(format!("Unknown savevm section type {other}"))),
        }
    }
    // The vmdesc is optional: read and discard it when present.
    match f.peek_u8() {
        Some(QEMU_VM_VMDESCRIPTION) => {
            f.get_u8();
            let len = f.get_be32() as usize;
            if !f.skip(len) {
                log::warn!("truncated vmdesc after EOF ignored");
            }
        }
        Some(b) => log::warn!("Expected vmdescription section, but got {b}"),
        None => log::debug!("no vmdesc after EOF"),
    }
    Ok(())
}

/// Loads one section's payload into its handler; `Ok(true)` when it was a
/// device's (loaded with the host lock held).
fn load_section(f: &mut QemuFile, host: Option<&Host>, e: &Entry, version_id: u32, kind: SectionKind) -> Result<bool> {
    let mut h = e.handler.lock();
    let device = !h.load_without_host_lock();
    let r = if !device {
        h.load(f, version_id, kind)
    } else {
        // Released while the section waits for the source (as QEMU's
        // destination yields its lock), taken again before it goes on.
        let _guard = host.map(|h| h.lock_for_load());
        h.load(f, version_id, kind)
    };
    r?;
    f.check()?;
    Ok(device)
}

/// The section of `loaded[i]`, a device's, was loaded: its load may have
/// written guest RAM (as a QEMU device's may), so every other handler
/// forgets what it knew of guest RAM's content. A zero page sent later is
/// then checked against the page, as QEMU 7.2 checks it, and clears what
/// the device wrote.
fn device_section_loaded(loaded: &[Loaded], i: usize) {
    for (j, l) in loaded.iter().enumerate() {
        if j != i {
            l.entry.handler.lock().guest_ram_may_have_changed();
        }
    }
}

fn check_footer(f: &mut QemuFile, section_id: u32, idstr: &str) -> Result<()> {
    let b = f.get_u8();
    f.check()?;
    if b != QEMU_VM_SECTION_FOOTER {
        return Err(MigError::new(format!("Missing section footer for {idstr}")));
    }
    let id = f.get_be32();
    f.check()?;
    if id != section_id {
        return Err(MigError::new(format!("Mismatched section id in footer for {idstr} - read 0x{id:x} expected 0x{section_id:x}")));
    }
    Ok(())
}

/// The bytes of `b` up to its first NUL: what 7.2 compares of a name it
/// read into a C string (section idstrs, RAM block names, the
/// configuration's names).
pub(crate) fn c_str(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// The configuration record, read as 7.2's vmstate reads its
/// "configuration" description: the name, then the subsections (their
/// versions kept in a `uint8_t`, their names compared as C strings), and
/// only then (its `post_load`) the checks of the machine name, the target
/// page bits and the validated capabilities, in that order.
fn load_configuration(f: &mut QemuFile, local: &str) -> Result<()> {
    let len = f.get_be32();
    f.check()?;
    if len > MAX_MACHINE_NAME {
        return Err(MigError::new(format!("configuration: machine name of {len} bytes is too long")));
    }
    let mut name = vec![0u8; len as usize];
    f.get_buffer(&mut name);
    f.check()?;
    // Without the subsection, the source has the minimum (12 on x86).
    let mut target_page_bits = 12;
    let mut ignore_shared = false;
    // Subsections: consumed only while the name has the parent's prefix.
    const PREFIX: &[u8] = b"configuration";
    while let Some(head) = f.peek(2) {
        if head[0] != QEMU_VM_SUBSECTION {
            break;
        }
        let nlen = head[1] as usize;
        let Some(hdr) = f.peek(2 + nlen) else { break };
        let sub = hdr[2..].to_vec();
        if nlen < PREFIX.len() + 1 || !sub.starts_with(PREFIX) {
            break;
        }
        let sub = String::from_utf8_lossy(c_str(&sub)).into_owned();
        if !["configuration/target-page-bits", "configuration/capabilities", "configuration/uuid"].contains(&sub.as_str()) {
            // Left unread, as 7.2 leaves it (its only message is ENOENT's).
            return Err(MigError::with_errno(format!("configuration: unknown subsection '{sub}'"), libc::ENOENT));
        }
        f.skip(2 + nlen);
        // Read as a be32 into 7.2's `uint8_t version_id`.
        let version = f.get_be32() as u8;
        f.check()?;
        if version > 1 {
            return Err(MigError::new(format!("{sub}: incoming version_id {version} is too new for local version_id 1")));
        }
        if version < 1 {
            return Err(MigError::new(format!("{sub}: incoming version_id {version} is too old for local minimum version_id  1")));
        }
        match sub.as_str() {
            "configuration/target-page-bits" => {
                target_page_bits = f.get_be32();
                f.check()?;
            }
            "configuration/capabilities" => {
                // As 7.2: every entry is read, a name that is no capability
                // of 7.2 refused as it is read; the list (the last one
                // sent) is validated after the subsections. Any other
                // capability named is accepted.
                let count = f.get_be32();
                f.check()?;
                ignore_shared = false;
                for _ in 0..count {
                    let cap = f.get_counted_bytes();
                    f.check()?;
                    // Compared as the C string it is read into.
                    let cap = c_str(&cap);
                    match MigrationCapability::all().into_iter().find(|c| c.name().as_bytes() == cap) {
                        Some(MigrationCapability::XIgnoreShared) => ignore_shared = true,
                        Some(_) => {}
                        None => return Err(MigError::new(format!("Received unknown capability {}", String::from_utf8_lossy(cap)))),
                    }
                }
            }
            _ => {
                f.skip(16);
                f.check()?;
                log::warn!("configuration: the source sent a UUID; this side has none to compare");
            }
        }
    }
    f.check()?;
    // 7.2 compares only the received length, with strncmp: a prefix
    // passes, and the name ends at a NUL (then the local one must too).
    let rx = c_str(&name);
    let local_c = [local.as_bytes(), &[0]].concat();
    if !local_c.starts_with(rx) || (rx.len() < name.len() && local.len() != rx.len()) {
        let rx = String::from_utf8_lossy(rx);
        return Err(MigError::new(format!("Machine type received is '{rx}' and local is '{local}'")));
    }
    if target_page_bits != 12 {
        return Err(MigError::new(format!("Received TARGET_PAGE_BITS is {target_page_bits} but local is 12")));
    }
    if ignore_shared {
        // The only capability 7.2 validates; livemig does not implement it.
        let cap = MigrationCapability::XIgnoreShared.name();
        return Err(MigError::new(format!("Capability {cap} is off, but received capability is on")));
    }
    Ok(())
}

/// Reads a command; `Ok(true)` when it opens the return path.
/// QEMU 7.2's commands, indexed by their number in `enum qemu_vm_cmd`,
/// with the fixed payload length `mig_cmd_args` gives them (None:
/// variable; ENABLE_COLO has no entry there, so 0); 0 is INVALID, 11 and
/// above unknown.
const MIG_CMDS: [(&str, Option<u16>); 11] = [
    ("INVALID", None),
    ("OPEN_RETURN_PATH", Some(0)),
    ("PING", Some(4)),
    ("POSTCOPY_ADVISE", None),
    ("POSTCOPY_LISTEN", Some(0)),
    ("POSTCOPY_RUN", Some(0)),
    ("POSTCOPY_RAM_DISCARD", None),
    ("PACKAGED", Some(4)),
    ("ENABLE_COLO", Some(0)),
    ("POSTCOPY_RESUME", Some(0)),
    ("RECV_BITMAP", None),
];

/// One QEMU_VM_COMMAND, checked as QEMU 7.2's `loadvm_process_command`
/// checks it; true when it opened the return path. `advised`: a
/// POSTCOPY_ADVISE came before (7.2 takes only one per stream).
fn load_command(f: &mut QemuFile, advised: &mut bool) -> Result<bool> {
    let cmd = f.get_be16();
    let len = f.get_be16();
    f.check()?;
    let Some(&(name, fixed)) = MIG_CMDS.get(usize::from(cmd)).filter(|_| cmd != 0) else {
        return Err(MigError::new(format!("MIG_CMD 0x{cmd:x} unknown (len 0x{len:x})")));
    };
    if let Some(want) = fixed.filter(|&n| n != len) {
        return Err(MigError::with_errno(format!("{name} received with bad length - expecting {want}, got {len}"), libc::ERANGE));
    }
    match cmd {
        1 if f.bidirectional() => Ok(true),
        1 => Err(MigError::with_errno("the source asked for a return path, but this channel is not a socket", libc::ENOTSUP)),
        2 => {
            // PING: answer with a PONG carrying the same value.
            let v = f.get_be32();
            f.check()?;
            if !f.return_path {
                return Err(MigError::with_errno(format!("CMD_PING (0x{v:x}) received with no return path"), libc::EPERM));
            }
            f.rp_send(crate::savevm::MIG_RP_MSG_PONG, &v.to_be_bytes())?;
            Ok(false)
        }
        // POSTCOPY_ADVISE: once (7.2 moves its postcopy state from NONE
        // to ADVISE, 1, before any other check), empty with postcopy off
        // (this side has none).
        3 if std::mem::replace(advised, true) => Err(MigError::new("CMD_POSTCOPY_ADVISE in wrong postcopy state (1)")),
        3 => match len {
            0 => Ok(false),
            16 => Err(MigError::new("RAM postcopy is disabled but have 16 byte advise")),
            n => Err(MigError::new(format!("CMD_POSTCOPY_ADVISE invalid length ({n})"))),
        },
        // POSTCOPY_RESUME outside a postcopy recovery: 7.2 reports it and
        // goes on ("Don't fail the load, only for this").
        9 => {
            log::warn!("loadvm_postcopy_handle_resume: illegal resume received");
            Ok(false)
        }
        10 => load_recv_bitmap(f, len).map(|()| false),
        _ => Err(MigError::with_errno(format!("MIG_CMD 0x{cmd:x} ({name}: postcopy/COLO) is not supported"), libc::ENOTSUP)),
    }
}

/// RECV_BITMAP (`len` bytes: a counted block name) outside a postcopy
/// recovery, as 7.2's `loadvm_handle_recv_bitmap` takes it: the name is
/// checked (read, its length against `len`, the block looked up as the C
/// string it is read into), then the request is reported and dropped, as
/// only a recovering destination answers it; the load goes on.
fn load_recv_bitmap(f: &mut QemuFile, len: u16) -> Result<()> {
    const WHERE: &str = "loadvm_handle_recv_bitmap";
    let name = f.get_counted_bytes();
    f.check()?;
    if name.is_empty() {
        return Err(MigError::new(format!("{WHERE}: failed to read block name")));
    }
    if usize::from(len) != name.len() + 1 {
        return Err(MigError::new(format!("{WHERE}: invalid payload length ({len})")));
    }
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    let shown = String::from_utf8_lossy(name);
    if !crate::ram::blocks().iter().any(|b| b.idstr.as_bytes() == name) {
        return Err(MigError::new(format!("{WHERE}: block '{shown}' not found")));
    }
    log::warn!("migrate_send_rp_recv_bitmap: MSG_RP_RECV_BITMAP only used for recovery (block '{shown}')");
    Ok(())
}
