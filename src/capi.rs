//! The C interface declared in `lib/offheap.h`, for C stubs and allocators.
//!
//! `offheap_alloc` and `offheap_free` (the default allocator) live in [`crate::alloc`].

use crate::alloc::Allocator;
use crate::layout::Word;
use crate::runtime;

/// `void *(*alloc_t)(void *data, size_t size)`.
pub type AllocT = unsafe extern "C" fn(data: *mut libc::c_void, size: usize) -> *mut libc::c_void;

/// A copy made from C: the allocation, or `{ NULL, 0 }`.
#[repr(C)]
#[derive(Debug)]
pub struct OffheapBuffer {
    /// Start of the allocation: the header of the root block.
    pub ptr: *mut libc::c_void,
    /// Size of the allocation in bytes.
    pub size: usize,
}

/// `void (*free_t)(void *data, void *ptr, size_t size)`.
pub type FreeT = unsafe extern "C" fn(data: *mut libc::c_void, ptr: *mut libc::c_void, size: usize);

/// An `alloc_t` with its data, and the `free_t` that gives its memory back if the caller
/// passed one.
struct CFunction {
    data: *mut libc::c_void,
    alloc: AllocT,
    free: Option<FreeT>,
}

impl Allocator for CFunction {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        // SAFETY: calling the caller's allocator as its contract says.
        unsafe { (self.alloc)(self.data, bytes) as *mut u8 }
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // The traversal frees only when the allocation cannot become a copy, which since
        // copies read a shared source once (no failure after the allocation) means
        // misaligned memory. Without a free function that memory stays with the caller
        // (documented in offheap.h).
        if let Some(free) = self.free {
            // SAFETY: `ptr` and `bytes` come from `alloc` on this data: the caller's
            // free function takes them back, as its contract says.
            unsafe { free(self.data, ptr as *mut libc::c_void, bytes) }
        }
    }
}

/// Copies `v` into one buffer from `alloc_fn(data, size)`. The root block comes first:
/// the copy of `v` is `ptr + sizeof(header_t)` (plus the infix offset when `v` points
/// inside a closure). Returns `{ NULL, 0 }` when nothing is copied (`v` is an immediate,
/// or outside the heap and `copy_static` is 0) or the copy fails; the source is then as
/// it was. The buffer is not registered in OCaml 4's page table. A misaligned buffer is
/// not freed: there is no free function (see [`offheap_copy_with_free`]).
///
/// # Safety
/// Called with the OCaml runtime held, `v` a valid value; `alloc_fn` must not call into
/// OCaml.
#[no_mangle]
pub unsafe extern "C" fn offheap_copy(
    v: Word,
    data: *mut libc::c_void,
    alloc_fn: Option<AllocT>,
    copy_static: libc::c_int,
) -> OffheapBuffer {
    // SAFETY: forwarded from the caller.
    unsafe { offheap_copy_with_free(v, data, alloc_fn, None, copy_static) }
}

/// [`offheap_copy`], with `free_fn(data, ptr, size)` to give back a buffer from
/// `alloc_fn` that cannot become the copy (misaligned memory): on every failure, nothing
/// from `alloc_fn` stays with the caller. `free_fn` may be NULL (then as `offheap_copy`).
///
/// # Safety
/// As [`offheap_copy`]; `free_fn` must not call into OCaml either.
#[no_mangle]
pub unsafe extern "C" fn offheap_copy_with_free(
    v: Word,
    data: *mut libc::c_void,
    alloc_fn: Option<AllocT>,
    free_fn: Option<FreeT>,
    copy_static: libc::c_int,
) -> OffheapBuffer {
    let none = OffheapBuffer {
        ptr: std::ptr::null_mut(),
        size: 0,
    };
    let Some(alloc) = alloc_fn else { return none };
    let mut allocator = CFunction {
        data,
        alloc,
        free: free_fn,
    };
    // SAFETY: forwarded from the caller.
    match unsafe { runtime::copy_value(v, copy_static != 0, &mut allocator) } {
        Ok(copied) if !copied.base.is_null() => OffheapBuffer {
            ptr: copied.base as *mut libc::c_void,
            size: copied.bytes,
        },
        _ => none,
    }
}

/// Registers the buffer `[ptr, ptr + size)` (a copy from [`offheap_copy`]) as static data
/// in OCaml 4's page table, as offheap registers its own copies: with the pages it shares
/// with other registered memory counted, so that freeing a neighbouring copy (or this
/// buffer, by [`offheap_unregister`]) leaves the other's pages registered. Returns 1, or
/// 0 when the page table could not grow (nothing registered then). A buffer of no bytes
/// (`{ NULL, 0 }`, nothing copied) registers nothing. On OCaml 5, which has no page
/// table, does nothing and returns 1.
///
/// # Safety
/// Called with the OCaml runtime held; `ptr` is the start of a buffer of `size` bytes
/// that is not registered yet.
#[no_mangle]
pub unsafe extern "C" fn offheap_register(ptr: *mut libc::c_void, size: usize) -> libc::c_int {
    libc::c_int::from(runtime::register(ptr as *mut u8, size))
}

/// Undoes [`offheap_register`]`(ptr, size)`, once no value in the buffer is used any more
/// (and before it is freed): the pages it shares with other registered memory stay
/// registered. On OCaml 5, does nothing.
///
/// # Safety
/// Called with the OCaml runtime held; `(ptr, size)` was registered by
/// [`offheap_register`] and not unregistered since.
#[no_mangle]
pub unsafe extern "C" fn offheap_unregister(ptr: *mut libc::c_void, size: usize) {
    runtime::unregister(ptr as *mut u8, size)
}
