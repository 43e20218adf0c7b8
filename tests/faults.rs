//! The fault matrix, over tcp and unix, with livemig in this process as the
//! destination and as the source, and a misbehaving peer on the other end:
//! killed mid-stream, connection reset, a peer that stops reading or writing
//! without closing, the stream truncated and bytes flipped at many offsets,
//! and hostile streams (wrong magic/version, unknown section, wrong RAM
//! block name or size, page past the end of a block, bad XBZRLE data).
//!
//! In every case: the destination ends FAILED with a clear message and its
//! VM not started; the source ends FAILED with its VM running; the process
//! lives on; no thread or fd (listening sockets included) is left behind;
//! and guest RAM sits between PROT_NONE guard pages, so a write outside it
//! would kill the test.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use livemig::host::RunState;
use livemig::outgoing::{self, Target};
use livemig::state::{MigrationStatus, INCOMING, OUTGOING};
use livemig::transport::Uri;

#[derive(Clone, Copy, Debug)]
enum Net {
    Tcp,
    Unix,
}

const NETS: [Net; 2] = [Net::Tcp, Net::Unix];

/// A connected byte stream of either kind.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(b),
            Conn::Unix(s) => s.write_all(b),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
    /// Closes abruptly: a TCP RST (SO_LINGER 0); for unix, a plain close.
    fn reset(self) {
        if let Conn::Tcp(s) = &self {
            let l = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt with a live linger struct and its size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&l as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
        }
    }
}

/// Starts the in-process destination (its VM not running, as an incoming
/// migration needs); returns the URI a peer connects to.
fn start_dst(net: Net, name: &str) -> String {
    STATE.store(RunState::Prelaunch as u32, Ordering::SeqCst);
    match net {
        Net::Tcp => {
            livemig::incoming::start_uri("tcp:127.0.0.1:0").unwrap();
            format!("tcp:127.0.0.1:{}", livemig::incoming::local_port().unwrap())
        }
        Net::Unix => {
            let p = tmpdir(name).join("in.sock");
            let uri = format!("unix:{}", p.display());
            livemig::incoming::start_uri(&uri).unwrap();
            uri
        }
    }
}

fn connect(uri: &str) -> Conn {
    match Uri::parse(uri).unwrap() {
        Uri::Tcp { host, port, .. } => Conn::Tcp(TcpStream::connect((host.as_str(), port)).unwrap()),
        Uri::Unix(p) => Conn::Unix(UnixStream::connect(p).unwrap()),
        _ => unreachable!(),
    }
}

/// Checks the destination failed cleanly with `want` in its message.
fn dst_failed(what: &str, want: &[&str], starts_before: u32, before: (usize, usize)) -> String {
    let st = wait_final(true, 30);
    let e = livemig::incoming::error().unwrap_or_default();
    assert_eq!(st, MigrationStatus::Failed, "{what}: destination {} ({e})", st.name());
    assert!(want.iter().any(|w| e.contains(w)), "{what}: error '{e}' lacks any of {want:?}");
    assert_eq!(STARTS.load(Ordering::SeqCst), starts_before, "{what}: the destination VM was started");
    assert_ne!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "{what}: destination VM running");
    assert_no_leak(before, what);
    e
}

/// Feeds `bytes` to the in-process destination, then ends the connection
/// with `end`; returns the destination's error.
fn feed(net: Net, bytes: &[u8], end: End, what: &str, want: &[&str]) -> String {
    let before = counts();
    let starts = STARTS.load(Ordering::SeqCst);
    let uri = start_dst(net, what);
    let mut c = connect(&uri);
    let _ = c.write_all(bytes);
    match end {
        End::Close => drop(c),
        End::Reset => c.reset(),
        End::Hold => {
            // Stop writing without closing: the io timeout (1 s) must fire.
            let t = Instant::now();
            wait_final(true, 10);
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: took {:?}", t.elapsed());
            drop(c);
        }
    }
    dst_failed(what, want, starts, before)
}

