# offheap: every entry point. `make demo` and `make test` work on a fresh Debian machine
# with Rust installed: they install OCaml, dune and the test libraries when missing.

DEBIAN_PACKAGES := ocaml-nox ocaml-dune ocaml-findlib libounit-ocaml-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OCAML5_ENV := ../shared/ocaml5-env.sh

.PHONY: all deps build demo test test-rust test-ocaml test-ocaml5 bench bench-quick lint fmt clean

all: build

# Installs the Debian packages that are missing (nothing when all are there).
deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }

build: deps
	dune build

# The main demo: a large value's cost to the major GC, on the heap and moved off it.
demo: build
	dune exec --no-print-directory -- ./examples/demo.exe

# All tests: Rust (core on the fake heap) and OCaml (native, bytecode, small minor heap).
test: deps test-rust test-ocaml

test-rust:
	cargo test --release --quiet

test-ocaml: deps
	dune build @runtest --force
	OCAMLRUNPARAM=s=4k dune build @runtest --force

# The same OCaml tests on OCaml 5.3, in a Debian trixie chroot (created on first use;
# the Rust tests do not depend on the OCaml version).
test-ocaml5:
	OCAML5_PACKAGES=make $(OCAML5_ENV) $(CURDIR) 'make test-ocaml DEBIAN_PACKAGES='

bench: build
	dune exec --no-print-directory -- ./benches/bench.exe
	cargo bench --bench traversal

bench-quick: build
	dune exec --no-print-directory -- ./benches/bench.exe -- -quick

lint:
	cargo fmt --check
	cargo clippy --all-targets --features stubs -- -D warnings
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt

clean:
	dune clean
	cargo clean
