//! `lib/stubs.ml`, every OCaml `external` of the library, is generated from the
//! `#[ocaml::sig("...")]` of the Rust stubs: this test regenerates it and fails when the
//! checked-in file differs, so names and arities cannot drift between the two sides.
//! `OFFHEAP_BLESS=1 cargo test --test externals` rewrites the file.
//!
//! Why not `ocaml-build` (`Sigs::generate`), which reads the same attribute: it cannot
//! write what follows the primitive's name (`[@@noalloc]`, which `get` needs), it names
//! a bytecode twin only for more than five arguments (stubs with `[@untagged]` or
//! `[@unboxed]` arguments need one whatever their arity), it checks no arity, and it
//! writes a flat file with no way to bring the handle and allocator types in scope (here
//! they are functor parameters, since `lib/image.ml` has the handle type only as one).
//!
//! The rules, checked here too:
//! - every `offheap_stub_*` and `offheap_region_*` function and every
//!   `#[ocaml::native_func]` carries a sig, and
//!   the sig has as many arrows as the function has arguments;
//! - a trailing `[@@...]` of the sig goes after the primitive's name;
//! - a function `NAME` with a twin `NAME_bytecode` is declared with both names;
//! - no other `external` is declared in `lib/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One stub: its name, OCaml type, trailing attributes, and source file.
struct Stub {
    name: String,
    ty: String,
    attrs: String,
    file: String,
    bytecode_twin: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Rust files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn attr_name(a: &syn::Attribute) -> String {
    a.path()
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

/// Arrows at parenthesis depth 0: the arity an OCaml type gives a primitive.
fn arity(ty: &str) -> usize {
    let (mut depth, mut n, mut prev) = (0i32, 0, ' ');
    for c in ty.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            '>' if prev == '-' && depth == 0 => n += 1,
            _ => {}
        }
        prev = c;
    }
    n
}

/// Splits `T [@@a] [@@b]` into `T` and `[@@a] [@@b]`.
fn split_attrs(sig: &str) -> (String, String) {
    match sig.find("[@@") {
        Some(i) => (sig[..i].trim().to_owned(), sig[i..].trim().to_owned()),
        None => (sig.trim().to_owned(), String::new()),
    }
}

/// The stubs of the crate, and the problems found.
fn stubs() -> (Vec<Stub>, Vec<String>) {
    let src = root().join("src");
    let mut stubs = Vec::new();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for path in rust_files(&src) {
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let file: syn::File =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        let rel = path
            .strip_prefix(root())
            .expect("under the root")
            .display()
            .to_string();
        for item in file.items {
            let syn::Item::Fn(f) = item else { continue };
            let name = f.sig.ident.to_string();
            names.push(name.clone());
            let sig = f.attrs.iter().find(|a| attr_name(a) == "ocaml::sig");
            let native = f.attrs.iter().any(|a| attr_name(a) == "ocaml::native_func");
            let Some(sig) = sig else {
                if native
                    || name.starts_with("offheap_stub_")
                    || name.starts_with("offheap_region_")
                {
                    problems.push(format!("{rel}: {name} has no #[ocaml::sig(\"...\")]"));
                }
                continue;
            };
            let lit: syn::LitStr = sig.parse_args().expect("#[ocaml::sig(\"...\")]");
            let (ty, attrs) = split_attrs(&lit.value());
            let args = f.sig.inputs.len();
            if arity(&ty) != args {
                problems.push(format!(
                    "{rel}: {name} takes {args} arguments, its sig {ty:?} gives {}",
                    arity(&ty)
                ));
            }
            if args > 5 {
                problems.push(format!(
                    "{rel}: {name}: more than 5 arguments needs a bytecode twin"
                ));
            }
            stubs.push(Stub {
                name,
                ty,
                attrs,
                file: rel.clone(),
                bytecode_twin: false,
            });
        }
    }
    for s in &mut stubs {
        s.bytecode_twin = names.contains(&format!("{}_bytecode", s.name));
    }
    stubs.sort_by(|a, b| (&a.file, &a.name).cmp(&(&b.file, &b.name)));
    (stubs, problems)
}

/// The text of `lib/stubs.ml`.
fn generate(stubs: &[Stub]) -> String {
    let mut out = String::from(
        "(* Generated from the #[ocaml::sig] of the stubs in src/ by tests/externals.rs\n   \
         (OFFHEAP_BLESS=1 cargo test --test externals): do not edit. The handle,\n   \
         allocator and region types are parameters: lib/image.ml has the handle type only\n   \
         as one, lib/region.ml defines the region's. *)\n\n\
         module Make (T : sig\n  type 'a handle\n  type alloc\n  type region\n  type region_cell\nend) =\nstruct\n  open T\n",
    );
    let mut file = "";
    for s in stubs {
        if s.file != file {
            file = &s.file;
            let _ = write!(out, "\n  (* {file} *)\n");
        }
        let names = if s.bytecode_twin {
            format!("\"{}_bytecode\" \"{}\"", s.name, s.name)
        } else {
            format!("\"{}\"", s.name)
        };
        let attrs = if s.attrs.is_empty() {
            String::new()
        } else {
            format!(" {}", s.attrs)
        };
        let _ = writeln!(out, "  external {} : {} = {names}{attrs}", s.name, s.ty);
    }
    out.push_str("end\n");
    out
}

#[test]
fn stubs_ml_is_generated_from_the_rust_stubs() {
    let (stubs, problems) = stubs();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        stubs.iter().any(|s| s.name == "offheap_stub_copy"),
        "no stub found: the scan is broken"
    );
    let generated = generate(&stubs);
    let path = root().join("lib/stubs.ml");
    if std::env::var_os("OFFHEAP_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write lib/stubs.ml");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "lib/stubs.ml differs from the stubs' #[ocaml::sig]s: run \
         OFFHEAP_BLESS=1 cargo test --test externals and commit it.\ngenerated:\n{generated}"
    );
}

#[test]
fn no_external_is_declared_by_hand_in_lib() {
    for entry in std::fs::read_dir(root().join("lib")).expect("read lib/") {
        let path = entry.expect("dir entry").path();
        let is_ml = path.extension().is_some_and(|e| e == "ml" || e == "mli");
        if !is_ml || path.file_name().is_some_and(|n| n == "stubs.ml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read an OCaml file");
        let by_hand = text
            .lines()
            .any(|l| l.trim_start().starts_with("external "));
        assert!(
            !by_hand,
            "{}: declare externals with #[ocaml::sig] in src/",
            path.display()
        );
    }
}

#[test]
fn arity_counts_top_level_arrows_only() {
    assert_eq!(arity("unit -> alloc"), 1);
    assert_eq!(arity("'a handle -> (int -> int) -> 'a -> Outcome.t"), 3);
    assert_eq!(arity("(int [@untagged]) -> (float [@unboxed])"), 1);
    assert_eq!(
        split_attrs("'a -> bool [@@noalloc]"),
        ("'a -> bool".to_owned(), "[@@noalloc]".to_owned())
    );
}