#[derive(Clone, Copy)]
enum End {
    Close,
    Reset,
    Hold,
}

/// Offset of the EOF byte of a stream that ends with a vmdesc.
fn eof_offset(s: &[u8]) -> usize {
    (0..s.len() - 6)
        .rev()
        .find(|&i| s[i] == 0 && s[i + 1] == 6 && u32::from_be_bytes(s[i + 2..i + 6].try_into().unwrap()) as usize == s.len() - i - 6)
        .expect("stream ends with EOF and a vmdesc")
}

#[test]
fn destination_truncated_at_many_offsets() {
    let (_g, _ram) = host();
    let s = valid_stream();
    let n = s.len();
    let eof = eof_offset(&s);
    // Inside the header, configuration, START, first pages, the middle, and
    // before EOF: the END section, the timer and globalstate sections. (The
    // vmdesc after EOF is optional; a stream cut inside it is complete.)
    let offsets = [1, 4, 8, 12, 17, 30, 60, 70, 5000, n / 3, n / 2, eof - 150, eof - 134, eof - 100, eof - 20, eof - 1, eof];
    for net in NETS {
        for &off in &offsets {
            let e = feed(
                net,
                &s[..off],
                End::Close,
                &format!("{net:?} truncated at {off}"),
                &["unexpected end of migration stream", "Configuration section missing"],
            );
            assert!(!e.is_empty());
        }
    }
}

#[test]
fn destination_bytes_flipped_at_structural_offsets() {
    let (_g, _ram) = host();
    let s = valid_stream();
    // Offsets of framing bytes: magic, version, configuration type, name
    // length, machine name, START type and idstr, the MEM_SIZE flags, the
    // first record's flags, the START footer. A flip in page data cannot be
    // detected: the format has no checksum (nor does QEMU 7.2).
    let offsets = [0, 3, 7, 8, 12, 13, 17, 22, 25, 41, 50, 61, 62];
    for net in NETS {
        for &off in &offsets {
            let mut b = s.clone();
            b[off] ^= 0x5A;
            let what = format!("{net:?} flipped at {off}");
            feed(net, &b, End::Close, &what, &[""]);
        }
    }
}

#[test]
fn destination_connection_reset_and_stall() {
    let (_g, _ram) = host();
    let s = valid_stream();
    for net in NETS {
        let want: &[&str] = match net {
            Net::Tcp => &["Connection reset by peer", "unexpected end of migration stream"],
            Net::Unix => &["unexpected end of migration stream"],
        };
        feed(net, &s[..s.len() / 2], End::Reset, &format!("{net:?} reset"), want);
        let e = feed(net, &s[..s.len() / 2], End::Hold, &format!("{net:?} stall"), &["no progress on"]);
        // The limit, and what may have made a source silent that long.
        for part in ["for 1000 ms", "paused before its switchover", "livemig_set_io_timeout"] {
            assert!(e.contains(part), "{net:?} stall: '{e}' lacks '{part}'");
        }
        feed(net, &[], End::Hold, &format!("{net:?} silent peer"), &["no progress on"]);
    }
}

#[test]
fn destination_source_killed_mid_stream() {
    let (_g, _ram) = host();
    for net in NETS {
        let before = counts();
        let starts = STARTS.load(Ordering::SeqCst);
        let uri = start_dst(net, "killed-src");
        // A source sending 64 MiB at 8 MB/s: killed while it sends.
        let mut p = spawn_peer(&[
            "--migrate".into(),
            uri,
            "--ram-size".into(),
            "64M".into(),
            "--speed".into(),
            "8000000".into(),
            "--ram-file".into(),
            "/dev/urandom".into(),
        ]);
        wait_until(20, "destination active", || INCOMING.status() == MigrationStatus::Active);
        std::thread::sleep(Duration::from_millis(300));
        p.kill().unwrap();
        p.wait().unwrap();
        drop(p);
        dst_failed(&format!("{net:?} source killed"), &["unexpected end of migration stream", "Connection reset by peer"], starts, before);
    }
}

