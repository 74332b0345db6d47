# offheap: every entry point. `make demo` and `make test` work on a fresh Debian 12 machine
# with make and Rust: they install OCaml, dune and the test libraries when missing
# (make test-fresh-debian checks it).

DEBIAN_PACKAGES := ocaml-nox ocaml-dune ocaml-findlib libounit-ocaml-dev ocaml-odoc
# For the packaging tests only (make test-packaging): opam for `opam lint`, findlib's
# toplevel support (topfind) for the toplevel test.
PACKAGING_PACKAGES := opam libfindlib-ocaml-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# $(call in_chroot,PACKAGES,COMMAND): runs COMMAND in this project inside a Debian chroot
# with OCaml 5.3 (Debian trixie) and PACKAGES, made on first use (about a minute) by the
# project's own tools/ocaml5-env.sh (see its header). Always that one, also where the
# team's ../shared/ocaml5-env.sh exists: CI runs what a clone of the project alone runs.
# It needs root: through sudo otherwise, with the user's Rust toolchain; its OCAML5_*
# settings (OCAML5_CHROOT: the chroot's directory...) are passed on.
OCAML5_VARS := OCAML5_CHROOT OCAML5_MIRROR OCAML5_SUITE OCAML5_BASE_PACKAGES OCAML5_SHADOW \
	OCAML5_MODE OCAML5_EPHEMERAL OCAML5_RUST OCAML5_PASS_ENV
define in_chroot
	@echo '[$@] in the chroot (tools/ocaml5-env.sh): $(2)'
	@$(SUDO) env CARGO_HOME="$${CARGO_HOME:-$$HOME/.cargo}" \
	  RUSTUP_HOME="$${RUSTUP_HOME:-$$HOME/.rustup}" \
	  $(foreach v,$(OCAML5_VARS),$(v)="$${$(v):-}") \
	  OCAML5_PACKAGES="$(1)" tools/ocaml5-env.sh $(CURDIR) '$(2)'
endef

.PHONY: all deps deps-packaging build demo doc test test-rust test-ocaml test-faults test-doc test-ocaml5 \
	test-fresh-debian \
	release opam-lint test-release test-duniverse test-install test-install-ocaml5 \
	test-packaging bench bench-quick bench-small lint fmt clean

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
test: deps test-rust test-ocaml test-faults test-doc

test-rust:
	cargo test --release --quiet

test-ocaml: deps
	dune build @runtest --force
	OCAMLRUNPARAM=s=4k dune build @runtest --force

# Debian ships no odoc files for the standard library, so odoc cannot resolve Stdlib
# types that a signature shows (Obj.t in Offheap.Region): that one warning is expected
# (and dune's line naming the odoc step that printed it).
# Every value of offheap.mli documented with an example and its exceptions, no stray
# doc comment (warning 50); then odoc, which must not warn (a broken {!reference}...).
# _doc is removed first so that odoc runs, and warns, again.
test-doc: deps
	ocaml tests/packaging/check_doc.ml lib/offheap.mli
	@rm -rf _build/default/_doc
	@out=$$(dune build @doc 2>&1) || { echo "$$out"; exit 1; }; \
	out=$$(printf '%s\n' "$$out" | awk '/^File .*offheap\.odoc":$$/ { f = $$0; next } \
	  /^Warning: Couldn.t find the following modules:$$/ { w = $$0; next } \
	  w != "" && /^  Stdlib$$/ { f = ""; w = ""; next } /^ +odoc / { next } \
	  { if (f != "") print f; if (w != "") print w; f = ""; w = ""; print }'); \
	if [ -n "$$out" ]; then echo "$$out"; echo "dune build @doc: odoc warns"; exit 1; fi; \
	echo "dune build @doc: no warnings (but that Debian ships no odoc files for Stdlib)"

# The stubs built with the cargo feature fault-injection, in a build directory of their
# own (tests/faults/): a panic inside a stub aborts the process with its message; copies
# freed in loops, their released memory kept unreadable (OFFHEAP_POISON_RELEASED; the
# tests beside a second domain on OCaml 5 only); every operation with memory failing at
# each of its allocations (test_alloc_oom, native only).
FAULTS_BUILD := _build_faults
FAULTS := $(FAULTS_BUILD)/default/tests/faults
FAULTS_BYTECODE := CAML_LD_LIBRARY_PATH=$(FAULTS_BUILD)/default/lib
POISONED := OFFHEAP_POISON_RELEASED=1
test-faults: deps
	OFFHEAP_CARGO_FEATURES=fault-injection dune build --build-dir $(FAULTS_BUILD) \
	  $(foreach t,test_panics test_released test_released5,tests/faults/$(t).exe tests/faults/$(t).bc) \
	  tests/faults/test_alloc_oom.exe
	$(FAULTS)/test_alloc_oom.exe
	$(FAULTS)/test_panics.exe
	$(FAULTS_BYTECODE) $(FAULTS)/test_panics.bc
	$(POISONED) $(FAULTS)/test_released.exe
	$(POISONED) $(FAULTS_BYTECODE) $(FAULTS)/test_released.bc
	if [ "$$(ocamlfind ocamlc -version | cut -d. -f1)" -ge 5 ]; then \
	  $(POISONED) $(FAULTS)/test_released5.exe -runner sequential && \
	  $(POISONED) $(FAULTS_BYTECODE) $(FAULTS)/test_released5.bc -runner sequential; fi

