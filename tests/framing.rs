//! Stream framing, written and read, checked against the byte layouts of
//! QEMU 7.2's savevm format (header, configuration, START/PART/END/FULL with
//! footers, EOF, vmdesc) and against a 7.2 destination's refusals.
//!
//! One test function: the handler registry is process-global.

use std::sync::Arc;

use livemig::error::Result;
use livemig::loadvm::load_stream;
use livemig::qemu_file::{Direction, QemuFile};
use livemig::savevm::{self, Priority, SaveState, SaveVmHandler, SectionKind};
use livemig::transport::mem::MemChannel;
use parking_lot::Mutex;

/// A live handler that sends "A" in START, "B" in one PART, "C" in END.
struct Live {
    parts: u32,
    loaded: Arc<Mutex<Vec<(SectionKind, u8)>>>,
}

impl SaveVmHandler for Live {
    fn is_live(&self) -> bool {
        true
    }
    fn setup(&mut self, f: &mut QemuFile) -> Result<()> {
        f.put_u8(b'A');
        Ok(())
    }
    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        self.parts += 1;
        f.put_u8(b'B');
        Ok(true)
    }
    fn pending(&mut self, _max: u64) -> u64 {
        if self.parts == 0 {
            1
        } else {
            0
        }
    }
    fn complete(&mut self, f: &mut QemuFile) -> Result<()> {
        f.put_u8(b'C');
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, kind: SectionKind) -> Result<()> {
        let b = f.get_u8();
        self.loaded.lock().push((kind, b));
        f.check()
    }
}

/// A non-live device with 3 bytes of state.
struct Dev(Arc<Mutex<Vec<u8>>>);

impl SaveVmHandler for Dev {
    fn is_live(&self) -> bool {
        false
    }
    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        f.put_buffer(&[1, 2, 3]);
        Ok(())
    }
    fn load(&mut self, f: &mut QemuFile, _v: u32, _k: SectionKind) -> Result<()> {
        let mut b = [0u8; 3];
        f.get_buffer(&mut b);
        self.0.lock().extend_from_slice(&b);
        f.check()
    }
}

fn load(bytes: Vec<u8>) -> std::result::Result<(), String> {
    let mut f = QemuFile::new(Box::new(MemChannel::source(bytes)), Direction::Read);
    load_stream(&mut f, None).map_err(|e| e.to_string())
}

