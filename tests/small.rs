//! The path of small values (`copy::small`): which copies take it, and the skipping that
//! keeps values just beyond its limits from paying for a walk that gives up at every copy.
//! (That it writes the general traversal's bytes is checked on random graphs in
//! `properties.rs`; that it takes no Rust memory, in `exhaustion.rs`.)

mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::HeaderMarks;
use offheap::copy::{self, small, Copied, Heap};
use offheap::layout::{self, Color, Word};

/// The fake heap, counting the calls of `should_copy`: the walk and the general
/// traversal each ask for every pointer field they read.
struct Asking {
    heap: FakeHeap,
    asked: usize,
}

impl Heap for Asking {
    fn should_copy(&mut self, v: Word) -> bool {
        self.asked += 1;
        self.heap.should_copy(v)
    }

    fn is_copyable_custom(&self, ops: Word) -> bool {
        self.heap.is_copyable_custom(ops)
    }

    fn custom_name(&self, ops: Word) -> String {
        self.heap.custom_name(ops)
    }

    fn has_ocaml5_tags(&self) -> bool {
        self.heap.has_ocaml5_tags()
    }
}

impl Asking {
    fn new() -> Asking {
        Asking {
            heap: FakeHeap::new(1 << 14),
            asked: 0,
        }
    }
}

/// A list of `n` immediates.
fn list(h: &mut FakeHeap, n: usize) -> Word {
    let mut l = layout::val_int(0);
    for i in 0..n {
        l = h.block(0, &[layout::val_int(i as isize), l]);
    }
    l
}

/// Copies `root`; checks the copy and frees it. Returns it (freed) and how many times
/// `should_copy` was asked.
fn copy_counted(a: &mut Asking, root: Word, blocks: usize) -> (Copied, usize) {
    let before = a.asked;
    let mut alloc = Counting::new();
    // SAFETY: `root` is a well-formed value of the fake heap; nothing else touches it.
    let c = unsafe { copy::copy(root, a, HeaderMarks::new(Color::C2), &mut alloc) }.unwrap();
    assert_eq!(
        assert_isomorphic(&mut a.heap, root, c.root, c.base as Word, c.bytes),
        blocks
    );
    // SAFETY: from this allocator; not used after.
    unsafe { alloc.free(c.base, c.bytes) };
    (c, a.asked - before)
}

#[test]
fn values_within_the_limits_take_the_path_and_those_beyond_do_not() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let n = small::MAX_BLOCKS;
        let within = list(&mut a.heap, n);
        let beyond = list(&mut a.heap, n + 1);
        // A list of n cells: the walk, no traversal tables.
        let (c, _) = copy_counted(&mut a, within, n);
        assert_eq!(c.transient_bytes, 0);
        // One cell more: the walk gives up, the traversal copies it.
        let (c, _) = copy_counted(&mut a, beyond, n + 1);
        assert!(c.transient_bytes > 0);
    })
    .join()
    .unwrap();
}

#[test]
fn a_run_of_values_beyond_the_limits_walks_once_in_a_while() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let n = small::MAX_BLOCKS + 4;
        let beyond = list(&mut a.heap, n);
        let asked: Vec<usize> = (0..20).map(|_| copy_counted(&mut a, beyond, n).1).collect();
        // The traversal alone asks the same each time; a walk that gives up, more.
        let traversal = *asked.iter().min().unwrap();
        let walked: Vec<bool> = asked.iter().map(|&k| k > traversal).collect();
        let expected: Vec<bool> = (0..20).map(|i| i % 9 == 0).collect();
        assert_eq!(walked, expected, "a walk once in 9 copies: {asked:?}");
        // A small value ends the skipping at once: it is copied by the traversal (it
        // was not tried), and the next small value takes the path again.
        let record = a.heap.block(0, &[layout::val_int(1), layout::val_int(2)]);
        copy_counted(&mut a, beyond, n); // copy 20: walks, then skips
        let (c, _) = copy_counted(&mut a, record, 1);
        assert!(c.transient_bytes > 0, "skipped: the traversal copied it");
        let (c, _) = copy_counted(&mut a, record, 1);
        assert_eq!(c.transient_bytes, 0, "the path again");
    })
    .join()
    .unwrap();
}

#[test]
fn values_past_the_linear_search_keep_sharing_and_cycles_on_the_path() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let h = &mut a.heap;
        // A ring of 200 cells, each holding one of 3 shared strings: 203 blocks, found
        // by address through the index once past the first 16.
        let names: Vec<Word> = (0..3)
            .map(|i| h.string(format!("name {i}").as_bytes()))
            .collect();
        let first = h.block(0, &[names[0], layout::val_int(0)]);
        let mut last = first;
        for i in 1..200 {
            last = h.block(0, &[names[i % 3], last]);
        }
        h.set(first, 1, last);
        let (c, _) = copy_counted(&mut a, last, 203);
        assert_eq!(c.transient_bytes, 0, "the walk copied it");
        assert_eq!(
            c.bytes,
            (200 * 3 + 3 * 2) * 8,
            "cells of 3 words, strings of 2"
        );
    })
    .join()
    .unwrap();
}

#[test]
fn values_of_few_blocks_but_more_words_than_the_buffer_do_not_take_the_path() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        // One array of `MAX_WORDS - 1` fields fits the buffer with its header; one more
        // field does not.
        let fits = a
            .heap
            .block(0, &vec![layout::val_int(1); small::MAX_WORDS - 1]);
        let (c, _) = copy_counted(&mut a, fits, 1);
        assert_eq!(c.transient_bytes, 0, "the walk copied it");
        let beyond = a.heap.block(0, &vec![layout::val_int(1); small::MAX_WORDS]);
        let (c, _) = copy_counted(&mut a, beyond, 1);
        assert!(c.transient_bytes > 0, "the traversal copied it");
    })
    .join()
    .unwrap();
}
