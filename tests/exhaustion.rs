//! The traversal's own memory runs out: every allocation it makes for itself on the Rust
//! heap (queue, side table, snapshot) is made to fail in turn, by a global allocator that
//! fails the `n`-th allocation of the thread. Each failure must give
//! `CopyError::OutOfMemory`, leave the source byte-identical, ask the copy's allocator
//! for nothing or give it all back, and keep no Rust memory; with no failure the copy
//! succeeds. (Failures of the huge-page mappings are tested in `address_space.rs`.)
//!
//! The queue's first vector may come from the thread's spare (`copy::queue`), which a
//! thread keeps between copies: the memory kept is counted as the thread's live Rust
//! heap minus its spare, and both ways of getting that vector (taken from the spare, or
//! allocated when the thread has none) are made to fail.

mod fake_heap;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fake_heap::{assert_isomorphic, Counting, FakeHeap, Rng};
use offheap::copy::queue::{thread_spare_bytes, SPARE_BYTES};
use offheap::copy::visited::{HeaderMarks, MarksOutside, SideTable};
use offheap::copy::{self, Copied, CopyError};
use offheap::layout::{self, Color, Word};

struct FailingNth;

thread_local! {
    /// Allocations of this thread still allowed to succeed; `usize::MAX`: unarmed.
    static ALLOWED: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Bytes of Rust heap this thread holds.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// Whether this allocation may go ahead (and counts it).
fn may_allocate() -> bool {
    ALLOWED
        .try_with(|a| match a.get() {
            usize::MAX => true,
            0 => false,
            n => {
                a.set(n - 1);
                true
            }
        })
        .unwrap_or(true)
}

fn bump(delta: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

/// Bytes of Rust heap this thread holds, its spare queue vector and the walk's buffers
/// (`copy::small`) not counted.
fn live_but_spare() -> isize {
    LIVE.with(Cell::get)
        - thread_spare_bytes() as isize
        - offheap::copy::small::thread_space_bytes() as isize
}

// SAFETY: forwards to `System`, or returns null (a valid answer of any allocator).
unsafe impl GlobalAlloc for FailingNth {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !may_allocate() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            bump(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !may_allocate() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            bump(l.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(p, l) };
        bump(-(l.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if !may_allocate() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            bump(new_size as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: FailingNth = FailingNth;

#[derive(Clone, Copy, Debug)]
enum Strategy {
    Marks,
    Table,
    /// Header marks, the blocks at the start of the heap arena in a side table.
    Outside,
}

/// A value with many blocks: a list of `n` cells, each holding a boxed float or a pair
/// with a string, some shared, and a closure.
fn value(h: &mut FakeHeap, n: usize) -> Word {
    let mut rng = Rng(7);
    let shared = h.string(b"shared by many cells");
    let mut list = layout::val_int(0);
    for i in 0..n {
        let head = match rng.below(3) {
            0 => h.float(i as f64),
            1 => {
                let s = h.string(format!("cell {i}").as_bytes());
                h.block(1, &[s, shared])
            }
            _ => shared,
        };
        list = h.block(0, &[head, list]);
    }
    let f = h.closure(&[1, 2], &[list, shared]);
    h.block(0, &[list, f[1]])
}

/// Copies `root` by the general traversal with `s` (the path of small values, which
/// allocates nothing, has a test of its own), the `allowed`-th Rust allocation of the thread failing
/// (`usize::MAX`: none).
fn copy_failing(
    h: &mut FakeHeap,
    root: Word,
    s: Strategy,
    alloc: &mut Counting,
    allowed: usize,
) -> Result<Copied, CopyError> {
    let (start, end) = h.heap_range();
    // About the first half of what `value` builds: some blocks in each set.
    let range = (start, start + (end - start) / 10);
    // SAFETY: `root` is a well-formed value of `h`; nothing else touches it.
    unsafe {
        ALLOWED.with(|a| a.set(allowed));
        let r = match s {
            Strategy::Marks => copy::traverse(root, h, HeaderMarks::new(Color::C2), alloc),
            Strategy::Table => copy::traverse(root, h, SideTable::new(), alloc),
            Strategy::Outside => {
                copy::traverse(root, h, MarksOutside::new(Color::C2, range), alloc)
            }
        };
        ALLOWED.with(|a| a.set(usize::MAX));
        r
    }
}

#[test]
fn every_failing_traversal_allocation_is_out_of_memory_with_the_source_intact() {
    let mut h = FakeHeap::new(1 << 20);
    let root = value(&mut h, 30_000);
    let before = h.snapshot();
    for s in [Strategy::Marks, Strategy::Table, Strategy::Outside] {
        let mut failures = 0;
        let mut allowed = 0;
        loop {
            let mut alloc = Counting::new();
            let live = live_but_spare();
            let outcome = copy_failing(&mut h, root, s, &mut alloc, allowed);
            assert_eq!(
                live_but_spare(),
                live,
                "{s:?}, allocation {allowed} failing: Rust memory kept"
            );
            assert!(
                h.snapshot() == before,
                "{s:?}, allocation {allowed} failing: source changed"
            );
            match outcome {
                Err(CopyError::OutOfMemory(bytes)) => {
                    assert!(bytes > 0);
                    assert!(
                        alloc.allocs.is_empty(),
                        "{s:?}: the copy is allocated after the traversal's tables"
                    );
                    failures += 1;
                    allowed += 1;
                }
                Err(e) => panic!("{s:?}: {e}"),
                Ok(c) => {
                    assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
                    // SAFETY: from this allocator; not used after.
                    unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
                    assert!(alloc.live.is_empty());
                    break;
                }
            }
        }
        // Queue growth (about 10 doublings) for all; table growth and snapshot growth
        // for the side table.
        let least = match s {
            Strategy::Marks => 8,
            Strategy::Table => 20,
            Strategy::Outside => 10,
        };
        assert!(
            failures >= least,
            "{s:?}: only {failures} allocations could fail"
        );
    }
}

/// A value of three blocks: a record with a string and a boxed float (issue 9's small
/// values).
fn small(h: &mut FakeHeap) -> Word {
    let s = h.string(b"name-0000000042");
    let f = h.float(42.0);
    h.block(
        0,
        &[
            layout::val_int(42),
            s,
            f,
            layout::val_int(1),
            layout::val_int(-1),
        ],
    )
}

#[test]
fn the_path_of_small_values_takes_no_rust_memory() {
    let mut h = FakeHeap::new(1 << 12);
    let root = small(&mut h);
    let before = h.snapshot();
    // SAFETY: `root` is a well-formed value of `h`; nothing else touches it.
    let copy = |h: &mut FakeHeap, alloc: &mut dyn offheap::alloc::Allocator| unsafe {
        ALLOWED.with(|a| a.set(0));
        let r = copy::copy(root, h, HeaderMarks::new(Color::C2), &mut DynAlloc(alloc));
        ALLOWED.with(|a| a.set(usize::MAX));
        r
    };
    let live = live_but_spare();
    let spare = thread_spare_bytes();
    let mut alloc = Counting::new();
    let c = copy(&mut h, &mut alloc).expect("no Rust allocation needed");
    assert_eq!(
        assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes),
        3
    );
    assert_eq!(c.transient_bytes, 0);
    // SAFETY: from this allocator; not used after.
    unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
    drop(alloc);
    assert_eq!((live_but_spare(), thread_spare_bytes()), (live, spare));
    // The allocator failing: out of memory, nothing kept, the source as it was.
    let mut null = NullAlloc;
    let outcome = copy(&mut h, &mut null);
    assert!(
        matches!(outcome, Err(CopyError::OutOfMemory(88))),
        "{outcome:?}"
    );
    assert!(h.snapshot() == before, "source changed");
    assert_eq!(live_but_spare(), live);
}

/// An allocator that always fails.
struct NullAlloc;

impl offheap::alloc::Allocator for NullAlloc {
    fn alloc(&mut self, _bytes: usize) -> *mut u8 {
        std::ptr::null_mut()
    }

    unsafe fn free(&mut self, _ptr: *mut u8, _bytes: usize) {
        unreachable!("nothing was allocated")
    }
}

/// An allocator behind a `dyn` reference.
struct DynAlloc<'a>(&'a mut dyn offheap::alloc::Allocator);

impl offheap::alloc::Allocator for DynAlloc<'_> {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.0.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: forwarded.
        unsafe { self.0.free(ptr, bytes) }
    }
}

#[test]
fn a_small_copy_allocates_nothing_once_the_thread_has_a_spare_and_fails_cleanly_before() {
    // A thread of its own: it starts without a spare.
    std::thread::spawn(|| {
        let mut h = FakeHeap::new(1 << 12);
        let root = small(&mut h);
        let before = h.snapshot();
        let s = Strategy::Marks;
        for _round in 0..2 {
            // No spare yet (the first round), or one (the second): with no Rust
            // allocation allowed, the first copy has no queue and the next one does.
            let mut alloc = Counting::new();
            let had_spare = thread_spare_bytes();
            let live = live_but_spare();
            let outcome = copy_failing(&mut h, root, s, &mut alloc, 0);
            assert!(h.snapshot() == before, "{s:?}: source changed");
            assert_eq!(live_but_spare(), live, "{s:?}: Rust memory kept");
            assert_eq!(thread_spare_bytes(), had_spare, "{s:?}: spare lost or made");
            match outcome {
                Err(CopyError::OutOfMemory(bytes)) => {
                    assert_eq!(had_spare, 0, "{s:?}: the spare was not used");
                    assert_eq!(bytes, SPARE_BYTES);
                    assert!(alloc.allocs.is_empty());
                }
                Ok(c) => {
                    assert_eq!(had_spare, SPARE_BYTES, "{s:?}: allocated without a spare");
                    assert_eq!(
                        assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes),
                        3
                    );
                    // SAFETY: from this allocator; not used after.
                    unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
                }
                Err(e) => panic!("{s:?}: {e}"),
            }
            // Any copy leaves the spare behind.
            let c = copy_failing(&mut h, root, s, &mut alloc, usize::MAX).unwrap();
            // SAFETY: as above.
            unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
            assert_eq!(thread_spare_bytes(), SPARE_BYTES);
            // A copy that grows its queue past the spare's size gives back no spare of
            // another size, and takes the spare again next time.
            let mut big = FakeHeap::new(1 << 16);
            let big_root = value(&mut big, 1000);
            let c = copy_failing(&mut big, big_root, s, &mut alloc, usize::MAX).unwrap();
            // SAFETY: as above.
            unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
            assert_eq!(thread_spare_bytes(), 0, "{s:?}: a grown vector kept");
            assert!(alloc.live.is_empty());
            let c = copy_failing(&mut h, root, s, &mut alloc, usize::MAX).unwrap();
            // SAFETY: as above.
            unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
        }
        // With the spare, header marks allocate nothing for three blocks, with or
        // without a side table for the first blocks of the heap: it holds them inline.
        // (A shared source's snapshot is allocated whatever the size.)
        for s in [Strategy::Marks, Strategy::Outside] {
            let mut alloc = Counting::new();
            let live = live_but_spare();
            let c = copy_failing(&mut h, root, s, &mut alloc, 0)
                .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(
                assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes),
                3
            );
            // SAFETY: as above.
            unsafe { offheap::alloc::Allocator::free(&mut alloc, c.base, c.bytes) };
            assert!(h.snapshot() == before, "{s:?}: source changed");
            assert_eq!(live_but_spare(), live, "{s:?}: Rust memory kept");
        }
    })
    .join()
    .unwrap();
}

/// An allocator that makes another copy (of `inner`, in `heap`) inside its `alloc`, as a
/// copy nested in a copy of the same thread would: the outer queue holds the spare then.
struct Nesting<'a> {
    heap: &'a mut FakeHeap,
    inner: Word,
    made: Option<Copied>,
    alloc: Counting,
}

