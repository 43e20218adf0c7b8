//! QEMU 7.2's `qmp_migrate_set_parameters` and
//! `qmp_query_migrate_parameters`, with the QAPI types they take and give
//! laid out as 7.2's generated C has them (each optional member a
//! `has_X` flag, then `X`), so code written against 7.2 compiles as it is.
//! What each parameter does here is in `crate::parameters`.

use std::ffi::{c_char, CString};
use std::ptr::{addr_of, null_mut};

use super::errors::Error;
use super::{cstr, guard, guard_err};
use crate::error::{MigError, Result};
use crate::parameters::{self, Changes, MultifdCompression};

/// QAPI's `QType`: what a `StrOrNull` holds.
/// cbindgen:prefix-with-name=false
#[repr(C)]
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    QtypeNone = 0,
    QtypeQnull = 1,
    QtypeQnum = 2,
    QtypeQstring = 3,
    QtypeQdict = 4,
    QtypeQlist = 5,
    QtypeQbool = 6,
}

/// QAPI's JSON null (opaque: only its address is used).
pub struct QNull {
    _private: [u8; 0],
}

/// A string or JSON null, as the TLS parameters are set.
#[repr(C)]
pub struct StrOrNull {
    /// `QTYPE_QSTRING` (then `u.s`) or `QTYPE_QNULL`.
    pub r#type: QType,
    /// The value.
    pub u: StrOrNullValue,
}

/// The value of a `StrOrNull`.
#[repr(C)]
pub union StrOrNullValue {
    /// A string (`QTYPE_QSTRING`).
    pub s: *mut c_char,
    /// Null (`QTYPE_QNULL`).
    pub n: *mut QNull,
}

/// QEMU's list of block bitmap aliases (opaque: livemig takes none).
pub struct BitmapMigrationNodeAliasList {
    _private: [u8; 0],
}

/// `multifd-compression`'s values.
/// cbindgen:prefix-with-name=false
#[repr(C)]
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiFDCompression {
    MultifdCompressionNone = 0,
    MultifdCompressionZlib = 1,
    MultifdCompressionZstd = 2,
}

/// The argument of `qmp_migrate_set_parameters`: a member is set when its
/// `has_` flag is. Zero-initialise it and set the members wanted.
#[repr(C)]
pub struct MigrateSetParameters {
    pub has_announce_initial: bool,
    pub announce_initial: u64,
    pub has_announce_max: bool,
    pub announce_max: u64,
    pub has_announce_rounds: bool,
    pub announce_rounds: u64,
    pub has_announce_step: bool,
    pub announce_step: u64,
    pub has_compress_level: bool,
    pub compress_level: u8,
    pub has_compress_threads: bool,
    pub compress_threads: u8,
    pub has_compress_wait_thread: bool,
    pub compress_wait_thread: bool,
    pub has_decompress_threads: bool,
    pub decompress_threads: u8,
    pub has_throttle_trigger_threshold: bool,
    pub throttle_trigger_threshold: u8,
    pub has_cpu_throttle_initial: bool,
    pub cpu_throttle_initial: u8,
    pub has_cpu_throttle_increment: bool,
    pub cpu_throttle_increment: u8,
    pub has_cpu_throttle_tailslow: bool,
    pub cpu_throttle_tailslow: bool,
    /// Only "" or null (no TLS) is accepted.
    pub has_tls_creds: bool,
    pub tls_creds: *mut StrOrNull,
    /// Only "" or null is accepted.
    pub has_tls_hostname: bool,
    pub tls_hostname: *mut StrOrNull,
    /// Only "" or null is accepted.
    pub has_tls_authz: bool,
    pub tls_authz: *mut StrOrNull,
    /// Bytes per second; 0: unlimited.
    pub has_max_bandwidth: bool,
    pub max_bandwidth: u64,
    /// Milliseconds, 0 to 2,000,000.
    pub has_downtime_limit: bool,
    pub downtime_limit: u64,
    pub has_x_checkpoint_delay: bool,
    pub x_checkpoint_delay: u32,
    pub has_block_incremental: bool,
    pub block_incremental: bool,
    pub has_multifd_channels: bool,
    pub multifd_channels: u8,
    /// Bytes: a power of two, at least a page.
    pub has_xbzrle_cache_size: bool,
    pub xbzrle_cache_size: u64,
    pub has_max_postcopy_bandwidth: bool,
    pub max_postcopy_bandwidth: u64,
    pub has_max_cpu_throttle: bool,
    pub max_cpu_throttle: u8,
    pub has_multifd_compression: bool,
    pub multifd_compression: MultiFDCompression,
    pub has_multifd_zlib_level: bool,
    pub multifd_zlib_level: u8,
    pub has_multifd_zstd_level: bool,
    pub multifd_zstd_level: u8,
    /// Refused when set.
    pub has_block_bitmap_mapping: bool,
    pub block_bitmap_mapping: *mut BitmapMigrationNodeAliasList,
}

