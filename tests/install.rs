//! `make install` puts the library, the header and a pkg-config file under
//! a prefix, and a C program builds from them with `pkg-config` alone,
//! linked against the shared library and against the static one.

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
    let dest = std::env::temp_dir().join(format!("livemig-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    run(Command::new("make").args(["-s", "-C", root, "install", "PREFIX=/usr"]).arg(format!("DESTDIR={}", dest.display())), "make install");
    let lib = dest.join("usr/lib");
    for f in ["usr/lib/liblivemig.so", "usr/lib/liblivemig.a", "usr/include/livemig.h", "usr/lib/pkgconfig/livemig.pc"] {
        assert!(dest.join(f).is_file(), "{f} not installed");
    }
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
    assert!(!lib.join("liblivemig.so").exists(), "uninstall removes the library");
    let _ = std::fs::remove_dir_all(&dest);
}
