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
    outgoing::cancel();
    let end = wait_final(false, 10);
    livemig::params::set_speed(0).unwrap();
    assert_eq!(status, MigrationStatus::Active, "still migrating after 1 s at 5 bytes/s ({sent} bytes sent)");
    assert_eq!(end, MigrationStatus::Cancelled);
    // About a page per window, and the setup sections.
    assert!(sent > 0 && sent < 100_000, "{sent} bytes sent in 1 s at 5 bytes/s");
}
