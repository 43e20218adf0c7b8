//! Scratch directories for tests: one directory per test process under the
//! system's temporary directory, removed when the process exits, passed
//! or failed (set `LIVEMIG_KEEP_TEST_DIRS` to keep it for a post-mortem),
//! so that runs do not fill the disk with images and streams.

use std::path::PathBuf;
use std::sync::Once;

fn root() -> PathBuf {
    std::env::temp_dir().join(format!("livemig-{}", std::process::id()))
}

extern "C" fn remove_root() {
    if std::env::var_os("LIVEMIG_KEEP_TEST_DIRS").is_none() {
        let _ = std::fs::remove_dir_all(root());
    }
}

/// A fresh, empty directory `name` (emptied if an earlier test used it).
pub fn dir(name: &str) -> PathBuf {
    static CLEANUP: Once = Once::new();
    CLEANUP.call_once(|| {
        // SAFETY: registers a function without arguments or state; the
        // test harness exits through exit(3), which runs it.
        unsafe { libc::atexit(remove_root) };
    });
    let d = root().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
