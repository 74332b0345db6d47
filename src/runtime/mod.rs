//! What differs between OCaml 4 and OCaml 5, behind one interface.
//!
//! Each backend (`ocaml4.rs`, `ocaml5.rs`, chosen by `cfg(ocaml5)` from `build.rs`)
//! provides:
//! - `RuntimeHeap`: the [`Heap`] classifier (which pointers lead to blocks to copy);
//! - `visited_set()`: the visited set the copy uses on that runtime
//!   (`Visited`);
//! - `register` / `register_copy` / `unregister` / `reregister_shared`: making a copy
//!   or a loaded image (its blocks: `register_copy` leaves its Bigarray data out, and
//!   the pages inside its large blocks) known to the runtime's polymorphic operations
//!   (OCaml 4's page table; nothing on OCaml 5);
//! - `DEFERS_FREE`, `free_must_wait()` and `major_cycles_completed()`: whether frees
//!   may wait (both), whether one made now must (OCaml 5: always, for the running
//!   cycle; OCaml 4: while the major GC marks, for the end of the marking), and the
//!   counter to wait on; `SLAB_FREES_WAIT`, whether the frees of slab copies wait too;
//!   `DISCARDS_AT_FREE`, whether a large copy that waits gives its pages back at once;
//!   `gc_allowance()`, the bytes and GC work of the runtime's rate for custom blocks;
//!   `share_gc_work()`, GC work that frees tell the runtime for every domain to share
//!   (OCaml 5 beside other domains);
//! - `stub_runs_alone()`: whether the stub that calls it runs alone (always on OCaml 4,
//!   the master lock; on OCaml 5 when no other domain runs), so that a handle's state
//!   changes without an atomic read-modify-write;
//!   `StubLock`, data that only stubs use (a region's state): a mutex on OCaml 5, the
//!   runtime lock alone on OCaml 4;
//! - `install_roots_hook()`: the GC scans the slots that keep allocator blocks alive
//!   while their copies wait (`release::Rooted`), through the runtime's hook.
//!
//! Everything else in the crate is the same on both. `slab` serves small copies made
//! with the default allocator from regions registered once.

#[cfg_attr(ocaml5, path = "ocaml5.rs")]
#[cfg_attr(not(ocaml5), path = "ocaml4.rs")]
mod backend;
pub mod slab;

pub use backend::{
    free_must_wait, gc_allowance, install_roots_hook, major_cycles_completed, register,
    register_copy, reregister_shared, share_gc_work, stub_runs_alone, unregister, StubGuard,
    StubLock, COUNTS_PER_CYCLE, DEFERS_FREE, DISCARDS_AT_FREE, SLAB_FREES_WAIT,
};
#[cfg(ocaml5)]
pub use backend::{minor_collections, try_without_stopping, with_world_stopped};

use crate::alloc::Allocator;
use crate::copy::{self, Copied, CopyError};
use crate::layout::Word;

extern "C" {
    /// `caml_enter_blocking_section` without running pending signal handlers and
    /// actions first (OCaml 4.13 and 5.3, `caml/signals.h`): they run in OCaml once the
    /// stub has returned, instead of raising through Rust frames.
    fn caml_enter_blocking_section_no_pending();
}

/// Runs `f` with the runtime released: other threads (and on OCaml 5 other domains, and
/// this domain's backup thread for it) run OCaml code and collect meanwhile. No signal
/// handler runs on the way in ([`caml_enter_blocking_section_no_pending`]) nor on the way
/// out (`caml_leave_blocking_section` only records pending signals), so none raises
/// through Rust frames.
///
/// # Safety
/// Called holding the runtime; `f` touches no OCaml value, and every OCaml value the
/// caller uses afterwards is kept where the GC updates it (`release::Kept`).
pub unsafe fn released<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the caller holds the runtime and keeps its values where the GC sees them.
    unsafe { caml_enter_blocking_section_no_pending() };
    let r = f();
    // SAFETY: pairs with the enter above.
    unsafe { ocaml_sys::caml_leave_blocking_section() };
    r
}

