//! Giving a freed copy's memory back to its allocator: after the major cycle running at
//! `free` time on OCaml 5; on OCaml 4 at once, or after the marking running at `free`
//! time (`runtime::free_must_wait`).
//!
//! On OCaml 4 the marker scans a block it reached long after it reached it: a block
//! that pointed into the copy then, dead since, is scanned after the free, and the page
//! table makes the marker skip its pointers only while the memory is not part of the
//! heap. Memory handed back to `malloc` can become a heap chunk at the next heap
//! growth; the marker then took the stale pointers for blocks and blackened words of
//! live arrays (`tests/cross`: frees while the major GC marks). So a free made while it
//! marks waits in the queue below, its pages unregistered at once (the page table is
//! for polymorphic operations on live copies), until the marking has ended.
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
//! A copy whose root no `get` ever handed out waits for none of this
//! ([`free_never_exposed`]): only its handle pointed into it.
//!
//! A waiting copy keeps its allocator block alive through a slot that the GC scans as a
//! root ([`Rooted`]), except when the block's free function ignores it (the default
//! allocator's).
//!
//! On OCaml 5 ([`runtime::DISCARDS_AT_FREE`]) the memory of a waiting copy that lies in
//! a mapping of offheap's own (the default allocator's copies of [`alloc::LARGE_BYTES`]
//! and more, region chunks, loaded image payloads) goes back to the system at the free
//! itself ([`discard_at_free`]) when waiting would pass the limit past which frees owe GC
//! work ([`passes_limit`]): its pages are dropped and its address range stays mapped
//! until the release. A marker that follows a pointer left from before the free then
//! reads zeros (or, in a mapped image, the file's bytes: headers of the color no GC
//! marks). A zero header is a block of no fields, tag 0, in one of the three colors the
//! GC gives heap blocks: the marker skips it, or marks it by writing its header (a page
//! of the range comes back, zeroed) and finds nothing to scan. The address range, which
//! nothing else can take meanwhile, is what waits for the end of the cycle. So a program
//! that frees large copies gets their memory back at once, whether or not major cycles
//! end, and its frees owe GC work only for the ranges waiting ([`DISCARDED_WEIGHT`]).
//! Below the limit a free only queues the copy (dropping the pages of 80 MB takes a
//! quarter of a millisecond, and most copies come back at the end of a cycle that ends
//! soon).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::alloc::{self, offheap_free, Allocator, CAllocator, FreeFn};
use crate::handle::{self, Apart, Owned};
use crate::layout::{val_int, Word};
use crate::runtime::{self, slab};

/// Bytes that may wait in the queue before frees ask for major GC work, at the least.
/// The limit is the larger of this and the out-of-heap bytes that the runtime lets dead
/// custom blocks hold before it does a cycle's work for them ([`runtime::gc_allowance`]:
/// by default 29% of the major heap, `OCAMLRUNPARAM=M` sets it). Past the limit, every
/// byte freed owes its share of a major cycle's work: freeing the limit's worth owes one
/// cycle (the rate the runtime applies to custom blocks). The debt is paid by the next
/// `free`, with `Gc.major_slice`, unless a major cycle has ended meanwhile: that end
/// released every copy queued before it, so the debt is forgiven. A program that
/// allocates completes cycles itself and pays nothing; one that frees much and
/// allocates little pays for the cycles after which its memory comes back. No free does
/// GC work for its own bytes, and none pays more than one cycle's work (a debt larger
/// than that is pointless: one cycle's end releases everything queued), as a slice: no
/// `Gc.major`, no finishing of a cycle regardless of its cost.
///
/// Beside other domains (OCaml 5), a free past the limit owes no slice of its own: it
/// tells the runtime what it freed, as a custom block's memory does
/// ([`runtime::share_gc_work`]: `caml_adjust_gc_speed`), the limit's worth for one
/// cycle's work and more as more waits ([`owe`]), and every domain does a share at its
/// next slice. On OCaml 5 a cycle ends once every domain has marked what its own roots
/// reach, and a domain marks only in its own slices, with the budget of the work the
/// domains have incurred and not yet done. Explicit slices (`Gc.major_slice`) incur
/// nothing and count their work as done, so a domain that promotes nothing (its slices
/// incur nothing) never got a budget beside a free that paid slices, and no cycle ended
/// (measured: 5000 copies of 160 KB copied and freed in turn beside such a domain, one
/// cycle ended, 1.2 GB kept). Work incurred through the runtime is left over for the
/// other domains once this one has none of its own to do; a free that paid slices as
/// well would take that budget back. (Until 2026-12 a free finished the cycle with
/// `Gc.major` at four times the limit instead: a pause, seconds long with 100
/// domains.) No free ever finishes a cycle.
pub const PENDING_LIMIT: usize = 8 << 20;
/// The smallest debt (words of work) worth a slice: smaller ones wait for more.
const SLICE_MIN_WORK: usize = 1 << 17;

