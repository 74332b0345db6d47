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
    } else {
        domain_state_fields();
    }
}

/// The OCaml 4 runtime's `Caml_state` fields that `src/runtime/ocaml4.rs` reads: their
/// word indices, from the runtime's own list (`caml/domain_state.tbl`, one word per
/// field), written to `$OUT_DIR/domain_state.rs`.
fn domain_state_fields() {
    let ocamlopt = std::env::var("OCAMLOPT").unwrap_or_else(|_| "ocamlopt".into());
    let out = Command::new(&ocamlopt)
        .arg("-where")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {ocamlopt} -where: {e}"));
    let stdlib = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let table = std::path::Path::new(&stdlib).join("caml/domain_state.tbl");
    println!("cargo:rerun-if-changed={}", table.display());
    let text = std::fs::read_to_string(&table)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", table.display()));
    let names: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("DOMAIN_STATE("))
        .filter_map(|rest| rest.split(')').next()?.rsplit(',').next())
        .map(str::trim)
        .collect();
    let mut consts = String::new();
    for field in [
        "young_start",
        "young_end",
        "stat_heap_wsz",
        "stat_compactions",
        "stat_heap_chunks",
        "stat_major_collections",
    ] {
        let index = names
            .iter()
            .position(|&n| n == field)
            .unwrap_or_else(|| panic!("no field {field} in {}", table.display()));
        consts += &format!(
            "/// Word index of `Caml_state->{field}`.\npub const {}: usize = {index};\n",
            field.to_uppercase()
        );
    }
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("domain_state.rs");
    std::fs::write(dest, consts).expect("cannot write domain_state.rs");
}
