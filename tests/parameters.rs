//! `qmp_migrate_set_parameters` and `qmp_query_migrate_parameters`
//! through the C ABI:
//! - against a real QEMU 7.2 (skipped with a message where it is not
//!   installed): the same sets, one after another, are accepted or refused
//!   alike, refusals with QEMU's texts, and both then report the same
//!   parameters, defaults included;
//! - what livemig refuses where 7.2 accepts (TLS, block-bitmap-mapping),
//!   malformed C input, all-or-nothing, and the three parameters that act.

#[path = "common/qmp.rs"]
mod qmp;
#[path = "common/scratch.rs"]
mod scratch;

use std::ffi::{CStr, CString};
use std::process::{Command, Stdio};
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use livemig::ffi::errors::{error_free, error_get_pretty, Error};
use livemig::ffi::migration::{qmp_migrate_set_downtime, qmp_migrate_set_speed, qmp_query_migrate_cache_size};
use livemig::ffi::parameters::{
    qapi_free_MigrationParameters, qmp_migrate_set_parameters, qmp_query_migrate_parameters, MigrateSetParameters, MultiFDCompression,
    QType, StrOrNull, StrOrNullValue,
};
use serde_json::{json, Value};

/// The parameters are one global state: one test at a time.
static GLOBAL: Mutex<()> = Mutex::new(());

fn global() -> MutexGuard<'static, ()> {
    GLOBAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A zeroed argument: every member unset.
fn blank() -> MigrateSetParameters {
    // SAFETY: all-zero is a valid MigrateSetParameters (flags false,
    // integers 0, pointers NULL, MULTIFD_COMPRESSION_NONE).
    unsafe { std::mem::zeroed() }
}

/// Calls qmp_migrate_set_parameters; the error text on failure.
fn set(p: &mut MigrateSetParameters) -> Result<(), String> {
    set_raw(p)
}

/// `set` on a raw pointer: for arguments holding bytes C may store but a
/// Rust value must not (no Rust reference to them is made).
fn set_raw(p: *mut MigrateSetParameters) -> Result<(), String> {
    let mut err: *mut Error = null_mut();
    qmp_migrate_set_parameters(p, &mut err);
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a live Error from livemig; its text is NUL-terminated.
    let text = unsafe { CStr::from_ptr(error_get_pretty(err)) }.to_string_lossy().into_owned();
    error_free(err);
    Err(text)
}

/// Sets one QAPI member (by its QMP name) in `p`.
fn member(p: &mut MigrateSetParameters, name: &str, v: &Value) {
    let n = v.as_u64();
    let b = v.as_bool();
    match name {
        "announce-initial" => (p.has_announce_initial, p.announce_initial) = (true, n.unwrap()),
        "announce-max" => (p.has_announce_max, p.announce_max) = (true, n.unwrap()),
        "announce-rounds" => (p.has_announce_rounds, p.announce_rounds) = (true, n.unwrap()),
        "announce-step" => (p.has_announce_step, p.announce_step) = (true, n.unwrap()),
        "compress-level" => (p.has_compress_level, p.compress_level) = (true, n.unwrap() as u8),
        "compress-threads" => (p.has_compress_threads, p.compress_threads) = (true, n.unwrap() as u8),
        "compress-wait-thread" => (p.has_compress_wait_thread, p.compress_wait_thread) = (true, b.unwrap()),
        "decompress-threads" => (p.has_decompress_threads, p.decompress_threads) = (true, n.unwrap() as u8),
        "throttle-trigger-threshold" => (p.has_throttle_trigger_threshold, p.throttle_trigger_threshold) = (true, n.unwrap() as u8),
        "cpu-throttle-initial" => (p.has_cpu_throttle_initial, p.cpu_throttle_initial) = (true, n.unwrap() as u8),
        "cpu-throttle-increment" => (p.has_cpu_throttle_increment, p.cpu_throttle_increment) = (true, n.unwrap() as u8),
        "cpu-throttle-tailslow" => (p.has_cpu_throttle_tailslow, p.cpu_throttle_tailslow) = (true, b.unwrap()),
        "max-bandwidth" => (p.has_max_bandwidth, p.max_bandwidth) = (true, n.unwrap()),
        "downtime-limit" => (p.has_downtime_limit, p.downtime_limit) = (true, n.unwrap()),
        "x-checkpoint-delay" => (p.has_x_checkpoint_delay, p.x_checkpoint_delay) = (true, n.unwrap() as u32),
        "block-incremental" => (p.has_block_incremental, p.block_incremental) = (true, b.unwrap()),
        "multifd-channels" => (p.has_multifd_channels, p.multifd_channels) = (true, n.unwrap() as u8),
        "xbzrle-cache-size" => (p.has_xbzrle_cache_size, p.xbzrle_cache_size) = (true, n.unwrap()),
        "max-postcopy-bandwidth" => (p.has_max_postcopy_bandwidth, p.max_postcopy_bandwidth) = (true, n.unwrap()),
        "max-cpu-throttle" => (p.has_max_cpu_throttle, p.max_cpu_throttle) = (true, n.unwrap() as u8),
        "multifd-compression" => {
            p.has_multifd_compression = true;
            p.multifd_compression = match v.as_str().unwrap() {
                "none" => MultiFDCompression::MultifdCompressionNone,
                "zlib" => MultiFDCompression::MultifdCompressionZlib,
                _ => MultiFDCompression::MultifdCompressionZstd,
            };
        }
        "multifd-zlib-level" => (p.has_multifd_zlib_level, p.multifd_zlib_level) = (true, n.unwrap() as u8),
        "multifd-zstd-level" => (p.has_multifd_zstd_level, p.multifd_zstd_level) = (true, n.unwrap() as u8),
        _ => panic!("no member {name}"),
    }
}

