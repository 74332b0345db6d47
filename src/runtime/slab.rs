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
//! Each thread keeps some free slots of each class ([`cache_limit`]), used without the
//! lock: it takes them from the slab in runs and gives half back when it has too many,
//! and all of them when it ends. A copy made and freed on one thread (a cache's entries)
//! takes no lock at all; copies freed on other threads than made them go to the
//! freeing thread's slots.
//!
//! The stubs choose the slab from the allocator block and the size alone (see
//! [`is_slab_copy`]), at `copy` and again at `free`, so the handle records nothing more.
//! Copies made with any other allocator, `offheap_alloc` called from C included, are
//! registered per copy as before.

use std::cell::UnsafeCell;
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

/// The bytes of a slot of class `class`.
fn slot_bytes(class: usize) -> usize {
    (class + 1) * GRAIN
}

/// The free slots of class `class` that a thread keeps at most: 4 KiB of them (256 KiB
/// a thread for all classes at most, mostly much less).
fn cache_limit(class: usize) -> usize {
    CACHE_LIMITS[class] as usize
}

/// The bytes of free slots of one class that a thread keeps.
const CACHE_BYTES: usize = 4096;

/// [`cache_limit`] of every class, computed once (a division cost each call 7
/// instructions).
const CACHE_LIMITS: [u16; CLASSES] = {
    let mut limits = [0; CLASSES];
    let mut class = 0;
    while class < CLASSES {
        limits[class] = (CACHE_BYTES / ((class + 1) * GRAIN)) as u16;
        class += 1;
    }
    limits
};
// Every class keeps at least 2 slots, so that half of a full list is at least one.
const _: () = assert!(CACHE_BYTES / SMALL_MAX >= 2);

/// The link word of a free slot: the next free slot of its list.
///
/// # Safety
/// `slot` is a free slot of the slab (at least a word, ours alone).
unsafe fn next_of(slot: *mut u8) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { *(slot as *const *mut u8) }
}

/// Links the free slot `slot` to `next`.
///
/// # Safety
/// As [`next_of`].
unsafe fn link(slot: *mut u8, next: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { *(slot as *mut *mut u8) = next };
}

/// A list of free slots of one class: `count` slots from `head`, linked through their
/// first words, the last one at `tail` (null links past it are not relied on).
#[derive(Clone, Copy)]
struct Run {
    head: *mut u8,
    tail: *mut u8,
    count: usize,
}

impl Slab {
    /// Up to `want` (at least 1) free slots of class `class`: from its free list, else
    /// carved from the current region or a new one; `None` when no region could be
    /// mapped or registered.
    ///
    /// Called holding the runtime (see [`alloc`]).
    fn take(&mut self, class: usize, want: usize) -> Option<Run> {
        let head = self.free[class];
        if !head.is_null() {
            let (mut tail, mut count) = (head, 1);
            // SAFETY: slots of this class's free list.
            let mut next = unsafe { next_of(tail) };
            while count < want && !next.is_null() {
                tail = next;
                count += 1;
                // SAFETY: as above.
                next = unsafe { next_of(tail) };
            }
            self.free[class] = next;
            return Some(Run { head, tail, count });
        }
        let size = slot_bytes(class);
        if (self.end as usize) - (self.bump as usize) < size {
            let region = map_huge(REGION_BYTES);
            if region.is_null() {
                return None;
            }
            if !super::register(region, REGION_BYTES) {
                // SAFETY: just mapped, unused.
                unsafe { unmap_huge(region, REGION_BYTES) };
                return None;
            }
            self.bump = region;
            // SAFETY: the end of the mapping just made.
            self.end = unsafe { region.add(REGION_BYTES) };
        }
        let count = want.min((self.end as usize - self.bump as usize) / size);
        let head = self.bump;
        // SAFETY: `count * size` bytes fit before `end` (above).
        self.bump = unsafe { head.add(count * size) };
        // SAFETY: as above: slots `1..count` follow `head` in the region.
        let tail = unsafe { head.add((count - 1) * size) };
        let mut slot = head;
        while slot != tail {
            // SAFETY: carved above, ours alone; the next slot follows it.
            unsafe {
                let next = slot.add(size);
                link(slot, next);
                slot = next;
            }
        }
        Some(Run { head, tail, count })
    }

