//! The main job: live migration of a running minivmm guest (c-tests/minivmm)
//! over tcp and unix, with and without XBZRLE, on KVM and on the software
//! vCPU. Each run asserts the demo's three proofs — RAM at the switchover
//! equals RAM as loaded, the single-edge check on both sides, the guest runs
//! on the destination while the source stays stopped — which demo.sh turns
//! into its exit status and CHECK lines.
//!
//! Where /dev/kvm is missing or unusable minivmm says so and runs the
//! software vCPU; the KVM cases then cover that path (a message says so).

#[path = "common/scratch.rs"]
mod scratch;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn demo(args: &[&str]) -> String {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let st = Command::new("make").args(["-s", "-C"]).arg(root.join("c-tests")).arg("build/minivmm").status().expect("make");
    assert!(st.success(), "building minivmm failed");
    let out_dir = scratch::dir(&format!("minivmm-{}", args.join("_").replace(['-', '/'], "")));
    let out = Command::new(root.join("c-tests/minivmm/demo.sh"))
        .args(["--out", out_dir.to_str().unwrap()])
        .args(args)
        .output()
        .expect("demo.sh runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    if !std::path::Path::new("/dev/kvm").exists() && !args.contains(&"--no-kvm") {
        println!("note: /dev/kvm is absent; this case ran the software vCPU");
    }
    assert!(out.status.success(), "demo.sh {args:?} failed:\n{text}");
    for check in ["ram-at-switchover: ok", "src-single-edge: ok", "dst-single-edge: ok", "guest-runs-on-dst: ok", "src-stays-stopped: ok"] {
        assert!(text.contains(&format!("CHECK {check}")), "{check} missing:\n{text}");
    }
    assert!(!text.contains("FAILED"), "{text}");
    let csv = std::fs::read_to_string(out_dir.join("timeline.csv")).expect("timeline written");
    assert!(csv.lines().count() > 2 && csv.lines().last().unwrap().ends_with(",completed"), "timeline:\n{csv}");
    let _ = std::fs::remove_dir_all(&out_dir);
    text
}

fn stat(text: &str, key: &str) -> i64 {
    let line = text.lines().find(|l| l.starts_with("stats:")).expect("stats line");
    let v = line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}"));
    v.parse().unwrap()
}

#[test]
fn kvm_tcp() {
    demo(&["--ram", "128", "--dirty-rate", "100", "--speed", "0", "--run-ms", "600"]);
}

#[test]
fn kvm_unix_xbzrle() {
    demo(&["--transport", "unix", "--ram", "128", "--dirty-rate", "100", "--speed", "0", "--run-ms", "600", "--xbzrle"]);
}

#[test]
fn software_vcpu_tcp() {
    let t = demo(&["--no-kvm", "--ram", "128", "--dirty-rate", "100", "--speed", "0", "--run-ms", "600"]);
    assert!(t.contains("KVM turned off (--no-kvm)"), "{t}");
}

#[test]
fn software_vcpu_unix_xbzrle() {
    demo(&["--no-kvm", "--transport", "unix", "--ram", "128", "--dirty-rate", "100", "--speed", "0", "--run-ms", "600", "--xbzrle"]);
}

/// A low speed limit keeps the guest ahead of the link for several passes;
/// then the limit is lifted and the migration converges.
#[test]
fn several_passes_then_converge() {
    let t = demo(&[
        "--ram",
        "64",
        "--dirty-rate",
        "200",
        "--speed",
        "60000000",
        "--downtime-ms",
        "10",
        "--raise-speed-after-syncs",
        "4",
        "--xbzrle",
    ]);
    assert!(stat(&t, "dirty_sync_count") > 1, "{t}");
    assert!(stat(&t, "normal") + stat(&t, "xbzrle_pages") > stat(&t, "total_pages"), "pages were re-sent: {t}");
}