/// livemig's parameters in QMP's JSON form (as query-migrate-parameters).
fn query() -> Value {
    let mut err: *mut Error = null_mut();
    let p = qmp_query_migrate_parameters(&mut err);
    assert!(err.is_null() && !p.is_null());
    // SAFETY: a live MigrationParameters from livemig, freed below.
    let q = unsafe { &*p };
    // SAFETY: livemig's strings in `q`, NUL-terminated, live until freed.
    let s = |c: *mut std::ffi::c_char| unsafe { CStr::from_ptr(c) }.to_str().unwrap().to_string();
    let compression = match q.multifd_compression {
        MultiFDCompression::MultifdCompressionNone => "none",
        MultiFDCompression::MultifdCompressionZlib => "zlib",
        MultiFDCompression::MultifdCompressionZstd => "zstd",
    };
    assert!(!q.has_block_bitmap_mapping && q.block_bitmap_mapping.is_null());
    let v = json!({
        "announce-initial": q.announce_initial, "announce-max": q.announce_max,
        "announce-rounds": q.announce_rounds, "announce-step": q.announce_step,
        "compress-level": q.compress_level, "compress-threads": q.compress_threads,
        "compress-wait-thread": q.compress_wait_thread, "decompress-threads": q.decompress_threads,
        "throttle-trigger-threshold": q.throttle_trigger_threshold,
        "cpu-throttle-initial": q.cpu_throttle_initial, "cpu-throttle-increment": q.cpu_throttle_increment,
        "cpu-throttle-tailslow": q.cpu_throttle_tailslow,
        "tls-creds": s(q.tls_creds), "tls-hostname": s(q.tls_hostname), "tls-authz": s(q.tls_authz),
        "max-bandwidth": q.max_bandwidth, "downtime-limit": q.downtime_limit,
        "x-checkpoint-delay": q.x_checkpoint_delay, "block-incremental": q.block_incremental,
        "multifd-channels": q.multifd_channels, "xbzrle-cache-size": q.xbzrle_cache_size,
        "max-postcopy-bandwidth": q.max_postcopy_bandwidth, "max-cpu-throttle": q.max_cpu_throttle,
        "multifd-compression": compression,
        "multifd-zlib-level": q.multifd_zlib_level, "multifd-zstd-level": q.multifd_zstd_level,
    });
    let all_set = [
        q.has_announce_initial,
        q.has_announce_max,
        q.has_announce_rounds,
        q.has_announce_step,
        q.has_compress_level,
        q.has_compress_threads,
        q.has_compress_wait_thread,
        q.has_decompress_threads,
        q.has_throttle_trigger_threshold,
        q.has_cpu_throttle_initial,
        q.has_cpu_throttle_increment,
        q.has_cpu_throttle_tailslow,
        q.has_tls_creds,
        q.has_tls_hostname,
        q.has_tls_authz,
        q.has_max_bandwidth,
        q.has_downtime_limit,
        q.has_x_checkpoint_delay,
        q.has_block_incremental,
        q.has_multifd_channels,
        q.has_xbzrle_cache_size,
        q.has_max_postcopy_bandwidth,
        q.has_max_cpu_throttle,
        q.has_multifd_compression,
        q.has_multifd_zlib_level,
        q.has_multifd_zstd_level,
    ];
    assert!(all_set.iter().all(|&h| h), "every member but block-bitmap-mapping is reported");
    qapi_free_MigrationParameters(p);
    v
}

