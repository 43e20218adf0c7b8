//! Runs the C harness (`make -C c-tests test`: header tests, then source
//! and destination processes over tcp, unix, exec and fd under ASan/UBSan)
//! so that `cargo test` covers the C API end to end.

use std::process::Command;

#[test]
fn c_harness_passes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make").args(["-C", &format!("{root}/c-tests"), "test"]).output().expect("make runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "C harness failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "no summary line:\n{text}");
}

/// The harness (no sanitizers) under valgrind: no invalid access, no
/// definite leak (`make -C c-tests valgrind`). Skips where valgrind is absent.
#[test]
fn c_harness_clean_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("skipped: valgrind is not installed");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make").args(["-s", "-C", &format!("{root}/c-tests"), "valgrind"]).output().expect("make runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "valgrind run failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
}
