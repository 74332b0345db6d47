//! Small copies made with the default allocator: size-class slots carved from large
//! regions that are registered with the runtime once, when they are mapped.
//!
//! A small copy made with `malloc` cost, besides `malloc` and `free`, a page-table
//! registration at `copy` and a removal at `free` on OCaml 4 (under a global lock, with
//! a hash map counting the copies that share each end page): measured with `perf`, a
//! third of a small copy's time. Here a copy of at most [`SMALL_MAX`] bytes made with
//! the default allocator takes a slot of its size class ([`crate::size_class`]):
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
//! On OCaml 5 a slot whose copy's root was never handed out, freed while other domains
//! run, is held a short while instead ([`free_held`]): until the runtime has completed
//! two more minor collections, stop-the-world sections that every running domain enters
//! from a safe point, so that a stub or a marking slice of another domain that read the
//! handle just before the free has returned by then (`release::free_never_exposed`).
//! A thread keeps two batches of such slots, by the minor collection count of their
//! frees; a thread that ends gives its batches to the slab, which holds them as long.
//!
//! The stubs choose the slab from the allocator block and the size alone (see
//! [`is_slab_copy`]), at `copy` and again at `free`, so the handle records nothing more.
//! Copies made with any other allocator, `offheap_alloc` called from C included, are
//! registered per copy as before.

use std::cell::UnsafeCell;
use std::sync::{Mutex, MutexGuard};

use crate::alloc::{map_huge, offheap_alloc, offheap_free, unmap_huge, Allocator, CAllocator};
use crate::size_class::{class_of, slot_bytes, CLASSES, SMALL_MAX};

/// Bytes of one region: one huge page.
const REGION_BYTES: usize = crate::alloc::HUGE_PAGE;

/// The free slots of every class and the unused end of the current region.
struct Slab {
    /// Head of each class's free list; a free slot's first word links to the next.
    free: [*mut u8; CLASSES],
    /// Next unused byte of the current region, and its end.
    bump: *mut u8,
    end: *mut u8,
    /// Slots held for ended threads and threads that keep no slots (OCaml 5).
    #[cfg(ocaml5)]
    held: Batches,
}

/// Slots of any class, and blocks of the default allocator beyond the slab, held until
/// a minor collection count ([`Held::due`]): each one's first word links to the next,
/// its second word holds a slot's class or a block's size with [`BLOCK`] set (every
/// slot has at least [`crate::size_class::GRAIN`] bytes). `minor` is the count read at
/// the latest of their frees; `bytes` the bytes of the slots and blocks.
#[cfg(ocaml5)]
#[derive(Clone, Copy)]
struct Held {
    head: *mut u8,
    tail: *mut u8,
    count: usize,
    minor: usize,
    bytes: usize,
}

/// The tag of a held block beyond the slab: its size or'ed with this bit.
#[cfg(ocaml5)]
const BLOCK: usize = 1 << (usize::BITS - 1);

/// The bytes of slots and blocks that a thread, or the slab for threads that keep none,
/// holds at most ([`can_hold`]); past them, frees wait for the end of a major cycle as
/// any other. A thread gives its held memory back at its next copy or free, or at its
/// end, once due: an idle thread keeps at most this much meanwhile, whatever the GC does
/// (with 16 MiB, 8 idle threads kept 120 MiB of 3 MiB copies through full majors, a
/// helper's find).
#[cfg(ocaml5)]
const HELD_BYTES: usize = 4 << 20;

/// Gives a held slot or block back: a slot to `slot_free(class, slot)`, a block to the
/// default allocator.
///
/// # Safety
/// `at` is held (pushed with `tag`) and due.
#[cfg(ocaml5)]
unsafe fn give_held(tag: usize, at: *mut u8, slot_free: impl FnOnce(usize, *mut u8)) {
    if tag & BLOCK != 0 {
        // SAFETY: a block of this size from the default allocator (`free_held_block`'s
        // contract), which ignores its block argument; nothing uses it.
        unsafe { offheap_free(0, at, tag & !BLOCK) };
    } else {
        slot_free(tag, at);
    }
}

