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
