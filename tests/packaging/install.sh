#!/usr/bin/env bash
# make test-install: `dune install` to a temporary prefix, then, against that installed
# copy only (OCAMLPATH and CAML_LD_LIBRARY_PATH point at it):
#   1. the files: library (byte and native), stub archives, stub DLL, .mli, offheap.h;
#   2. ocamlfind finds it there;
#   3. an external dune project (tests/packaging/external) builds, and runs in native
#      code and in bytecode (dlloffheap_stubs.so loaded from the prefix's stublibs);
#   4. a C allocator (external/c_alloc) that includes the installed offheap.h and calls
#      offheap_alloc builds with ocamlfind, and runs natively and in bytecode (its stubs
#      in a DLL of their own, made with ocamlmklib);
#   5. the toplevel: `ocaml` with `#require "offheap";;` runs a copy/get/free session
#      (the one in the README) and prints what it should;
#   6. the examples of offheap.mli, extracted by check_doc.ml, run in the toplevel.
# Usage: install.sh [PROJECT_DIR]   (default: this checkout, built with `dune build`)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "${1:-$here/../..}" && pwd)
name=install
. "$here/common.sh"
prefix=$tmp/prefix

step "dune install --prefix $prefix"
(cd "$project" && dune build @install && dune install --prefix "$prefix" offheap >"$tmp/install.log" 2>&1) ||
  { cat "$tmp/install.log" >&2; fail "dune install"; }

for f in lib/offheap/META lib/offheap/offheap.cma lib/offheap/offheap.cmxa \
  lib/offheap/offheap.a lib/offheap/offheap.cmxs lib/offheap/offheap.cmi \
  lib/offheap/offheap.mli lib/offheap/offheap.cmti lib/offheap/offheap.h \
  lib/offheap/liboffheap_stubs.a lib/stublibs/dlloffheap_stubs.so; do
  [ -f "$prefix/$f" ] || fail "not installed: $f"
done
grep -q '^version = "' "$prefix/lib/offheap/META" || fail "META has no version"
step "installed: library, stub archive and DLL, offheap.mli, offheap.h"

export OCAMLPATH=$prefix/lib
export CAML_LD_LIBRARY_PATH=$prefix/lib/stublibs
unset OCAMLFIND_CONF OCAMLFIND_DESTDIR OCAMLFIND_IGNORE_DUPS_IN OCAMLTOP_INCLUDE_PATH
pkgdir=$(ocamlfind query offheap)
[ "$pkgdir" = "$prefix/lib/offheap" ] || fail "ocamlfind finds offheap in $pkgdir, not in $prefix"

step "an external dune project against the installed copy"
cp -r "$here/external" "$tmp/external"
(cd "$tmp/external" && dune build --root . ./main.exe ./main.bc 2>&1) || fail "external dune project"
"$tmp/external/_build/default/main.exe"
ocamlrun "$tmp/external/_build/default/main.bc"

step "a C allocator built with ocamlfind against the installed offheap.h"
cd "$tmp/external/c_alloc"
cflags="-I $pkgdir -Wall -Wextra -Werror"
ocamlfind ocamlopt -package offheap -linkpkg -ccopt "$cflags" \
  counting.c counting_main.ml -o counting.exe
./counting.exe
ocamlfind ocamlc -c -ccopt "$cflags" counting.c
ocamlmklib -o counting_stubs counting.o
ocamlfind ocamlc -package offheap -linkpkg -dllib -lcounting_stubs \
  counting_main.ml -o counting.bc
CAML_LD_LIBRARY_PATH=.:$CAML_LD_LIBRARY_PATH ocamlrun ./counting.bc
cd "$tmp"

step 'the toplevel: #require "offheap";; and a copy/get/free session'
cat >session.ml <<'EOF'
#use "topfind";;
#require "offheap";;
let h = Offheap.copy [1; 2; 3];;
Offheap.get h;;
(Offheap.stats h).blocks;;
Offheap.free h;;
Offheap.get h;;
EOF
ocaml -noinit -noprompt <session.ml >session.out 2>&1 || true
expected=(
  'val h : int list Offheap.t = <abstr>'
  '- : int list = [1; 2; 3]'
  '- : int = 3'
  '- : unit = ()'
  'Exception: Invalid_argument "Offheap.get: deleted".'
)
for line in "${expected[@]}"; do
  grep -qxF -- "$line" session.out || { cat session.out >&2; fail "toplevel: no line: $line"; }
done
! grep -q -e '^Error' -e 'undefined symbol' -e 'Cannot load' session.out ||
  { cat session.out >&2; fail "toplevel: an error"; }
sed -n '/^val h/,$p' session.out | sed 's/^/    /'

step "the examples of offheap.mli, in the toplevel"
printf '#use "topfind";;\n#require "offheap";;\n' >examples.ml
ocaml "$here/check_doc.ml" "$pkgdir/offheap.mli" examples.body >/dev/null
cat examples.body >>examples.ml
ocaml -noinit examples.ml >examples.out 2>&1 || { cat examples.out >&2; fail "an example of offheap.mli"; }
! grep -q -e '^Error' -e '^Exception' -e 'Warning' -e 'Alert' examples.out ||
  { cat examples.out >&2; fail "an example of offheap.mli"; }
step "ok: $(grep -c '^(\* the example of' examples.body) examples ran"