/// The sets both sides get, in order: each member's bounds, values
/// between, a check between two members, and a set refused as a whole.
/// (Left out: values C's member types cannot hold, which QEMU's JSON
/// parser refuses; TLS and block-bitmap-mapping, which livemig refuses;
/// multifd-zlib-level and multifd-zstd-level, which 7.2's set accepts but
/// does not keep, any value, and checks against a value it never set:
/// livemig keeps them and checks them as 7.2's check is written.)
fn cases() -> Vec<Value> {
    let mut v = vec![];
    let one = |v: &mut Vec<Value>, name: &str, vals: &[Value]| {
        for x in vals {
            v.push(json!({ name: x }));
        }
    };
    one(&mut v, "announce-initial", &[json!(0), json!(100000), json!(100001), json!(70)]);
    one(&mut v, "announce-max", &[json!(0), json!(100000), json!(100001), json!(600)]);
    one(&mut v, "announce-rounds", &[json!(0), json!(1000), json!(1001), json!(7)]);
    one(&mut v, "announce-step", &[json!(0), json!(1), json!(10000), json!(10001), json!(90)]);
    one(&mut v, "compress-level", &[json!(0), json!(9), json!(10), json!(3)]);
    one(&mut v, "compress-threads", &[json!(0), json!(1), json!(255), json!(4)]);
    one(&mut v, "decompress-threads", &[json!(0), json!(1), json!(255), json!(3)]);
    one(&mut v, "compress-wait-thread", &[json!(false)]);
    one(&mut v, "throttle-trigger-threshold", &[json!(0), json!(1), json!(100), json!(101), json!(40)]);
    one(&mut v, "cpu-throttle-initial", &[json!(0), json!(1), json!(99), json!(100), json!(30)]);
    one(&mut v, "cpu-throttle-increment", &[json!(0), json!(1), json!(99), json!(100), json!(15)]);
    one(&mut v, "cpu-throttle-tailslow", &[json!(true)]);
    one(&mut v, "max-bandwidth", &[json!(0u64), json!(u64::MAX), json!(1u64 << 30)]);
    one(&mut v, "downtime-limit", &[json!(0), json!(2000000), json!(2000001), json!(150)]);
    one(&mut v, "x-checkpoint-delay", &[json!(0), json!(4294967295u64), json!(1000)]);
    one(&mut v, "block-incremental", &[json!(true)]);
    one(&mut v, "multifd-channels", &[json!(0), json!(1), json!(255), json!(4)]);
    one(&mut v, "xbzrle-cache-size", &[json!(0), json!(4096), json!(12288), json!(1u64 << 21)]);
    one(&mut v, "max-postcopy-bandwidth", &[json!(u64::MAX), json!(1000)]);
    one(&mut v, "max-cpu-throttle", &[json!(29), json!(30), json!(99), json!(100), json!(80)]);
    one(&mut v, "multifd-compression", &[json!("zlib"), json!("zstd"), json!("none")]);
    // max-cpu-throttle below the cpu-throttle-initial set with it.
    v.push(json!({"cpu-throttle-initial": 50, "max-cpu-throttle": 40}));
    // Refused as a whole: max-bandwidth must not change.
    v.push(json!({"max-bandwidth": 1000, "xbzrle-cache-size": 3}));
    v.push(json!({"downtime-limit": 200, "max-bandwidth": 5000, "multifd-channels": 0}));
    // Two refused: the first in 7.2's order of checks is the one reported.
    v.push(json!({"announce-step": 0, "multifd-channels": 0, "compress-level": 10}));
    v.push(json!({"max-cpu-throttle": 100, "downtime-limit": 2000001, "xbzrle-cache-size": 5}));
    v
}