/// What a waiting copy whose pages went back at its free ([`discard_at_free`]) counts in
/// the bytes waiting: its address range and the kernel's tables for it. It keeps the
/// number of such ranges waiting bounded (past the limit, at least 128, frees owe GC work
/// for them), far below the system's limit on mappings (65530 by default). Where address
/// space counts ([`alloc::address_space_counts`]: `ulimit -v`, a strict commit limit),
/// such a copy counts its whole size, as it did before its pages went back at the free.
const DISCARDED_WEIGHT: usize = 64 << 10;

/// The bytes that may wait before frees owe GC work ([`PENDING_LIMIT`], or the larger
/// allowance of a larger heap), and the words of work a major cycle costs
/// ([`runtime::gc_allowance`]).
///
/// # Safety
/// Called holding the runtime.
unsafe fn limit_and_cycle_work() -> (usize, usize) {
    // SAFETY: the caller holds the runtime.
    let (allowance, cycle_work) = unsafe { runtime::gc_allowance() };
    (PENDING_LIMIT.max(allowance), cycle_work)
}

/// Whether `waiting` bytes waiting pass the limit past which frees owe GC work (the
/// runtime's allowance asked only past [`PENDING_LIMIT`]).
///
/// # Safety
/// Called holding the runtime.
unsafe fn passes_limit(waiting: usize) -> bool {
    // SAFETY: the caller holds the runtime.
    waiting > PENDING_LIMIT && waiting > unsafe { limit_and_cycle_work() }.0
}

/// What a copy of `bytes` bytes counts in the bytes waiting: its size, or
/// [`DISCARDED_WEIGHT`] when its pages go back at its free (`discard`) and address space
/// costs nothing.
fn counted(bytes: usize, discard: bool) -> usize {
    if discard && !alloc::address_space_counts() {
        DISCARDED_WEIGHT
    } else {
        bytes
    }
}

/// Words of major GC work owed by frees past the limit, not yet paid.
static DEBT: AtomicUsize = AtomicUsize::new(0);
/// The major cycles completed when the debt began (a free owing from 0): once more have
/// completed, the debt is forgiven.
static DEBT_CYCLE: AtomicUsize = AtomicUsize::new(0);

/// A freed copy waiting for the end of a major cycle.
struct Pending {
    /// Released once more cycles than this have completed.
    after_cycle: usize,
    base: *mut u8,
    bytes: usize,
    /// What it counts in [`PENDING_BYTES`]: `bytes`, or [`DISCARDED_WEIGHT`].
    counted: usize,
    /// The allocator's free function (field 1 of its block).
    free: FreeFn,
    /// The allocator block, passed to `free`.
    alloc: Rooted,
    /// Whether it was registered (unregistered at `free`), so that the end pages it
    /// shares with live registrations are registered again after `free` (a slab copy's
    /// slab stays registered).
    registered: bool,
    /// The handle's record apart, freed with the copy (see [`Apart`]).
    apart: Apart,
}

/// An allocator block kept alive while its copies wait: a slot of [`ROOTS`], shared by
/// the entries of one `free` (a region's chunks), or nothing when the block's free
/// function ignores it (the default allocator's, the slab's, a loaded image's owners:
/// the block is then passed as the integer 0).
///
/// The GC scans the slots through the runtime's root-scanning hook
/// (`runtime::install_roots_hook`), so keeping a block alive allocates only the slot,
/// fallibly: the runtime's own global roots allocate when registered, and raise
/// `Out_of_memory` from inside the stub when they cannot (on OCaml 5 holding the
/// runtime's lock of roots, which later registrations then wait for forever).
pub struct Rooted(Option<usize>);

/// The slots of [`Rooted`]: a block (or an immediate when free) and the entries sharing
/// it, and the free slots. Locked by stubs (never across an allocation on the OCaml
/// heap) and by the GC's scan, which runs while no stub does.
struct RootTable {
    slots: Vec<Word>,
    entries: Vec<usize>,
    free: Vec<usize>,
}

static ROOTS: Mutex<RootTable> = Mutex::new(RootTable {
    slots: Vec::new(),
    entries: Vec::new(),
    free: Vec::new(),
});

fn roots() -> MutexGuard<'static, RootTable> {
    // Nothing panics while the lock is held (panics abort anyway).
    ROOTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Calls `scan` on every slot that keeps a block alive: the GC's root scan
/// (`runtime::install_roots_hook`), which may move the block and update the slot.
pub fn scan_roots(mut scan: impl FnMut(&mut Word)) {
    for slot in roots().slots.iter_mut() {
        if !crate::layout::is_immediate(*slot) {
            scan(slot);
        }
    }
}

