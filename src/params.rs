//! Capabilities and parameters: speed, downtime limit, XBZRLE cache size.
//!
//! Defaults are QEMU 7.2's: max-bandwidth 128 MiB/s, downtime-limit 300 ms,
//! xbzrle-cache-size 64 MiB. Every setter checks its value first and changes
//! nothing when it refuses one.

use parking_lot::Mutex;

use crate::error::{MigError, Result};

/// Migration capabilities, numbered as QEMU 7.2's QAPI `MigrationCapability`.
/// livemig implements `xbzrle` and `return-path`; the others can be queried and switched off,
/// and switching one on is refused with an error naming it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationCapability {
    /// XBZRLE delta compression of re-sent pages.
    Xbzrle = 0,
    /// Not supported.
    RdmaPinAll = 1,
    /// Not supported.
    AutoConverge = 2,
    /// Not supported.
    ZeroBlocks = 3,
    /// Not supported.
    Compress = 4,
    /// Not supported.
    Events = 5,
    /// Not supported.
    PostcopyRam = 6,
    /// Not supported.
    XColo = 7,
    /// Not supported.
    ReleaseRam = 8,
    /// Not supported.
    Block = 9,
    /// The destination confirms the load on the same socket before the
    /// source completes (QEMU's return path; tcp, unix and socket fds).
    /// The source's setting decides: it asks the destination to answer,
    /// whatever the destination's own setting, as in QEMU. A source that
    /// gets no answer within the io timeout ends FAILED with its VM
    /// stopped (postmigrate): the destination may be running it. Over
    /// another channel (`exec:`, a pipe or file fd) `qmp_migrate` accepts
    /// the URI and the migration then fails in setup ("capability
    /// 'return-path' needs a socket …"), the VM running on.
    ReturnPath = 10,
    /// Not supported.
    PauseBeforeSwitchover = 11,
    /// Not supported.
    Multifd = 12,
    /// Not supported.
    DirtyBitmaps = 13,
    /// Not supported.
    PostcopyBlocktime = 14,
    /// Not supported.
    LateBlockActivate = 15,
    /// Not supported.
    XIgnoreShared = 16,
    /// Not supported.
    ValidateUuid = 17,
    /// Not supported.
    BackgroundSnapshot = 18,
    /// Not supported.
    ZeroCopySend = 19,
    /// Not supported.
    PostcopyPreempt = 20,
}

/// Number of capabilities.
pub const CAPABILITY_COUNT: usize = 21;

const CAP_NAMES: [&str; CAPABILITY_COUNT] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

impl MigrationCapability {
    /// Every capability, in QAPI order.
    pub fn all() -> [MigrationCapability; CAPABILITY_COUNT] {
        use MigrationCapability::*;
        [
            Xbzrle,
            RdmaPinAll,
            AutoConverge,
            ZeroBlocks,
            Compress,
            Events,
            PostcopyRam,
            XColo,
            ReleaseRam,
            Block,
            ReturnPath,
            PauseBeforeSwitchover,
            Multifd,
            DirtyBitmaps,
            PostcopyBlocktime,
            LateBlockActivate,
            XIgnoreShared,
            ValidateUuid,
            BackgroundSnapshot,
            ZeroCopySend,
            PostcopyPreempt,
        ]
    }

    /// From the numeric value (as received from C).
    pub fn from_u32(v: u32) -> Option<MigrationCapability> {
        Self::all().get(v as usize).copied()
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        CAP_NAMES[self as usize]
    }

    /// True for the capabilities livemig implements.
    pub fn supported(self) -> bool {
        matches!(self, MigrationCapability::Xbzrle | MigrationCapability::ReturnPath)
    }
}

/// Page size of the stream (x86: 4 KiB).
pub const TARGET_PAGE_SIZE: u64 = 4096;
/// Largest downtime limit, as QEMU 7.2: 2000 s.
pub const MAX_DOWNTIME_NS: u64 = 2_000_000 * 1_000_000;

/// The current parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Bandwidth limit in bytes per second; 0 means unlimited.
    pub speed: u64,
    /// Downtime limit in nanoseconds.
    pub downtime_ns: u64,
    /// XBZRLE cache size in bytes.
    pub xbzrle_cache_size: u64,
    /// Capability states, indexed by `MigrationCapability as usize`.
    pub caps: [bool; CAPABILITY_COUNT],
}

impl Params {
    const DEFAULT: Params =
        Params { speed: 128 << 20, downtime_ns: 300_000_000, xbzrle_cache_size: 64 << 20, caps: [false; CAPABILITY_COUNT] };

    /// Whether `cap` is on.
    pub fn cap(&self, cap: MigrationCapability) -> bool {
        self.caps[cap as usize]
    }
}

static PARAMS: Mutex<Params> = Mutex::new(Params::DEFAULT);

/// A copy of the current parameters.
pub fn get() -> Params {
    *PARAMS.lock()
}

/// Sets the bandwidth limit (bytes/s; 0 lifts it).
pub fn set_speed(value: i64) -> Result<()> {
    if value < 0 {
        return Err(MigError::new(format!("Parameter 'speed' expects a value from 0 to {} bytes/second, got {value}", i64::MAX)));
    }
    set_speed_bytes(value as u64);
    Ok(())
}

/// Sets the bandwidth limit in bytes/s (0 lifts it), as QEMU 7.2's
/// max-bandwidth parameter takes it: any 64-bit value.
pub fn set_speed_bytes(value: u64) {
    PARAMS.lock().speed = value;
    // A migration in progress takes it up at once, as in QEMU.
    crate::outgoing::speed_changed();
}

