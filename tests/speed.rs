//! The speed limit at its low end: a limit of a few bytes per second is a
//! limit (one page per 100 ms window, as in QEMU), never "unlimited" by
//! rounding.

mod common;

use std::time::{Duration, Instant};

use common::*;
use livemig::outgoing::{self, Target};
use livemig::state::{MigrationStatus, OUTGOING};
use livemig::transport::Uri;

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
