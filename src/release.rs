//! Giving a freed copy's memory back to its allocator: at once on OCaml 4, after the
//! major cycle running at `free` time on OCaml 5.
//!
//! On OCaml 5 a cycle's marker works from a snapshot of what was reachable when the cycle
//! began, so it may still read the headers of a copy freed during the cycle (see
//! `runtime/ocaml5.rs`). Freed copies wait in one queue, shared by all domains, in the
//! order they were freed, with the number of cycles completed at that time: a copy is
//! released once more cycles than that have completed. The queue is drained by
//! [`drain_due`] at every `copy` and `free` and at the end of every major cycle (a GC
//! alarm of `lib/offheap.ml`); a drain stops at the first copy not due yet, so it costs
//! nothing when nothing is due.
//!
//! A waiting copy keeps its allocator block alive through a generational global root,
//! except with the default allocator, whose functions ignore the block.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::alloc::{offheap_free, Allocator, CAllocator, FreeFn};
use crate::handle::{self, Owned};
use crate::layout::{val_int, Word};
use crate::runtime;

/// Above this many bytes waiting, `free` asks the OCaml side to hurry the major cycle.
pub const PENDING_LIMIT: usize = 8 << 20;

/// A freed copy waiting for the end of a major cycle.
struct Pending {
    /// Released once more cycles than this have completed.
    after_cycle: usize,
    base: *mut u8,
    bytes: usize,
    /// The allocator's free function (field 1 of its block).
    free: FreeFn,
    /// The allocator block, passed to `free`.
    alloc: Rooted,
}

/// An allocator block kept alive while its copy waits: a generational global root of
/// its own, or nothing for the default allocator, whose functions ignore the block (it
/// is then passed as the integer 0).
struct Rooted(Option<Box<Word>>);

impl Rooted {
    /// Roots `alloc` unless its free function is `free`, the default allocator's.
    ///
    /// # Safety
    /// `alloc` is an allocator block; called holding the runtime.
    unsafe fn new(alloc: Word, free: FreeFn) -> Rooted {
        if free as *const () == offheap_free as *const () {
            return Rooted(None);
        }
        let mut cell = Box::new(alloc);
        // SAFETY: a boxed cell that stays in place until `release` removes the root.
        unsafe {
            ocaml_sys::caml_register_generational_global_root(&mut *cell as *mut Word as *mut _)
        };
        Rooted(Some(cell))
    }

    /// The allocator block.
    fn block(&self) -> Word {
        self.0.as_deref().copied().unwrap_or(val_int(0))
    }
}

// SAFETY: the raw pointer is an allocation owned by this entry alone; the root is only
// touched by whoever pops the entry, holding the runtime.
unsafe impl Send for Pending {}

/// The queue, in the order of `after_cycle`.
static QUEUE: Mutex<VecDeque<Pending>> = Mutex::new(VecDeque::new());
/// Bytes waiting in the queue.
static PENDING_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Entries in the queue (read without the lock to skip empty drains).
static PENDING_COUNT: AtomicUsize = AtomicUsize::new(0);

fn queue() -> MutexGuard<'static, VecDeque<Pending>> {
    // Nothing panics while the lock is held (panics abort anyway), so a poisoned lock
    // still guards a consistent queue.
    QUEUE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What [`free`] did.
pub enum Outcome {
    /// The copy was released or queued; `true` when more than [`PENDING_LIMIT`] bytes
    /// are now waiting.
    Done(bool),
    /// The handle was freed already.
    AlreadyFreed,
    /// No memory for the queue entry; the handle is still live.
    OutOfMemory,
}

/// Frees the handle `h`: exactly one of concurrent calls on one handle succeeds.
///
/// # Safety
/// `h` is a handle; called from a stub holding the runtime, which allocates nothing on
/// the OCaml heap until this returns.
pub unsafe fn free(h: Word) -> Outcome {
    if !runtime::DEFERS_FREE {
        // SAFETY: the caller's contract.
        return match unsafe { handle::take(h) } {
            None => Outcome::AlreadyFreed,
            Some(owned) => {
                // SAFETY: the handle owned this copy and gave it up to us alone.
                unsafe { release_now(owned) };
                Outcome::Done(false)
            }
        };
    }
    let mut queue = queue();
    if queue.try_reserve(1).is_err() {
        return Outcome::OutOfMemory;
    }
    // SAFETY: the caller's contract.
    let Some(owned) = (unsafe { handle::take(h) }) else {
        return Outcome::AlreadyFreed;
    };
    if owned.base.is_null() {
        return Outcome::Done(false);
    }
    // SAFETY: `owned.alloc` is an allocator block, alive (the handle holds it).
    let free = unsafe { CAllocator::new(owned.alloc) }.free_fn();
    let entry = Pending {
        after_cycle: runtime::major_cycles_completed(),
        base: owned.base,
        bytes: owned.bytes,
        free,
        // SAFETY: `owned.alloc` is the handle's allocator block; we hold the runtime.
        alloc: unsafe { Rooted::new(owned.alloc, free) },
    };
    queue.push_back(entry); // capacity reserved above
    PENDING_COUNT.fetch_add(1, Ordering::Relaxed);
    let waiting = PENDING_BYTES.fetch_add(owned.bytes, Ordering::Relaxed) + owned.bytes;
    Outcome::Done(waiting > PENDING_LIMIT)
}

