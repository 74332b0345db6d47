//! Small copies made with the default allocator: size-class slots carved from large
//! regions that are registered with the runtime once, when they are mapped.
//!
//! A small copy made with `malloc` cost, besides `malloc` and `free`, a page-table
//! registration at `copy` and a removal at `free` on OCaml 4 (under a global lock, with
//! a hash map counting the copies that share each end page): measured with `perf`, a
//! third of a small copy's time. Here a copy of at most [`SMALL_MAX`] bytes made with
//! the default allocator takes a slot of its size class (multiples of [`GRAIN`] bytes):
//! from that class's free list, else from the current region, else from a new region
//! of [`REGION_BYTES`] (a huge-page mapping, registered whole as static data on OCaml
//! 4). Freed slots go back to their class's list and serve later small copies; regions
//! are kept for the life of the process (their memory is the peak of small copies
//! live at once, plus under [`SMALL_MAX`] bytes a region of tail).
//!
//! The stubs choose the slab from the allocator block and the size alone (see
//! [`is_slab_copy`]), at `copy` and again at `free`, so the handle records nothing more.
//! Copies made with any other allocator, `offheap_alloc` called from C included, are
//! registered per copy as before.

use std::sync::{Mutex, MutexGuard};

use crate::alloc::{map_huge, offheap_alloc, offheap_free, unmap_huge, Allocator, CAllocator};

/// The largest copy served from the slab, in bytes.
pub const SMALL_MAX: usize = 1024;
/// Slot sizes are multiples of this many bytes.
const GRAIN: usize = 16;
const CLASSES: usize = SMALL_MAX / GRAIN;
/// Bytes of one region: one huge page.
const REGION_BYTES: usize = crate::alloc::HUGE_PAGE;

/// The free slots of every class and the unused end of the current region.
struct Slab {
    /// Head of each class's free list; a free slot's first word links to the next.
    free: [*mut u8; CLASSES],
    /// Next unused byte of the current region, and its end.
    bump: *mut u8,
    end: *mut u8,
}

// SAFETY: the pointers are memory owned by the slab alone, used under its lock.
unsafe impl Send for Slab {}

static SLAB: Mutex<Slab> = Mutex::new(Slab {
    free: [std::ptr::null_mut(); CLASSES],
    bump: std::ptr::null_mut(),
    end: std::ptr::null_mut(),
});

fn slab() -> MutexGuard<'static, Slab> {
    // Nothing panics while the lock is held (panics abort anyway).
    SLAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The class of a copy of `bytes` bytes (`1..=SMALL_MAX`).
fn class_of(bytes: usize) -> usize {
    bytes.max(1).div_ceil(GRAIN) - 1
}

/// Whether a copy of `bytes` bytes with the allocator `alloc` lives in the slab.
pub fn is_slab_copy(alloc: &CAllocator, bytes: usize) -> bool {
    bytes <= SMALL_MAX && alloc.is_default()
}

/// A slot for `bytes` (at most [`SMALL_MAX`]) bytes, already registered with the
/// runtime; null when no region could be mapped or registered.
///
/// Called holding the runtime (a stub): on OCaml 4, registering a region needs the
/// runtime lock.
pub fn alloc(bytes: usize) -> *mut u8 {
    let class = class_of(bytes);
    let size = (class + 1) * GRAIN;
    let mut slab = slab();
    let head = slab.free[class];
    if !head.is_null() {
        // SAFETY: a free slot of this class, whose first word links to the next.
        slab.free[class] = unsafe { *(head as *const *mut u8) };
        return head;
    }
    if (slab.end as usize) - (slab.bump as usize) < size {
        let region = map_huge(REGION_BYTES);
        if region.is_null() {
            return std::ptr::null_mut();
        }
        if !super::register(region, REGION_BYTES) {
            // SAFETY: just mapped, unused.
            unsafe { unmap_huge(region, REGION_BYTES) };
            return std::ptr::null_mut();
        }
        slab.bump = region;
        // SAFETY: the end of the mapping just made.
        slab.end = unsafe { region.add(REGION_BYTES) };
    }
    let slot = slab.bump;
    // SAFETY: `size` bytes fit before `end` (checked above).
    slab.bump = unsafe { slot.add(size) };
    slot
}

/// Gives back a slot from [`alloc`] of the same `bytes`.
///
/// # Safety
/// `ptr` came from `alloc(bytes)` and nothing uses it any more.
pub unsafe fn free(ptr: *mut u8, bytes: usize) {
    let class = class_of(bytes);
    let mut slab = slab();
    // SAFETY: the slot is ours again and at least a word long.
    unsafe { *(ptr as *mut *mut u8) = slab.free[class] };
    slab.free[class] = ptr;
}

/// [`free`] as an allocator's free function, for frees that wait (OCaml 5).
///
/// # Safety
/// As for [`free`]; the allocator block is ignored.
pub unsafe extern "C" fn free_fn(_alloc: crate::layout::Word, ptr: *mut u8, bytes: usize) {
    // SAFETY: forwarded.
    unsafe { free(ptr, bytes) }
}

/// The default allocator of copies: the slab up to [`SMALL_MAX`] bytes, else
/// [`offheap_alloc`].
pub struct DefaultAllocator;

impl Allocator for DefaultAllocator {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        if bytes <= SMALL_MAX {
            alloc(bytes)
        } else {
            // SAFETY: the default allocator ignores its block.
            unsafe { offheap_alloc(0, bytes) }
        }
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: `ptr` came from `alloc(bytes)` above, which chose by the same test.
        unsafe {
            if bytes <= SMALL_MAX {
                free(ptr, bytes)
            } else {
                offheap_free(0, ptr, bytes)
            }
        }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        Some(0) // beyond `SMALL_MAX`, `offheap_alloc` and `offheap_free`
    }
}