/// What `qmp_query_migrate_parameters` returns (every `has_` flag set but
/// `has_block_bitmap_mapping`); free it with
/// `qapi_free_MigrationParameters`.
#[repr(C)]
pub struct MigrationParameters {
    pub has_announce_initial: bool,
    pub announce_initial: u64,
    pub has_announce_max: bool,
    pub announce_max: u64,
    pub has_announce_rounds: bool,
    pub announce_rounds: u64,
    pub has_announce_step: bool,
    pub announce_step: u64,
    pub has_compress_level: bool,
    pub compress_level: u8,
    pub has_compress_threads: bool,
    pub compress_threads: u8,
    pub has_compress_wait_thread: bool,
    pub compress_wait_thread: bool,
    pub has_decompress_threads: bool,
    pub decompress_threads: u8,
    pub has_throttle_trigger_threshold: bool,
    pub throttle_trigger_threshold: u8,
    pub has_cpu_throttle_initial: bool,
    pub cpu_throttle_initial: u8,
    pub has_cpu_throttle_increment: bool,
    pub cpu_throttle_increment: u8,
    pub has_cpu_throttle_tailslow: bool,
    pub cpu_throttle_tailslow: bool,
    /// Always "".
    pub has_tls_creds: bool,
    pub tls_creds: *mut c_char,
    /// Always "".
    pub has_tls_hostname: bool,
    pub tls_hostname: *mut c_char,
    /// Always "".
    pub has_tls_authz: bool,
    pub tls_authz: *mut c_char,
    pub has_max_bandwidth: bool,
    pub max_bandwidth: u64,
    pub has_downtime_limit: bool,
    pub downtime_limit: u64,
    pub has_x_checkpoint_delay: bool,
    pub x_checkpoint_delay: u32,
    pub has_block_incremental: bool,
    pub block_incremental: bool,
    pub has_multifd_channels: bool,
    pub multifd_channels: u8,
    pub has_xbzrle_cache_size: bool,
    pub xbzrle_cache_size: u64,
    pub has_max_postcopy_bandwidth: bool,
    pub max_postcopy_bandwidth: u64,
    pub has_max_cpu_throttle: bool,
    pub max_cpu_throttle: u8,
    pub has_multifd_compression: bool,
    pub multifd_compression: MultiFDCompression,
    pub has_multifd_zlib_level: bool,
    pub multifd_zlib_level: u8,
    pub has_multifd_zstd_level: bool,
    pub multifd_zstd_level: u8,
    /// Always false.
    pub has_block_bitmap_mapping: bool,
    /// Always NULL.
    pub block_bitmap_mapping: *mut BitmapMigrationNodeAliasList,
}

/// A C `bool` read as a byte: C may store any value in one, which a Rust
/// `bool` must not hold.
///
/// # Safety
/// `p` must be valid for a one-byte read.
unsafe fn flag(p: *const bool) -> bool {
    // SAFETY: the caller's guarantee; any byte is a valid u8.
    unsafe { p.cast::<u8>().read() != 0 }
}