    /// Puts the run of free slots `run` of class `class` at the head of its free list.
    fn give(&mut self, class: usize, run: Run) {
        // SAFETY: the run's slots are free and ours alone.
        unsafe { link(run.tail, self.free[class]) };
        self.free[class] = run.head;
    }
}

/// The free slots a thread keeps, used without the lock: a copy made and freed on one
/// thread (a cache's entries, one at a time) takes the lock once per
/// [`cache_limit`]` / 2` slots instead of twice per copy (its two atomic
/// read-modify-writes cost a copy and a free of a 3-block record some 30% of their time).
struct ThreadSlots {
    /// Each class's list: `heads[c]`, `counts[c]` slots.
    heads: [*mut u8; CLASSES],
    counts: [usize; CLASSES],
}

impl ThreadSlots {
    /// A slot of class `class`, from this thread's list, else a run taken from the slab.
    fn alloc(&mut self, class: usize) -> *mut u8 {
        if self.counts[class] == 0 {
            let want = cache_limit(class).div_ceil(2);
            let Some(run) = slab().take(class, want) else {
                return std::ptr::null_mut();
            };
            self.heads[class] = run.head;
            self.counts[class] = run.count;
        }
        let slot = self.heads[class];
        // SAFETY: a free slot of this list.
        self.heads[class] = unsafe { next_of(slot) };
        self.counts[class] -= 1;
        slot
    }

    /// Keeps the free slot `ptr` of class `class`; past the class's limit, gives half of
    /// the list back to the slab.
    ///
    /// # Safety
    /// `ptr` is a slot of that class that nothing uses any more.
    unsafe fn free(&mut self, class: usize, ptr: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe { link(ptr, self.heads[class]) };
        self.heads[class] = ptr;
        self.counts[class] += 1;
        let limit = cache_limit(class);
        if self.counts[class] > limit {
            let give = limit / 2;
            let run = self.split(class, give);
            slab().give(class, run);
        }
    }

    /// The first `n` (at least 1, at most the count) slots of class `class`'s list, taken
    /// off it.
    fn split(&mut self, class: usize, n: usize) -> Run {
        let head = self.heads[class];
        let mut tail = head;
        for _ in 1..n {
            // SAFETY: the list holds more than `n` free slots.
            tail = unsafe { next_of(tail) };
        }
        // SAFETY: as above.
        self.heads[class] = unsafe { next_of(tail) };
        self.counts[class] -= n;
        Run {
            head,
            tail,
            count: n,
        }
    }
}

impl ThreadSlots {
    /// Gives every slot back to the slab.
    fn give_back(&mut self) {
        let mut slab = slab();
        for class in 0..CLASSES {
            let n = self.counts[class];
            if n > 0 {
                let run = self.split(class, n);
                slab.give(class, run);
            }
        }
    }
}

thread_local! {
    /// This thread's slots, given back when it ends ([`crate::thread_end`]): the
    /// variable itself has no destructor.
    static THREAD_SLOTS: UnsafeCell<ThreadSlots> = const {
        UnsafeCell::new(ThreadSlots {
            heads: [std::ptr::null_mut(); CLASSES],
            counts: [0; CLASSES],
        })
    };
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
    if !crate::thread_end::watched() {
        // A thread whose end is not watched keeps no slots: one from the slab.
        return slab()
            .take(class, 1)
            .map_or(std::ptr::null_mut(), |r| r.head);
    }
    // SAFETY: this thread's slots, used by nothing else meanwhile (neither function
    // calls out of this module).
    THREAD_SLOTS.with(|slots| unsafe { (*slots.get()).alloc(class) })
}

/// Gives back a slot from [`alloc`] of the same `bytes`, on any thread.
///
/// # Safety
/// `ptr` came from `alloc(bytes)` and nothing uses it any more.
pub unsafe fn free(ptr: *mut u8, bytes: usize) {
    let class = class_of(bytes);
    if !crate::thread_end::watched() {
        let run = Run {
            head: ptr,
            tail: ptr,
            count: 1,
        };
        slab().give(class, run);
        return;
    }
    // SAFETY: as in `alloc`; the caller's contract for `ptr`.
    THREAD_SLOTS.with(|slots| unsafe { (*slots.get()).free(class, ptr) });
}

/// Gives the calling thread's slots back to the slab: its thread ends
/// ([`crate::thread_end`]).
pub(crate) fn thread_ends() {
    // SAFETY: as in `alloc`.
    THREAD_SLOTS.with(|slots| unsafe { (*slots.get()).give_back() });
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
    #[inline]
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
