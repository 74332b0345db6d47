//! The path of small values (`copy::small`): which copies take it (on the stack, in
//! buffers of its own, or not at all), and the skipping that keeps values just beyond its
//! limits from paying for a walk that gives up at every copy; and the shallow path before
//! it (`copy::shallow`).
//! (That it writes the general traversal's bytes is checked on random graphs in
//! `properties.rs`; that it takes no Rust memory, in `exhaustion.rs`.)

mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::HeaderMarks;
use offheap::copy::{self, shallow, small, Copied, Heap};
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

    fn custom_name(&self, ops: Word) -> Result<String, offheap::alloc::NoMemory> {
        self.heap.custom_name(ops)
    }

    fn has_ocaml5_tags(&self) -> bool {
        self.heap.has_ocaml5_tags()
    }
}

impl Asking {
    fn new() -> Asking {
        Asking {
            heap: FakeHeap::new(1 << 18),
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

/// Where a copy was made, by its transient memory.
#[derive(Debug, PartialEq, Eq)]
enum Made {
    /// On the stack, by the walk or by the shallow path.
    Stack,
    OwnBuffers,
    Traversal,
}

fn made(c: &Copied) -> Made {
    match c.transient_bytes {
        0 => Made::Stack,
        small::LARGE_SPACE_BYTES => Made::OwnBuffers,
        _ => Made::Traversal,
    }
}

#[test]
fn values_within_the_limits_take_the_path_and_those_beyond_do_not() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        for (n, expected) in [
            (small::MAX_BLOCKS, Made::Stack),
            (small::MAX_BLOCKS + 1, Made::OwnBuffers),
            (small::LARGE_MAX_BLOCKS, Made::OwnBuffers),
            (small::LARGE_MAX_BLOCKS + 1, Made::Traversal),
        ] {
            let l = list(&mut a.heap, n);
            let (c, _) = copy_counted(&mut a, l, n);
            assert_eq!(made(&c), expected, "a list of {n}");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn after_a_value_too_large_for_the_stack_the_next_copies_start_in_own_buffers() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let n = small::MAX_BLOCKS + 44;
        let l = list(&mut a.heap, n);
        // The first copy walks on the stack until it is full, then again in buffers of
        // its own; the next ones only there. Each walk asks once per pointer field.
        let asked: Vec<usize> = (0..4).map(|_| copy_counted(&mut a, l, n).1).collect();
        assert!(asked[0] > asked[1], "{asked:?}");
        assert_eq!(&asked[1..], &[asked[1]; 3], "{asked:?}");
        for _ in 0..20 {
            assert_eq!(made(&copy_counted(&mut a, l, n).0), Made::OwnBuffers);
        }
        // A small value, walked in own buffers, shows that it fits the stack: it reports
        // no transient memory, as on the stack, and sends the next copy to the stack
        // first again.
        let small_list = list(&mut a.heap, 3);
        let (c, _) = copy_counted(&mut a, small_list, 3);
        assert_eq!(made(&c), Made::Stack);
        assert_eq!(
            copy_counted(&mut a, l, n).1,
            asked[0],
            "the stack first again"
        );
        // A value of the shallow path, which the walk never sees, leaves the counts
        // alone: the next copies still start in own buffers.
        copy_counted(&mut a, l, n);
        let record = a.heap.block(0, &[layout::val_int(1), layout::val_int(2)]);
        let (c, _) = copy_counted(&mut a, record, 1);
        assert_eq!(made(&c), Made::Stack);
        assert_eq!(
            copy_counted(&mut a, l, n).1,
            asked[1],
            "own buffers first still, after the shallow path"
        );
    })
    .join()
    .unwrap();
}

#[test]
fn a_run_of_values_beyond_the_limits_walks_once_in_a_while() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let n = small::LARGE_MAX_BLOCKS + 4;
        let beyond = list(&mut a.heap, n);
        let asked: Vec<usize> = (0..20).map(|_| copy_counted(&mut a, beyond, n).1).collect();
        // The stack's walk and the traversal ask the same each time; a walk in own
        // buffers that gives up, more.
        let traversal = *asked.iter().min().unwrap();
        let walked: Vec<bool> = asked.iter().map(|&k| k > traversal).collect();
        let expected: Vec<bool> = (0..20).map(|i| i % 9 == 0).collect();
        assert_eq!(walked, expected, "a walk once in 9 copies: {asked:?}");
        // While the own buffers are skipped (copy 18 walked, gave up), the stack and the
        // shallow path still take small values, which leave the skipping as it is;
        // values that the own buffers take and the stack does not are copied by the
        // traversal, and end the skipping once they held as many blocks as a walk that
        // gives up reads.
        copy_counted(&mut a, beyond, n); // copy 20: skipped
        let small_list = list(&mut a.heap, 3);
        let record = a.heap.block(0, &[layout::val_int(1), layout::val_int(2)]);
        let m = small::LARGE_MAX_BLOCKS / 2;
        let medium = list(&mut a.heap, m);
        let (c, _) = copy_counted(&mut a, small_list, 3);
        assert_eq!(made(&c), Made::Stack, "on the stack while skipping");
        let (c, _) = copy_counted(&mut a, record, 1);
        assert_eq!(made(&c), Made::Stack, "the shallow path while skipping");
        for k in 0..2 {
            let (c, _) = copy_counted(&mut a, medium, m);
            assert_eq!(
                made(&c),
                Made::Traversal,
                "skipped: the traversal copied {k}"
            );
        }
        let (c, _) = copy_counted(&mut a, medium, m);
        assert_eq!(made(&c), Made::OwnBuffers, "the own buffers again");
        // Values beyond between values that the own buffers take walk once in 9 copies
        // too, unless those hold many blocks: each of them ended the skipping, as it
        // was, and every value beyond walked (30 walks).
        // Of 30 copies of the value beyond, each after one of `other` (`k` blocks):
        // those that walked in own buffers and gave up.
        let walks_between = |a: &mut Asking, other: Word, k: usize| {
            (0..30)
                .filter(|_| {
                    copy_counted(a, other, k);
                    copy_counted(a, beyond, n).1 > traversal
                })
                .count()
        };
        let medium = list(&mut a.heap, 300);
        copy_counted(&mut a, beyond, n);
        let walks = walks_between(&mut a, medium, 300);
        assert!((5..=8).contains(&walks), "{walks} walks in 30 alternations");
        // Values beyond, between small ones, walk in own buffers once in 9 copies too
        // (the small ones count): a small one does not end the skipping. (Ended by each
        // small one, as it was, every value beyond walked: 30 walks.)
        let walks = walks_between(&mut a, small_list, 3);
        assert!((5..=7).contains(&walks), "{walks} walks in 30 alternations");
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
        assert_eq!(made(&c), Made::OwnBuffers, "the walk copied it");
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
fn values_on_the_stack_past_the_linear_search_keep_sharing_and_cycles() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let h = &mut a.heap;
        // A ring of `MAX_BLOCKS - 3` cells sharing 3 strings: found by address through
        // the stack's index once past the first `LINEAR_BLOCKS`; every string and the
        // ring's first cell are met again after that.
        let cells = small::MAX_BLOCKS - 3;
        assert!(cells > small::LINEAR_BLOCKS);
        let names: Vec<Word> = (0..3)
            .map(|i| h.string(format!("name {i}").as_bytes()))
            .collect();
        let first = h.block(0, &[names[0], layout::val_int(0)]);
        let mut last = first;
        for i in 1..cells {
            last = h.block(0, &[names[i % 3], last]);
        }
        h.set(first, 1, last);
        let (c, asked) = copy_counted(&mut a, last, cells + 3);
        // One walk, on the stack: each of the cells' 2 pointer fields asked about once,
        // besides the root and the root's last field (the copy's entry, then the shallow
        // path, which leaves a value whose field leads to a cell to the walk). A walk
        // that gave up on the stack and walked again in its own buffers asks again (102).
        assert_eq!(asked, 2 * cells + 2, "one walk");
        assert_eq!(made(&c), Made::Stack, "no buffers of its own");
        assert_eq!(
            c.bytes,
            (cells * 3 + 3 * 2) * 8,
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
        // One array of `MAX_WORDS - 1` fields fits the stack's buffer with its header;
        // one more field does not, and so on for the larger buffers.
        for (fields, expected) in [
            (small::MAX_WORDS - 1, Made::Stack),
            (small::MAX_WORDS, Made::OwnBuffers),
            (small::LARGE_MAX_WORDS - 1, Made::OwnBuffers),
            (small::LARGE_MAX_WORDS, Made::Traversal),
        ] {
            let array = a.heap.block(0, &vec![layout::val_int(1); fields]);
            let (c, _) = copy_counted(&mut a, array, 1);
            assert_eq!(made(&c), expected, "an array of {fields} fields");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn copies_run_on_threads_with_small_stacks() {
    // The walk keeps some 2 KiB on the stack: a version that kept 28 KiB there overflowed
    // threads of 48 KiB (C threads calling the C API, a low `ulimit -s`). Every path on
    // a thread of 32 KiB: the stack, the walk's own buffers, the general traversal.
    std::thread::Builder::new()
        .stack_size(32 * 1024)
        .spawn(|| {
            let mut a = Asking::new();
            for n in [3, small::MAX_BLOCKS + 1, 300, small::LARGE_MAX_BLOCKS + 1] {
                let l = list(&mut a.heap, n);
                let mut alloc = Counting::new();
                // SAFETY: a well-formed value of the fake heap; nothing else touches it.
                let c = unsafe { copy::copy(l, &mut a, HeaderMarks::new(Color::C2), &mut alloc) }
                    .unwrap();
                assert_eq!(c.blocks, n);
                // SAFETY: from this allocator; not used after.
                unsafe { alloc.free(c.base, c.bytes) };
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn measure_answers_what_the_next_copy_takes() {
    // Whatever the thread's last copies were (which may send the next one to the walk's
    // own buffers, or past the walk), `measure` reports the bytes, blocks and transient
    // memory of the copy that follows it.
    // Lists of `n` cells, and (`n` = 0) a record of a string that the shallow path
    // takes, also while the walk is skipped.
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let sizes = [
            3,
            300,
            0,
            3,
            small::LARGE_MAX_BLOCKS + 10,
            0,
            3,
            300,
            0,
            3,
            3,
            20,
            3,
        ];
        let name = a.heap.string(b"name");
        let values: Vec<(Word, usize)> = sizes
            .iter()
            .map(|&n| match n {
                0 => (a.heap.block(0, &[name, layout::val_int(1)]), 2),
                n => (list(&mut a.heap, n), n),
            })
            .collect();
        for (v, n) in values {
            // SAFETY: a well-formed value of the fake heap; nothing else touches it.
            let m = unsafe { copy::measure(v, &mut a, HeaderMarks::new(Color::C2)) }.unwrap();
            let (c, _) = copy_counted(&mut a, v, n);
            assert_eq!(
                (m.bytes, m.blocks, m.transient_bytes),
                (c.bytes, c.blocks, c.transient_bytes),
                "{n} blocks"
            );
        }
    })
    .join()
    .unwrap();
}

#[test]
fn shallow_values_keep_sharing_and_cycles_and_leave_the_rest_to_the_walk() {
    std::thread::spawn(|| {
        let mut a = Asking::new();
        let h = &mut a.heap;
        let name = h.string(b"a name");
        let x = h.float(1.5);
        let n64 = h.int64(-7);
        let statics = h.static_block(0, &[layout::val_int(3)]);
        // A record of a string twice, a float, an Int64, a static block and integers:
        // 4 blocks, the string once.
        let record = h.block(
            0,
            &[
                name,
                layout::val_int(1),
                x,
                name,
                n64,
                statics,
                layout::val_int(2),
            ],
        );
        // A record that points to itself and to a string.
        let ring = h.block(3, &[name, layout::val_int(0)]);
        h.set(ring, 1, ring);
        // Raw roots.
        let fits = h.string(&[7; (small::MAX_WORDS - 2) * 8]);
        let array = h.float_array(&[1.0, 2.0, 3.0]);
        // Beyond the shallow path: a field to a scannable block, one field too many,
        // a string that takes the words past the stack's limit.
        let cell = h.block(0, &[layout::val_int(1), layout::val_int(0)]);
        let deep = h.block(0, &[name, cell]);
        let wide = h.block(0, &[name; shallow::MAX_FIELDS + 1]);
        let long = h.string(&[7; (small::MAX_WORDS - 4) * 8]);
        let past = h.block(0, &[long, x]);
        for (v, blocks, made_by) in [
            (record, 4, Made::Stack),
            (ring, 2, Made::Stack),
            (fits, 1, Made::Stack),
            (array, 1, Made::Stack),
            (deep, 3, Made::Stack),
            (wide, 2, Made::Stack),
            (past, 3, Made::OwnBuffers),
        ] {
            let (c, _) = copy_counted(&mut a, v, blocks);
            assert_eq!(made(&c), made_by, "{blocks} blocks");
        }
    })
    .join()
    .unwrap();
}
