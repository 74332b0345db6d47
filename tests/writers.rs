//! Copies of a source that "another domain" writes to during the copy (OCaml 5 with
//! several domains, where the visited set is a [`SideTable`]).
//!
//! The other domain is simulated on the fake heap: [`Writer`] wraps the heap, and every
//! time the traversal asks it whether a pointer is to be copied (many times in pass 1,
//! and, were the source read again, in pass 2) it rewrites fields of the source first,
//! as a domain running in parallel could have done at that moment. Its allocator also
//! writes between the passes. Every value a field ever holds is logged. The copies must
//! always succeed and be well formed: each field of a copied block holds the copy of a
//! value the field held at some moment, sharing between fields maps to sharing in the
//! copy, and what the copy holds is what pass 1 read (writes after that moment, for
//! instance between the passes, never show: each block was read once).

mod fake_heap;

use std::collections::HashMap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::SideTable;
use offheap::copy::{self, small, Copied, CopyError, Heap};
use offheap::layout::{self, Color, Header, Word, WORD_BYTES};

/// Writes to the fake heap, run with the number of the call of `should_copy`.
type Script = Box<dyn FnMut(&mut FakeHeap, usize)>;

/// The fake heap, and a script of writes run at each call of `should_copy`.
struct Writer {
    heap: FakeHeap,
    /// Calls of `should_copy` so far.
    calls: usize,
    /// Run with the heap and the number of the call, before answering it.
    act: Script,
}

impl Heap for Writer {
    fn should_copy(&mut self, v: Word) -> bool {
        (self.act)(&mut self.heap, self.calls);
        self.calls += 1;
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

/// Writes `field := value` into the source while the copy is being allocated: between
/// pass 1 and pass 2.
struct WriteBetweenPasses {
    inner: Counting,
    writes: Vec<(*mut Word, Word)>,
}

impl Allocator for WriteBetweenPasses {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        for &(field, value) in &self.writes {
            // SAFETY: the test passes fields of blocks of its fake heap.
            unsafe { field.write(value) };
        }
        self.inner.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: forwarded.
        unsafe { self.inner.free(ptr, bytes) }
    }
}

fn copy_shared<H: Heap, A: Allocator>(
    h: &mut H,
    root: Word,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    // SAFETY: the roots are values of the fake heap; the "other domain" only writes
    // values (immediates and pointers to complete blocks that stay allocated) into
    // fields of scannable blocks, which `copy` allows with a side table.
    unsafe { copy::copy(root, h, SideTable::new(), alloc) }
}

/// Word `i` after `p`.
fn word_at(p: Word, i: usize) -> Word {
    // SAFETY: tests pass addresses inside the fake heap or a live copy.
    unsafe { *(p as *const Word).add(i) }
}

fn header(v: Word) -> Header {
    // SAFETY: tests pass blocks of the fake heap or of a live copy.
    unsafe { layout::read_header(v) }
}

/// The blocks of the copy tile it exactly, every header `Unmarkable`.
fn assert_tiles(c: &Copied) {
    let words = c.bytes / WORD_BYTES;
    let (mut at, mut n) = (0, 0);
    while at < words {
        let hd = Header(word_at(c.base as Word, at));
        assert_eq!(hd.color(), Color::Unmarkable, "block {n} of the copy");
        at += hd.whsize();
        n += 1;
    }
    assert_eq!((at, n), (words, c.blocks), "the blocks tile the copy");
}

/// A value for a slot: an immediate, or one of the pool's blocks (a pair of an int and
/// a string, never written to), several slots sharing some.
struct Pool {
    blocks: Vec<Word>,
}

impl Pool {
    fn new(h: &mut FakeHeap, n: usize) -> Pool {
        let blocks = (0..n)
            .map(|i| {
                let s = h.string(format!("pool block {i}").as_bytes());
                h.block(0, &[layout::val_int(i as isize), s])
            })
            .collect();
        Pool { blocks }
    }

