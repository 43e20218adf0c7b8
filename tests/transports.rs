//! Transports and URIs at their edges, both directions: how long a
//! destination waits for its source, what a refused or failed start leaves
//! behind (state, error text, descriptors, processes).

mod common;

use std::ffi::CString;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::ptr::null_mut;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use livemig::ffi::errors::{error_free, error_get_pretty, Error};
use livemig::ffi::host::livemig_fd_add;
use livemig::ffi::migration as api;
use livemig::host::RunState;
use livemig::state::{MigrationStatus, INCOMING};

fn take_err(err: *mut Error) -> String {
    if err.is_null() {
        return String::new();
    }
    // SAFETY: a live error from livemig; its text is a C string it owns.
    let s = unsafe { std::ffi::CStr::from_ptr(error_get_pretty(err)) }.to_string_lossy().into_owned();
    error_free(err);
    s
}

/// qemu_start_incoming_migration(uri): its error text ("" for none).
fn incoming(uri: &str) -> String {
    let c = CString::new(uri).unwrap();
    let mut err = null_mut();
    api::qemu_start_incoming_migration(c.as_ptr(), &mut err);
    take_err(err)
}

/// qmp_query_migrate: (status, error_desc).
fn query() -> (MigrationStatus, Option<String>) {
    let i = api::qmp_query_migrate(null_mut());
    assert!(!i.is_null());
    // SAFETY: a MigrationInfo from livemig, freed right after; error_desc
    // is a C string when has_error_desc is set.
    let r = unsafe {
        let e = (*i).has_error_desc.then(|| std::ffi::CStr::from_ptr((*i).error_desc).to_string_lossy().into_owned());
        ((*i).status, e)
    };
    api::qapi_free_MigrationInfo(i);
    r
}

/// The child processes of this process.
fn children() -> Vec<String> {
    let mut v = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        v.extend(c.split_whitespace().map(str::to_string));
    }
    v
}

/// Asserts that the incoming migration stays waiting (SETUP, not failed)
/// for `d`, well past the 1 s io timeout.
fn still_waiting_after(d: Duration, what: &str) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        assert_eq!(INCOMING.status(), MigrationStatus::Setup, "{what}: {:?}", livemig::incoming::error());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An `exec:` source that starts sending later than the io timeout (as
/// `nc -l PORT` does when the source connects late) is waited for, as
/// QEMU's destination waits for it: the migration completes.
#[test]
fn an_exec_source_that_starts_late_is_waited_for() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let d = tmpdir("late-exec");
    let s = d.join("s.bin");
    std::fs::write(&s, valid_stream()).unwrap();
    // The command starts writing after 2.5 io timeouts.
    assert_eq!(incoming(&format!("exec:sleep 2.5; cat {}", s.display())), "");
    still_waiting_after(Duration::from_millis(2000), "exec: source not yet sending");
    assert_eq!(wait_final(true, 30), MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// The same for an `fd:` whose writer starts late; the destination sets
/// the VM running once it has the stream.
#[test]
fn an_fd_source_that_starts_late_is_waited_for() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
    let name = CString::new("late-src").unwrap();
    let mut err = null_mut();
    assert!(livemig_fd_add(name.as_ptr(), r.into_raw_fd(), &mut err), "{}", take_err(err));
    assert_eq!(incoming("fd:late-src"), "");
    still_waiting_after(Duration::from_millis(2500), "fd: source not yet sending");
    let stream = valid_stream();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&stream);
    });
    assert_eq!(wait_final(true, 30), MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    writer.join().unwrap();
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
}