#[cfg(ocaml5)]
impl Held {
    const EMPTY: Held = Held {
        head: std::ptr::null_mut(),
        tail: std::ptr::null_mut(),
        count: 0,
        minor: 0,
        bytes: 0,
    };

    /// Whether slots are held and the count `now` is 2 past their frees' (see
    /// `runtime::minor_collections`).
    fn due(&self, now: usize) -> bool {
        self.count > 0 && now.wrapping_sub(self.minor) >= 2
    }

    /// Adds the slot `slot` of class `tag`, or the block of `tag & !BLOCK` bytes, freed
    /// at count `minor`.
    ///
    /// # Safety
    /// `slot` is a slot of that class, or a block of the default allocator of that size,
    /// that nothing uses any more.
    unsafe fn push(&mut self, slot: *mut u8, tag: usize, minor: usize) {
        // SAFETY: the caller's contract: at least two words of ours.
        unsafe {
            link(slot, self.head);
            *(slot as *mut usize).add(1) = tag;
        }
        self.bytes += if tag & BLOCK != 0 {
            tag & !BLOCK
        } else {
            slot_bytes(tag)
        };
        if self.count == 0 {
            self.tail = slot;
        }
        self.head = slot;
        self.count += 1;
        self.minor = self.minor.max(minor);
    }

    /// Adds the slots of `other`; they are all held until the later of the two counts.
    fn append(&mut self, other: Held) {
        if other.count == 0 {
            return;
        }
        if self.count > 0 {
            // SAFETY: held slots, ours alone.
            unsafe { link(other.tail, self.head) };
        } else {
            self.tail = other.tail;
        }
        self.head = other.head;
        self.count += other.count;
        self.minor = self.minor.max(other.minor);
        self.bytes += other.bytes;
    }

    /// Takes everything, calling `free(tag, slot)` on each (see [`Held::push`]).
    fn drain(&mut self, mut free: impl FnMut(usize, *mut u8)) {
        let mut slot = self.head;
        for _ in 0..self.count {
            // SAFETY: held: its link and tag were written by `push`.
            let (next, tag) = unsafe { (next_of(slot), *(slot as *const usize).add(1)) };
            free(tag, slot);
            slot = next;
        }
        *self = Held::EMPTY;
    }
}

// SAFETY: the pointers are memory owned by the slab alone, used under its lock.
unsafe impl Send for Slab {}

/// Held slots in two batches, the older and the newer, so that a steady stream of frees
/// never keeps a batch from coming due: a batch takes frees of one count only, and a
/// free of a later count starts a new one, the older batch being due by then.
#[cfg(ocaml5)]
#[derive(Clone, Copy)]
struct Batches([Held; 2]);

#[cfg(ocaml5)]
impl Batches {
    const EMPTY: Batches = Batches([Held::EMPTY; 2]);

    /// Takes the batches that are due at the count `now` out.
    fn take_due(&mut self, now: usize) -> [Held; 2] {
        let mut due = [Held::EMPTY; 2];
        for (k, batch) in self.0.iter_mut().enumerate() {
            if batch.due(now) {
                due[k] = std::mem::replace(batch, Held::EMPTY);
            }
        }
        due
    }

    /// The bytes of the slots and blocks held.
    fn bytes(&self) -> usize {
        self.0[0].bytes + self.0[1].bytes
    }

    /// Adds `slots`, freed at counts up to `slots.minor`, at most `now`, once what is due
    /// at `now` was taken out ([`Batches::take_due`]).
    fn add(&mut self, slots: Held) {
        let [older, newer] = &mut self.0;
        if newer.count > 0 && newer.minor < slots.minor {
            // The older batch is empty: its count was below the newer's, so at least 2
            // below `now`, and it was due.
            older.append(*newer);
            *newer = Held::EMPTY;
        }
        newer.append(slots);
    }
}