# The same OCaml tests on OCaml 5.3, in a Debian trixie chroot (created on first use;
# the Rust tests do not depend on the OCaml version).
test-ocaml5:
	$(call in_chroot,,ocamlfind ocamlopt -version && make test-ocaml test-faults DEBIAN_PACKAGES=)

# The promise of the README's first lines: `make demo` and `make test` on a fresh Debian
# 12 machine with make and Rust, installing what they need themselves. Both run in a
# Debian bookworm chroot (minbase, plus make, gcc and CA certificates: what installing
# Rust with rustup needs; the host's Rust toolchain) on a throw-away overlay, so every
# run starts from the fresh system. The chroot is FRESH_CHROOT (made on first use).
FRESH_CHROOT := /var/cache/offheap-bookworm-chroot
test-fresh-debian: export OCAML5_CHROOT := $(FRESH_CHROOT)
test-fresh-debian: export OCAML5_SUITE := bookworm
test-fresh-debian: export OCAML5_BASE_PACKAGES := make gcc libc6-dev ca-certificates
test-fresh-debian: export OCAML5_EPHEMERAL := 1
test-fresh-debian:
	$(call in_chroot,,echo Debian $$(cat /etc/debian_version) && make demo && make test)

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
	$(call in_chroot,libfindlib-ocaml-dev,bash tests/packaging/install.sh)

bench: build
	dune exec --no-print-directory -- ./benches/bench.exe
	dune exec --no-print-directory -- ./benches/region_bench.exe
	dune exec --no-print-directory -- ./benches/bigarray_bench.exe
	cargo bench --bench traversal

bench-quick: build
	dune exec --no-print-directory -- ./benches/bench.exe -quick

# Only the small values' per-call table (issue 9), on OCaml 4 and in the OCaml 5.3 chroot.
bench-small: build
	dune exec --no-print-directory -- ./benches/bench.exe -small
	$(call in_chroot,,dune exec --no-print-directory -- ./benches/bench.exe -small)

# make bench's tables on OCaml 5.3 (one domain), in the chroot of test-ocaml5; then the copy
# with a second domain running (side table), and how long it keeps that domain waiting.
# BENCH_FLAGS (e.g. -quick, -only ast) go to every run.
.PHONY: bench-ocaml5 bench-ocaml5-domains bench-many-domains
bench-ocaml5:
	$(call in_chroot,,dune build ./benches/bench.exe && ./_build/default/benches/bench.exe $(BENCH_FLAGS))

bench-ocaml5-domains:
	$(call in_chroot,,dune build ./benches/bench.exe && ./_build/default/benches/bench.exe -domains $(BENCH_FLAGS))

# Copies beside more domains than cores (benches/many_domains.ml5), OCaml 5.3 in the chroot.
bench-many-domains:
	$(call in_chroot,,dune build ./benches/many_domains.exe && ./_build/default/benches/many_domains.exe $(BENCH_FLAGS))

# Formatting; clippy on every target and feature set, any warning an error; rustdoc
# (broken links); the claim rust-version makes (clippy's incompatible_msrv for offheap's
# own code, msrv.sh for the crates it builds with).
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features stubs -- -D warnings
	cargo clippy --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features stubs --quiet
	bash tests/packaging/msrv.sh

fmt:
	cargo fmt

clean:
	dune clean
	cargo clean
	rm -rf _release

# Images: loading a 1 GB value in fresh processes (Marshal vs Offheap.Image) and the
# memory of 4 processes holding it. IMAGE_BENCH_FLAGS=-quick for a 50 MB run.
.PHONY: bench-image bench-image-ocaml5
bench-image: build
	dune exec --no-print-directory -- ./benches/image_bench.exe $(IMAGE_BENCH_FLAGS)

# The same on OCaml 5.3, in the chroot of test-ocaml5 (no page table: a trusted mapped
# load is a few system calls whatever the size).
bench-image-ocaml5:
	$(call in_chroot,,dune build ./benches/image_bench.exe && ./_build/default/benches/image_bench.exe $(IMAGE_BENCH_FLAGS))

# A 6 GB image written and loaded every way (tests/image/test_image_large.ml): about 13 GB
# of memory and 6 GB of disk in $TMPDIR (or OFFHEAP_LARGE_DIR).
.PHONY: test-image-large
test-image-large: build
	OFFHEAP_LARGE_TESTS=1 dune exec --no-print-directory -- ./tests/image/test_image_large.exe

# Regions: small adds, incremental building against building on the heap, a map updated
# in batches (benches/region_bench.ml; also part of make bench).
.PHONY: bench-region
bench-region: build
	dune exec --no-print-directory -- ./benches/region_bench.exe $(REGION_BENCH_FLAGS)

# Bigarrays: a 1 GB float64 Bigarray and an index copied (against a warm memmove), its
# image loaded in fresh processes, 4 processes' Pss. BIGARRAY_BENCH_FLAGS=-quick: 64 MB.
.PHONY: bench-bigarray
bench-bigarray: build
	dune exec --no-print-directory -- ./benches/bigarray_bench.exe $(BIGARRAY_BENCH_FLAGS)

# What fresh memory costs here: the first touch of 4 KiB and huge pages, right after a
# free and after a pause (benches/fresh_pages.c; the README's "Fresh memory").
# PAGES_FLAGS: MB, pause in seconds, rounds (default 512 6 3).
.PHONY: bench-pages
bench-pages:
	@mkdir -p _build
	cc -O2 -Wall -o _build/fresh_pages benches/fresh_pages.c
	_build/fresh_pages $(PAGES_FLAGS)
