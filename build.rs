//! Tells the crate which OCaml it is built for: `cfg(ocaml5)` on OCaml 5.
//!
//! Only the `stubs` feature talks to a runtime; without it nothing is detected. The
//! compiler is the one ocaml-sys uses: `$OCAMLOPT`, else `ocamlopt` on the PATH.

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ocaml5)");
    println!("cargo:rerun-if-env-changed=OCAMLOPT");
    println!("cargo:rerun-if-env-changed=OCAML_VERSION");
    if std::env::var_os("CARGO_FEATURE_STUBS").is_none() {
        return;
    }
    let version = std::env::var("OCAML_VERSION").unwrap_or_else(|_| {
        let ocamlopt = std::env::var("OCAMLOPT").unwrap_or_else(|_| "ocamlopt".into());
        let out = Command::new(&ocamlopt)
            .arg("-version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {ocamlopt} -version: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    });
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected OCaml version {version:?}"));
    if major >= 5 {
        println!("cargo:rustc-cfg=ocaml5");
    }
}
