//! The committed header is what the build generates, its macros are
//! livemig's own and match the crate's versions, and README's C example
//! compiles against it.

#[path = "common/scratch.rs"]
mod scratch;

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

/// A host includes the header into its own code: every macro it defines
/// must be livemig's (the crate's internal constants, such as the stream's
/// page flags, would otherwise arrive as `ZERO`, `EOS` or `PAGE_SIZE`).
#[test]
fn header_defines_only_livemig_macros() {
    let h = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/livemig.h")).unwrap();
    let foreign: Vec<&str> = h
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("#define "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name != &"LIVEMIG_H" && !name.starts_with("LIVEMIG_"))
        .collect();
    assert!(foreign.is_empty(), "include/livemig.h defines macros outside the LIVEMIG_ namespace: {foreign:?}");
}

/// The host-ops version macro (written by cbindgen.toml) is the version
/// the library checks.
#[test]
fn host_ops_version_macro_matches_library() {
    let h = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/livemig.h")).unwrap();
    let v = h
        .lines()
        .find_map(|l| l.strip_prefix("#define LIVEMIG_HOST_OPS_VERSION "))
        .expect("LIVEMIG_HOST_OPS_VERSION missing")
        .trim()
        .to_string();
    assert_eq!(v, livemig::ffi::types::LIVEMIG_HOST_OPS_VERSION.to_string());
}

/// README's "A minimal host" compiles against the header as C11 with every
/// warning an error: the example a host author starts from does not rot.
#[test]
fn readme_host_example_compiles() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme.find("```c\n").expect("README has a C example") + 5;
    let len = readme[start..].find("```").expect("the C example ends");
    let dir = scratch::dir("readme");
    let src = dir.join("host.c");
    std::fs::write(&src, &readme[start..start + len]).unwrap();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
        .arg(format!("{root}/include"))
        .arg(&src)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    match out {
        Ok(o) => assert!(o.status.success(), "README's C example does not compile:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("skipped: no C compiler (cc): {e}"),
    }
}