#[test]
fn destination_refuses_hostile_streams() {
    let (_g, _ram) = host();
    let s = valid_stream();
    let vec = |n: &str| std::fs::read(root().join("tests/vectors/generated").join(format!("{n}.bin"))).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong magic", vec("bad_magic"), "Not a migration stream"),
        ("version 2", vec("version2"), "SaveVM v2 format is obsolete"),
        ("version 4", vec("version4"), "Unsupported migration stream version"),
        ("unknown section", vec("unknown_section_foo"), "Unknown savevm section or instance 'foo' 0"),
        ("unknown record type", vec("unknown_section_type_9"), "Unknown savevm section type 9"),
        ("ram block name", vec("ramblock_unknown_name"), "Unknown ramblock \"pc.ram\""),
        ("ram block size", vec("ramblock_size_128M"), "Size mismatch: ram: 0x8000000 != 0x4000000"),
        ("page past the end", vec("page_beyond_block"), "Illegal RAM offset 4000000"),
        ("page in unknown block", vec("page_unknown_block"), "Can't find block nosuch"),
        ("xbzrle decode", vec("xbzrle_overrun"), "Failed to load XBZRLE page - decode error!"),
        ("xbzrle length", vec("xbzrle_len_4097"), "Failed to load XBZRLE page - len overflow!"),
        ("xbzrle encoding", vec("xbzrle_bad_encflag"), "Failed to load XBZRLE page - wrong compression!"),
        ("machine", vec("machine_pc"), "Machine type received is 'pc-i440fx-7.2' and local is 'none'"),
        ("truncated valid stream", s[..s.len() - 1000].to_vec(), "unexpected end of migration stream"),
    ];
    for net in NETS {
        for (what, bytes, want) in &cases {
            feed(net, bytes, End::Close, &format!("{net:?} {what}"), &[want]);
        }
    }
}

// ---------------- livemig as the source ----------------

/// A peer that accepts one connection and then misbehaves.
enum Peer {
    /// Read `n` bytes, then close.
    CloseAfter(usize),
    /// Read `n` bytes, then reset.
    ResetAfter(usize),
    /// Never read, never close (until told to stop).
    Stall,
    /// Read until the source stops sending, then close without a word.
    ReadAllThenClose,
}

fn listen(net: Net, name: &str) -> (String, Box<dyn FnOnce() -> Conn + Send>) {
    match net {
        Net::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let uri = format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port());
            (uri, Box::new(move || Conn::Tcp(l.accept().unwrap().0)))
        }
        Net::Unix => {
            let p = tmpdir(name).join("out.sock");
            let l = UnixListener::bind(&p).unwrap();
            (format!("unix:{}", p.display()), Box::new(move || Conn::Unix(l.accept().unwrap().0)))
        }
    }
}

