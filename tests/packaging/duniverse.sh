#!/usr/bin/env bash
# make test-duniverse: offheap vendored inside a larger dune workspace.
#
# A temporary workspace, as opam-monorepo lays one out: a dune-project at its root, the
# release tarball (make release) unpacked as duniverse/offheap, an executable app/ that
# uses the library, and two build contexts (default, and "other" with the same
# compiler), built with no network for cargo (as offline.sh: a new network namespace
# when root, CARGO_NET_OFFLINE=true, an empty CARGO_HOME). Checks:
#   - no rule assumes offheap is the workspace root: the app builds and runs (native and
#     bytecode) and offheap's own tests and examples pass there
#     (dune build @duniverse/offheap/runtest);
#   - cargo takes the crates from duniverse/offheap/vendor (cargo's own search for
#     .cargo/ starts in _build, where it would not find offheap's);
#   - cargo's output goes to _build/offheap-cargo-target/<context>, one per context, and
#     nothing is written into the source tree.
# Usage: duniverse.sh [TARBALL]
set -euo pipefail
cd "$(dirname "$0")/../.."
name=duniverse
. tests/packaging/common.sh
need_tarball "$@"
ws=$tmp/workspace
mkdir -p "$ws/duniverse" "$ws/app" "$tmp/cargo-home" "$tmp/home"
tar -xzf "$tarball" -C "$ws/duniverse"
mv "$ws/duniverse/offheap-$version" "$ws/duniverse/offheap"

cat >"$ws/dune-project" <<'EOF'
(lang dune 2.9)
EOF
cat >"$ws/dune-workspace" <<'EOF'
(lang dune 2.9)
(context default)
(context (default (name other)))
EOF
cat >"$ws/app/dune" <<'EOF'
(executable
 (name app)
 (modes native byte)
 (libraries offheap))
EOF
cat >"$ws/app/app.ml" <<'EOF'
let () =
  let words = Hashtbl.create 16 in
  List.iteri (fun i w -> Hashtbl.replace words w i) [ "mono"; "repo"; "duniverse" ];
  let h = Offheap.copy words in
  assert (Hashtbl.find (Offheap.get h) "duniverse" = 2);
  Offheap.free h;
  Printf.printf "app in a workspace (%s): ok\n"
    (match Sys.backend_type with Native -> "native" | Bytecode -> "bytecode" | Other s -> s)
EOF

sources() { (cd "$ws/duniverse/offheap" && find . -path ./_build -prune -o -print | sort | sha256sum); }
before=$(sources)

sysroot=$(rustc --print sysroot)
run=(env -i HOME="$tmp/home" PATH="$sysroot/bin:/usr/local/bin:/usr/bin:/bin"
  CARGO_HOME="$tmp/cargo-home" CARGO_NET_OFFLINE=true
  RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" LC_ALL=C.UTF-8 TMPDIR="$tmp")
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then run=(unshare -n "${run[@]}"); fi

cd "$ws"
t0=$SECONDS
"${run[@]}" dune build ./app/app.exe ./app/app.bc @install 2>&1 || fail "dune build in the workspace"
step "built in both contexts: $((SECONDS - t0)) s"
for ctx in default other; do
  "_build/$ctx/app/app.exe"
  ocamlrun -I "_build/$ctx/duniverse/offheap/lib" "_build/$ctx/app/app.bc"
  [ -f "_build/offheap-cargo-target/$ctx/release/liboffheap.a" ] ||
    fail "no cargo output in _build/offheap-cargo-target/$ctx"
done
step "cargo output: _build/offheap-cargo-target/{default,other}"
[ ! -e "$tmp/cargo-home/registry" ] || fail "cargo downloaded crates: vendor/ was not used"

t0=$SECONDS
"${run[@]}" dune build @_build/default/duniverse/offheap/runtest \
  >"$tmp/runtest.log" 2>&1 || { cat "$tmp/runtest.log"; fail "offheap's tests in the workspace"; }
grep '^Ran: ' "$tmp/runtest.log" | sed 's/^/    /'
step "offheap's tests and examples in duniverse/offheap: $((SECONDS - t0)) s"

[ "$(sources)" = "$before" ] || fail "the build wrote into duniverse/offheap"
[ ! -e "$ws/target" ] && [ ! -e "$ws/duniverse/offheap-cargo-target" ] || fail "cargo output outside _build"
step "ok: nothing written outside _build"
