# Sourced by the packaging tests, from the project root, after setting `name`: messages
# `step` and `fail` tagged with it, and `tmp`, a scratch directory removed on exit.
# `need_tarball [TARBALL]` sets `version` and `tarball` (default: make release's).

step() { printf '[%s] %s\n' "$name" "$*"; }
fail() { printf '[%s] FAILED: %s\n' "$name" "$*" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/offheap-$name.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

need_tarball() {
  version=$(sed -n 's/^version: "\(.*\)"$/\1/p' offheap.opam)
  tarball=$(realpath "${1:-_release/offheap-$version.tar.gz}")
  [ -f "$tarball" ] || { echo "$name: no $tarball (make release)" >&2; exit 1; }
}