/// Migrates this process's VM to a misbehaving peer; checks the source
/// failed with one of `want`, its VM running (stopped in postmigrate when
/// a peer with the whole stream never answered), nothing leaked.
/// Returns how many times the VM had been stopped (1 when the failure came
/// during the switchover).
fn migrate_to(net: Net, peer: Peer, what: &str, want: &[&str]) -> u32 {
    let before = counts();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let (stops, starts) = (STOPS.load(Ordering::SeqCst), STARTS.load(Ordering::SeqCst));
    let (uri, accept) = listen(net, what);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut c = accept();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        match peer {
            Peer::CloseAfter(n) | Peer::ResetAfter(n) => {
                while got < n {
                    match c.read(&mut buf[..(n - got).min(1 << 16)]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
                if let Peer::ResetAfter(_) = peer {
                    c.reset();
                }
            }
            Peer::ReadAllThenClose => {
                let set_timeout = |c: &Conn| match c {
                    Conn::Tcp(s) => s.set_read_timeout(Some(Duration::from_millis(300))).unwrap(),
                    Conn::Unix(s) => s.set_read_timeout(Some(Duration::from_millis(300))).unwrap(),
                };
                set_timeout(&c);
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                }
            }
            Peer::Stall => {
                while !stop2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
    let t0 = Instant::now();
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    let st = wait_final(false, 30);
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    let e = outgoing::stats().error.unwrap_or_default();
    assert_eq!(st, MigrationStatus::Failed, "{what}: source {} ({e})", st.name());
    assert!(want.iter().any(|w| e.contains(w)), "{what}: error '{e}' lacks any of {want:?}");
    let stopped = STOPS.load(Ordering::SeqCst) - stops;
    if e.contains("this VM stays stopped") {
        // A peer with the whole stream that never answered may be running
        // the VM: it is not started here again.
        assert_eq!(STATE.load(Ordering::SeqCst), RunState::Postmigrate as u32, "{what}: source VM not left stopped");
        assert_eq!(STARTS.load(Ordering::SeqCst) - starts, 0, "{what}: the VM was started again");
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
    } else {
        assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "{what}: source VM not running");
        assert_eq!(STARTS.load(Ordering::SeqCst) - starts, stopped, "{what}: a VM stopped for the switchover is started again");
    }
    assert!(t0.elapsed() < Duration::from_secs(20), "{what}: took {:?}", t0.elapsed());
    assert_no_leak(before, what);
    // A new migration works afterwards (into a file: no return path).
    let rp = livemig::params::get().cap(livemig::params::MigrationCapability::ReturnPath);
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, false)]).unwrap();
    let sink = format!("exec:cat > {}", tmpdir("after").join("s.bin").display());
    outgoing::start(Target::Uri(Uri::parse(&sink).unwrap(), sink.clone())).unwrap();
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed, "{what}: the next migration");
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, rp)]).unwrap();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    stopped
}

#[test]
fn source_peer_closes_at_many_offsets() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(0).unwrap();
    // The length of this source's stream.
    let f = tmpdir("len").join("s.bin");
    let uri = format!("exec:cat > {}", f.display());
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    assert_eq!(wait_final(false, 30), MigrationStatus::Completed);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let n = std::fs::metadata(&f).unwrap().len() as usize;
    // Without a return path: a peer that goes away while the source still
    // has more to send than socket buffers hold.
    for net in NETS {
        for off in [0, 8, 100, 5000, 1 << 20, n / 4, n / 2] {
            migrate_to(
                net,
                Peer::CloseAfter(off),
                &format!("{net:?} peer closes after {off}"),
                &["Broken pipe", "Connection reset by peer"],
            );
        }
    }
    // With the return path, also at the very end: in the END section, the
    // device sections, the last byte. The VM was stopped for the switchover
    // in those cases and must run again.
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, true)]).unwrap();
    let mut in_switchover = 0;
    for net in NETS {
        for off in [n / 2, n - 1000, n - 300, n - 1] {
            in_switchover += migrate_to(
                net,
                Peer::CloseAfter(off),
                &format!("{net:?} return path, peer closes after {off} of {n}"),
                // (The stream's length varies by a few bytes with the number
                // of PART sections: a peer still waiting for its last bytes
                // never answers, and the io timeout ends the wait, leaving
                // the VM stopped: see migrate_to.)
                &[
                    "Broken pipe",
                    "Connection reset by peer",
                    "without confirming the load",
                    "did not confirm the load within",
                    "no progress on",
                ],
            );
        }
    }
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, false)]).unwrap();
    assert!(in_switchover >= 4, "only {in_switchover} cases failed during the switchover");
}

#[test]
fn source_peer_resets() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(0).unwrap();
    for net in NETS {
        migrate_to(net, Peer::ResetAfter(1 << 20), &format!("{net:?} reset"), &["Connection reset by peer", "Broken pipe"]);
    }
}

#[test]
fn source_peer_stops_reading() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(0).unwrap();
    for net in NETS {
        migrate_to(net, Peer::Stall, &format!("{net:?} stall"), &["no progress on", "for 1000 ms"]);
    }
}