static SLAB: Mutex<Slab> = Mutex::new(Slab {
    free: [std::ptr::null_mut(); CLASSES],
    bump: std::ptr::null_mut(),
    end: std::ptr::null_mut(),
    #[cfg(ocaml5)]
    held: Batches::EMPTY,
});

fn slab() -> MutexGuard<'static, Slab> {
    // Nothing panics while the lock is held (panics abort anyway).
    SLAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The free slots of class `class` that a thread keeps at most: 4 KiB of them, and at
/// least 2 slots (some 450 KiB a thread for all classes at most, mostly much less).
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
        // At least 2 slots, so that half of a full list is at least one.
        let limit = CACHE_BYTES / slot_bytes(class);
        limits[class] = if limit < 2 { 2 } else { limit } as u16;
        class += 1;
    }
    limits
};

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

impl Run {
    /// The run of the one slot `slot`.
    fn one(slot: *mut u8) -> Run {
        Run {
            head: slot,
            tail: slot,
            count: 1,
        }
    }
}

impl Slab {
    /// Up to `want` (at least 1) free slots of class `class`: from its free list, else
    /// carved from the current region or a new one; `None` when no region could be
    /// mapped or registered.
    ///
    /// Called holding the runtime (see [`alloc`]).
    fn take(&mut self, class: usize, want: usize) -> Option<Run> {
        #[cfg(ocaml5)]
        self.release_due(super::minor_collections());
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

    /// Puts the held slots that are due at the count `now` on their free lists.
    #[cfg(ocaml5)]
    fn release_due(&mut self, now: usize) {
        for mut batch in self.held.take_due(now) {
            // SAFETY: held and due.
            batch.drain(|tag, at| unsafe {
                give_held(tag, at, |class, slot| self.give(class, Run::one(slot)))
            });
        }
    }

    /// Holds `slots` (see [`free_held`]), freed at counts up to `now`.
    #[cfg(ocaml5)]
    fn hold(&mut self, slots: Held, now: usize) {
        self.release_due(now);
        self.held.add(slots);
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
    /// Slots held (OCaml 5, [`free_held`]).
    #[cfg(ocaml5)]
    held: Batches,
}

impl ThreadSlots {
    /// A slot of class `class`, from this thread's list, else a run taken from the slab.
    fn alloc(&mut self, class: usize) -> *mut u8 {
        #[cfg(ocaml5)]
        if self.counts[class] == 0 {
            self.release_due(super::minor_collections());
        }
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
    /// Gives every slot back to the slab, the held ones to be held there.
    fn give_back(&mut self) {
        let mut slab = slab();
        for class in 0..CLASSES {
            let n = self.counts[class];
            if n > 0 {
                let run = self.split(class, n);
                slab.give(class, run);
            }
        }
        #[cfg(ocaml5)]
        {
            let [older, newer] = std::mem::replace(&mut self.held, Batches::EMPTY).0;
            let now = super::minor_collections();
            slab.hold(older, now);
            slab.hold(newer, now);
        }
    }

    /// Holds the slot `ptr` of class `class`, freed now, at the minor collection count
    /// `now` (see [`free_held`]).
    ///
    /// # Safety
    /// As for [`ThreadSlots::free`].
    #[cfg(ocaml5)]
    unsafe fn hold(&mut self, tag: usize, ptr: *mut u8, now: usize) {
        self.release_due(now);
        let mut one = Held::EMPTY;
        // SAFETY: the caller's contract.
        unsafe { one.push(ptr, tag, now) };
        self.held.add(one);
    }

    /// Moves the held slots that are due at the count `now` to their classes' lists.
    #[cfg(ocaml5)]
    fn release_due(&mut self, now: usize) {
        for mut batch in self.held.take_due(now) {
            // SAFETY: held and due, ours alone.
            batch.drain(|tag, at| unsafe {
                give_held(tag, at, |class, slot| self.free(class, slot))
            });
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
            #[cfg(ocaml5)]
            held: Batches::EMPTY,
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
        slab().give(class, Run::one(ptr));
        return;
    }
    // SAFETY: as in `alloc`; the caller's contract for `ptr`.
    THREAD_SLOTS.with(|slots| unsafe { (*slots.get()).free(class, ptr) });
}

/// Gives back a slot from [`alloc`] of the same `bytes`, on any thread, once the minor
/// collection count has grown by 2 (see `runtime::minor_collections`): a slot of a copy
/// whose root no `get` handed out, freed while other domains run, whose stubs or marking
/// slices may have read the handle just before the free (`release::free_never_exposed`;
/// OCaml 5: on OCaml 4, where no other domain runs, [`free`]).
///
/// # Safety
/// As for [`free`].
pub unsafe fn free_held(ptr: *mut u8, bytes: usize) {
    #[cfg(not(ocaml5))]
    // SAFETY: forwarded.
    unsafe {
        free(ptr, bytes)
    }
    #[cfg(ocaml5)]
    // SAFETY: forwarded: a slot of class `class_of(bytes)`.
    unsafe {
        hold_tagged(ptr, class_of(bytes))
    }
}

/// Holds `ptr`, a slot of class `tag` or a block of `tag & !BLOCK` bytes, in this
/// thread's batches, or the slab's for a thread that keeps none.
///
/// # Safety
/// As for [`Held::push`].
#[cfg(ocaml5)]
unsafe fn hold_tagged(ptr: *mut u8, tag: usize) {
    let now = super::minor_collections();
    if !crate::thread_end::watched() {
        let mut one = Held::EMPTY;
        // SAFETY: the caller's contract.
        unsafe { one.push(ptr, tag, now) };
        slab().hold(one, now);
        return;
    }
    // SAFETY: as in `alloc`; the caller's contract for `ptr`.
    THREAD_SLOTS.with(|slots| unsafe { (*slots.get()).hold(tag, ptr, now) });
}

/// Whether [`free_held`] or [`free_held_block`] may hold a copy of `bytes` more bytes
/// now (a thread, or the slab for threads that keep none, holds at most `HELD_BYTES`;
/// the batches due are released first). Never on OCaml 4, where no other domain runs.
#[cfg_attr(not(ocaml5), allow(unused_variables))]
pub fn can_hold(bytes: usize) -> bool {
    #[cfg(not(ocaml5))]
    return false;
    #[cfg(ocaml5)]
    can_hold_now(bytes)
}

/// [`can_hold`] on OCaml 5.
#[cfg(ocaml5)]
fn can_hold_now(bytes: usize) -> bool {
    let now = super::minor_collections();
    let room = |held: usize| held.saturating_add(bytes) <= HELD_BYTES;
    if !crate::thread_end::watched() {
        let mut slab = slab();
        slab.release_due(now);
        return room(slab.held.bytes());
    }
    // SAFETY: as in `alloc`.
    THREAD_SLOTS.with(|slots| unsafe {
        let slots = &mut *slots.get();
        slots.release_due(now);
        room(slots.held.bytes())
    })
}

/// Gives back, as [`free_held`] does a slot, a block of `bytes` bytes (beyond
/// [`SMALL_MAX`]) of the default allocator ([`offheap_alloc`]) after [`can_hold`] said
/// there was room.
///
/// # Safety
/// `ptr` came from the default allocator for `bytes` bytes and nothing uses it any more.
pub unsafe fn free_held_block(ptr: *mut u8, bytes: usize) {
    #[cfg(not(ocaml5))]
    // SAFETY: the caller's contract (OCaml 4 holds nothing: never called there).
    unsafe {
        offheap_free(0, ptr, bytes)
    }
    #[cfg(ocaml5)]
    // SAFETY: forwarded; a size has its top bit clear.
    unsafe {
        hold_tagged(ptr, bytes | BLOCK)
    }
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