impl offheap::alloc::Allocator for Nesting<'_> {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        // SAFETY: `inner` is a well-formed value of its own heap, which nothing else
        // touches.
        let c = unsafe {
            copy::traverse(
                self.inner,
                self.heap,
                HeaderMarks::new(Color::C2),
                &mut self.alloc,
            )
        };
        self.made = Some(c.unwrap());
        self.alloc.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: forwarded.
        unsafe { self.alloc.free(ptr, bytes) }
    }
}

#[test]
fn a_copy_nested_in_a_copy_gets_a_queue_of_its_own() {
    std::thread::spawn(|| {
        let mut outer_heap = FakeHeap::new(1 << 12);
        let mut inner_heap = FakeHeap::new(1 << 12);
        let outer = small(&mut outer_heap);
        let inner = small(&mut inner_heap);
        let (outer_before, inner_before) = (outer_heap.snapshot(), inner_heap.snapshot());
        for round in 0..3 {
            let live = live_but_spare();
            let mut nesting = Nesting {
                heap: &mut inner_heap,
                inner,
                made: None,
                alloc: Counting::new(),
            };
            // SAFETY: `outer` is a well-formed value of its heap; nothing else touches it.
            let c = unsafe {
                copy::traverse(
                    outer,
                    &mut outer_heap,
                    HeaderMarks::new(Color::C2),
                    &mut nesting,
                )
            }
            .unwrap();
            let made = nesting.made.take().expect("the nested copy ran");
            assert_eq!(
                assert_isomorphic(&mut outer_heap, outer, c.root, c.base as Word, c.bytes),
                3
            );
            assert_eq!(
                assert_isomorphic(
                    nesting.heap,
                    inner,
                    made.root,
                    made.base as Word,
                    made.bytes
                ),
                3
            );
            // SAFETY: both from the nesting allocator's `Counting`; not used after.
            unsafe {
                offheap::alloc::Allocator::free(&mut nesting.alloc, c.base, c.bytes);
                offheap::alloc::Allocator::free(&mut nesting.alloc, made.base, made.bytes);
            }
            assert!(nesting.alloc.live.is_empty());
            drop(nesting);
            assert!(outer_heap.snapshot() == outer_before && inner_heap.snapshot() == inner_before);
            assert_eq!(live_but_spare(), live, "round {round}: Rust memory kept");
            assert_eq!(
                thread_spare_bytes(),
                SPARE_BYTES,
                "round {round}: one spare kept"
            );
        }
    })
    .join()
    .unwrap();
}