/// QEMU 7.2's refusal of a downtime-limit parameter out of range.
pub const DOWNTIME_LIMIT_RANGE: &str = "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms";

/// Sets the downtime limit in whole milliseconds, as QEMU 7.2's
/// downtime-limit parameter takes it (0 to 2,000,000).
pub fn set_downtime_ms(ms: u64) -> Result<()> {
    if ms > MAX_DOWNTIME_NS / 1_000_000 {
        return Err(MigError::new(DOWNTIME_LIMIT_RANGE));
    }
    PARAMS.lock().downtime_ns = ms * 1_000_000;
    Ok(())
}

/// Sets the downtime limit in seconds, kept in whole milliseconds
/// (truncated), as QEMU 7.2's `downtime_limit` parameter keeps it.
pub fn set_downtime(seconds: f64) -> Result<()> {
    let max_s = (MAX_DOWNTIME_NS / 1_000_000_000) as f64;
    if !seconds.is_finite() || !(0.0..=max_s).contains(&seconds) {
        // QEMU 7.2's text (qmp_migrate_set_downtime), then the value.
        return Err(MigError::new(format!(
            "Parameter 'downtime_limit' expects an integer in the range of 0 to {max_s} seconds, got {seconds}"
        )));
    }
    // As QEMU 7.2 (qmp_migrate_set_downtime): `value *= 1000`, then
    // converted to an integer number of milliseconds.
    PARAMS.lock().downtime_ns = (seconds * 1000.0) as u64 * 1_000_000;
    Ok(())
}

/// Sets the XBZRLE cache size in bytes: a power of two, at least one page
/// (as QEMU 7.2 requires; the size reported is then the cache's own).
pub fn set_cache_size(value: i64) -> Result<()> {
    PARAMS.lock().xbzrle_cache_size = check_cache_size(value)?;
    Ok(())
}

/// Checks an XBZRLE cache size for [`set_cache_size`]; the size in bytes.
pub fn check_cache_size(value: i64) -> Result<u64> {
    if value < TARGET_PAGE_SIZE as i64 || !(value as u64).is_power_of_two() {
        return Err(MigError::new(format!(
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size ({TARGET_PAGE_SIZE}), got {value}"
        )));
    }
    if usize::try_from(value).is_err() {
        return Err(MigError::new(format!("Parameter 'xbzrle_cache_size': {value} exceeds the address space")));
    }
    Ok(value as u64)
}

/// Applies a list of capability changes, all or none.
pub fn set_capabilities(list: &[(MigrationCapability, bool)]) -> Result<()> {
    // Checked under the lock: a migration reads the capabilities after its
    // state left idle, so a change either lands before that or is refused.
    // Only the source's state counts, as in QEMU: a destination reads none.
    // First, as QEMU 7.2 checks it before the capabilities themselves.
    let mut p = PARAMS.lock();
    if crate::state::OUTGOING.status().is_active() {
        return Err(MigError::new("There's a migration process in progress"));
    }
    for &(cap, on) in list {
        if on && !cap.supported() {
            return Err(MigError::new(format!("capability '{}' is not supported by livemig", cap.name())));
        }
    }
    for &(cap, on) in list {
        p.caps[cap as usize] = on;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn reset_for_tests() {
    *PARAMS.lock() = Params::DEFAULT;
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test drives the global so parallel tests don't interleave on it.
    #[test]
    fn setters_refuse_bad_values_and_change_nothing() {
        reset_for_tests();
        assert!(set_speed(-1).unwrap_err().to_string().contains("got -1"));
        assert!(set_downtime(f64::NAN).unwrap_err().to_string().contains("got NaN"));
        assert!(set_downtime(-0.5).is_err());
        assert!(set_downtime(f64::INFINITY).is_err());
        assert!(set_downtime(2000.5).is_err());
        assert!(set_cache_size(4095).unwrap_err().to_string().contains("got 4095"));
        let e = set_cache_size(5 << 20).unwrap_err().to_string();
        assert_eq!(e, "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size (4096), got 5242880");
        assert!(set_cache_size(-1).is_err());
        let e = set_capabilities(&[(MigrationCapability::Xbzrle, true), (MigrationCapability::Compress, true)]).unwrap_err();
        assert_eq!(e.to_string(), "capability 'compress' is not supported by livemig");
        let p = get();
        assert_eq!((p.speed, p.downtime_ns, p.xbzrle_cache_size), (128 << 20, 300_000_000, 64 << 20));
        assert!(!p.cap(MigrationCapability::Xbzrle), "a refused list applies nothing");

        set_speed(0).unwrap();
        set_downtime(0.05).unwrap();
        set_cache_size(1 << 20).unwrap();
        set_capabilities(&[(MigrationCapability::Xbzrle, true), (MigrationCapability::Compress, false)]).unwrap();
        let p = get();
        assert_eq!((p.speed, p.downtime_ns, p.xbzrle_cache_size), (0, 50_000_000, 1 << 20));
        assert!(p.cap(MigrationCapability::Xbzrle));
        reset_for_tests();
    }

    #[test]
    fn capability_names_and_numbers() {
        assert_eq!(MigrationCapability::all().len(), CAPABILITY_COUNT);
        for (i, c) in MigrationCapability::all().iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(MigrationCapability::from_u32(i as u32), Some(*c));
        }
        assert_eq!(MigrationCapability::from_u32(21), None);
        assert_eq!(MigrationCapability::XIgnoreShared.name(), "x-ignore-shared");
        assert_eq!(MigrationCapability::PostcopyPreempt.name(), "postcopy-preempt");
    }
}