/// Gives `owned` back to its allocator now.
///
/// # Safety
/// Nothing refers to the copy any more, or (OCaml 5) no major cycle that began before it
/// was freed is still running; called holding the runtime.
unsafe fn release_now(owned: Owned) {
    if owned.base.is_null() {
        return;
    }
    runtime::unregister(owned.base, owned.bytes);
    // SAFETY: `owned.alloc` is the block the copy was allocated with; the caller's
    // contract makes the memory unused.
    unsafe { CAllocator::new(owned.alloc).free(owned.base, owned.bytes) };
    runtime::reregister_shared(owned.base, owned.bytes);
}

/// Releases the queued copies whose cycle has ended, oldest first.
///
/// # Safety
/// Called holding the runtime (a stub).
pub unsafe fn drain_due() {
    if PENDING_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let completed = runtime::major_cycles_completed();
    loop {
        let entry = {
            let mut queue = queue();
            match queue.front() {
                Some(first) if first.after_cycle < completed => queue.pop_front(),
                _ => None,
            }
        };
        let Some(entry) = entry else { return };
        PENDING_COUNT.fetch_sub(1, Ordering::Relaxed);
        PENDING_BYTES.fetch_sub(entry.bytes, Ordering::Relaxed);
        // SAFETY: the cycle running at its `free` has completed: no marker reads the copy
        // any more. `free` is the function of the block passed with it (kept alive by
        // its root), or the default allocator's, which ignores its block.
        unsafe { (entry.free)(entry.alloc.block(), entry.base, entry.bytes) };
        if let Some(mut cell) = entry.alloc.0 {
            // SAFETY: the root registered by `Rooted::new` for this cell.
            unsafe {
                ocaml_sys::caml_remove_generational_global_root(&mut *cell as *mut Word as *mut _)
            };
        }
    }
}

/// Copies waiting in the queue.
pub fn pending() -> usize {
    PENDING_COUNT.load(Ordering::Relaxed)
}

/// Frees several allocations at once, each as [`free`] frees a copy (at once on OCaml 4,
/// after the running major cycle on OCaml 5): a region's chunks. `take` is called once
/// the queue has room for `count` entries and returns them (at most `count`), or `None`
/// when they were freed already. Their allocator blocks must be alive for the call.
///
/// # Safety
/// Called from a stub holding the runtime, which allocates nothing on the OCaml heap
/// until this returns; what `take` returns is unused by anything but the GC's marker.
pub unsafe fn free_all(count: usize, take: impl FnOnce() -> Option<Vec<Owned>>) -> Outcome {
    if !runtime::DEFERS_FREE {
        let Some(owned) = take() else {
            return Outcome::AlreadyFreed;
        };
        for owned in owned {
            // SAFETY: the caller's contract; OCaml 4's marker skips unregistered memory.
            unsafe { release_now(owned) };
        }
        return Outcome::Done(false);
    }
    let mut queue = queue();
    if queue.try_reserve(count).is_err() {
        return Outcome::OutOfMemory;
    }
    let Some(owned) = take() else {
        return Outcome::AlreadyFreed;
    };
    debug_assert!(owned.len() <= count, "room reserved for {count} entries");
    let after_cycle = runtime::major_cycles_completed();
    let mut bytes = 0;
    for owned in owned.into_iter().filter(|o| !o.base.is_null()) {
        // SAFETY: an allocator block, alive for the call (the caller's contract).
        let free = unsafe { CAllocator::new(owned.alloc) }.free_fn();
        queue.push_back(Pending {
            after_cycle,
            base: owned.base,
            bytes: owned.bytes,
            free,
            // SAFETY: as above; we hold the runtime.
            alloc: unsafe { Rooted::new(owned.alloc, free) },
        }); // room reserved above
        PENDING_COUNT.fetch_add(1, Ordering::Relaxed);
        bytes += owned.bytes;
    }
    let waiting = PENDING_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    Outcome::Done(waiting > PENDING_LIMIT)
}
