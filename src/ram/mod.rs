//! Guest RAM: blocks, dirty tracking, the built-in "ram" section.

use std::sync::atomic::{AtomicU64, Ordering};

static DIRTY_BYTES_RATE: AtomicU64 = AtomicU64::new(0);

/// The measured dirty rate of guest RAM, in bytes per second.
pub fn dirty_bytes_rate() -> u64 {
    DIRTY_BYTES_RATE.load(Ordering::Relaxed)
}

use crate::ffi::types::{MigrationStats, XBZRLECacheStats};
use crate::outgoing::OutStats;

/// The RAM and XBZRLE figures for query-migrate.
pub fn query_stats(out: &OutStats) -> (MigrationStats, Option<XBZRLECacheStats>) {
    let s = MigrationStats {
        transferred: out.transferred as i64,
        remaining: out.remaining as i64,
        mbps: out.mbps,
        page_size: crate::params::TARGET_PAGE_SIZE as i64,
        downtime_bytes: out.downtime_bytes as i64,
        precopy_bytes: out.transferred.saturating_sub(out.downtime_bytes) as i64,
        ..Default::default()
    };
    (s, None)
}

/// The XBZRLE cache size parameter changed.
pub fn cache_resized() {}