#[test]
fn source_destination_killed_mid_stream() {
    let (_g, ram) = host();
    ram.fill_pattern();
    for net in NETS {
        livemig::params::set_speed(8_000_000).unwrap();
        let before = counts();
        STATE.store(RunState::Running as u32, Ordering::SeqCst);
        let d = tmpdir("killed-dst");
        let (uri, args) = match net {
            Net::Tcp => {
                let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                (format!("tcp:127.0.0.1:{port}"), vec!["--incoming".to_string(), format!("tcp:127.0.0.1:{port}")])
            }
            Net::Unix => {
                let u = format!("unix:{}", d.join("k.sock").display());
                (u.clone(), vec!["--incoming".to_string(), u])
            }
        };
        let mut p = spawn_peer(&[args, vec!["--ram-size".into(), "64M".into()]].concat());
        let path = d.join("k.sock");
        wait_until(20, "destination listening", || match net {
            Net::Tcp => TcpStream::connect(uri.trim_start_matches("tcp:")).is_ok(),
            Net::Unix => path.exists(),
        });
        if let Net::Tcp = net {
            // The probe connection above was the destination's one accept:
            // start a fresh destination.
            let _ = p.kill();
            let _ = p.wait();
            p = spawn_peer(&["--incoming".into(), uri.clone(), "--ram-size".into(), "64M".into()]);
            std::thread::sleep(Duration::from_millis(300));
        }
        outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
        wait_until(20, "source active", || OUTGOING.status() == MigrationStatus::Active);
        std::thread::sleep(Duration::from_millis(300));
        p.kill().unwrap();
        p.wait().unwrap();
        drop(p);
        let st = wait_final(false, 30);
        let e = outgoing::stats().error.unwrap_or_default();
        assert_eq!(st, MigrationStatus::Failed, "{net:?}: {e}");
        assert!(e.contains("Connection reset by peer") || e.contains("Broken pipe"), "{net:?}: {e}");
        assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
        assert_no_leak(before, "destination killed");
    }
    livemig::params::set_speed(0).unwrap();
}

/// Without a return path a source cannot know whether the destination
/// loaded the end of the stream; with it, a destination that takes every
/// byte but never confirms leaves the source FAILED with its VM running.
#[test]
fn source_with_return_path_needs_the_confirmation() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(0).unwrap();
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, true)]).unwrap();
    for net in NETS {
        let stopped = migrate_to(
            net,
            Peer::ReadAllThenClose,
            &format!("{net:?} no confirmation"),
            &["the destination closed the return path without confirming the load"],
        );
        assert_eq!(stopped, 1, "the failure came in the switchover, with the VM stopped");
    }
    // exec: cannot carry a return path: refused at setup with a reason.
    let uri = "exec:cat > /dev/null".to_string();
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    assert_eq!(wait_final(false, 30), MigrationStatus::Failed);
    let e = outgoing::stats().error.unwrap();
    assert!(e.contains("capability 'return-path' needs a socket"), "{e}");
    livemig::params::set_capabilities(&[(livemig::params::MigrationCapability::ReturnPath, false)]).unwrap();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// The destination tells a return-path source that its load failed.
#[test]
fn destination_reports_failure_on_the_return_path() {
    let (_g, _ram) = host();
    for net in NETS {
        let before = counts();
        let starts = STARTS.load(Ordering::SeqCst);
        let uri = start_dst(net, "rp-fail");
        // A qemu_peer source whose RAM block is larger than ours: refused
        // at MEM_SIZE; the source hears it on the return path.
        let out =
            std::process::Command::new(qemu_peer()).args(["--migrate", &uri, "--ram-size", "128M", "--return-path"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text}");
        // The source hears the failure on the return path, or (when the
        // destination's close beats its read) as a reset of its writes.
        assert!(
            text.contains("the destination failed to load the stream (return path status 1)")
                || text.contains("Connection reset by peer")
                || text.contains("Broken pipe"),
            "{text}"
        );
        dst_failed(&format!("{net:?} size mismatch"), &["Size mismatch: ram: 0x8000000 != 0x4000000"], starts, before);
    }
}