/// Whether the free function `free` ignores its allocator block.
fn ignores_block(free: FreeFn) -> bool {
    [
        offheap_free as FreeFn,
        slab::free_fn,
        crate::image::file::offheap_image_unmap_recorded,
        crate::image::file::offheap_image_unmap_relocated,
    ]
    .iter()
    .any(|&f| f as *const () == free as *const ())
}

/// Whether a copy of `bytes` bytes freed with `free` lies in a mapping of offheap's own,
/// whose pages [`discard_at_free`] gives back: the default allocator's large copies and
/// region chunks ([`alloc::maps_huge`]), and loaded image payloads; on OCaml 5 only
/// ([`runtime::DISCARDS_AT_FREE`]).
fn discards(free: FreeFn, bytes: usize) -> bool {
    let is = |f: FreeFn| f as *const () == free as *const ();
    runtime::DISCARDS_AT_FREE
        && (is(offheap_free) && alloc::maps_huge(bytes)
            || is(crate::image::file::offheap_image_unmap_recorded)
            || is(crate::image::file::offheap_image_unmap_relocated))
}

/// Gives back to the system the pages of a copy just queued (see the module's
/// documentation). A copy's [`handle::Record`], in front of it, goes too: a `stats` of
/// another domain that read the handle live just before the free then reads zeros
/// (keeping the record's page kept its whole huge page: some 2 MiB of memory a copy,
/// counted nowhere until the kernel splits it).
///
/// # Safety
/// `discards(free, bytes)`; the copy at `base` was queued by this stub, which holds the
/// runtime and has not returned since: no cycle can end before it returns (ending one
/// takes every domain to a safe point), so the copy is not released yet.
unsafe fn discard_at_free(free: FreeFn, base: *mut u8, bytes: usize) {
    // SAFETY: for both calls below, the caller's contract; nothing but a marker
    // following a pointer from before the free, or a racing `stats`, reads the copy
    // now, and zeros are safe for both (module docs).
    unsafe {
        if free as *const () == offheap_free as *const () {
            alloc::discard_huge(base, bytes);
        } else {
            // A payload's reservation is page aligned; nothing lies in front of it.
            alloc::discard(base, bytes);
        }
    }
}

impl Rooted {
    /// A slot keeping `alloc` alive for one entry, unless its free function ignores it;
    /// `None` when there is no memory for the slot (nothing done).
    ///
    /// # Safety
    /// `alloc` is an allocator block; called holding the runtime.
    pub unsafe fn new(alloc: Word) -> Option<Rooted> {
        // SAFETY: the caller's contract.
        if ignores_block(unsafe { CAllocator::new(alloc) }.free_fn()) {
            return Some(Rooted(None));
        }
        // SAFETY: the caller's contract.
        unsafe { Rooted::value(alloc) }
    }

    /// A slot keeping any value `v` alive and telling where it is ([`Rooted::block`]),
    /// for a stub that releases the runtime; `None` when there is no memory for it.
    ///
    /// # Safety
    /// Called holding the runtime.
    pub unsafe fn value(v: Word) -> Option<Rooted> {
        runtime::install_roots_hook();
        let mut t = roots();
        let i = match t.free.pop() {
            Some(i) => i,
            None => {
                let n = t.slots.len();
                t.slots.try_reserve(1).ok()?;
                t.entries.try_reserve(1).ok()?;
                // Room for every slot to be free at once: `drop` never allocates.
                t.free.try_reserve(n + 1).ok()?;
                t.slots.push(val_int(0));
                t.entries.push(0);
                n
            }
        };
        t.slots[i] = v;
        t.entries[i] = 1;
        Some(Rooted(Some(i)))
    }

    /// The same slot for one more entry.
    fn share(&self) -> Rooted {
        if let Some(i) = self.0 {
            roots().entries[i] += 1;
        }
        Rooted(self.0)
    }

    /// The value kept (where the GC has it now).
    pub fn block(&self) -> Word {
        self.0.map_or(val_int(0), |i| roots().slots[i])
    }
}

/// Values kept alive, and followed when they move, while a stub lets the GC run (it
/// releases the runtime, or waits for the other domains): one [`Rooted`] slot each.
pub struct Kept(Vec<Rooted>);

impl Kept {
    /// Keeps `values`; `None` when there is no memory for the slots (nothing kept).
    ///
    /// # Safety
    /// Called holding the runtime.
    pub unsafe fn new(values: &[Word]) -> Option<Kept> {
        let mut slots = Vec::new();
        slots.try_reserve_exact(values.len()).ok()?;
        for &v in values {
            // SAFETY: the caller's contract.
            slots.push(unsafe { Rooted::value(v) }?);
        }
        Some(Kept(slots))
    }

    /// Writes where the values are now into `values` (those given to [`Kept::new`]).
    pub fn read_back(&self, values: &mut [Word]) {
        for (v, slot) in values.iter_mut().zip(&self.0) {
            *v = slot.block();
        }
    }
}