#[test]
fn sets_and_reports_as_qemu_7_2() {
    let _g = global();
    let ok = Command::new("qemu-system-x86_64").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("skipped: qemu-system-x86_64 not found (install the Debian package qemu-system-x86)");
        return;
    }
    let dir = scratch::dir("parameters");
    let sock = dir.join("qmp.sock");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-S", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu starts");
    let mut q = qmp::Qmp::connect(&sock);
    // The defaults first: livemig's are QEMU 7.2's (set back to them, as
    // another test may have changed them).
    let qemu_defaults = q.reply(r#"{"execute":"query-migrate-parameters"}"#).unwrap();
    let mut back = blank();
    for (name, v) in qemu_defaults.as_object().unwrap() {
        if !name.starts_with("tls-") {
            member(&mut back, name, v);
        }
    }
    set(&mut back).expect("QEMU 7.2's defaults are accepted");
    assert_eq!(query(), qemu_defaults, "livemig reports what QEMU 7.2 reports");
    for c in cases() {
        let want = q.reply(&json!({"execute": "migrate-set-parameters", "arguments": c}).to_string()).map(|_| ());
        let mut p = blank();
        for (name, v) in c.as_object().unwrap() {
            member(&mut p, name, v);
        }
        assert_eq!(set(&mut p), want, "migrate-set-parameters {c}");
        let theirs = q.reply(r#"{"execute":"query-migrate-parameters"}"#).unwrap();
        assert_eq!(query(), theirs, "after {c}");
    }
    let _ = q.reply(r#"{"execute":"quit"}"#);
    let _ = qemu.wait();
}

/// A `StrOrNull` holding `s` (its CString kept alive by the caller).
fn str_or_null(s: &CString) -> StrOrNull {
    StrOrNull { r#type: QType::QtypeQstring, u: StrOrNullValue { s: s.as_ptr() as *mut _ } }
}

#[test]
fn refuses_tls_bitmaps_and_malformed_input_changing_nothing() {
    let _g = global();
    let before = query();
    let (empty, creds) = (CString::new("").unwrap(), CString::new("tls0").unwrap());

    // TLS: "" and null are no TLS, accepted; anything else refused.
    let mut s = str_or_null(&empty);
    let mut n = StrOrNull { r#type: QType::QtypeQnull, u: StrOrNullValue { n: null_mut() } };
    let mut p = blank();
    (p.has_tls_creds, p.tls_creds, p.has_tls_authz, p.tls_authz) = (true, &mut s, true, &mut n);
    assert_eq!(set(&mut p), Ok(()));
    let mut c = str_or_null(&creds);
    let mut p = blank();
    (p.has_max_bandwidth, p.max_bandwidth, p.has_tls_hostname, p.tls_hostname) = (true, 1, true, &mut c);
    assert_eq!(
        set(&mut p),
        Err("Parameter 'tls-hostname': TLS is not supported by livemig (only \"\" or null, no TLS, is accepted)".into())
    );
    let mut p = blank();
    (p.has_tls_creds, p.tls_creds) = (true, null_mut());
    assert_eq!(set(&mut p), Err("Parameter 'tls-creds': set with a NULL value".into()));
    // A tag C may hold but QAPI never makes there (written through raw
    // pointers into untyped memory: no Rust value holds it).
    let mut odd = std::mem::MaybeUninit::<StrOrNull>::zeroed();
    let mut bad = blank();
    // SAFETY: the tag is the struct's first 4 bytes, zeroed memory of ours.
    unsafe { odd.as_mut_ptr().cast::<u32>().write(77) };
    (bad.has_tls_creds, bad.tls_creds) = (true, odd.as_mut_ptr());
    assert_eq!(set(&mut bad), Err("Parameter 'tls-creds': expects a string or null (QType 77)".into()));

    let mut p = blank();
    p.has_block_bitmap_mapping = true;
    assert_eq!(set(&mut p), Err("Parameter 'block-bitmap-mapping' is not supported by livemig: it migrates no block devices".into()));

    // An enum value C may store but QAPI does not define.
    let mut p = std::mem::MaybeUninit::new(blank());
    let pp = p.as_mut_ptr();
    // SAFETY: members of our own struct, written through raw pointers.
    unsafe {
        std::ptr::addr_of_mut!((*pp).has_multifd_compression).write(true);
        std::ptr::addr_of_mut!((*pp).multifd_compression).cast::<u32>().write(9);
    }
    assert_eq!(set_raw(pp), Err("Parameter 'multifd-compression' does not accept value 9".into()));

    // 7.2 takes these without keeping them; livemig applies 7.2's check.
    let mut p = blank();
    (p.has_multifd_zlib_level, p.multifd_zlib_level) = (true, 10);
    assert_eq!(set(&mut p), Err("Parameter 'multifd_zlib_level' expects a value between 0 and 9".into()));
    let mut p = blank();
    (p.has_multifd_zstd_level, p.multifd_zstd_level) = (true, 21);
    assert_eq!(set(&mut p), Err("Parameter 'multifd_zstd_level' expects a value between 0 and 20".into()));
    // A value that fits no 64-bit cache.
    let mut p = blank();
    (p.has_xbzrle_cache_size, p.xbzrle_cache_size) = (true, 1 << 63);
    assert_eq!(set(&mut p), Err("Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size".into()));

    // NULL: an error, not a crash.
    let mut err: *mut Error = null_mut();
    qmp_migrate_set_parameters(null_mut(), &mut err);
    assert!(!err.is_null());
    // SAFETY: a live Error from livemig.
    assert_eq!(unsafe { CStr::from_ptr(error_get_pretty(err)) }.to_str().unwrap(), "params must not be NULL");
    error_free(err);
    qapi_free_MigrationParameters(null_mut());

    assert_eq!(query(), before, "no refused set changed anything");
}

#[test]
fn the_acting_parameters_are_the_classic_setters_values() {
    let _g = global();
    let mut p = blank();
    (p.has_max_bandwidth, p.max_bandwidth) = (true, 12_345_678);
    (p.has_downtime_limit, p.downtime_limit) = (true, 42);
    (p.has_xbzrle_cache_size, p.xbzrle_cache_size) = (true, 1 << 22);
    assert_eq!(set(&mut p), Ok(()));
    let mut err: *mut Error = null_mut();
    assert_eq!(qmp_query_migrate_cache_size(&mut err), 1 << 22);
    assert_eq!(livemig::params::get().speed, 12_345_678);
    assert_eq!(livemig::params::get().downtime_ns, 42_000_000);
    // And the other way round.
    qmp_migrate_set_speed(777, &mut err);
    qmp_migrate_set_downtime(0.25, &mut err);
    assert!(err.is_null());
    let q = query();
    assert_eq!((q["max-bandwidth"].as_u64(), q["downtime-limit"].as_u64()), (Some(777), Some(250)));
    // A C bool holding 2 is true, as in C.
    let mut p = std::mem::MaybeUninit::new(blank());
    let pp = p.as_mut_ptr();
    // SAFETY: members of our own struct, written through raw pointers (a
    // byte other than 0 or 1 in a C bool, as C may leave one).
    unsafe {
        std::ptr::addr_of_mut!((*pp).has_block_incremental).cast::<u8>().write(2);
        std::ptr::addr_of_mut!((*pp).block_incremental).cast::<u8>().write(2);
    }
    assert_eq!(set_raw(pp), Ok(()));
    assert_eq!(query()["block-incremental"], json!(true));
    // Kept, unlike 7.2's set, which drops these two.
    let mut p = blank();
    (p.has_multifd_zlib_level, p.multifd_zlib_level, p.has_multifd_zstd_level, p.multifd_zstd_level) = (true, 7, true, 19);
    assert_eq!(set(&mut p), Ok(()));
    assert_eq!((query()["multifd-zlib-level"].as_u64(), query()["multifd-zstd-level"].as_u64()), (Some(7), Some(19)));
}
