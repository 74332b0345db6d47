#!/usr/bin/env bash
# tools/ocaml5-env.sh: offheap's own way of getting OCaml 5.3 on a Debian 12 host, whose
# OCaml is 4.13. `make test-ocaml5` and `make test-install-ocaml5` run through it, so a
# clone of the project alone tests both runtimes. (It started as a copy of the team's
# shared ocaml5-env.sh and keeps its chroot layout, so the two can share one chroot;
# this copy is the one the project maintains and the Makefile uses, also where the
# shared one exists.)
#
#   tools/ocaml5-env.sh PROJECT_DIR 'COMMAND'
#
# Creates (once, idempotently, under a lock) a Debian trixie chroot with OCaml 5.3,
# dune 3.17, findlib, OUnit2, gcc and make, then runs COMMAND inside it, in PROJECT_DIR,
# and exits with its status. Needs root (debootstrap, chroot, mount): the Makefile runs
# it with sudo when not root. Installs debootstrap on the host when missing.
#
# * Everything is mounted in a private mount namespace (unshare -m), so no mount
#   outlives the command, even if it is killed.
# * The project is bind-mounted at the SAME absolute path, read-write. The directories
#   named in OCAML5_SHADOW (default "_build _build_faults target": every dune build
#   directory the Makefile uses, and cargo's) are replaced, inside the chroot only, by
#   per-project directories kept in the chroot, so host (OCaml 4.13) and chroot (OCaml
#   5.3) builds never share dune or cargo outputs. This matters: ocaml-sys's
#   build.rs only re-runs when OCAMLOPT/OCAML_VERSION/OCAML_WHERE_PATH change, so a
#   cargo target directory built against 4.13 would silently be reused (without the
#   `ocaml5` cfg). A missing one is created on the host (it is the mount point), owned
#   by the user who ran sudo.
# * Rust: the host's rustup toolchain ($CARGO_HOME, $RUSTUP_HOME) is bind-mounted at the
#   same paths (cargo's registry cache is shared). With OCAML5_RUST=debian, or when the
#   host has no rustup, trixie's own cargo and rustc (1.85) are installed in the chroot
#   instead: too old for offheap (rust-version 1.87), so offheap needs the host's.
#   The command runs as root: through sudo, crates that cargo downloads in the chroot
#   land in the user's registry cache owned by root (`make test` on the host first
#   fetches them all as the user).
#
# Environment knobs (empty means the default):
#   OCAML5_CHROOT   chroot directory            (default /var/cache/ocaml5-chroot)
#   OCAML5_MIRROR   Debian mirror               (default http://deb.debian.org/debian)
#   OCAML5_SUITE    Debian suite                (default trixie)
#   OCAML5_BASE_PACKAGES  the chroot's packages (default: OCaml, dune, findlib, OUnit2,
#                   gcc, make; see PACKAGES below)
#   OCAML5_PACKAGES extra packages to install in the chroot (space separated)
#   OCAML5_SHADOW   project subdirs private to the chroot (default
#                   "_build _build_faults target"; "none" for none)
#   OCAML5_MODE     bind (default) or copy (copy the project into the chroot; results
#                   are NOT copied back)
#   OCAML5_EPHEMERAL 1: run COMMAND on a throw-away overlay of the chroot, so that what
#                   it installs or writes there (the shadowed dirs included) is gone
#                   afterwards: a fresh machine at every run (make test-fresh-debian)
#   OCAML5_RUST     host (default when the host has rustup) or debian
#   OCAML5_PASS_ENV extra variable names to pass into the chroot
#
# Measured on a 2-core bookworm VM (2026-11-25): cold (no chroot) 52-59 s (debootstrap
# 21-34 s, apt-get install 13-18 s); warm no-op run ~0.1 s. Chroot: about 710 MB; each
# project's shadowed _build and target add about 90 MB.
#
# Project-side notes: the dune rule that runs cargo lists Cargo.lock in its deps and
# passes --locked (else `dune build @runtest` re-resolves from crates.io); bytecode stubs
# (dll*_stubs.so from the cdylib) only load because the `ocaml` crate is built with
# feature "no-caml-startup" (else: undefined symbol caml_startup, on 4.13 and 5.3).
set -euo pipefail

