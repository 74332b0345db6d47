#!/usr/bin/env bash
# make lint (with clippy's incompatible_msrv): the claim `rust-version` in Cargo.toml makes.
#
# Only one Rust toolchain may be installed where CI runs, so the claim is checked without
# building with the version it names:
#   - offheap's own code: clippy's incompatible_msrv lint (denied in Cargo.toml's
#     [lints.clippy]) flags every std API stabilised after rust-version; `make lint`
#     runs clippy on every target and feature set;
#   - here: every crate the library builds with (normal and build dependencies, feature
#     `stubs`, as Cargo.lock pins them) asks for at most rust-version in its own
#     manifest; cargo would refuse to build one that asks for more. The dev-dependencies
#     (tests, benches) are only reported: they may need a newer Rust (README says which).
# Language features (syntax) are not checked by either; the Cargo.lock format (4) needs
# cargo 1.78, and the edition-2024 manifests among the vendored crates cargo 1.85.
# Needs cargo and the crates (cargo's registry cache or vendor/).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=msrv
step() { printf '[%s] %s\n' "$name" "$*"; }
fail() { printf '[%s] FAILED: %s\n' "$name" "$*" >&2; exit 1; }

rust_version() { sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$1" | head -1; }
# version_le A B: A <= B, for dotted versions (1.87 = 1.87.0).
version_le() { [ "$(printf '%s\n%s\n' "${1%.0}" "${2%.0}" | sort -V | head -1)" = "${1%.0}" ]; }

msrv=$(rust_version Cargo.toml)
[ -n "$msrv" ] || fail "Cargo.toml states no rust-version"

manifests=$(cargo metadata --format-version 1 --locked --all-features |
  grep -o '"manifest_path":"[^"]*"' | cut -d'"' -f4)
# "name version" of the crates of a dependency kind set, offheap itself left out.
crates() {
  cargo tree --locked --quiet -e "$1" --features stubs --prefix none --format '{p}' |
    sed 's/ (.*//; s/ v/ /' | sort -u | grep -v '^offheap '
}
# The highest rust-version among the crates on stdin, as "version name" lines, sorted.
needs() {
  local n v m r
  while read -r n v; do
    # A here-string, not a pipe: grep -m1 exits at the first match, and under pipefail a
    # printf still writing into the pipe would die of SIGPIPE and fail the lookup.
    m=$(grep -m1 "/$n-$v/Cargo.toml$" <<<"$manifests") || fail "no manifest for $n $v"
    r=$(rust_version "$m")
    printf '%s %s-%s\n' "${r:-0}" "$n" "$v"
  done | sort -V
}

lib=$(crates normal,build | needs)
too_new=$(printf '%s\n' "$lib" | while read -r r c; do version_le "$r" "$msrv" || echo "$c (rust-version $r)"; done)
[ -z "$too_new" ] || fail "rust-version is $msrv, but the library builds with: $too_new"
step "rust-version $msrv: the library's $(printf '%s\n' "$lib" | wc -l) dependencies ask for at most $(printf '%s\n' "$lib" | tail -1 | cut -d' ' -f1) ($(printf '%s\n' "$lib" | tail -1 | cut -d' ' -f2))"
dev=$(crates normal,build,dev | needs | tail -1)
step "tests and benches (dev-dependencies included): rust-version ${dev% *} (${dev#* })"
