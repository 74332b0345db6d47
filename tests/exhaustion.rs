//! The traversal's own memory runs out: every allocation it makes for itself on the Rust
//! heap (queue, side table, snapshot) is made to fail in turn, by a global allocator that
//! fails the `n`-th allocation of the thread. Each failure must give
//! `CopyError::OutOfMemory`, leave the source byte-identical, ask the copy's allocator
//! for nothing or give it all back, and keep no Rust memory; with no failure the copy
//! succeeds. (Failures of the huge-page mappings are tested in `address_space.rs`.)

mod fake_heap;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fake_heap::{assert_isomorphic, Counting, FakeHeap, Rng};
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

/// Copies `root` with `s`, the `allowed`-th Rust allocation of the thread failing
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
            Strategy::Marks => copy::copy(root, h, HeaderMarks::new(Color::C2), alloc),
            Strategy::Table => copy::copy(root, h, SideTable::new(), alloc),
            Strategy::Outside => copy::copy(root, h, MarksOutside::new(Color::C2, range), alloc),
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
            let live = LIVE.with(Cell::get);
            let outcome = copy_failing(&mut h, root, s, &mut alloc, allowed);
            assert_eq!(
                LIVE.with(Cell::get),
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