/// The runtime's `struct custom_operations` of the three boxed integers: plain bytes.
mod custom_ops {
    extern "C" {
        pub static caml_int32_ops: u8;
        pub static caml_int64_ops: u8;
        pub static caml_nativeint_ops: u8;
        pub static caml_ba_ops: u8;
        pub fn caml_ba_compare();
        pub fn caml_ba_hash();
        pub fn caml_ba_serialize();
    }
}

/// Whether `ops` are the operations of Int32, Int64 or Nativeint.
fn is_boxed_integer(ops: Word) -> bool {
    // Only the addresses of the runtime's statics are taken, never their contents.
    let known = {
        [
            std::ptr::addr_of!(custom_ops::caml_int32_ops) as Word,
            std::ptr::addr_of!(custom_ops::caml_int64_ops) as Word,
            std::ptr::addr_of!(custom_ops::caml_nativeint_ops) as Word,
        ]
    };
    known.contains(&ops)
}

/// The operations of Int32, Int64, Nativeint and Bigarray, in that order (the order of
/// [`crate::image::format::CustomKind`]).
pub fn image_custom_ops() -> [Word; 4] {
    [
        std::ptr::addr_of!(custom_ops::caml_int32_ops) as Word,
        std::ptr::addr_of!(custom_ops::caml_int64_ops) as Word,
        std::ptr::addr_of!(custom_ops::caml_nativeint_ops) as Word,
        bigarray_ops(),
    ]
}

/// The runtime's `caml_ba_ops`: the operations of every Bigarray's copy.
fn bigarray_ops() -> Word {
    std::ptr::addr_of!(custom_ops::caml_ba_ops) as Word
}

/// The operations a Bigarray's copy gets when `ops` are a Bigarray's: `caml_ba_ops`
/// itself, or a table with its comparison, hash and serialisation (the unix library's
/// for mapped files; see [`crate::bigarray`]), whatever its finaliser.
fn copy_ops_of_bigarray(ops: Word) -> Option<Word> {
    let runtime = bigarray_ops();
    if ops == runtime {
        return Some(runtime);
    }
    // `struct custom_operations`: identifier, finalize, compare, hash, serialize, ...
    // (caml/custom.h, 4.13 and 5.3).
    // SAFETY: `ops` is field 0 of a custom block of the running program: a pointer to a
    // `struct custom_operations`, whose first five members are pointers.
    let [compare, hash, serialize] = unsafe {
        let table = ops as *const Word;
        [*table.add(2), *table.add(3), *table.add(4)]
    };
    let same = compare == custom_ops::caml_ba_compare as *const () as Word
        && hash == custom_ops::caml_ba_hash as *const () as Word
        && serialize == custom_ops::caml_ba_serialize as *const () as Word;
    same.then_some(runtime)
}

/// The `identifier` of custom operations (their first field, a C string).
pub fn custom_identifier(ops: Word) -> Result<String, crate::alloc::NoMemory> {
    // SAFETY: `ops` is field 0 of a custom block: a `struct custom_operations *`, whose
    // first member is a NUL-terminated `char *identifier`.
    let identifier = unsafe {
        let identifier = *(ops as *const *const libc::c_char);
        if identifier.is_null() {
            b"?".as_slice()
        } else {
            std::ffi::CStr::from_ptr(identifier).to_bytes()
        }
    };
    crate::message::try_format(format_args!("{}", crate::message::Lossy(identifier)))
        .ok_or(crate::alloc::NoMemory(identifier.len()))
}

/// Copies `v` with the runtime's classifier and visited set into `out` (an image written
/// as it is copied).
///
/// # Safety
/// As [`copy_value`]; `out` does not call into OCaml.
pub unsafe fn copy_value_into<O: copy::Output>(
    v: Word,
    copy_static: bool,
    out: &mut O,
) -> Result<copy::Written, CopyError> {
    let mut heap = backend::RuntimeHeap::new(copy_static);
    // SAFETY: as in `copy_value`.
    unsafe {
        #[allow(irrefutable_let_patterns)]
        match backend::visited_set() {
            backend::Visited::Marks(marks) => copy::copy_into(v, &mut heap, marks, out),
            #[cfg(ocaml5)]
            backend::Visited::Table(table) => copy::copy_into(v, &mut heap, table, out),
            #[cfg(ocaml5)]
            backend::Visited::Budgeted(table) => copy::copy_into(v, &mut heap, table, out),
        }
    }
}

