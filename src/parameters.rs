//! QEMU 7.2's migration parameters, as `migrate-set-parameters` and
//! `query-migrate-parameters` set and read them.
//!
//! Three of them act, and are the values the classic setters change:
//! max-bandwidth is the speed limit, downtime-limit the downtime limit (in
//! ms), xbzrle-cache-size the XBZRLE cache size ([`crate::params`]). Each
//! takes effect as its classic setter's does, during a migration too.
//!
//! The others belong to features whose capabilities livemig refuses to
//! switch on (compression, auto-converge, multifd, COLO, block migration,
//! postcopy) or to the host (self-announcement after a migration). They
//! are checked as QEMU 7.2 checks them, kept, and reported, so that a host
//! written against 7.2 sets and reads them as it did; they change nothing.
//!
//! Two are refused rather than kept: TLS (`tls-creds`, `tls-hostname` and
//! `tls-authz` take only "" or null: a migration told to use TLS must not
//! go out in clear text) and `block-bitmap-mapping` (livemig moves no
//! block devices).
//!
//! A set is all or nothing: every value is checked, on the parameters as
//! they would be after it, before any is applied.

use parking_lot::Mutex;

use crate::error::{MigError, Result};
use crate::params;

/// `multifd-compression`'s values (QEMU 7.2's `MultiFDCompression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultifdCompression {
    /// No compression.
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
}

/// The parameters that change nothing here, with QEMU 7.2's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub announce_initial: u64,
    pub announce_max: u64,
    pub announce_rounds: u64,
    pub announce_step: u64,
    pub compress_level: u8,
    pub compress_threads: u8,
    pub compress_wait_thread: bool,
    pub decompress_threads: u8,
    pub throttle_trigger_threshold: u8,
    pub cpu_throttle_initial: u8,
    pub cpu_throttle_increment: u8,
    pub cpu_throttle_tailslow: bool,
    pub x_checkpoint_delay: u32,
    pub block_incremental: bool,
    pub multifd_channels: u8,
    pub max_postcopy_bandwidth: u64,
    pub max_cpu_throttle: u8,
    pub multifd_compression: MultifdCompression,
    pub multifd_zlib_level: u8,
    pub multifd_zstd_level: u8,
}

impl Kept {
    const DEFAULT: Kept = Kept {
        announce_initial: 50,
        announce_max: 550,
        announce_rounds: 5,
        announce_step: 100,
        compress_level: 1,
        compress_threads: 8,
        compress_wait_thread: true,
        decompress_threads: 2,
        throttle_trigger_threshold: 50,
        cpu_throttle_initial: 20,
        cpu_throttle_increment: 10,
        cpu_throttle_tailslow: false,
        x_checkpoint_delay: 20_000,
        block_incremental: false,
        multifd_channels: 2,
        max_postcopy_bandwidth: 0,
        max_cpu_throttle: 99,
        multifd_compression: MultifdCompression::None,
        multifd_zlib_level: 1,
        multifd_zstd_level: 1,
    };
}

static KEPT: Mutex<Kept> = Mutex::new(Kept::DEFAULT);

/// Every parameter, as `query-migrate-parameters` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Bytes per second (0: unlimited).
    pub max_bandwidth: u64,
    /// Milliseconds.
    pub downtime_limit: u64,
    /// Bytes.
    pub xbzrle_cache_size: u64,
    /// The rest.
    pub kept: Kept,
}

/// The parameters now.
pub fn get() -> Parameters {
    let p = params::get();
    Parameters {
        max_bandwidth: p.speed,
        downtime_limit: p.downtime_ns / 1_000_000,
        xbzrle_cache_size: p.xbzrle_cache_size,
        kept: *KEPT.lock(),
    }
}

/// One `migrate-set-parameters`: `None` leaves a parameter as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub announce_initial: Option<u64>,
    pub announce_max: Option<u64>,
    pub announce_rounds: Option<u64>,
    pub announce_step: Option<u64>,
    pub compress_level: Option<u8>,
    pub compress_threads: Option<u8>,
    pub compress_wait_thread: Option<bool>,
    pub decompress_threads: Option<u8>,
    pub throttle_trigger_threshold: Option<u8>,
    pub cpu_throttle_initial: Option<u8>,
    pub cpu_throttle_increment: Option<u8>,
    pub cpu_throttle_tailslow: Option<bool>,
    /// TLS credentials, host name, authorization: `Some("")` is accepted
    /// (no TLS), anything else refused.
    pub tls: [Option<String>; 3],
    pub max_bandwidth: Option<u64>,
    pub downtime_limit: Option<u64>,
    pub x_checkpoint_delay: Option<u32>,
    pub block_incremental: Option<bool>,
    pub multifd_channels: Option<u8>,
    pub xbzrle_cache_size: Option<u64>,
    pub max_postcopy_bandwidth: Option<u64>,
    pub max_cpu_throttle: Option<u8>,
    pub multifd_compression: Option<MultifdCompression>,
    pub multifd_zlib_level: Option<u8>,
    pub multifd_zstd_level: Option<u8>,
    /// Set at all: refused.
    pub block_bitmap_mapping: bool,
}

