# offheap: every entry point. `make demo` and `make test` work on a fresh Debian machine
# with Rust installed: they install OCaml, dune and the test libraries when missing.

DEBIAN_PACKAGES := ocaml-nox ocaml-dune ocaml-findlib libounit-ocaml-dev ocaml-odoc
# For the packaging tests only (make test-packaging): opam for `opam lint`, findlib's
# toplevel support (topfind) for the toplevel test.
PACKAGING_PACKAGES := opam libfindlib-ocaml-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OCAML5_ENV := ../shared/ocaml5-env.sh

.PHONY: all deps deps-packaging build demo doc test test-rust test-ocaml test-doc test-ocaml5 \
	release opam-lint test-release test-duniverse test-install test-install-ocaml5 \
	test-packaging bench bench-quick lint fmt clean

all: build

# $(call install_missing,PACKAGES,APT_FLAGS): installs those of PACKAGES that are missing
# (nothing when all are there).
define install_missing
	@missing=$$(for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef

deps:
	$(call install_missing,$(DEBIAN_PACKAGES),)
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }

# The same, for the packaging tests' tools (recommended packages left out).
deps-packaging: deps
	$(call install_missing,$(PACKAGING_PACKAGES),--no-install-recommends)

build: deps
	dune build

# The main demo: a large value's cost to the major GC, on the heap and moved off it.
demo: build
	dune exec --no-print-directory -- ./examples/demo.exe

# The API documentation (odoc): _build/default/_doc/_html/index.html.
doc: deps
	dune build @doc
	@echo "API documentation: _build/default/_doc/_html/offheap/Offheap/index.html"

# All tests: Rust (core on the fake heap), OCaml (native, bytecode, small minor heap; the
# examples) and the documentation.
test: deps test-rust test-ocaml test-doc

test-rust:
	cargo test --release --quiet

test-ocaml: deps
	dune build @runtest --force
	OCAMLRUNPARAM=s=4k dune build @runtest --force

# Every value of offheap.mli documented with an example and its exceptions, no stray
# doc comment (warning 50); then odoc, which must not warn (a broken {!reference}...).
# _doc is removed first so that odoc runs, and warns, again.
test-doc: deps
	ocaml tests/packaging/check_doc.ml lib/offheap.mli
	@rm -rf _build/default/_doc
	@out=$$(dune build @doc 2>&1) || { echo "$$out"; exit 1; }; \
	if [ -n "$$out" ]; then echo "$$out"; echo "dune build @doc: odoc warns"; exit 1; fi; \
	echo "dune build @doc: no warnings"

# The same OCaml tests on OCaml 5.3, in a Debian trixie chroot (created on first use;
# the Rust tests do not depend on the OCaml version).
test-ocaml5:
	OCAML5_PACKAGES=make $(OCAML5_ENV) $(CURDIR) 'make test-ocaml DEBIAN_PACKAGES='

# Packaging (tests/packaging/): the release tarball, built offline; offheap inside a
# larger dune workspace; the installed library (dune project, C allocator via ocamlfind,
# toplevel) on OCaml 4.13 and 5.3; opam lint.
test-packaging: opam-lint test-release test-duniverse test-install test-install-ocaml5

# _release/offheap-VERSION.tar.gz: the sources with the Rust crates vendored.
release: deps
	bash tests/packaging/release.sh

opam-lint: deps-packaging
	@out=$$(opam lint --strict offheap.opam 2>&1); status=$$?; \
	echo "$$out" | grep -v 'Running as root is not recommended'; exit $$status

test-release: release
	bash tests/packaging/offline.sh

test-duniverse: release
	bash tests/packaging/duniverse.sh

test-install: deps-packaging
	bash tests/packaging/install.sh

test-install-ocaml5:
	OCAML5_PACKAGES="make libfindlib-ocaml-dev" $(OCAML5_ENV) $(CURDIR) 'bash tests/packaging/install.sh'

bench: build
	dune exec --no-print-directory -- ./benches/bench.exe
	cargo bench --bench traversal

bench-quick: build
	dune exec --no-print-directory -- ./benches/bench.exe -- -quick

# Formatting; clippy on every target and feature set, any warning an error; the claim
# rust-version makes (clippy's incompatible_msrv for offheap's own code, msrv.sh for the
# crates it builds with).
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features stubs -- -D warnings
	cargo clippy --all-targets --all-features -- -D warnings
	bash tests/packaging/msrv.sh

fmt:
	cargo fmt

clean:
	dune clean
	cargo clean
	rm -rf _release

# Images: loading a 1 GB value in fresh processes (Marshal vs Offheap.Image) and the
# memory of 4 processes holding it. IMAGE_BENCH_FLAGS=-quick for a 50 MB run.
.PHONY: bench-image
bench-image: build
	dune exec --no-print-directory -- ./benches/image_bench.exe -- $(IMAGE_BENCH_FLAGS)