impl Drop for Rooted {
    /// The last entry sharing the slot frees it.
    fn drop(&mut self) {
        let Some(i) = self.0 else { return };
        let mut t = roots();
        t.entries[i] -= 1;
        if t.entries[i] == 0 {
            t.slots[i] = val_int(0);
            // Capacity for every slot (`new`).
            t.free.push(i);
        }
    }
}

// SAFETY: the raw pointers are allocations owned by this entry alone (the copy, the
// handle's record apart), touched by whoever pops the entry, holding the runtime.
unsafe impl Send for Pending {}

/// The queue, in the order of `after_cycle`.
static QUEUE: Mutex<VecDeque<Pending>> = Mutex::new(VecDeque::new());
/// Bytes waiting in the queue. Written only under the queue's lock (see [`add_waiting`]).
static PENDING_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Entries in the queue. Written only under the queue's lock (see [`add_waiting`]).
static PENDING_COUNT: AtomicUsize = AtomicUsize::new(0);
/// The `after_cycle` of the oldest entry, `usize::MAX` when the queue is empty: read
/// without the lock, it lets a drain with nothing due (most of them: a copy or free
/// while the oldest free's cycle is still running) return without locking. Written
/// under the lock.
static OLDEST_CYCLE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Counts of [`runtime::major_cycles_completed`] that every freed copy waits beyond the
/// cycle running at its free: one whole cycle more in a bytecode program on OCaml 5
/// ([`hold_longer_in_bytecode`]), none otherwise.
///
/// Bytecode keeps a function's locals on its stack until it returns (a loop body's
/// until the body ends), used or not, and the GC scans them all. A free that is the last
/// thing of a loop's body leaves, for a moment, variables that lead into the freed copy
/// (its value, a heap array of pointers into it). Another domain, or another thread at a
/// poll point, may begin a major cycle in that moment: its marking then starts from those
/// variables and follows them into the copy, slice after slice, during that cycle, the
/// one after the free's, whose start released the copy. `tests/faults/test_released5`
/// (a second domain ending cycles, released memory kept unreadable) crashed so in 2 or 3
/// runs of 4 without this wait. Native code's frames tell the GC which slots are live.
static EXTRA_WAIT: AtomicUsize = AtomicUsize::new(0);

/// Makes every freed copy wait one major cycle more ([`EXTRA_WAIT`]): called once by a
/// bytecode program, when the library is initialised. Nothing on OCaml 4, whose frees
/// wait only for the running marking, and whose marker skips pointers outside the
/// heap's pages.
pub fn hold_longer_in_bytecode() {
    #[cfg(ocaml5)]
    EXTRA_WAIT.store(runtime::COUNTS_PER_CYCLE, Ordering::Relaxed);
}

/// The `after_cycle` of a copy freed now.
fn after_cycle_now() -> usize {
    runtime::major_cycles_completed() + EXTRA_WAIT.load(Ordering::Relaxed)
}

