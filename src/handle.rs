//! The handle: the OCaml record that owns one off-heap copy (`'a Offheap.t`).
//!
//! `lib/offheap.ml` declares it as
//! `{ root : Obj.t; alloc : alloc; mutable state : int; bytes; blocks; transient_bytes }`
//! and allocates it, state "freed", before calling a stub that fills it: the handle exists
//! before the copy does, so no point of `copy` (OCaml side included) can lose a copy to
//! an exception, such as one raised by a signal handler.
//!
//! `state` holds `base + 1` while the copy is live (an OCaml integer, since `base` is word
//! aligned; `base` is 0 when nothing was allocated) and [`FREED`] once freed. Freeing is
//! one compare-and-swap on it, so of several domains or threads freeing one handle at
//! once, exactly one takes the copy. `root` is cleared after the swap: a [`root_if_live`]
//! that reads `root` and then `state` never hands out the cleared root.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::copy::Copied;
use crate::layout::{val_int, Word};

/// Field of the copy's root (an immediate, a shared pointer, or a pointer into the copy).
const ROOT: usize = 0;
/// Field of the allocator block.
const ALLOC: usize = 1;
/// Field of the state: `base + 1` while live, [`FREED`] after.
const STATE: usize = 2;
/// Fields of the copy's size in bytes, its blocks and the traversal's peak memory.
const BYTES: usize = 3;
const BLOCKS: usize = 4;
const TRANSIENT_BYTES: usize = 5;

/// The state of a freed handle: the OCaml integer -1, never `base + 1` for a word-aligned
/// `base`.
pub const FREED: Word = val_int(-1);

/// The memory a live handle owned, taken from it by [`take`].
#[derive(Clone, Copy, Debug)]
pub struct Owned {
    /// Start of the allocation, or null when nothing was allocated.
    pub base: *mut u8,
    /// Its size in bytes.
    pub bytes: usize,
    /// The allocator block it came from.
    pub alloc: Word,
}

/// The field `i` of the handle `h`, as an atomic word.
///
/// # Safety
/// `h` is a handle block (six fields) that does not move while the reference is used: the
/// caller allocates nothing on the OCaml heap meanwhile.
unsafe fn field<'a>(h: Word, i: usize) -> &'a AtomicUsize {
    // SAFETY: `h` has six word-sized, word-aligned fields (the caller's contract);
    // AtomicUsize has the layout of a word.
    unsafe { &*(h as *const AtomicUsize).add(i) }
}

/// Makes the fresh handle `h` own the copy `copied`.
///
/// # Safety
/// `h` is a handle in state [`FREED`] that no other thread or domain sees yet, and
/// `copied.root` is an immediate or lies outside the OCaml heap (the GC needs no barrier
/// for it).
pub unsafe fn fill(h: Word, copied: &Copied) {
    // SAFETY: forwarded.
    unsafe {
        fill_parts(
            h,
            copied.root,
            copied.base,
            copied.bytes,
            copied.blocks,
            copied.transient_bytes,
        )
    }
}

/// Makes the fresh handle `h` own the allocation `[base, base + bytes)` of `blocks`
/// blocks, whose root is `root`.
///
/// # Safety
/// As for [`fill`].
pub unsafe fn fill_parts(
    h: Word,
    root: Word,
    base: *mut u8,
    bytes: usize,
    blocks: usize,
    transient_bytes: usize,
) {
    // SAFETY: the caller's contract; the handle is ours alone.
    unsafe {
        field(h, ROOT).store(root, Ordering::Relaxed);
        field(h, BYTES).store(val_int(bytes as isize), Ordering::Relaxed);
        field(h, BLOCKS).store(val_int(blocks as isize), Ordering::Relaxed);
        field(h, TRANSIENT_BYTES).store(val_int(transient_bytes as isize), Ordering::Relaxed);
        field(h, STATE).store(base as Word + 1, Ordering::Release);
    }
}

/// Sets the allocator block of the fresh handle `h` to `alloc`.
///
/// # Safety
/// `h` is a handle that no other thread or domain sees yet and `alloc` an allocator
/// block; called holding the runtime.
pub unsafe fn set_alloc(h: Word, alloc: Word) {
    // SAFETY: a field of a live block, written with the runtime's write barrier.
    unsafe {
        ocaml_sys::caml_modify(
            (h as *mut ocaml_sys::Value).add(ALLOC),
            alloc as ocaml_sys::Value,
        )
    };
}

/// Takes the copy from the live handle `h`, leaving it freed; `None` when it was freed
/// already (by this thread or a concurrent one).
///
/// # Safety
/// `h` is a handle; the caller allocates nothing on the OCaml heap until this returns.
pub unsafe fn take(h: Word) -> Option<Owned> {
    // SAFETY: the caller's contract.
    let state = unsafe { field(h, STATE) };
    let mut current = state.load(Ordering::Acquire);
    loop {
        if current == FREED {
            return None;
        }
        match state.compare_exchange_weak(current, FREED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(seen) => current = seen,
        }
    }
    // SAFETY: as above. The old root is an immediate or lies outside the heap, so
    // overwriting it needs no write barrier.
    unsafe {
        field(h, ROOT).store(val_int(0), Ordering::Release);
        let bytes = field(h, BYTES).load(Ordering::Relaxed) as isize >> 1;
        Some(Owned {
            base: (current - 1) as *mut u8,
            bytes: bytes as usize,
            alloc: field(h, ALLOC).load(Ordering::Relaxed),
        })
    }
}

/// The copy's root while `h` is live, else `freed`.
///
/// # Safety
/// `h` is a handle; the caller allocates nothing on the OCaml heap until this returns.
pub unsafe fn root_if_live(h: Word, freed: Word) -> Word {
    // SAFETY: the caller's contract. `root` is read before `state`: a concurrent `take`
    // clears `root` only after it set `state`, so a cleared root is never returned.
    unsafe {
        let root = field(h, ROOT).load(Ordering::Acquire);
        if field(h, STATE).load(Ordering::Acquire) == FREED {
            freed
        } else {
            root
        }
    }
}
