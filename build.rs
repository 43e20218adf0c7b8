//! Generates `include/livemig.h` from the `src/ffi` module with cbindgen.
//!
//! The header is committed; it is rewritten only when its content changes so
//! that an unchanged build leaves the work tree clean (a test checks that the
//! committed header matches what this script generates).

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // The shared library's SONAME carries the ABI's major version, so that
    // a host records `liblivemig.so.MAJOR` and an incompatible release can
    // be installed next to it. `make install` and `c-tests/Makefile` make
    // the `liblivemig.so.MAJOR` name point at the library.
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets CARGO_PKG_VERSION_MAJOR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liblivemig.so.{major}");

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml is readable and valid");
    let bindings = match cbindgen::Builder::new().with_crate(&crate_dir).with_config(config).generate() {
        Ok(b) => b,
        Err(e) => {
            // A syntax error in the crate is reported by rustc with a better
            // message; don't fail the build script for it.
            println!("cargo:warning=cbindgen could not generate the header: {e}");
            return;
        }
    };
    let mut out = Vec::new();
    bindings.write(&mut out);
    let path = crate_dir.join("include").join("livemig.h");
    let old = fs::read(&path).unwrap_or_default();
    if old != out {
        fs::create_dir_all(path.parent().expect("header path has a parent")).expect("create include/");
        fs::write(&path, &out).expect("write include/livemig.h");
    }
}
