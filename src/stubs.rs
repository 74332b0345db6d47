//! The OCaml externals of `lib/offheap.ml`: thin glue between OCaml values and the core.
//!
//! They are `#[ocaml::native_func]`s on raw values. `#[ocaml::func]` would root every
//! argument with boxroot, which the stubs do not need (nothing is allocated on the OCaml
//! heap while a raw value is in use) and which broke copies in bytecode programs linked
//! with systhreads on OCaml 4. No exception is raised across Rust frames: errors come
//! back as values and the OCaml side raises.

use ocaml::{Raw, Value};
use ocaml_sys::{caml_alloc_small, caml_copy_string, caml_modify};

use crate::alloc::{offheap_alloc, offheap_free, Allocator, CAllocator};
use crate::layout::{val_int, Word, ABSTRACT_TAG};
use crate::runtime;

/// Fields of the result array that `offheap_stub_copy` fills.
const RESULT_FIELDS: usize = 5;

fn word(v: Raw) -> Word {
    v.0 as Word
}

/// An OCaml value from a word the GC may see: an immediate, or a block it leaves alone.
fn value(w: Word) -> Value {
    // SAFETY: callers pass immediates, fresh blocks or blocks outside the heap; none
    // needs a root here.
    unsafe { Raw(w as isize).as_value() }
}

/// The default allocator block: `Abstract_tag`, field 0 `offheap_alloc`, field 1
/// `offheap_free`.
#[ocaml::native_func]
pub fn offheap_stub_malloc(_unit: Raw) -> Value {
    // SAFETY: a fresh abstract block of two fields; the GC never scans its fields, so
    // raw words are stored with plain writes.
    unsafe {
        let block = caml_alloc_small(2, ABSTRACT_TAG);
        let fields = block as *mut Word;
        *fields = offheap_alloc as *const () as usize;
        *fields.add(1) = offheap_free as *const () as usize;
        value(block as Word)
    }
}

/// Copies `v` with the allocator block `alloc` (static data too when `copy_static`).
/// On success fills `result` (an array of [`RESULT_FIELDS`] values: root, base address,
/// bytes, blocks, transient bytes) and returns 0; returns 1 when the allocator ran out
/// of memory, or the message of the `Invalid_argument` to raise.
#[ocaml::native_func]
pub fn offheap_stub_copy(alloc: Raw, copy_static: Raw, v: Raw, result: Raw) -> Value {
    copy(alloc, copy_static, v, result)
}

/// The body of [`offheap_stub_copy`].
fn copy(alloc: Raw, copy_static: Raw, v: Raw, result: Raw) -> Value {
    // SAFETY: `alloc` is an allocator block (the OCaml type `alloc` only comes from
    // `malloc` or from C code that builds one), alive for the call.
    let mut allocator = unsafe { CAllocator::new(word(alloc)) };
    let copy_static = word(copy_static) != val_int(0);
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; the allocator's contract forbids calls into OCaml.
    let copied = match unsafe { runtime::copy_value(word(v), copy_static, &mut allocator) } {
        Ok(copied) => copied,
        Err(e) if e.is_out_of_memory() => return value(val_int(1)),
        // SAFETY: the message is a NUL-free Rust string; one allocation, nothing else
        // held.
        Err(e) => {
            return unsafe {
                value(caml_copy_string(
                    nul_terminated(&e.to_string()).as_ptr() as *const ocaml_sys::Char
                ) as Word)
            }
        }
    };
    if !copied.base.is_null() && !runtime::register(copied.base, copied.bytes) {
        // SAFETY: the copy was just allocated by this allocator and nothing refers to it.
        unsafe { allocator.free(copied.base, copied.bytes) };
        return value(val_int(1));
    }
    let fields = [
        copied.root,
        val_int(copied.base as isize),
        val_int(copied.bytes as isize),
        val_int(copied.blocks as isize),
        val_int(copied.transient_bytes as isize),
    ];
    let out = word(result) as *mut ocaml_sys::Value;
    for (i, field) in fields.into_iter().enumerate().take(RESULT_FIELDS) {
        // SAFETY: `result` is an array of RESULT_FIELDS values (offheap.ml makes it);
        // the stored words are immediates or the copy's root, which the GC leaves alone.
        unsafe { caml_modify(out.add(i), field as ocaml_sys::Value) };
    }
    value(val_int(0))
}

/// `s` with a NUL at the end, any NUL inside it replaced.
fn nul_terminated(s: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = s.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    bytes.push(0);
    bytes
}

/// Gives the copy `[base, base + bytes)` back to the allocator block `alloc`, now.
#[ocaml::native_func]
pub fn offheap_stub_release(alloc: Raw, base: Raw, bytes: Raw) -> Value {
    let base = (word(base) as isize >> 1) as *mut u8;
    let bytes = (word(bytes) as isize >> 1) as usize;
    runtime::unregister(base, bytes);
    // SAFETY: `alloc` is the block the copy was made with, and the OCaml side calls this
    // once per copy, after its handle was marked freed.
    unsafe { CAllocator::new(word(alloc)).free(base, bytes) };
    runtime::reregister_shared(base, bytes);
    value(val_int(0))
}

/// Whether `free` must wait for the running major cycle to end (OCaml 5).
#[ocaml::native_func]
pub fn offheap_stub_defers_free(_unit: Raw) -> Value {
    value(val_int(runtime::DEFERS_FREE as isize))
}

/// Major cycles completed so far (OCaml 5; 0 on OCaml 4).
#[ocaml::native_func]
pub fn offheap_stub_major_cycles(_unit: Raw) -> Value {
    value(val_int(runtime::major_cycles_completed() as isize))
}
