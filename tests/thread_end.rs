//! What a thread keeps between copies (the queue's spare first vector, the space of walks
//! beyond the stack) is freed when the thread ends (`offheap::thread_end`, a POSIX key's
//! destructor, not `thread_local!` destructors): threads that each make copies leave no
//! Rust memory behind once they have ended. In a test binary of its own: it counts the
//! whole process's Rust heap.

mod fake_heap;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use fake_heap::{Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::queue::{thread_spare_bytes, SPARE_BYTES};
use offheap::copy::small::{thread_space_bytes, LARGE_SPACE_BYTES};
use offheap::copy::visited::HeaderMarks;
use offheap::copy::{self, small};
use offheap::layout::{self, Color, Word};

/// Bytes of Rust heap the process holds.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct CountingAll;

// SAFETY: forwards to `System`, counting what it hands out and takes back.
unsafe impl GlobalAlloc for CountingAll {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAll = CountingAll;

/// A list of `n` cells holding strings: `n + n` blocks.
fn list(h: &mut FakeHeap, n: usize) -> Word {
    let mut l = layout::val_int(0);
    for i in 0..n {
        let s = h.string(format!("cell {i}").as_bytes());
        l = h.block(0, &[s, l]);
    }
    l
}

/// Copies `root` (by the general traversal when `general`) and frees the copy.
fn copy_and_free(h: &mut FakeHeap, root: Word, general: bool) {
    let mut alloc = Counting::new();
    let visited = HeaderMarks::new(Color::C2);
    // SAFETY: `root` is a well-formed value of the fake heap; nothing else touches it.
    let c = unsafe {
        if general {
            copy::traverse(root, h, visited, &mut alloc)
        } else {
            copy::copy(root, h, visited, &mut alloc)
        }
    }
    .unwrap();
    // SAFETY: from this allocator; not used after.
    unsafe { alloc.free(c.base, c.bytes) };
}

#[test]
fn threads_that_end_leave_their_spare_and_space_behind() {
    // A value beyond the walk on the stack but within its own buffers: copied, it
    // leaves the thread the space of those buffers; by the general traversal (a list:
    // its queue stays short), the spare first vector of the queue.
    let run = || {
        let mut h = FakeHeap::new(1 << 16);
        let v = list(&mut h, small::MAX_BLOCKS);
        copy_and_free(&mut h, v, false);
        copy_and_free(&mut h, v, true);
        (thread_space_bytes(), thread_spare_bytes())
    };
    // The first thread: std's own first-use allocations are made.
    std::thread::spawn(run).join().unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..64 {
        let kept = std::thread::spawn(run).join().unwrap();
        assert_eq!(
            kept,
            (LARGE_SPACE_BYTES, SPARE_BYTES),
            "the thread kept both"
        );
    }
    let grew = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        grew < (SPARE_BYTES + LARGE_SPACE_BYTES) as isize,
        "64 threads that ended left {grew} bytes (one thread keeps {} + {})",
        SPARE_BYTES,
        LARGE_SPACE_BYTES
    );
}
