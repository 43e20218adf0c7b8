//! The committed header is what the build generates, and its version
//! macros match the crate's version.

use std::process::Command;

#[test]
fn committed_header_is_current() {
    // The build script has just regenerated include/livemig.h; any
    // difference from the committed file means it was not committed.
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("git").args(["-C", root, "diff", "--exit-code", "--stat", "--", "include/livemig.h"]).output();
    match out {
        Ok(o) if o.status.code() == Some(128) => eprintln!("skipped: not a git checkout ({})", String::from_utf8_lossy(&o.stderr).trim()),
        Ok(o) => assert!(
            o.status.success(),
            "include/livemig.h is stale; commit the regenerated header:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(e) => eprintln!("skipped: git not available: {e}"),
    }
}

#[test]
fn version_macros_match_crate() {
    let h = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/livemig.h")).unwrap();
    let get = |name: &str| {
        h.lines().find_map(|l| l.strip_prefix(&format!("#define {name} "))).unwrap_or_else(|| panic!("{name} missing")).trim().to_string()
    };
    assert_eq!(get("LIVEMIG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(get("LIVEMIG_VERSION_MINOR"), env!("CARGO_PKG_VERSION_MINOR"));
    assert_eq!(get("LIVEMIG_VERSION_PATCH"), env!("CARGO_PKG_VERSION_PATCH"));
    assert_eq!(get("LIVEMIG_VERSION_STRING"), format!("\"{}\"", env!("CARGO_PKG_VERSION")));
    for f in ["qmp_migrate(", "qmp_query_migrate(", "register_savevm_live(", "qemu_start_incoming_migration(", "migrate_fd_connect("] {
        assert!(h.contains(f), "header lacks {f}");
    }
}
