#!/usr/bin/env bash
# make test-release: the release tarball builds and passes its tests with no network.
#
# Unpacks _release/offheap-VERSION.tar.gz (make release) in an empty temporary
# directory, then, as opam would, `dune build -p offheap` and `dune build -p offheap
# @runtest` (the OCaml tests, native and bytecode, and the examples), with:
#   - no network at all when possible (a new network namespace: `unshare -n`, as root),
#     and for cargo in any case: CARGO_NET_OFFLINE=true;
#   - an empty CARGO_HOME (no registry cache, no config), read-only as in opam's
#     sandbox when possible (a bind mount in a new mount namespace, as root); cargo
#     must not have downloaded anything into it: every crate comes from vendor/;
#   - the Rust toolchain's own bin/ on the PATH (rustc --print sysroot), no rustup
#     proxy: RUSTUP_HOME is kept for anyone who needs it.
# Also checks that cargo, run by hand in the unpacked tree, finds every crate of
# Cargo.lock (dev-dependencies included) offline, through .cargo/config.toml.
# Usage: offline.sh [TARBALL]
set -euo pipefail
cd "$(dirname "$0")/../.."
name=offline
. tests/packaging/common.sh
need_tarball "$@"
tar -xzf "$tarball" -C "$tmp"
src=$tmp/offheap-$version
[ -d "$src/vendor" ] && [ -f "$src/.cargo/config.toml" ] && [ -f "$src/Cargo.lock" ] ||
  fail "the tarball lacks vendor/, .cargo/config.toml or Cargo.lock"
[ ! -e "$src/_build" ] && [ ! -e "$src/target" ] && [ ! -e "$src/.git" ] ||
  fail "the tarball carries _build/, target/ or .git/"
step "$(basename "$tarball"): $(ls "$src/vendor" | wc -l) vendored crates"

sysroot=$(rustc --print sysroot)
mkdir "$tmp/cargo-home"
offline_env=(env -i
  HOME="$tmp/home" PATH="$sysroot/bin:/usr/local/bin:/usr/bin:/bin"
  CARGO_HOME="$tmp/cargo-home" CARGO_NET_OFFLINE=true
  RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" LC_ALL=C.UTF-8 TMPDIR="$tmp")
mkdir "$tmp/home"
if [ "$(id -u)" = 0 ] && unshare -m -n true 2>/dev/null; then
  offline_env=(unshare -m -n sh -c 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    "$tmp/cargo-home" "${offline_env[@]}")
  step "no network (unshare -n), CARGO_NET_OFFLINE=true, CARGO_HOME empty and read-only"
else
  step "no network for cargo: CARGO_NET_OFFLINE=true, CARGO_HOME empty (not root: the network stays up)"
fi

cd "$src"
t0=$SECONDS
"${offline_env[@]}" dune build -p offheap 2>&1 || fail "dune build -p offheap"
step "dune build -p offheap: $((SECONDS - t0)) s"
t0=$SECONDS
"${offline_env[@]}" dune build -p offheap @runtest >"$tmp/runtest.log" 2>&1 ||
  { cat "$tmp/runtest.log"; fail "dune build -p offheap @runtest"; }
grep '^Ran: ' "$tmp/runtest.log" | sed 's/^/    /'
step "dune build -p offheap @runtest (OCaml tests, native and bytecode; examples): $((SECONDS - t0)) s"
[ -f _build/offheap-cargo-target/default/release/liboffheap.a ] ||
  fail "cargo's output is not in _build/offheap-cargo-target/default"
[ ! -e target ] || fail "cargo wrote target/ into the source tree"

"${offline_env[@]}" cargo fetch --locked --quiet 2>&1 || fail "cargo fetch (offline, by hand)"
step "cargo by hand finds all of Cargo.lock in vendor/ (cargo fetch --locked, offline)"
[ ! -e "$tmp/cargo-home/registry" ] && [ ! -e "$tmp/cargo-home/git" ] ||
  fail "cargo downloaded crates into CARGO_HOME"
step "ok: nothing downloaded"
