//! The speed limit at its low end: a limit of a few bytes per second is a
//! limit (one page per 100 ms window, as in QEMU), never "unlimited" by
//! rounding; each window's bytes go out in that window. Before a rate is
//! measured, the expected downtime is the
//! downtime limit (as QEMU 7.2).

mod common;

use std::time::{Duration, Instant};

use common::*;
use livemig::outgoing::{self, Target};
use livemig::state::{MigrationStatus, OUTGOING};
use livemig::transport::Uri;

/// Starts a migration of the RAM at a page per window (40 kB/s) to a
/// socket; returns its reader: the bytes one read got within `timeout`
/// (0 if none). Dropping the reader closes the socket.
fn paced_migration() -> impl FnMut(Duration) -> usize {
    use std::io::Read;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    livemig::params::set_speed(40_000).unwrap();
    let (mut rx, theirs) = UnixStream::pair().unwrap();
    let uri = format!("fd:{}", theirs.into_raw_fd());
    outgoing::start(Target::Uri(Uri::parse(&uri).unwrap(), uri.clone())).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    move |timeout: Duration| -> usize {
        rx.set_read_timeout(Some(timeout)).unwrap();
        match rx.read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => 0,
            Err(e) => panic!("reading the stream: {e}"),
        }
    }
}

#[test]
fn a_tiny_speed_limit_still_limits() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(5).unwrap();
    let uri = "exec:cat > /dev/null";
    outgoing::start(Target::Uri(Uri::parse(uri).unwrap(), uri.to_string())).unwrap();
    // Ten windows: unlimited, the 64 MiB would be gone in well under that.
    let t0 = Instant::now();
    wait_until(10, "one second of migrating", || t0.elapsed() >= Duration::from_secs(1));
    let status = OUTGOING.status();
    let sent = outgoing::stats().transferred;
    let windows = (t0.elapsed().as_millis() / 100) as u64;
    outgoing::cancel();
    let end = wait_final(false, 10);
    livemig::params::set_speed(0).unwrap();
    assert_eq!(status, MigrationStatus::Active, "still migrating after 1 s at 5 bytes/s ({sent} bytes sent)");
    assert_eq!(end, MigrationStatus::Cancelled);
    // About a page (and its header) per window, and the setup sections:
    // bounded by the time that really passed, however late this thread ran.
    let most = (windows + 3) * 4200 + 20_000;
    assert!(sent > 0 && sent <= most, "{sent} bytes sent in {windows} windows at 5 bytes/s (at most {most} expected)");
}

/// A raised limit applies to the window the migration is in: a thread
/// waiting out its spent window wakes and sends at once, instead of at the
/// window's end (up to 100 ms later).
#[test]
fn a_raised_speed_limit_applies_at_once() {
    let (_g, ram) = host();
    ram.fill_pattern();
    let mut read_for = paced_migration();
    // Wait for a window's page to arrive after a quiet spell of at least
    // half a window: the migration thread has just spent a window and
    // sleeps until its end.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no paced page arrived after a quiet spell");
        if read_for(Duration::from_millis(50)) == 0 && read_for(Duration::from_millis(200)) > 0 {
            break;
        }
    }
    let t0 = Instant::now();
    livemig::params::set_speed(0).unwrap();
    // 8 MiB more: at a page per window that would take 200 s.
    let mut got = 0;
    while got < 8 << 20 && t0.elapsed() < Duration::from_secs(10) {
        got += read_for(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    outgoing::cancel();
    drop(read_for);
    let end = wait_final(false, 10);
    assert!(matches!(end, MigrationStatus::Cancelled | MigrationStatus::Failed), "{end:?}");
    assert!(got >= 8 << 20, "only {got} bytes within 10 s of lifting the limit");
    // The old behaviour waited out the window: about 100 ms here.
    assert!(took < Duration::from_millis(60), "8 MiB took {took:?} after lifting the limit");
}

/// query-migrate's expected-downtime is the downtime limit until the
/// migration has measured the link (QEMU 7.2's migrate_fd_connect), not
/// 0, which would read as "no downtime".
#[test]
fn the_expected_downtime_is_the_limit_until_measured() {
    let (_g, ram) = host();
    ram.fill_pattern();
    livemig::params::set_speed(0).unwrap();
    livemig::params::set_downtime(0.25).unwrap();
    // A destination that never reads: the first window never ends.
    let uri = "exec:sleep 5";
    outgoing::start(Target::Uri(Uri::parse(uri).unwrap(), uri.to_string())).unwrap();
    wait_until(10, "ACTIVE", || OUTGOING.status() == MigrationStatus::Active);
    let mut err = std::ptr::null_mut();
    let i = livemig::ffi::migration::qmp_query_migrate(&mut err);
    assert!(!i.is_null());
    // SAFETY: a MigrationInfo from livemig, freed right after.
    let (status, has, expected) = unsafe { ((*i).status, (*i).has_expected_downtime, (*i).expected_downtime) };
    livemig::ffi::migration::qapi_free_MigrationInfo(i);
    outgoing::cancel();
    let end = wait_final(false, 10);
    livemig::params::set_downtime(0.3).unwrap();
    assert_eq!(end, MigrationStatus::Cancelled);
    assert_eq!((status, has, expected), (MigrationStatus::Active, true, 250), "query-migrate before the first window");
}

/// Under a speed limit each window's page goes out in its window, not
/// once the stream's buffer is full (64 pages: 6.4 s at a page per
/// window), as QEMU's RAM iterate flushes at its end.
#[test]
fn a_limited_stream_goes_out_window_by_window() {
    let (_g, ram) = host();
    ram.fill_pattern();
    let mut read_for = paced_migration();
    let (t0, mut got) = (Instant::now(), 0);
    while t0.elapsed() < Duration::from_millis(1500) {
        got += read_for(Duration::from_millis(50));
    }
    let sent = outgoing::stats().transferred;
    outgoing::cancel();
    drop(read_for);
    let end = wait_final(false, 10);
    livemig::params::set_speed(0).unwrap();
    assert!(matches!(end, MigrationStatus::Cancelled | MigrationStatus::Failed), "{end:?}");
    // About 15 windows' pages (60 KB); 5 pages at the least.
    assert!(got >= 5 * 4096, "{got} bytes arrived in 1.5 s at 40 kB/s ({sent} counted as sent)");
}