/// An `fd:` that cannot be read (the write end of a pipe) is not waited
/// on: the migration fails at once with the reason.
#[test]
fn an_fd_that_cannot_be_read_fails_at_once() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let mut p = [0; 2];
    // SAFETY: pipe(2) fills two descriptors.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    let name = CString::new("wrong-end").unwrap();
    let mut err = null_mut();
    assert!(livemig_fd_add(name.as_ptr(), p[1], &mut err), "{}", take_err(err));
    assert_eq!(incoming("fd:wrong-end"), "");
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(livemig::incoming::error().unwrap(), "fd:wrong-end: waiting for the source: Bad file descriptor");
    // SAFETY: the read end is this test's.
    unsafe { libc::close(p[0]) };
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// A cancel ends the wait for a late `exec:` source: FAILED with the
/// reason, the command and everything it started killed, no descriptor
/// left open.
#[test]
fn an_incoming_cancel_ends_the_wait_for_an_exec_source() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let before = counts();
    let uri = "exec:sleep 60; echo never";
    assert_eq!(incoming(uri), "");
    still_waiting_after(Duration::from_millis(1500), "exec: source silent");
    assert!(!children().is_empty(), "the command runs");
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_eq!(
        livemig::incoming::error().unwrap(),
        format!("incoming migration cancelled: {uri}: waiting for the source: Operation canceled")
    );
    wait_until(10, "the command reaped", || children().is_empty());
    assert_no_leak(before, "cancelled exec: source");
    assert_ne!(STATE.load(Ordering::SeqCst), RunState::Running as u32, "the VM is not started");
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// A stream the host opened (`process_incoming_migration`) whose writer
/// starts late is waited for as well, and a cancel ends that wait.
#[test]
fn process_incoming_migration_waits_for_a_late_source() {
    let (_g, _ram) = host();
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let mode = CString::new("rb").unwrap();
    // A late source: loaded once it sends.
    let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
    let f = livemig::ffi::file::qemu_fdopen(r.into_raw_fd(), mode.as_ptr());
    assert!(!f.is_null());
    api::process_incoming_migration(f);
    still_waiting_after(Duration::from_millis(2500), "host stream not yet sending");
    let stream = valid_stream();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&stream);
    });
    assert_eq!(wait_final(true, 30), MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    writer.join().unwrap();
    // A source that never comes: the cancel ends the wait.
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let before = counts();
    let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
    let f = livemig::ffi::file::qemu_fdopen(r.into_raw_fd(), mode.as_ptr());
    api::process_incoming_migration(f);
    still_waiting_after(Duration::from_millis(1500), "host stream silent");
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    let e = livemig::incoming::error().unwrap();
    assert!(e.starts_with("incoming migration cancelled: ") && e.ends_with(": waiting for the source: Operation canceled"), "{e}");
    drop(w);
    assert_no_leak(before, "cancelled host stream");
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// QEMU 7.2's `tcp:` options: `,to=` tries the next ports when the first
/// is taken, `,ipv4`/`,ipv6` keep to one family, unknown ones are
/// ignored; both directions.
#[test]
fn tcp_options_are_read_as_qemu_reads_them() {
    let (_g, ram) = host();
    ram.fill_pattern();
    // Incoming: the port asked is taken, the next one is listened on.
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    let before = counts();
    let mut got = None;
    for q in p + 1..p.saturating_add(20) {
        // A port after `p` that is free now.
        if std::net::TcpListener::bind(("127.0.0.1", q)).is_ok() {
            got = Some(q);
            break;
        }
    }
    let q = got.expect("a free port after the taken one");
    assert_eq!(incoming(&format!("tcp:127.0.0.1:{p},to={q},keep-alive")), "");
    assert_eq!(api::livemig_incoming_port(), i32::from(q), "the first free port of the range");
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    assert_no_leak(before, "a range listener");
    assert_eq!(
        incoming(&format!("tcp:127.0.0.1:{p},to={p}")),
        format!("Failed to bind socket for 'tcp:127.0.0.1:{p},to={p}': Address already in use")
    );
    // Incoming, IPv4 only on every address: IPv4 sources only.
    assert_eq!(incoming("tcp::0,ipv4"), "");
    let port = api::livemig_incoming_port() as u16;
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        assert!(std::net::TcpStream::connect(("::1", port)).is_err(), "not listening on IPv6");
    }
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // Outgoing: the family filters the addresses; a destination that
    // reads the whole stream gets it.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let reader = std::thread::spawn(move || {
        let (mut c, _) = sink.accept().unwrap();
        std::io::copy(&mut c, &mut std::io::sink()).unwrap()
    });
    assert_eq!(migrate(&format!("tcp:127.0.0.1:{port},ipv4,to=9")), "");
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed, "{:?}", query());
    assert!(reader.join().unwrap() > RAM_SIZE as u64 / 2);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate(&format!("tcp:127.0.0.1:{port},ipv6")), "");
    assert_eq!(wait_final(false, 10), MigrationStatus::Failed);
    assert_eq!(query().1.unwrap(), format!("Failed to connect to '127.0.0.1:{port}': Address family for hostname not supported"));
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
    // A bad option value is refused with QEMU's text.
    assert_eq!(migrate("tcp:127.0.0.1:1,ipv4=foo"), "invalid migration uri 'tcp:127.0.0.1:1,ipv4=foo': error parsing 'ipv4' flag '=foo'");
    drop(taken);
}