fn queue() -> MutexGuard<'static, VecDeque<Pending>> {
    // Nothing panics while the lock is held (panics abort anyway), so a poisoned lock
    // still guards a consistent queue.
    QUEUE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Adds `entries` entries and `bytes` bytes to the counts of what waits (or takes them
/// away, negative), returns the bytes waiting now. The counts change only under the
/// queue's lock (`_held`), so a load and a store do, without a locked instruction;
/// readers without the lock see one value or the other.
fn add_waiting(_held: &MutexGuard<'_, VecDeque<Pending>>, entries: isize, bytes: isize) -> usize {
    let add = |counter: &AtomicUsize, n: isize| {
        let now = counter.load(Ordering::Relaxed).wrapping_add_signed(n);
        counter.store(now, Ordering::Relaxed);
        now
    };
    add(&PENDING_COUNT, entries);
    add(&PENDING_BYTES, bytes)
}

/// What [`free`] did.
pub enum Outcome {
    /// The copy was released or queued; the OCaml side should run a major slice of this
    /// many words of work when not 0.
    Done(usize),
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
    if !runtime::free_must_wait() {
        // SAFETY: the caller's contract.
        return match unsafe { handle::take(h) } {
            None => Outcome::AlreadyFreed,
            Some((owned, apart)) => {
                // SAFETY: the handle owned this copy and gave it up to us alone; no stub
                // runs meanwhile (OCaml 4's master lock) to read its record apart.
                unsafe {
                    release_now(owned);
                    apart.free();
                }
                Outcome::Done(0)
            }
        };
    }
    // SAFETY: the caller's contract.
    if let Some(done) = unsafe { free_never_exposed(h) } {
        return done;
    }
    // The root of the allocator block, made first (see `Rooted`).
    // SAFETY: the caller's contract; no lock is held, nothing to drop yet.
    let Some(alloc_block) = (unsafe { handle::alloc_if_live(h) }) else {
        return Outcome::AlreadyFreed;
    };
    // SAFETY: as above; the block of a live handle is an allocator block.
    let Some(root) = (unsafe { Rooted::new(alloc_block) }) else {
        return Outcome::OutOfMemory;
    };
    let mut queue = queue();
    if queue.try_reserve(1).is_err() {
        return Outcome::OutOfMemory;
    }
    // SAFETY: the caller's contract.
    let Some((owned, apart)) = (unsafe { handle::take(h) }) else {
        return Outcome::AlreadyFreed;
    };
    if owned.base.is_null() {
        // Nothing allocated: no record apart either (`handle::fill`).
        debug_assert!(apart.is_none(), "a record apart without a copy");
        // SAFETY: none to free; forgotten otherwise.
        unsafe { apart.free() };
        return Outcome::Done(0);
    }
    // SAFETY: `owned.alloc` is an allocator block, alive (the handle holds it).
    let alloc = unsafe { CAllocator::new(owned.alloc) };
    let slab_copy = slab::is_slab_copy(&alloc, owned.bytes);
    if slab_copy && !runtime::SLAB_FREES_WAIT {
        // SAFETY: a slab copy of this size, which the handle gave up to us alone, made
        // with the default allocator: its record is in front of it, none apart.
        unsafe {
            slab::free(owned.base, owned.bytes);
            apart.free();
        }
        return Outcome::Done(0);
    }
    let free = if slab_copy {
        slab::free_fn
    } else {
        alloc.free_fn()
    };
    if !slab_copy {
        // At once (OCaml 4): the page table is for polymorphic operations on live
        // copies; the marker goes by the heap's pages alone.
        runtime::unregister(owned.base, owned.bytes);
    }
    let discard = discards(free, owned.bytes) && {
        // SAFETY: `passes_limit` needs the runtime, which we hold (the caller's contract).
        unsafe { passes_limit(PENDING_BYTES.load(Ordering::Relaxed) + owned.bytes) }
    };
    let counted = counted(owned.bytes, discard);
    let entry = Pending {
        after_cycle: after_cycle_now(),
        base: owned.base,
        bytes: owned.bytes,
        counted,
        free,
        // Another domain may have freed the handle and made it live again in between?
        // No: a freed handle never becomes live, so `take` found `alloc_block`.
        alloc: root,
        registered: !slab_copy,
        apart,
    };
    if queue.is_empty() {
        OLDEST_CYCLE.store(entry.after_cycle, Ordering::Relaxed);
    }
    // Capacity reserved above.
    queue.push_back(entry);
    // SAFETY: we hold the runtime (the caller's contract).
    let work = unsafe { account(&mut queue, 1, counted) };
    // Outside the lock, which other domains' frees and drains take: dropping the pages
    // of a large copy takes a while.
    drop(queue);
    if discard {
        // SAFETY: just queued by this stub, which holds the runtime.
        unsafe { discard_at_free(free, owned.base, owned.bytes) };
    }
    Outcome::Done(work)
}

/// Frees a copy whose root was never handed out (`handle::take_never_exposed`): no
/// pointer into it but the handle's own root, which `take` overwrites, so no marker can
/// follow one into it later. When no other domain runs (always on OCaml 4) it goes back
/// to its allocator at once, whatever its size and allocator. Beside other domains, a
/// stub of theirs may have read the handle's state just before the free and be reading
/// the copy's record (`stats`), and a marking slice of theirs may have read a record
/// handle's root (an unscanned handle's the GC never reads: `handle.rs`; a block built
/// in C with the default allocator's functions gets a record): a copy of the default
/// allocator under [`alloc::LARGE_BYTES`] is then held until they
/// have all been at a safe point (`slab::free_held` and `slab::free_held_block`: two
/// minor collections, where a free that waits waits for the end of a major cycle), while
/// the thread holds under 4 MiB so (`slab::can_hold`: an idle thread gives what it
/// holds back only at its next copy or free); any other copy waits as usual. `None`, having done nothing, when the copy waits.
/// Like any free it pays the debt of earlier ones ([`debt_due`]).
///
/// A copy that is made and freed again without a `get` (a cache's entry evicted unread,
/// a copy made to measure or test a value) then costs what it costs on OCaml 4 when the
/// GC is not marking, its memory reused at once.
///
/// # Safety
/// `h` is a handle; called from a stub holding the runtime, allocating nothing on the
/// OCaml heap.
unsafe fn free_never_exposed(h: Word) -> Option<Outcome> {
    if runtime::stub_runs_alone() {
        // SAFETY: the caller's contract; nothing points into the copy (above), and no
        // other stub runs to read its record.
        return unsafe { release_never_exposed_now(h) };
    }
    // SAFETY: the caller's contract.
    let (bytes, alloc_block) = unsafe { handle::never_exposed(h) }?;
    // SAFETY: the allocator block of a live handle, alive (the handle holds it).
    let alloc = unsafe { CAllocator::new(alloc_block) };
    let small = slab::is_slab_copy(&alloc, bytes);
    // SAFETY: `h` is a handle.
    if small && unsafe { handle::is_unscanned(h) } {
        // No marker reads an unscanned handle, and the slab never unmaps its slots: a
        // stub of another domain that reads the record of this slot reused meanwhile
        // then finds the handle's state changed and reads the freed statistics instead
        // (`handle::record`). The slot goes back at once, as with no other domain.
        // SAFETY: the caller's contract; as above.
        return unsafe { release_never_exposed_now(h) };
    }
    // A larger copy of the default allocator is held too; from `LARGE_BYTES` on it gives
    // its pages back at the free as it waits. All while the thread holds little.
    let holds = small || (alloc.is_default() && bytes < alloc::LARGE_BYTES);
    if !holds || !slab::can_hold(bytes) {
        return None;
    }
    // SAFETY: the caller's contract. `None` when another domain freed the handle, or
    // handed its root out, meanwhile.
    let (owned, apart) = unsafe { handle::take_never_exposed(h) }?;
    // SAFETY: a copy of this size (its record and allocator never change while the
    // handle is live) made with the default allocator, which the handle gave up to us
    // alone, its record in front of it (no record apart); nothing points into it any
    // more but what other domains' marking may have just read (above).
    unsafe {
        if small {
            slab::free_held(owned.base, owned.bytes);
        } else {
            slab::free_held_block(owned.base, owned.bytes);
        }
        apart.free();
    }
    Some(Outcome::Done(debt_due()))
}

/// Takes the copy of `h` if its root was never handed out and gives it back to its
/// allocator now; `None`, having done nothing, when the root was handed out or another
/// domain freed the handle meanwhile.
///
/// # Safety
/// As for [`free_never_exposed`]; once taken, nothing reads the copy or its record any
/// more but what tells a reused record from its own (`handle::record`).
unsafe fn release_never_exposed_now(h: Word) -> Option<Outcome> {
    // SAFETY: the caller's contract.
    let (owned, apart) = unsafe { handle::take_never_exposed(h) }?;
    // SAFETY: the handle gave the copy up to us alone; the caller's contract.
    unsafe {
        release_now(owned);
        apart.free();
    }
    Some(Outcome::Done(debt_due()))
}

/// The debt that the free now starting pays (words of major-slice work): 0 when a major
/// cycle has ended since the debt was counted (forgiven), or while it is below
/// [`SLICE_MIN_WORK`] (which it can always reach: see [`owe`]). Concurrent frees may
/// each see part of it: the debt only sets how much GC work is asked, never when a copy
/// is released.
fn debt_due() -> usize {
    let debt = DEBT.load(Ordering::Relaxed);
    if debt == 0 {
        return 0;
    }
    if DEBT_CYCLE.load(Ordering::Relaxed) != runtime::major_cycles_completed() {
        DEBT.store(0, Ordering::Relaxed);
        return 0;
    }
    if debt < SLICE_MIN_WORK {
        return 0;
    }
    DEBT.swap(0, Ordering::Relaxed)
}

/// Counts the work owed by a free of `bytes` that left `waiting` bytes in the queue: the
/// part past the limit owes its share of a cycle's work (the limit's worth owes one).
/// Beside other domains it is told to the runtime, for every domain to share
/// ([`runtime::share_gc_work`]), times the limits' worth waiting, and `true` returned:
/// while cycles end, little waits past the limit, and a backlog asks for more (beside a
/// domain just spawned, the first cycle ended only after 1600 frees of 160 KB at the
/// plain rate, some 700 with it; `tests/ocaml5/test_free5`). Else it is added to the
/// debt, which never exceeds one cycle's work (one cycle's end releases everything
/// queued), or [`SLICE_MIN_WORK`] when a small heap's cycle costs less.
///
/// # Safety
/// Called holding the runtime.
unsafe fn owe(waiting: usize, bytes: usize) -> bool {
    if waiting <= PENDING_LIMIT {
        return false;
    }
    // SAFETY: the caller holds the runtime.
    let (limit, cycle_work) = unsafe { limit_and_cycle_work() };
    if waiting <= limit {
        return false;
    }
    let beyond = bytes.min(waiting - limit);
    // Shared, it asks more the more waits: times the limits' worth waiting.
    let asked = beyond.saturating_mul(waiting / limit);
    // SAFETY: the caller holds the runtime.
    if unsafe { runtime::share_gc_work(asked, limit) } {
        return true;
    }
    // At least `SLICE_MIN_WORK` for the limit's worth, rounded up: each free past the
    // limit owes at least a word, so that the debt reaches what a slice pays. Rounded
    // down, a free of a few dozen bytes owed nothing on a heap whose cycle costs less
    // than the limit over its size, and a loop that copied, read and freed a `ref`
    // queued 5 million copies with no cycle ended (a helper's find).
    let cap = cycle_work.max(SLICE_MIN_WORK);
    let owed = (beyond as u128 * cap as u128).div_ceil(limit as u128) as usize;
    let debt = DEBT.load(Ordering::Relaxed);
    if debt == 0 {
        DEBT_CYCLE.store(runtime::major_cycles_completed(), Ordering::Relaxed);
    }
    DEBT.store(debt.saturating_add(owed).min(cap), Ordering::Relaxed);
    false
}

/// Counts the last `entries` of the queue, just pushed by one free, of `bytes` in all,
/// and returns the work the free pays: the debt of earlier frees (this free's own is paid
/// by the next one, or shared by every domain: [`owe`]).
///
/// A free that pays, or that told the runtime of GC work, keeps its own entries one cycle
/// more. The work, done before the free returns or at the next poll for the runtime's
/// interrupts, may end the running cycle and begin the next, whose marking starts from
/// the roots of that moment: the free's caller may still hold the freed value in a
/// variable it drops only once the free has returned (bytecode keeps a function's
/// locals until it returns, and a loop's until its body ends). Released at the end of
/// that cycle, as the drain after the work would release them, the entries' memory was
/// read by the new cycle's marker (region images loaded, read and freed in a loop of a
/// bytecode program, the free the last thing of the loop's body: a segfault in the
/// marker).
///
/// # Safety
/// Called holding the runtime.
unsafe fn account(
    held: &mut MutexGuard<'_, VecDeque<Pending>>,
    entries: usize,
    bytes: usize,
) -> usize {
    let due = debt_due();
    let waiting = add_waiting(held, entries as isize, bytes as isize);
    // SAFETY: as above.
    let told = unsafe { owe(waiting, bytes) };
    if due != 0 || told {
        let first = held.len() - entries;
        // The last entries: they stay in the order of `after_cycle`. `OLDEST_CYCLE` may
        // now be below the oldest entry's cycle, which only costs a drain a lock.
        for entry in held.range_mut(first..) {
            entry.after_cycle += runtime::COUNTS_PER_CYCLE;
        }
    }
    due
}

/// Gives the copy `owned` back now: to the slab when it is a slab copy (the test that
/// `copy` made), else to its allocator.
///
/// # Safety
/// Nothing refers to the copy any more, or (OCaml 5) no major cycle that began before it
/// was freed is still running; called holding the runtime.
unsafe fn release_now(owned: Owned) {
    if owned.base.is_null() {
        return;
    }
    // SAFETY: `owned.alloc` is the copy's allocator block, alive (the handle held it).
    let alloc = unsafe { CAllocator::new(owned.alloc) };
    if slab::is_slab_copy(&alloc, owned.bytes) {
        // SAFETY: a slab copy of this size (chosen by the same test at `copy`), unused.
        unsafe { slab::free(owned.base, owned.bytes) };
        return;
    }
    // SAFETY: forwarded; not a slab copy.
    unsafe { release_to_allocator(owned) };
}

/// Gives `owned` back to its allocator block now, whatever its size: a region's chunks
/// come from their allocator, never from the slab (given to the slab, a chunk smaller
/// than its size class would have been handed out whole to later copies of that class).
///
/// # Safety
/// As [`release_now`]; `owned` was allocated by its allocator block and registered.
unsafe fn release_to_allocator(owned: Owned) {
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
/// Inlined into every `copy` and `free` for its first test alone: with nothing queued,
/// it costs a load and a branch (the call, and the runtime's cycle count computed
/// first, cost a copy and a free of a small record 60 instructions).
///
/// # Safety
/// Called holding the runtime (a stub).
#[inline(always)]
pub unsafe fn drain_due() {
    if OLDEST_CYCLE.load(Ordering::Relaxed) == usize::MAX {
        return;
    }
    // SAFETY: forwarded.
    unsafe { drain_queued() }
}

/// [`drain_due`] once something is queued.
///
/// # Safety
/// As [`drain_due`].
#[inline(never)]
unsafe fn drain_queued() {
    let completed = runtime::major_cycles_completed();
    // A stale read only delays a release to the next drain.
    if OLDEST_CYCLE.load(Ordering::Relaxed) >= completed {
        return;
    }
    loop {
        let mut batch: [Option<Pending>; DRAIN_BATCH] = [const { None }; DRAIN_BATCH];
        let taken = {
            let mut queue = queue();
            let (mut taken, mut bytes) = (0, 0);
            while taken < DRAIN_BATCH {
                match queue.front() {
                    Some(first) if first.after_cycle < completed => {}
                    _ => break,
                }
                let entry = queue.pop_front();
                bytes += entry.as_ref().map_or(0, |e| e.counted);
                batch[taken] = entry;
                taken += 1;
            }
            let oldest = queue.front().map_or(usize::MAX, |first| first.after_cycle);
            OLDEST_CYCLE.store(oldest, Ordering::Relaxed);
            add_waiting(&queue, -(taken as isize), -(bytes as isize));
            taken
        };
        for entry in batch.into_iter().flatten() {
            // SAFETY: the cycle running at its `free` has completed: no marker reads the
            // copy any more.
            unsafe { release_pending(entry) };
        }
        if taken < DRAIN_BATCH {
            return;
        }
    }
}

/// Entries that [`drain_due`] takes from the queue under one lock, then releases.
const DRAIN_BATCH: usize = 32;

/// Releases a queued copy.
///
/// # Safety
/// Taken from the queue, and no major cycle that ran at its `free` is still running;
/// called holding the runtime.
unsafe fn release_pending(entry: Pending) {
    // SAFETY: the caller's contract: no marker reads the copy any more. `free` is the
    // function of the block passed with it (kept alive by its root), or the default
    // allocator's, which ignores its block.
    unsafe { (entry.free)(entry.alloc.block(), entry.base, entry.bytes) };
    if entry.registered {
        runtime::reregister_shared(entry.base, entry.bytes);
    }
    // SAFETY: the cycle that ran at its `free` has ended: no stub that read the handle
    // live still runs.
    unsafe { entry.apart.free() };
    // The entry's root goes with it (`Rooted`'s `drop`).
}

/// Copies waiting in the queue.
pub fn pending() -> usize {
    PENDING_COUNT.load(Ordering::Relaxed)
}

/// Frees several allocations at once (as [`free`] does: at once, or after the running
/// marking on OCaml 4 and major cycle on OCaml 5), each by its allocator block, never
/// by the slab: a region's chunks, which came from their allocator whatever their
/// size. `take` is called once
/// the queue has room for `count` entries and returns them (at most `count`), or `None`
/// when they were freed already. Their allocator blocks must be alive for the call:
/// `alloc`, kept alive while they wait by `root` (made by the caller with
/// [`Rooted::new`] before it took any lock), or blocks whose free functions ignore them.
///
/// # Safety
/// Called from a stub holding the runtime, which allocates nothing on the OCaml heap
/// until this returns; what `take` returns is unused by anything but the GC's marker.
pub unsafe fn free_all(
    count: usize,
    (alloc, root): (Word, Rooted),
    take: impl FnOnce() -> Option<Vec<Owned>>,
) -> Outcome {
    if !runtime::free_must_wait() {
        let Some(owned) = take() else {
            return Outcome::AlreadyFreed;
        };
        for owned in owned {
            // SAFETY: the caller's contract; no marking is running (OCaml 4), so no
            // block reached before the free is scanned again.
            unsafe { release_to_allocator(owned) };
        }
        return Outcome::Done(0);
    }
    let mut queue = queue();
    if queue.try_reserve(count).is_err() {
        return Outcome::OutOfMemory;
    }
    let Some(owned) = take() else {
        return Outcome::AlreadyFreed;
    };
    debug_assert!(owned.len() <= count, "room reserved for {count} entries");
    let after_cycle = after_cycle_now();
    if queue.is_empty() {
        OLDEST_CYCLE.store(after_cycle, Ordering::Relaxed);
    }
    let (mut entries, mut bytes) = (0, 0);
    // The chunks' pages go back now when all of them waiting would pass the limit.
    let all: usize = owned.iter().map(|o| o.bytes).sum();
    // SAFETY: we hold the runtime (the caller's contract).
    let past = unsafe { passes_limit(PENDING_BYTES.load(Ordering::Relaxed) + all) };
    // The allocator's free function of each chunk, and whether its pages go back now.
    let how = |o: &Owned| {
        // SAFETY: an allocator block, alive for the call (the caller's contract).
        let free = unsafe { CAllocator::new(o.alloc) }.free_fn();
        (free, past && discards(free, o.bytes))
    };
    for owned in owned.iter().filter(|o| !o.base.is_null()) {
        let (free, discard) = how(owned);
        runtime::unregister(owned.base, owned.bytes);
        let counted = counted(owned.bytes, discard);
        queue.push_back(Pending {
            after_cycle,
            base: owned.base,
            bytes: owned.bytes,
            counted,
            free,
            alloc: if owned.alloc == alloc {
                root.share()
            } else {
                // Another owner (a loaded image's): its free function ignores its block.
                debug_assert!(ignores_block(free), "only `alloc` needs a root");
                Rooted(None)
            },
            registered: true,
            // Chunks have no handle.
            apart: Apart::none(),
        }); // room reserved above
        entries += 1;
        bytes += counted;
    }
    // SAFETY: we hold the runtime (the caller's contract).
    let work = unsafe { account(&mut queue, entries, bytes) };
    drop(queue);
    for owned in owned.iter().filter(|o| !o.base.is_null()) {
        if let (free, true) = how(owned) {
            // SAFETY: just queued by this stub, which holds the runtime.
            unsafe { discard_at_free(free, owned.base, owned.bytes) };
        }
    }
    Outcome::Done(work)
}