    /// The `k`-th value written: a pool block, or every fifth time an immediate.
    fn value(&self, k: usize) -> Word {
        if k % 5 == 4 {
            layout::val_int(-(k as isize))
        } else {
            self.blocks[k % self.blocks.len()]
        }
    }
}

/// Source value: `root = [| slots; record; list |]` where `slots` is an array of `n`
/// fields, `record` a block of 3 fields and `list` a list of `n` cells; all their fields
/// start out as pool values. The writer rewrites, at call `t`, slot `t % n`, record
/// field `t % 3`, and the head of list cell `t % n`, with fresh choices from the pool.
#[test]
fn copies_under_a_writer_succeed_and_hold_values_the_fields_held() {
    copies_under_a_writer(300);
}

/// The same with one slot and one cell: a value of a few blocks, which the path of small
/// values copies (it reads each block once, as the general traversal's snapshot does).
#[test]
fn small_copies_under_a_writer_succeed_and_hold_values_the_fields_held() {
    copies_under_a_writer(1);
}

fn copies_under_a_writer(n: usize) {
    let mut h = FakeHeap::new(1 << 16);
    let pool = Pool::new(&mut h, 37);
    let slot_init: Vec<Word> = (0..n).map(|i| pool.value(i)).collect();
    let slots = h.block(0, &slot_init);
    let record = h.block(0, &[pool.value(1), pool.value(2), pool.value(3)]);
    let mut list = layout::val_int(0);
    let mut cells = Vec::new();
    for i in (0..n).rev() {
        list = h.block(0, &[pool.value(i + 7), list]);
        cells.push(list);
    }
    cells.reverse();
    let root = h.block(0, &[slots, record, list]);
    let pool_blocks = pool.blocks.clone();

    // Every value each mutable field ever held: (block, field) -> values.
    let mut fields: Vec<(Word, usize)> = (0..n).map(|i| (slots, i)).collect();
    fields.extend((0..3).map(|i| (record, i)));
    fields.extend(cells.iter().map(|&c| (c, 0)));
    for round in 0..8usize {
        let mut log: HashMap<(Word, usize), Vec<Word>> = HashMap::new();
        for &(b, i) in &fields {
            log.insert((b, i), vec![h.field(b, i)]);
        }
        let log = std::rc::Rc::new(std::cell::RefCell::new(log));
        let writes = log.clone();
        let cells_w = cells.clone();
        let pool_w = Pool {
            blocks: pool_blocks.clone(),
        };
        let stride = round * 13 + 1;
        let act = move |heap: &mut FakeHeap, t: usize| {
            let k = t * stride + round;
            let mut write = |b: Word, i: usize, v: Word| {
                heap.set(b, i, v);
                writes.borrow_mut().get_mut(&(b, i)).unwrap().push(v);
            };
            write(slots, t % n, pool_w.value(k));
            write(record, t % 3, pool_w.value(k + 1));
            write(cells_w[(t * 7) % n], 0, pool_w.value(k + 2));
        };
        let mut w = Writer {
            heap: std::mem::replace(&mut h, FakeHeap::new(0)),
            calls: 0,
            act: Box::new(act),
        };
        // Between the passes: slot 0 and the record's field 0 get a fresh string that
        // pass 1 never saw (a pointer pass 2 would meet if it read the source again).
        let fresh = w.heap.string(format!("fresh {round}").as_bytes());
        let mut alloc = WriteBetweenPasses {
            inner: Counting::new(),
            writes: vec![(slots as *mut Word, fresh), (record as *mut Word, fresh)],
        };
        let c =
            copy_shared(&mut w, root, &mut alloc).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(w.calls > n, "the writer ran during the copy");
        assert_eq!(
            c.transient_bytes == 0,
            n == 1,
            "the path of small values copies the small value, and only it"
        );
        h = w.heap;
        assert_tiles(&c);
        let log = log.borrow();
        // The copy's root, its three blocks, and each mutable field.
        let croot = c.root;
        let (cslots, crecord, mut ccell) =
            (word_at(croot, 0), word_at(croot, 1), word_at(croot, 2));
        let mut pool_copies: HashMap<Word, Word> = HashMap::new(); // source pool block -> its copy
        let mut check = |b: Word, i: usize, copied: Word, h: &mut FakeHeap| {
            let held = &log[&(b, i)];
            if layout::is_immediate(copied) {
                assert!(
                    held.contains(&copied),
                    "round {round}: field {i} of {b:#x}: {copied:#x} was never there"
                );
                return;
            }
            assert!(
                copied > c.base as Word && copied < c.base as Word + c.bytes,
                "a pointer into the copy"
            );
            // Which pool block is it a copy of? Its int says. (Not the fresh string
            // written between the passes: pass 2 does not read the fields again.)
            assert_eq!(
                header(copied),
                Header::new(2, Color::Unmarkable, 0),
                "a pool block's copy"
            );
            let id = layout::is_immediate(word_at(copied, 0))
                .then(|| (word_at(copied, 0) >> 1) as usize);
            let src = pool_blocks[id.expect("a pool block copy")];
            assert!(
                held.contains(&src),
                "round {round}: field {i}: a copy of a block the field never held"
            );
            match pool_copies.get(&src) {
                Some(&seen) => assert_eq!(seen, copied, "sharing: one pool block, one copy"),
                None => {
                    assert_isomorphic(h, src, copied, c.base as Word, c.bytes);
                    pool_copies.insert(src, copied);
                }
            }
        };
        for i in 0..n {
            check(slots, i, word_at(cslots, i), &mut h);
        }
        for i in 0..3 {
            check(record, i, word_at(crecord, i), &mut h);
        }
        for &cell in &cells {
            check(cell, 0, word_at(ccell, 0), &mut h);
            ccell = word_at(ccell, 1);
        }
        assert_eq!(ccell, layout::val_int(0), "the list has its {n} cells");
        // Nothing but these blocks: root, slots, record, the cells, the pool blocks
        // reached and their strings.
        assert_eq!(
            c.blocks,
            3 + n + 2 * pool_copies.len(),
            "round {round}: blocks in the copy"
        );
        drop(log);
        // SAFETY: `base`/`bytes` came from this allocator; the copy is not used after.
        unsafe { alloc.inner.free(c.base, c.bytes) };
        assert!(alloc.inner.live.is_empty());
    }
}

/// A lazy value forced by "another domain" during the copy: `Lazy_tag`, then
/// `Forcing_tag` (OCaml 5), then its result in field 0 and `Forward_tag`. Whenever pass
/// 1 reaches it, the copy is well formed from that one header: refused while unforced or
/// being forced, else a `Forward_tag` block holding the copy of the result.
#[test]
fn a_lazy_forced_during_the_copy() {
    let mut h = FakeHeap::new(1 << 14);
    h.ocaml5_tags = true;
    let thunk = h.closure(&[1], &[layout::val_int(5)])[0];
    let result = h.string(b"the result");
    let lazy = h.block(layout::LAZY_TAG, &[thunk]);
    // The last of 50 cells holds the lazy: pass 1 reaches it after about 50 calls, and
    // the path of small values makes `MAX_BLOCKS` (on the stack) before it gives up on 50
    // cells: the stages below span both.
    let mut root = h.block(0, &[lazy, layout::val_int(0)]);
    for i in 0..49 {
        root = h.block(0, &[layout::val_int(i), root]);
    }
    let (mut refused_unforced, mut refused_forcing, mut copied) = (0, 0, 0);
    {
        for when in 0..small::MAX_BLOCKS + 64 {
            h.set(lazy, 0, thunk);
            // SAFETY: `lazy` is a block of the fake heap.
            unsafe { layout::write_header(lazy, Header::new(1, Color::C0, layout::LAZY_TAG)) };
            let act = move |heap: &mut FakeHeap, t: usize| {
                // SAFETY: `lazy` is a block of the fake heap.
                unsafe {
                    if t == when {
                        layout::write_header(lazy, Header::new(1, Color::C0, layout::FORCING_TAG));
                    } else if t == when + 3 {
                        heap.set(lazy, 0, result);
                        layout::write_header(lazy, Header::new(1, Color::C0, layout::FORWARD_TAG));
                    }
                }
            };
            let mut w = Writer {
                heap: std::mem::replace(&mut h, FakeHeap::new(0)),
                calls: 0,
                act: Box::new(act),
            };
            let mut alloc = Counting::new();
            let outcome = copy_shared(&mut w, root, &mut alloc);
            h = w.heap;
            match outcome {
                Err(CopyError::UnforcedLazy) => refused_unforced += 1,
                Err(CopyError::ForcingLazy) => refused_forcing += 1,
                Err(e) => panic!("unexpected error {e}"),
                Ok(c) => {
                    copied += 1;
                    assert_tiles(&c);
                    let mut cell = c.root;
                    for _ in 0..49 {
                        cell = word_at(cell, 1);
                    }
                    let clazy = word_at(cell, 0);
                    assert_eq!(header(clazy).tag(), layout::FORWARD_TAG);
                    let cresult = word_at(clazy, 0);
                    assert_eq!(header(cresult).tag(), layout::STRING_TAG);
                    assert_eq!(
                        word_at(cresult, 0),
                        h.field(result, 0),
                        "the result's bytes"
                    );
                    assert_eq!(c.blocks, 50 + 2, "the cells, the lazy and its result");
                    // SAFETY: from this allocator; not used after.
                    unsafe { alloc.free(c.base, c.bytes) };
                }
            }
            assert!(alloc.live.is_empty(), "nothing left allocated");
        }
    }
    assert!(refused_unforced > 0 && refused_forcing > 0 && copied > 0,
        "every stage was met: {refused_unforced} unforced, {refused_forcing} forcing, {copied} copied");
}
