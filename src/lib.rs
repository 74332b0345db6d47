//! offheap: deep copies of OCaml values outside the GC heap.
//!
//! The crate is the Rust half of the OCaml library `offheap` (see `lib/offheap.mli`).
//! Its modules, each with one job:
//!
//! - [`layout`]: the OCaml block layout (headers, tags, colors, closure info).
//! - [`memcopy`]: copies of memory that avoid a slow path of the processor's `rep movsb`.
//! - [`message`]: error messages bounded in size for the OCaml strings that carry them.
//! - [`copy`]: the traversal that copies a graph of blocks into one allocation; generic
//!   over a [`copy::Heap`] (which addresses to copy), an [`alloc::Allocator`] and a
//!   [`copy::visited::VisitedSet`], so it runs on the real runtime and on a fake heap.
//! - [`bigarray`]: the layout of the runtime's Bigarrays (`struct caml_ba_array`).
//! - [`alloc`]: the allocator trait, the C allocator block, the default allocator.
//! - [`image`]: images: a copy saved to a file and mapped back (format, writer, validator,
//!   relocation).
//! - [`region`]: regions: chunks that values are added to by bump allocation, rolled
//!   back when an add fails.
//! - [`size_class`]: the size classes of the slab that serves small copies.
//! - [`thread_end`]: what a thread keeps between copies, given back when it ends
//!   (without `thread_local!` destructors, whose registration can abort).
//! - `region_stubs` (feature `stubs`): the externals of `lib/region.ml`.
//! - `runtime` (feature `stubs`): what differs between OCaml 4 and OCaml 5: which
//!   addresses to copy, the visited set, page-table registration, deferred frees.
//! - `handle` (feature `stubs`): the OCaml record that owns a copy; freeing it once.
//! - `release` (feature `stubs`): giving freed copies back, at once or after the major
//!   cycle (OCaml 5).
//! - `stubs` (feature `stubs`): the `#[ocaml::native_func]` externals of `lib/stubs.ml`
//!   (generated from their `#[ocaml::sig]`s).
//! - `outcome` (feature `stubs`): how every stub reports success or an error (the OCaml
//!   type `Outcome.t`).
//! - `capi` (feature `stubs`): the C interface of `lib/offheap.h`.
//! - [`fault`]: panic injection for tests (feature `fault-injection`).

pub mod alloc;
pub mod bigarray;
pub mod copy;
pub mod fault;
pub mod image;
pub mod layout;
pub mod memcopy;
pub mod message;
pub mod region;
pub mod size_class;
pub mod thread_end;

#[cfg(feature = "stubs")]
mod capi;
#[cfg(feature = "stubs")]
mod handle;
#[cfg(feature = "stubs")]
mod outcome;
#[cfg(feature = "stubs")]
mod region_stubs;
#[cfg(feature = "stubs")]
mod release;
#[cfg(feature = "stubs")]
mod runtime;
#[cfg(feature = "stubs")]
mod stubs;