/// An `exec:` command gets stdin, stdout and stderr, and none of the
/// host's other descriptors, also those it left without close-on-exec
/// (guest RAM, disk images, KVM's): a command QEMU spawns through glib
/// gets none either. Both directions, each command's descriptors read
/// while it runs.
#[test]
fn an_exec_command_inherits_none_of_the_hosts_descriptors() {
    let (_g, ram) = host();
    ram.fill_pattern();
    let path = CString::new("/dev/null").unwrap();
    // SAFETY: open(2) of a NUL-terminated path, without O_CLOEXEC.
    let host_fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(host_fd > 2);
    // The descriptors of the one command running (the shell exec'd it),
    // once they are stdin, stdout and stderr alone, or as they still are
    // after 10 s: just after the exec, the dynamic loader may hold a
    // library open for a moment, but an inherited descriptor stays.
    let command_fds = || -> Vec<String> {
        wait_until(10, "the command", || children().len() == 1);
        let pid = &children()[0];
        wait_until(10, "the shell to exec sleep", || {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        let list = || {
            let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let v = list();
            if v == ["0", "1", "2"] || std::time::Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate("exec:exec sleep 30"), "");
    assert_eq!(command_fds(), ["0", "1", "2"], "the outgoing command's descriptors");
    api::qmp_migrate_cancel(null_mut());
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    assert_eq!(incoming("exec:exec sleep 30"), "");
    assert_eq!(command_fds(), ["0", "1", "2"], "the incoming command's descriptors");
    assert!(api::livemig_incoming_cancel());
    assert_eq!(wait_final(true, 10), MigrationStatus::Failed);
    wait_until(10, "the commands reaped", || children().is_empty());
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(host_fd) };
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}

/// A `unix:` path too long for a socket address fails the migration with
/// QEMU 7.2's words (as the destination refuses it), the VM running.
#[test]
fn a_unix_path_too_long_to_connect_is_reported_as_qemu_reports_it() {
    let (_g, _ram) = host();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let path = format!("/tmp/{}", "a".repeat(120));
    assert_eq!(migrate(&format!("unix:{path}")), "");
    assert_eq!(wait_final(false, 10), MigrationStatus::Failed);
    assert_eq!(
        query().1.unwrap(),
        format!("Failed to connect to '{path}': UNIX socket path '{path}' is too long (a socket path must be shorter than 108 bytes)")
    );
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
}

/// A URI that cannot be used is reported after a migration in progress
/// and a blocker, as QEMU 7.2 orders its refusals, and changes nothing:
/// the last migration's state stays, the VM runs on.
#[test]
fn a_bad_uri_is_reported_after_the_other_refusals_and_changes_nothing() {
    let (_g, ram) = host();
    ram.fill_pattern();
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // A migration in progress is reported first.
    assert_eq!(migrate("exec:exec sleep 30"), "");
    assert_eq!(migrate("blah:x"), "There's a migration process in progress");
    api::qmp_migrate_cancel(null_mut());
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    // Then a blocker.
    let reason = CString::new("device 'y' cannot migrate").unwrap();
    let reason = livemig::ffi::errors::error_new(reason.as_ptr());
    let mut err = null_mut();
    assert_eq!(api::migrate_add_blocker(reason, &mut err), 0);
    assert_eq!(migrate("blah:x"), "device 'y' cannot migrate");
    assert_eq!(migrate("fd:nope"), "device 'y' cannot migrate");
    api::migrate_del_blocker(reason);
    error_free(reason);
    // Then the URI, in QEMU's words for a name not registered.
    for (uri, want) in [
        ("fd:nope", "File descriptor named 'nope' has not been found"),
        ("tcp:127.0.0.1", "invalid migration uri 'tcp:127.0.0.1': expected tcp:HOST:PORT"),
    ] {
        assert_eq!(migrate(uri), want);
        assert_eq!(query(), (MigrationStatus::Cancelled, None), "{uri}: the last migration's state stays");
        assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
    }
}