#[test]
fn framing_round_trip_and_refusals() {
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let dev = Arc::new(Mutex::new(Vec::new()));
    let sid_live = savevm::register("lv", 0, 4, Box::new(Live { parts: 0, loaded: loaded.clone() }), 1, Priority::Ram).unwrap();
    let sid_dev = savevm::register("dev", 0, 2, Box::new(Dev(dev.clone())), 1, Priority::Default).unwrap();
    assert!(sid_live > 0, "a live section never gets id 0");
    assert_ne!(sid_live, sid_dev);
    savevm::set_machine_name(Some("none")).unwrap();

    // Write: setup, one iteration, completion.
    let (chan, out) = MemChannel::sink();
    let mut f = QemuFile::new(Box::new(chan), Direction::Write);
    let mut s = SaveState::registered();
    s.begin(&mut f).unwrap();
    assert!(s.pending(0) > 0);
    assert!(s.iterate(&mut f).unwrap());
    s.complete(&mut f).unwrap();
    s.end(&mut f);
    f.flush().unwrap();
    let bytes = out.lock().clone();

    // livemig's own "ram" section (no blocks registered here) takes part
    // too: START = MEM_SIZE total 0 + EOS, PART and END = EOS.
    let sid_ram = savevm::entries().iter().find(|e| e.idstr == "ram").expect("ram is registered").section_id;
    let sec = |want: &mut Vec<u8>, kind: u8, sid: u32, head: Option<(&str, u32)>, payload: &[u8]| {
        want.push(kind);
        want.extend_from_slice(&sid.to_be_bytes());
        if let Some((name, version)) = head {
            want.push(name.len() as u8);
            want.extend_from_slice(name.as_bytes());
            want.extend_from_slice(&0u32.to_be_bytes()); // instance
            want.extend_from_slice(&version.to_be_bytes());
        }
        want.extend_from_slice(payload);
        want.push(0x7E);
        want.extend_from_slice(&sid.to_be_bytes());
    };
    let eos = 0x10u64.to_be_bytes();
    let mem_size_0: Vec<u8> = [0x04u64.to_be_bytes(), eos].concat();
    let mut want = vec![0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 3]; // QEVM, version 3
    want.extend_from_slice(&[0x07, 0, 0, 0, 4, b'n', b'o', b'n', b'e']); // configuration "none"
    sec(&mut want, 0x01, sid_live, Some(("lv", 4)), b"A"); // START
    sec(&mut want, 0x01, sid_ram, Some(("ram", 4)), &mem_size_0);
    sec(&mut want, 0x02, sid_live, None, b"B"); // PART
    sec(&mut want, 0x02, sid_ram, None, &eos);
    sec(&mut want, 0x03, sid_live, None, b"C"); // END
    sec(&mut want, 0x03, sid_ram, None, &eos);
    sec(&mut want, 0x04, sid_dev, Some(("dev", 2)), &[1, 2, 3]); // FULL
    assert_eq!(&bytes[..want.len()], &want[..], "sections before globalstate");
    let rest = &bytes[want.len()..];
    // FULL globalstate (registered by livemig), then EOF and the vmdesc.
    assert_eq!(rest[0], 0x04);
    assert_eq!(&rest[5..17], b"\x0bglobalstate");
    let eof = 1 + 4 + 12 + 4 + 4 + 104 + 5;
    assert_eq!(rest[eof], 0x00, "EOF");
    assert_eq!(rest[eof + 1], 0x06, "vmdesc");
    let len = u32::from_be_bytes(rest[eof + 2..eof + 6].try_into().unwrap()) as usize;
    let json = std::str::from_utf8(&rest[eof + 6..]).unwrap();
    assert_eq!(json.len(), len);
    assert!(
        json.starts_with(r#"{"page_size": 4096, "devices": [{"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 2, "#),
        "{json}"
    );
    assert!(json.contains(r#"{"name": "globalstate", "instance_id": 0"#), "{json}");

    // Read it back.
    load(bytes.clone()).unwrap();
    assert_eq!(*loaded.lock(), vec![(SectionKind::Start, b'A'), (SectionKind::Part, b'B'), (SectionKind::End, b'C')]);
    assert_eq!(*dev.lock(), vec![1, 2, 3]);
    // Without the vmdesc, and with trailing garbage instead: still loads.
    load(bytes[..want.len() + eof + 1].to_vec()).unwrap();
    let mut garbage = bytes[..want.len() + eof + 1].to_vec();
    garbage.push(103);
    load(garbage).unwrap();

    // Refusals, with a 7.2 destination's messages.
    let hdr = &bytes[..17];
    let with = |tail: &[u8]| [hdr, tail].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"QEVX\0\0\0\x03".to_vec(), "Not a migration stream"),
        (b"QEVM\0\0\0\x02".to_vec(), "SaveVM v2 format is obsolete and don't work anymore"),
        (b"QEVM\0\0\0\x04".to_vec(), "Unsupported migration stream version"),
        (b"QEVM\0\0\0\x03\x00".to_vec(), "Configuration section missing"),
        (b"QEVM\0\0\0\x03\x07\0\0\0\x02pc\x00".to_vec(), "Machine type received is 'pc' and local is 'none'"),
        (with(b"\x04\0\0\0\x09\x03foo\0\0\0\0\0\0\0\x01"), "Unknown savevm section or instance 'foo' 0. Make sure"),
        (with(b"\x04\0\0\0\x09\x00"), "Unable to read ID string for section 9"),
        (with(&[0x02, 0, 0, 0, 0x63]), "Unknown savevm section 99"),
        (with(&[0x09]), "Unknown savevm section type 9"),
        (with(&[0x05]), "Unknown savevm section type 5"),
        (
            with(&[[0x04, 0, 0, 0, 9, 3].as_slice(), b"dev", &[0, 0, 0, 0, 0, 0, 0, 3]].concat()),
            "savevm: unsupported version 3 for 'dev' v2",
        ),
        (
            with(&[[0x04, 0, 0, 0, 9, 3].as_slice(), b"dev", &[0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3, 0x00]].concat()),
            "Missing section footer for dev",
        ),
        (
            with(&[[0x04, 0, 0, 0, 9, 3].as_slice(), b"dev", &[0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3, 0x7E, 0, 0, 0, 8]].concat()),
            "Mismatched section id in footer for dev - read 0x8 expected 0x9",
        ),
        (with(&[0x08, 0, 0x63, 0, 0]), "MIG_CMD 0x63 unknown (len 0x0)"),
        (with(&[0x08, 0, 2, 0, 3, 0, 0, 0]), "PING received with bad length - expecting 4, got 3"),
        (with(&[0x08, 0, 2, 0, 4, 0, 0, 0, 1]), "CMD_PING (0x1) received with no return path"),
        (with(&[0x08, 0, 2, 0, 4, 0, 0, 0, 7]), "CMD_PING (0x7) received with no return path"),
        (with(&[0x08, 0, 0, 0, 0]), "MIG_CMD 0x0 unknown (len 0x0)"),
        (with(&[0x08, 0, 11, 0, 0]), "MIG_CMD 0xb unknown (len 0x0)"),
        (with(&[0x08, 0, 1, 0, 5]), "OPEN_RETURN_PATH received with bad length - expecting 0, got 5"),
        (with(&[0x08, 0, 3, 0, 9]), "CMD_POSTCOPY_ADVISE invalid length (9)"),
        (with(&[0x08, 0, 3, 0, 16]), "RAM postcopy is disabled but have 16 byte advise"),
        (with(&[0x08, 0, 5, 0, 0]), "MIG_CMD 0x5 (POSTCOPY_RUN: postcopy/COLO) is not supported"),
        // 7.2's numbering: PACKAGED 7, ENABLE_COLO 8, POSTCOPY_RESUME 9,
        // RECV_BITMAP 10 (stream-format §2.5, `enum qemu_vm_cmd`).
        (with(&[0x08, 0, 7, 0, 4, 0, 0, 0, 9]), "MIG_CMD 0x7 (PACKAGED: postcopy/COLO) is not supported"),
        (with(&[0x08, 0, 7, 0, 0]), "PACKAGED received with bad length - expecting 4, got 0"),
        (with(&[0x08, 0, 8, 0, 0]), "MIG_CMD 0x8 (ENABLE_COLO: postcopy/COLO) is not supported"),
        (with(&[0x08, 0, 8, 0, 4, 0, 0, 0, 0]), "ENABLE_COLO received with bad length - expecting 0, got 4"),
        // POSTCOPY_RESUME outside a recovery is reported and skipped, as
        // 7.2 does; then EOF is missing.
        (with(&[0x08, 0, 9, 0, 0]), "unexpected end of migration stream"),
        (with(&[0x08, 0, 9, 0, 4, 0, 0, 0, 0]), "POSTCOPY_RESUME received with bad length - expecting 0, got 4"),
        (with(&[0x08, 0, 10, 0, 3, 1, 2, 3]), "loadvm_handle_recv_bitmap: invalid payload length (3)"),
        // An empty POSTCOPY_ADVISE is accepted (postcopy off), then EOF is missing.
        (with(&[0x08, 0, 3, 0, 0]), "unexpected end of migration stream"),
        // ... but only one: 7.2's postcopy state is ADVISE (1) after it.
        (with(&[0x08, 0, 3, 0, 0, 0x08, 0, 3, 0, 0, 0x00]), "CMD_POSTCOPY_ADVISE in wrong postcopy state (1)"),
        (with(&[0x08, 0, 3, 0, 0, 0x08, 0, 3, 0, 16]), "CMD_POSTCOPY_ADVISE in wrong postcopy state (1)"),
        (with(&[]), "unexpected end of migration stream"),
        (bytes[..want.len() - 3].to_vec(), "unexpected end of migration stream"),
        (b"QEVM".to_vec(), "unexpected end of migration stream"),
        (vec![], "unexpected end of migration stream"),
    ];
    for (stream, msg) in cases {
        let e = load(stream.clone()).expect_err(msg);
        assert!(e.contains(msg), "want '{msg}', got '{e}' for {stream:02x?}");
    }
    // The configuration's capabilities subsection, read as 7.2 reads it:
    // every entry; a name that is no 7.2 capability refused; of the known
    // ones only x-ignore-shared (validated, and off here) refused.
    let caps = |names: &[&str]| {
        let mut s = hdr.to_vec();
        s.push(0x05);
        s.push(26);
        s.extend_from_slice(b"configuration/capabilities");
        s.extend_from_slice(&1u32.to_be_bytes());
        s.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for n in names {
            s.push(n.len() as u8);
            s.extend_from_slice(n.as_bytes());
        }
        s.push(0x00); // EOF
        s
    };
    load(caps(&["xbzrle", "events"])).expect("capabilities 7.2 does not validate are accepted");
    for (names, msg) in [
        (&["xbzrle", "x-ignore-shared"][..], "Capability x-ignore-shared is off, but received capability is on"),
        (&["x-ignore-shared", "bogus"][..], "Received unknown capability bogus"),
        (&["bogus", "x-ignore-shared"][..], "Received unknown capability bogus"),
    ] {
        let e = load(caps(names)).expect_err(msg);
        assert!(e.contains(msg), "{names:?}: want '{msg}', got '{e}'");
    }

    // A failing handler is named with QEMU's context line.
    let e = load(with(&[[0x01, 0, 0, 0, 77, 2].as_slice(), b"lv", &[0, 0, 0, 0, 0, 0, 0, 4]].concat())).unwrap_err();
    assert_eq!(e, "error while loading state for instance 0x0 of device 'lv': unexpected end of migration stream");
}