log() { printf '[ocaml5-env] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

[ $# -ge 2 ] || die "usage: $0 PROJECT_DIR 'COMMAND'"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mount)"
PROJECT=$(realpath -e "$1") || die "no such project dir: $1"
shift
CMD="$*"

ROOT=${OCAML5_CHROOT:-/var/cache/ocaml5-chroot}
MIRROR=${OCAML5_MIRROR:-http://deb.debian.org/debian}
SUITE=${OCAML5_SUITE:-trixie}
SHADOW=${OCAML5_SHADOW:-_build _build_faults target}
if [ "$SHADOW" = none ]; then SHADOW=; fi
MODE=${OCAML5_MODE:-bind}
HOST_CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
HOST_RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
if [ -z "${OCAML5_RUST:-}" ]; then
  if [ -x "$HOST_CARGO_HOME/bin/cargo" ] && [ -d "$HOST_RUSTUP_HOME/toolchains" ]; then
    OCAML5_RUST=host
  else
    OCAML5_RUST=debian
  fi
fi

BASE_PACKAGES=${OCAML5_BASE_PACKAGES:-ocaml-nox ocaml-dune ocaml-findlib libounit-ocaml-dev gcc libc6-dev make ca-certificates}
PACKAGES="$BASE_PACKAGES ${OCAML5_PACKAGES:-}"
[ "$OCAML5_RUST" = debian ] && PACKAGES="$PACKAGES cargo rustc"
PACKAGES=$(printf '%s\n' $PACKAGES | sort -u | tr '\n' ' ')
STAMP="$ROOT/.ocaml5-env-packages"

# The host may sit behind a TLS-intercepting proxy whose CA is only in the
# host's bundle: copy the host's CA bundle files (default path and any named
# by SSL_CERT_FILE / CURL_CA_BUNDLE / CARGO_HTTP_CAINFO) to the same paths in
# the chroot before every use, so cargo can reach crates.io from inside.
sync_host_files() {
  local f
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  for f in /etc/ssl/certs/ca-certificates.crt ${SSL_CERT_FILE:-} ${CURL_CA_BUNDLE:-} ${CARGO_HTTP_CAINFO:-}; do
    [ -f "$f" ] || continue
    mkdir -p "$ROOT$(dirname "$f")"
    cp -L "$f" "$ROOT$f.tmp" && mv "$ROOT$f.tmp" "$ROOT$f"
  done
}

# Run a command in the chroot with /proc and /dev, in a private mount namespace.
chroot_admin() {
  unshare -m --propagation private bash -euc '
    R=$1; shift
    mount -t proc proc "$R/proc"
    mount --rbind /dev "$R/dev"
    exec chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"' _ "$ROOT" "$@"
}

# ready when every wanted package is in the stamp (the set installed so far)
chroot_ready() {
  [ -f "$STAMP" ] || return 1
  local p
  for p in $PACKAGES; do grep -qx -- "$p" "$STAMP" || return 1; done
}

ensure_chroot() {
  chroot_ready && return 0
  mkdir -p "$(dirname "$ROOT")"
  exec 9>"$ROOT.lock"
  flock 9
  chroot_ready && { exec 9>&-; return 0; }
  local t0=$SECONDS
  if [ ! -x "$ROOT/usr/bin/apt-get" ]; then   # not bootstrapped yet
    if ! command -v debootstrap >/dev/null; then
      log "installing debootstrap on the host"
      apt-get install -y debootstrap >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y debootstrap >/dev/null; }
    fi
    local tmp="$ROOT.partial"
    rm -rf "$tmp"
    log "debootstrap $SUITE into $tmp"
    debootstrap --variant=minbase \
      --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      "$SUITE" "$tmp" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 ||
      { tail -20 "$ROOT.debootstrap.log" >&2; die "debootstrap failed (log: $ROOT.debootstrap.log)"; }
    echo "deb $MIRROR $SUITE main" >"$tmp/etc/apt/sources.list"
    rm -rf "$ROOT"
    mv "$tmp" "$ROOT"
    log "debootstrap done in $((SECONDS - t0))s"
  fi
  sync_host_files
  log "installing: $PACKAGES"
  # shellcheck disable=SC2086
  chroot_admin sh -c "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null && apt-get clean" ||
    die "apt-get install in the chroot failed"
  { [ -f "$STAMP" ] && cat "$STAMP"; printf '%s\n' $PACKAGES; } | sort -u >"$STAMP.new"
  mv "$STAMP.new" "$STAMP"
  exec 9>&-
  log "chroot ready in $((SECONDS - t0))s ($(du -sh "$ROOT" 2>/dev/null | cut -f1))"
}

ensure_chroot

sync_host_files
KEY=$(printf '%s' "$PROJECT" | sha256sum | cut -c1-16)
STATE="$ROOT/var/lib/ocaml5-env/$KEY"
mkdir -p "$STATE"

if [ "$MODE" = copy ]; then
  WORK="/var/lib/ocaml5-env/$KEY/src"       # path inside the chroot
  mkdir -p "$ROOT$WORK"
  excl=()
  for d in $SHADOW; do excl+=(--exclude="./$d"); done
  # refresh the copy but keep the shadowed build dirs (warm builds)
  find "$ROOT$WORK" -mindepth 1 -maxdepth 1 $(for d in $SHADOW; do printf '! -name %s ' "$d"; done) -exec rm -rf {} +
  tar -C "$PROJECT" "${excl[@]}" -cf - . | tar -C "$ROOT$WORK" -xf -
else
  WORK="$PROJECT"
  for d in $SHADOW; do
    mkdir -p "$STATE/$d"
    if [ ! -d "$PROJECT/$d" ]; then
      mkdir -p "$PROJECT/$d"
      # run through sudo: the mount point belongs to the user, who builds there on the host
      if [ -n "${SUDO_UID:-}" ]; then chown "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$PROJECT/$d"; fi
    fi
  done
fi

# OCAML5_EPHEMERAL=1: an overlay of the chroot, in a directory beside it, removed at exit.
EPHEMERAL=
if [ "${OCAML5_EPHEMERAL:-}" = 1 ]; then
  EPHEMERAL=$(mktemp -d "$ROOT.ephemeral.XXXXXX")
  trap 'rm -rf "$EPHEMERAL"' EXIT
fi

PASS=(CI TERM OCAMLRUNPARAM OCAMLPARAM DUNE_PROFILE RUST_BACKTRACE CARGO_TERM_COLOR CARGO_NET_OFFLINE
      SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE CARGO_HTTP_CAINFO ${OCAML5_PASS_ENV:-})
ENVV=(PATH="$HOST_CARGO_HOME/bin:/usr/local/bin:/usr/bin:/bin" HOME=/root LC_ALL=C.UTF-8 USER=root)
[ "$OCAML5_RUST" = host ] && ENVV+=(CARGO_HOME="$HOST_CARGO_HOME" RUSTUP_HOME="$HOST_RUSTUP_HOME")
for v in "${PASS[@]}"; do [ -n "${!v+x}" ] && ENVV+=("$v=${!v}"); done

export O5_EPHEMERAL="$EPHEMERAL" O5_ROOT="$ROOT" O5_WORK="$WORK" O5_PROJECT="$PROJECT" O5_MODE="$MODE" O5_STATE="$STATE" \
       O5_SHADOW="$SHADOW" O5_RUST="$OCAML5_RUST" O5_CH="$HOST_CARGO_HOME" O5_RH="$HOST_RUSTUP_HOME"
status=0
unshare -m --propagation private bash -euc '
  R=$O5_ROOT
  STATE=$O5_STATE
  if [ -n "$O5_EPHEMERAL" ]; then
    E=$O5_EPHEMERAL
    mkdir -p "$E/upper" "$E/work" "$E/root"
    mount -t overlay overlay -o "lowerdir=$R,upperdir=$E/upper,workdir=$E/work" "$E/root"
    R=$E/root
    STATE=$R${O5_STATE#"$O5_ROOT"}
  fi
  mount -t proc proc "$R/proc"
  mount --rbind /dev "$R/dev"
  mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
  if [ "$O5_RUST" = host ]; then
    for d in "$O5_CH" "$O5_RH"; do mkdir -p "$R$d"; mount --bind "$d" "$R$d"; done
  fi
  if [ "$O5_MODE" = bind ]; then
    mkdir -p "$R$O5_PROJECT"
    mount --bind "$O5_PROJECT" "$R$O5_PROJECT"
    for d in $O5_SHADOW; do mount --bind "$STATE/$d" "$R$O5_PROJECT/$d"; done
  fi
  exec chroot "$R" /usr/bin/env -i "$@"
' _ "${ENVV[@]}" bash -c 'cd "$0" && eval "$1"' "$WORK" "$CMD" || status=$?
exit "$status"