/// A TLS member: its string ("" for null), or the error.
///
/// # Safety
/// `p` must be NULL or point to a `StrOrNull` whose string, if it holds
/// one, is NUL-terminated.
unsafe fn tls_value(p: *const StrOrNull, name: &str) -> Result<String> {
    if p.is_null() {
        return Err(MigError::new(format!("Parameter '{name}': set with a NULL value")));
    }
    // SAFETY: non-NULL, the caller's guarantee; the tag read as an integer
    // (C may hold any value there).
    let tag = unsafe { addr_of!((*p).r#type).cast::<u32>().read() };
    match tag {
        t if t == QType::QtypeQnull as u32 => Ok(String::new()),
        // SAFETY: the tag says the union holds the string pointer.
        t if t == QType::QtypeQstring as u32 => Ok(cstr(unsafe { (*p).u.s }, name)?.to_string()),
        t => Err(MigError::new(format!("Parameter '{name}': expects a string or null (QType {t})"))),
    }
}

/// Reads the host's `MigrateSetParameters`.
///
/// # Safety
/// `p` must point to a live `MigrateSetParameters`; its set TLS members
/// as [`tls_value`] requires.
unsafe fn changes(p: *const MigrateSetParameters) -> Result<Changes> {
    macro_rules! int {
        ($has:ident, $f:ident) => {
            // SAFETY: `p` points to a live struct (the caller's guarantee);
            // the flag is read as a byte, the integer as it is (any bit
            // pattern is valid), both through raw pointers.
            unsafe { flag(addr_of!((*p).$has)).then(|| addr_of!((*p).$f).read()) }
        };
    }
    macro_rules! boolean {
        ($has:ident, $f:ident) => {
            // SAFETY: as in `int!`; the bool is read as a byte too.
            unsafe { flag(addr_of!((*p).$has)).then(|| flag(addr_of!((*p).$f))) }
        };
    }
    let mut c = Changes {
        announce_initial: int!(has_announce_initial, announce_initial),
        announce_max: int!(has_announce_max, announce_max),
        announce_rounds: int!(has_announce_rounds, announce_rounds),
        announce_step: int!(has_announce_step, announce_step),
        compress_level: int!(has_compress_level, compress_level),
        compress_threads: int!(has_compress_threads, compress_threads),
        compress_wait_thread: boolean!(has_compress_wait_thread, compress_wait_thread),
        decompress_threads: int!(has_decompress_threads, decompress_threads),
        throttle_trigger_threshold: int!(has_throttle_trigger_threshold, throttle_trigger_threshold),
        cpu_throttle_initial: int!(has_cpu_throttle_initial, cpu_throttle_initial),
        cpu_throttle_increment: int!(has_cpu_throttle_increment, cpu_throttle_increment),
        cpu_throttle_tailslow: boolean!(has_cpu_throttle_tailslow, cpu_throttle_tailslow),
        max_bandwidth: int!(has_max_bandwidth, max_bandwidth),
        downtime_limit: int!(has_downtime_limit, downtime_limit),
        x_checkpoint_delay: int!(has_x_checkpoint_delay, x_checkpoint_delay),
        block_incremental: boolean!(has_block_incremental, block_incremental),
        multifd_channels: int!(has_multifd_channels, multifd_channels),
        xbzrle_cache_size: int!(has_xbzrle_cache_size, xbzrle_cache_size),
        max_postcopy_bandwidth: int!(has_max_postcopy_bandwidth, max_postcopy_bandwidth),
        max_cpu_throttle: int!(has_max_cpu_throttle, max_cpu_throttle),
        multifd_zlib_level: int!(has_multifd_zlib_level, multifd_zlib_level),
        multifd_zstd_level: int!(has_multifd_zstd_level, multifd_zstd_level),
        ..Changes::default()
    };
    // SAFETY: as in the macros.
    if unsafe { flag(addr_of!((*p).has_multifd_compression)) } {
        // SAFETY: as in the macros; the enum is read as the integer C
        // stored (a C enum is an int), not as the Rust enum.
        let raw = unsafe { addr_of!((*p).multifd_compression).cast::<u32>().read() };
        c.multifd_compression = Some(match raw {
            0 => MultifdCompression::None,
            1 => MultifdCompression::Zlib,
            2 => MultifdCompression::Zstd,
            v => return Err(MigError::new(format!("Parameter 'multifd-compression' does not accept value {v}"))),
        });
    }
    // SAFETY: as in the macros; the pointers are the caller's to keep valid.
    let tls = unsafe {
        [
            (flag(addr_of!((*p).has_tls_creds)), (*p).tls_creds, "tls-creds"),
            (flag(addr_of!((*p).has_tls_hostname)), (*p).tls_hostname, "tls-hostname"),
            (flag(addr_of!((*p).has_tls_authz)), (*p).tls_authz, "tls-authz"),
        ]
    };
    for (i, (has, v, name)) in tls.into_iter().enumerate() {
        if has {
            // SAFETY: the caller's guarantee for set TLS members.
            c.tls[i] = Some(unsafe { tls_value(v, name)? });
        }
    }
    // SAFETY: as in the macros.
    c.block_bitmap_mapping = unsafe { flag(addr_of!((*p).has_block_bitmap_mapping)) };
    Ok(c)
}

/// Sets migration parameters, all or none (QEMU 7.2's
/// `migrate-set-parameters`). max-bandwidth, downtime-limit and
/// xbzrle-cache-size act as `qmp_migrate_set_speed`,
/// `qmp_migrate_set_downtime` and `qmp_migrate_set_cache_size` do, a
/// running migration included. The parameters of features livemig does
/// not implement are checked as QEMU 7.2 checks them, kept and reported,
/// and change nothing; TLS other than "" or null, and
/// block-bitmap-mapping, are refused.
#[no_mangle]
pub extern "C" fn qmp_migrate_set_parameters(params: *mut MigrateSetParameters, errp: *mut *mut Error) {
    guard_err("qmp_migrate_set_parameters", errp, (), || {
        if params.is_null() {
            return Err(MigError::new("params must not be NULL"));
        }
        // SAFETY: non-NULL; the caller passes a live struct (the C API
        // contract) whose set TLS members hold valid values.
        let c = unsafe { changes(params)? };
        parameters::set(&c)
    })
}

/// Every migration parameter (QEMU 7.2's `query-migrate-parameters`); free
/// with `qapi_free_MigrationParameters`. NULL only on an internal error.
#[no_mangle]
pub extern "C" fn qmp_query_migrate_parameters(errp: *mut *mut Error) -> *mut MigrationParameters {
    guard_err("qmp_query_migrate_parameters", errp, null_mut(), || {
        let p = parameters::get();
        let k = p.kept;
        let empty = || CString::default().into_raw();
        let compression = match k.multifd_compression {
            MultifdCompression::None => MultiFDCompression::MultifdCompressionNone,
            MultifdCompression::Zlib => MultiFDCompression::MultifdCompressionZlib,
            MultifdCompression::Zstd => MultiFDCompression::MultifdCompressionZstd,
        };
        Ok(Box::into_raw(Box::new(MigrationParameters {
            has_announce_initial: true,
            announce_initial: k.announce_initial,
            has_announce_max: true,
            announce_max: k.announce_max,
            has_announce_rounds: true,
            announce_rounds: k.announce_rounds,
            has_announce_step: true,
            announce_step: k.announce_step,
            has_compress_level: true,
            compress_level: k.compress_level,
            has_compress_threads: true,
            compress_threads: k.compress_threads,
            has_compress_wait_thread: true,
            compress_wait_thread: k.compress_wait_thread,
            has_decompress_threads: true,
            decompress_threads: k.decompress_threads,
            has_throttle_trigger_threshold: true,
            throttle_trigger_threshold: k.throttle_trigger_threshold,
            has_cpu_throttle_initial: true,
            cpu_throttle_initial: k.cpu_throttle_initial,
            has_cpu_throttle_increment: true,
            cpu_throttle_increment: k.cpu_throttle_increment,
            has_cpu_throttle_tailslow: true,
            cpu_throttle_tailslow: k.cpu_throttle_tailslow,
            has_tls_creds: true,
            tls_creds: empty(),
            has_tls_hostname: true,
            tls_hostname: empty(),
            has_tls_authz: true,
            tls_authz: empty(),
            has_max_bandwidth: true,
            max_bandwidth: p.max_bandwidth,
            has_downtime_limit: true,
            downtime_limit: p.downtime_limit,
            has_x_checkpoint_delay: true,
            x_checkpoint_delay: k.x_checkpoint_delay,
            has_block_incremental: true,
            block_incremental: k.block_incremental,
            has_multifd_channels: true,
            multifd_channels: k.multifd_channels,
            has_xbzrle_cache_size: true,
            xbzrle_cache_size: p.xbzrle_cache_size,
            has_max_postcopy_bandwidth: true,
            max_postcopy_bandwidth: k.max_postcopy_bandwidth,
            has_max_cpu_throttle: true,
            max_cpu_throttle: k.max_cpu_throttle,
            has_multifd_compression: true,
            multifd_compression: compression,
            has_multifd_zlib_level: true,
            multifd_zlib_level: k.multifd_zlib_level,
            has_multifd_zstd_level: true,
            multifd_zstd_level: k.multifd_zstd_level,
            has_block_bitmap_mapping: false,
            block_bitmap_mapping: null_mut(),
        })))
    })
}

/// Frees what `qmp_query_migrate_parameters` returned (NULL is ignored).
#[no_mangle]
pub extern "C" fn qapi_free_MigrationParameters(p: *mut MigrationParameters) {
    guard("qapi_free_MigrationParameters", (), || {
        if p.is_null() {
            return;
        }
        // SAFETY: made by Box::into_raw in qmp_query_migrate_parameters and
        // freed once (the caller's contract), as are its strings, made by
        // CString::into_raw.
        unsafe {
            let b = Box::from_raw(p);
            for s in [b.tls_creds, b.tls_hostname, b.tls_authz] {
                if !s.is_null() {
                    drop(CString::from_raw(s));
                }
            }
        }
    })
}
