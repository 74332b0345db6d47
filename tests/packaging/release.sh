#!/usr/bin/env bash
# make release: the source tarball _release/offheap-VERSION.tar.gz, which builds with no
# network (tests/packaging/offline.sh checks it).
#
# Contents: every file git tracks (as in the working tree; a warning when it differs
# from HEAD), plus
#   vendor/             the Rust crates of Cargo.lock (`cargo vendor --locked`: all of
#                       them, dev-dependencies and other platforms' included, since cargo
#                       resolves the whole lock file even for a build that needs a few);
#   .cargo/config.toml  replaces crates.io by vendor/. cargo run by hand in the unpacked
#                       tree finds it; the dune rule in lib/dune passes it explicitly,
#                       wherever the tree sits in a dune workspace.
# The version is offheap.opam's; Cargo.toml and CHANGES.md must agree with it. The
# archive is reproducible: sorted names, owner 0, the mtime of the last commit.
# Needs the network (or cargo's registry cache) for `cargo vendor`.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=$(sed -n 's/^version: "\(.*\)"$/\1/p' offheap.opam)
[ -n "$version" ] || { echo "release: no version in offheap.opam" >&2; exit 1; }
cargo_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ "$cargo_version" = "$version" ] ||
  { echo "release: offheap.opam says $version, Cargo.toml $cargo_version" >&2; exit 1; }
grep -q "^## $version\b" CHANGES.md ||
  { echo "release: CHANGES.md has no '## $version' entry" >&2; exit 1; }
git diff --quiet HEAD -- . ||
  echo "release: warning: the working tree differs from HEAD; the tarball has the working tree" >&2
[ -z "$(git ls-files --others --exclude-standard)" ] ||
  echo "release: warning: files git does not track are left out:" $(git ls-files --others --exclude-standard) >&2

name=offheap-$version
out=_release
stage=$out/$name
rm -rf "$stage" "$out/$name.tar.gz"
mkdir -p "$stage"

# Tracked files that exist (a file deleted in the working tree stays out).
git ls-files -z | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -P -t "$stage"

cargo vendor --quiet --locked --manifest-path "$stage/Cargo.toml" "$stage/vendor" >/dev/null
mkdir -p "$stage/.cargo"
cat >"$stage/.cargo/config.toml" <<'EOF'
# Written by `make release`: the Rust crates come from vendor/, never from the network.
# Relative paths here are relative to the directory that holds .cargo/.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
EOF

crates=$(ls "$stage/vendor" | wc -l)
mtime=$(git log -1 --format=%ct 2>/dev/null || date +%s)
tar --sort=name --mtime="@$mtime" --owner=0 --group=0 --numeric-owner \
  -C "$out" -cf - "$name" | gzip -n -9 >"$out/$name.tar.gz"
rm -rf "$stage"
echo "$out/$name.tar.gz: $(du -h "$out/$name.tar.gz" | cut -f1)," \
  "$crates vendored crates," \
  "sha256 $(sha256sum "$out/$name.tar.gz" | cut -c1-16)..."
