//! A shorter soak than `make -C c-tests soak` (1,000 migrations): 200
//! back-to-back migrations between two processes, whose thread and fd
//! counts must end where they were after a warm-up and whose memory must
//! not grow.

use std::process::Command;

#[test]
fn two_hundred_migrations_leak_nothing() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make").args(["-s", "-C", &format!("{root}/c-tests"), "soak", "SOAK_N=200"]).output().expect("make runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "soak failed:\n{text}");
    assert!(text.contains("soak dst: 200 migrations") && text.contains("soak src: 200 migrations"), "{text}");
    assert!(text.contains("200 migrations, nothing leaked"), "{text}");
}
