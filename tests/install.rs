//! `make install` puts the library, the header and a pkg-config file under
//! a prefix, and a C program builds from them with `pkg-config` alone,
//! linked against the shared library and against the static one. The
//! shared library is installed under its version, with the SONAME link
//! `liblivemig.so.MAJOR` that hosts record, and the `liblivemig.so` link
//! they build with.

#[path = "common/scratch.rs"]
mod scratch;

use std::path::Path;
use std::process::Command;

const PROGRAM: &str = r#"#include <stdio.h>
#include <livemig.h>

int main(void)
{
    MigrationState *s = migrate_get_current();
    printf("livemig %s/%s: status %d, active %d\n", LIVEMIG_VERSION_STRING, livemig_version(),
           (int)livemig_migration_status(s), (int)migration_is_active(s));
    Error *err = NULL;
    qmp_migrate("bogus:", false, false, false, false, false, false, &err);
    printf("error: %s\n", err ? error_get_pretty(err) : "none");
    error_free(err);
    return 0;
}
"#;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `(TAG)` entries of an ELF file's dynamic section, per `readelf -d`,
/// e.g. the library names of `SONAME` or `NEEDED`.
fn dynamic(file: &Path, tag: &str) -> Vec<String> {
    let out = run(Command::new("readelf").arg("-d").arg(file), "readelf -d");
    out.lines()
        .filter(|l| l.contains(&format!("({tag})")))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect()
}

fn check_output(out: &str, how: &str) {
    let first = out.lines().next().unwrap_or_default();
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(first, format!("livemig {v}/{v}: status 0, active 0"), "{how}: header and library versions, state: {out}");
    let err = out.lines().nth(1).unwrap_or_default();
    assert!(err.starts_with("error: ") && err != "error: none", "{how}: qmp_migrate must fail with a reason: {out}");
}

#[test]
fn installed_library_builds_a_host_with_pkg_config() {
    if Command::new("pkg-config").arg("--version").output().is_err() {
        eprintln!("skipped: pkg-config is not installed");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let dest = scratch::dir("install");
    run(Command::new("make").args(["-s", "-C", root, "install", "PREFIX=/usr"]).arg(format!("DESTDIR={}", dest.display())), "make install");
    let lib = dest.join("usr/lib");
    let (version, major) = (env!("CARGO_PKG_VERSION"), env!("CARGO_PKG_VERSION_MAJOR"));
    let (real, soname) = (format!("liblivemig.so.{version}"), format!("liblivemig.so.{major}"));
    for f in
        [format!("usr/lib/{real}"), "usr/lib/liblivemig.a".into(), "usr/include/livemig.h".into(), "usr/lib/pkgconfig/livemig.pc".into()]
    {
        let meta = std::fs::symlink_metadata(dest.join(&f)).unwrap_or_else(|e| panic!("{f} not installed: {e}"));
        assert!(meta.is_file(), "{f} is a file");
    }
    // liblivemig.so -> liblivemig.so.MAJOR -> liblivemig.so.VERSION
    assert_eq!(std::fs::read_link(lib.join("liblivemig.so")).unwrap(), Path::new(&soname), "the development link");
    assert_eq!(std::fs::read_link(lib.join(&soname)).unwrap(), Path::new(&real), "the SONAME link");
    assert_eq!(dynamic(&lib.join(&real), "SONAME"), std::slice::from_ref(&soname), "the library's SONAME");
    assert_eq!(
        std::fs::read(dest.join("usr/include/livemig.h")).unwrap(),
        std::fs::read(Path::new(root).join("include/livemig.h")).unwrap(),
        "the installed header is the committed one"
    );
    let pkg = |args: &[&str]| {
        let out = run(
            Command::new("pkg-config")
                .args(args)
                .arg("livemig")
                .env("PKG_CONFIG_PATH", lib.join("pkgconfig"))
                .env("PKG_CONFIG_SYSROOT_DIR", &dest),
            "pkg-config",
        );
        out.split_whitespace().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(pkg(&["--modversion"]), [env!("CARGO_PKG_VERSION")]);
    let src = dest.join("host.c");
    std::fs::write(&src, PROGRAM).unwrap();

    // Shared: found through LD_LIBRARY_PATH at run time.
    let exe = dest.join("host-shared");
    run(
        Command::new("cc").args(["-std=c11", "-Wall", "-Werror"]).arg(&src).arg("-o").arg(&exe).args(pkg(&["--cflags", "--libs"])),
        "cc (shared)",
    );
    assert!(dynamic(&exe, "NEEDED").contains(&soname), "the host records the SONAME: {:?}", dynamic(&exe, "NEEDED"));
    check_output(&run(Command::new(&exe).env("LD_LIBRARY_PATH", &lib), "host-shared"), "shared");

    // Static: the archive and the private libraries; runs without the .so.
    let exe = dest.join("host-static");
    let libs: Vec<String> = pkg(&["--static", "--libs"]).into_iter().filter(|a| a != "-llivemig").collect();
    run(
        Command::new("cc")
            .args(["-std=c11", "-Wall", "-Werror"])
            .args(pkg(&["--cflags"]))
            .arg(&src)
            .arg(lib.join("liblivemig.a"))
            .arg("-o")
            .arg(&exe)
            .args(libs),
        "cc (static)",
    );
    check_output(&run(&mut Command::new(&exe), "host-static"), "static");

    run(
        Command::new("make").args(["-s", "-C", root, "uninstall", "PREFIX=/usr"]).arg(format!("DESTDIR={}", dest.display())),
        "make uninstall",
    );
    for f in ["liblivemig.so", &soname, &real, "liblivemig.a"] {
        assert!(std::fs::symlink_metadata(lib.join(f)).is_err(), "uninstall removes {f}");
    }
    let _ = std::fs::remove_dir_all(&dest);
}