/// Copies `v` with the runtime's classifier and visited set.
///
/// # Safety
/// The caller holds the runtime (lock or domain) and does not allocate on the OCaml heap
/// until this returns; `alloc` must not call into OCaml.
pub unsafe fn copy_value<A: Allocator>(
    v: Word,
    copy_static: bool,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    let mut heap = backend::RuntimeHeap::new(copy_static);
    // SAFETY: forwarded; the backend chooses a visited set that fits the runtime's
    // concurrency for the whole call.
    unsafe {
        #[allow(irrefutable_let_patterns)]
        match backend::visited_set() {
            backend::Visited::Marks(marks) => copy::copy(v, &mut heap, marks, alloc),
            #[cfg(ocaml5)]
            backend::Visited::Table(table) => copy::copy(v, &mut heap, table, alloc),
            #[cfg(ocaml5)]
            backend::Visited::Budgeted(table) => copy::copy(v, &mut heap, table, alloc),
        }
    }
}

/// Whether a copy (`Offheap.copy`, `measure`, `Image.write`) may stop the other domains
/// ([`with_world_stopped`]) to mark headers rather than keep a side table: when other
/// domains run. It stops them only for a value of more than `STOP_BEYOND_BLOCKS` blocks
/// ([`try_without_stopping`]). Static data is never marked (it goes to the side table
/// of the header marks: some of it is read-only).
#[cfg(ocaml5)]
pub fn may_stop_world() -> bool {
    backend::others_running()
}

/// Runs `task` (a copy, measure or image write through [`copy_value`],
/// [`measure_value`] or [`copy_value_into`]) on `values`, in the way the domains allow.
/// On OCaml 5 with other domains running: first with a side table of at most
/// `STOP_BEYOND_BLOCKS` blocks (`try_without_stopping`), then, for a larger value,
/// with the other domains stopped (`with_world_stopped`: header marks, 8 bytes a
/// block where a side table and its snapshot take some 100); `values` are rooted for
/// the wait and `task` reads them afresh. Else `task` runs at once. `None` when there
/// was no memory to root them (the task did not run).
///
/// # Safety
/// Called from a stub holding the runtime, with no Rust lock held that another domain
/// may be waiting for outside a safe point; `task` neither allocates on the OCaml heap
/// nor calls into OCaml.
pub unsafe fn among_domains<const N: usize, R>(
    #[allow(unused_mut)] mut values: [Word; N],
    task: impl Fn(&[Word; N]) -> R,
) -> Option<R> {
    #[cfg(ocaml5)]
    if may_stop_world() {
        if let Some(r) = backend::try_without_stopping(|| task(&values)) {
            return Some(r);
        }
        // SAFETY: the caller's contract.
        return unsafe { backend::with_world_stopped(&mut values, |values| task(values)) };
    }
    Some(task(&values))
}

/// What a copy of `v` would take ([`copy::measure`]), with the runtime's classifier and
/// visited set; nothing is allocated but the traversal's tables.
///
/// # Safety
/// The caller holds the runtime (lock or domain) and does not allocate on the OCaml heap
/// until this returns.
pub unsafe fn measure_value(v: Word, copy_static: bool) -> Result<copy::Measured, CopyError> {
    let mut heap = backend::RuntimeHeap::new(copy_static);
    // SAFETY: as in `copy_value`.
    unsafe {
        #[allow(irrefutable_let_patterns)]
        match backend::visited_set() {
            backend::Visited::Marks(marks) => copy::measure(v, &mut heap, marks),
            #[cfg(ocaml5)]
            backend::Visited::Table(table) => copy::measure(v, &mut heap, table),
            #[cfg(ocaml5)]
            backend::Visited::Budgeted(table) => copy::measure(v, &mut heap, table),
        }
    }
}

/// Whether `v` is a block outside the GC heap (static data, a copy, a loaded image, C
/// memory on OCaml 4).
///
/// # Safety
/// `v` is an OCaml value; called holding the runtime.
pub unsafe fn is_offheap(v: Word) -> bool {
    // SAFETY: forwarded.
    !crate::layout::is_immediate(v) && unsafe { backend::outside_gc_heap(v) }
}
