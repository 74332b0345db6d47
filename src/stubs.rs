//! The OCaml externals of `lib/offheap.ml`: thin glue between OCaml values and the core.
//!
//! Errors come back to OCaml as a `result` and the OCaml side raises: no exception is
//! raised across Rust frames.

use ocaml::{Raw, Value};

use crate::alloc::{offheap_alloc, offheap_free, Allocator, CAllocator};
use crate::layout::{Word, ABSTRACT_TAG};
use crate::runtime;

/// What `offheap_stub_copy` gives OCaml on success: root, base address, bytes, blocks,
/// transient bytes (see `Copied`).
type CopyResult = (Value, isize, isize, isize, isize);

fn word(v: &Value) -> Word {
    v.raw().0 as Word
}

/// Sets up what the stubs need of the runtime; called once when the OCaml module loads.
#[ocaml::func]
#[ocaml::sig("unit -> unit")]
pub fn offheap_stub_init() {
    // SAFETY: called from the main domain at module initialisation, before any thread
    // of the program's own is created (boxroot's requirement on OCaml 4).
    let ready = unsafe { ocaml_boxroot_sys::boxroot_setup() };
    assert!(ready, "offheap: boxroot setup failed");
}

/// The default allocator block: `Abstract_tag`, field 0 `offheap_alloc`, field 1
/// `offheap_free`.
#[ocaml::func]
#[ocaml::sig("unit -> alloc")]
pub fn offheap_stub_malloc() -> Value {
    // SAFETY: a fresh abstract block of two fields; its fields are raw words the GC never
    // scans, so plain stores are right.
    unsafe {
        let block = Value::alloc(2, ocaml::Tag(ABSTRACT_TAG));
        let fields = block.raw().0 as *mut Word;
        *fields = offheap_alloc as *const () as usize;
        *fields.add(1) = offheap_free as *const () as usize;
        block
    }
}

/// Copies `v` with the allocator block `alloc`; `Error (out_of_memory, message)` when it
/// cannot.
#[ocaml::func]
#[ocaml::sig("alloc -> bool -> 'a -> (Obj.t * int * int * int * int, bool * string) result")]
pub fn offheap_stub_copy(
    alloc: Value,
    copy_static: bool,
    v: Value,
) -> Result<CopyResult, (bool, String)> {
    // SAFETY: a stub may collect; `alloc` and `v` are rooted and read after this.
    let prepared = unsafe { runtime::prepare_copy() };
    // SAFETY: `alloc` is an allocator block (the OCaml type `alloc` only comes from
    // `malloc` or from C code that builds one), kept alive by the caller for the call.
    let mut allocator = unsafe { CAllocator::new(word(&alloc)) };
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; the allocator's contract forbids calls into OCaml.
    let copied = unsafe { runtime::copy_value(prepared, word(&v), copy_static, &mut allocator) };
    let copied = copied.map_err(|e| (e.is_out_of_memory(), e.to_string()))?;
    if !copied.base.is_null() && !runtime::register(copied.base, copied.bytes) {
        // SAFETY: the copy was just allocated by this allocator and nothing refers to it.
        unsafe { allocator.free(copied.base, copied.bytes) };
        return Err((
            true,
            "Offheap.copy: the page table could not grow".to_owned(),
        ));
    }
    // SAFETY: an immediate, a block outside the heap, or a well-formed copy with
    // unmarkable headers: a value the GC leaves alone, safe to hold across allocations.
    let root = unsafe { Raw(copied.root as isize).as_value() };
    Ok((
        root,
        copied.base as isize,
        copied.bytes as isize,
        copied.blocks as isize,
        copied.transient_bytes as isize,
    ))
}

/// Gives the copy `[base, base + bytes)` back to the allocator block `alloc`, now.
#[ocaml::func]
#[ocaml::sig("alloc -> int -> int -> unit")]
pub fn offheap_stub_release(alloc: Value, base: isize, bytes: isize) {
    let (base, bytes) = (base as *mut u8, bytes as usize);
    runtime::unregister(base, bytes);
    // SAFETY: `alloc` is the block the copy was made with, and the OCaml side calls this
    // once per copy, after its handle was marked freed.
    unsafe { CAllocator::new(word(&alloc)).free(base, bytes) };
    runtime::reregister_shared(base, bytes);
}

/// Whether `free` must wait for the running major cycle to end (OCaml 5).
#[ocaml::func]
#[ocaml::sig("unit -> bool")]
pub fn offheap_stub_defers_free() -> bool {
    runtime::DEFERS_FREE
}

/// Major cycles completed so far (OCaml 5; 0 on OCaml 4).
#[ocaml::func]
#[ocaml::sig("unit -> int")]
pub fn offheap_stub_major_cycles() -> isize {
    runtime::major_cycles_completed() as isize
}