/// QEMU's names of the TLS parameters, in `Changes::tls` order.
const TLS_NAMES: [&str; 3] = ["tls-creds", "tls-hostname", "tls-authz"];

/// Applies `c`, all or nothing.
pub fn set(c: &Changes) -> Result<()> {
    // One set at a time: the check and the apply see the same values.
    let mut kept = KEPT.lock();
    let mut k = *kept;
    macro_rules! merge {
        ($($f:ident),*) => { $( if let Some(v) = c.$f { k.$f = v; } )* };
    }
    merge!(
        announce_initial,
        announce_max,
        announce_rounds,
        announce_step,
        compress_level,
        compress_threads,
        compress_wait_thread,
        decompress_threads,
        throttle_trigger_threshold,
        cpu_throttle_initial,
        cpu_throttle_increment,
        cpu_throttle_tailslow,
        x_checkpoint_delay,
        block_incremental,
        multifd_channels,
        max_postcopy_bandwidth,
        max_cpu_throttle,
        multifd_compression,
        multifd_zlib_level,
        multifd_zstd_level
    );
    check(&k, c)?;
    for (v, name) in c.tls.iter().zip(TLS_NAMES) {
        if v.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(MigError::new(format!(
                "Parameter '{name}': TLS is not supported by livemig (only \"\" or null, no TLS, is accepted)"
            )));
        }
    }
    if c.block_bitmap_mapping {
        return Err(MigError::new("Parameter 'block-bitmap-mapping' is not supported by livemig: it migrates no block devices"));
    }
    // The one step that can still fail (a running migration's new cache
    // is allocated here) goes first; nothing is applied before it.
    if let Some(size) = c.xbzrle_cache_size {
        crate::ram::set_xbzrle_cache_size(size as i64)?;
    }
    if let Some(bw) = c.max_bandwidth {
        params::set_speed_bytes(bw);
    }
    if let Some(ms) = c.downtime_limit {
        params::set_downtime_ms(ms)?;
    }
    *kept = k;
    Ok(())
}

/// QEMU 7.2's `migrate_params_check`, in its order and with its texts, on
/// the parameters as `c` would leave them (`k`: the kept ones merged).
fn check(k: &Kept, c: &Changes) -> Result<()> {
    let range = |ok: bool, text: &str| if ok { Ok(()) } else { Err(MigError::new(text.to_string())) };
    if c.compress_level.is_some() {
        range(k.compress_level <= 9, "Parameter 'compress_level' expects a value between 0 and 9")?;
    }
    if c.compress_threads.is_some() {
        range(k.compress_threads >= 1, "Parameter 'compress_threads' expects a value between 1 and 255")?;
    }
    if c.decompress_threads.is_some() {
        range(k.decompress_threads >= 1, "Parameter 'decompress_threads' expects a value between 1 and 255")?;
    }
    if c.throttle_trigger_threshold.is_some() {
        range(
            (1..=100).contains(&k.throttle_trigger_threshold),
            "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
        )?;
    }
    if c.cpu_throttle_initial.is_some() {
        range((1..=99).contains(&k.cpu_throttle_initial), "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99")?;
    }
    if c.cpu_throttle_increment.is_some() {
        range(
            (1..=99).contains(&k.cpu_throttle_increment),
            "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
        )?;
    }
    if let Some(ms) = c.downtime_limit {
        range(ms <= params::MAX_DOWNTIME_NS / 1_000_000, params::DOWNTIME_LIMIT_RANGE)?;
    }
    if c.multifd_channels.is_some() {
        range(k.multifd_channels >= 1, "Parameter 'multifd_channels' expects a value between 1 and 255")?;
    }
    if c.multifd_zlib_level.is_some() {
        range(k.multifd_zlib_level <= 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9")?;
    }
    if c.multifd_zstd_level.is_some() {
        range(k.multifd_zstd_level <= 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20")?;
    }
    if let Some(size) = c.xbzrle_cache_size {
        // (What `qmp_migrate_set_cache_size` takes, with 7.2's shorter
        // text here, as its set-parameters gives it.)
        range(
            i64::try_from(size).is_ok_and(|v| params::check_cache_size(v).is_ok()),
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        )?;
    }
    if c.max_cpu_throttle.is_some() {
        range(
            k.max_cpu_throttle >= k.cpu_throttle_initial && k.max_cpu_throttle <= 99,
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
        )?;
    }
    if c.announce_initial.is_some() {
        range(k.announce_initial <= 100_000, "Parameter 'announce_initial' expects a value between 0 and 100000")?;
    }
    if c.announce_max.is_some() {
        range(k.announce_max <= 100_000, "Parameter 'announce_max' expects a value between 0 and 100000")?;
    }
    if c.announce_rounds.is_some() {
        range(k.announce_rounds <= 1000, "Parameter 'announce_rounds' expects a value between 0 and 1000")?;
    }
    if c.announce_step.is_some() {
        range((1..=10_000).contains(&k.announce_step), "Parameter 'announce_step' expects a value between 0 and 10000")?;
    }
    Ok(())
}
