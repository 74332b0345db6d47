//! One test per kind of OCaml block, each run with both visited strategies.
//!
//! Every copy goes through [`copy_checked`] or [`copy_refused`], which assert what holds
//! for every copy: the source arenas are byte-identical afterwards (success or failure),
//! the traversal gave back the Rust heap memory it took, the allocator was asked exactly
//! once for exactly the measured size (or not at all), and the copy is a contiguous run
//! of `Unmarkable` blocks. [`copy_ok`] adds the graph checks: the size and the number of
//! blocks equal what an independent walk of the source finds, and the copy is isomorphic
//! to the source.

mod fake_heap;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;

use fake_heap::{assert_isomorphic, bucket_label, Counting, FakeHeap, Rng, INT64_OPS};
use offheap::alloc::{Allocator, Malloc};
use offheap::copy::visited::{Budgeted, HeaderMarks, SideTable};
use offheap::copy::{self, Copied, CopyError, Heap, Measured};
use offheap::layout::{self, Color, Header, Word, WORD_BYTES};

// ---------------------------------------------------------------------------------------
// Rust heap accounting: a global allocator that counts the live bytes of each thread, so a
// test can check that a copy (failed or not) gives back the queue and the visited set.
// ---------------------------------------------------------------------------------------

struct ThreadCounting;

thread_local! {
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
}

fn bump(delta: isize) {
    // `try_with`: const-initialized, no destructor, never allocates.
    let _ = THREAD_LIVE.try_with(|live| live.set(live.get() + delta));
}

/// Bytes of Rust heap this thread holds now (allocated here minus freed here), less the
/// spare queue vector and the walk's buffers the thread keeps between copies
/// (`copy::queue`, `copy::small`).
fn thread_live() -> isize {
    THREAD_LIVE.with(Cell::get)
        - offheap::copy::queue::thread_spare_bytes() as isize
        - offheap::copy::small::thread_space_bytes() as isize
}

// SAFETY: forwards every call to `System` unchanged and only counts sizes on the side.
unsafe impl GlobalAlloc for ThreadCounting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            bump(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
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
        // SAFETY: the caller's contract is `System`'s.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            bump(new_size as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: ThreadCounting = ThreadCounting;

// ---------------------------------------------------------------------------------------
// Allocators for the copies.
// ---------------------------------------------------------------------------------------

/// Always out of memory; must never be asked to free.
struct NullAlloc {
    asked: Vec<usize>,
}

impl Default for NullAlloc {
    fn default() -> Self {
        // Reserved: the bookkeeping must not allocate during a copy (see `Counting::new`).
        NullAlloc {
            asked: Vec::with_capacity(8),
        }
    }
}

impl Allocator for NullAlloc {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.asked.push(bytes);
        std::ptr::null_mut()
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        panic!("free({ptr:?}, {bytes}) called on an allocator that never allocated");
    }
}

/// Returns memory one byte past a malloc'd address; checks that it gets it back.
#[derive(Default)]
struct MisalignedAlloc {
    /// (returned pointer, size) of the live allocation.
    given: Option<(usize, usize)>,
    freed: usize,
}

impl Allocator for MisalignedAlloc {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        assert!(self.given.is_none(), "a second allocation");
        let p = Malloc.alloc(bytes + WORD_BYTES);
        assert!(!p.is_null());
        // SAFETY: `p` holds `bytes + 8` bytes, so `p + 1` is inside it.
        let q = unsafe { p.add(1) };
        self.given = Some((q as usize, bytes));
        q
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        assert_eq!(
            self.given.take(),
            Some((ptr as usize, bytes)),
            "free of what alloc gave"
        );
        self.freed += 1;
        // SAFETY: `ptr - 1` is the start of the `Malloc` allocation of `bytes + 8` bytes.
        unsafe { Malloc.free(ptr.sub(1), bytes + WORD_BYTES) }
    }
}

// ---------------------------------------------------------------------------------------
// Copying, with the checks every copy gets.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Strategy {
    /// The general traversal with `HeaderMarks` of this mark color.
    Marks(Color),
    /// The general traversal with a `SideTable`.
    Table,
    /// `copy::copy` as the runtime calls it: the path of small values when it applies,
    /// else the general traversal with `HeaderMarks`.
    Copy,
}

const MARKS: Strategy = Strategy::Marks(Color::C2);
const ALL: [Strategy; 3] = [MARKS, Strategy::Table, Strategy::Copy];

/// `copy::copy` with a fresh visited set of strategy `s`.
fn raw_copy<A: Allocator>(
    h: &mut FakeHeap,
    root: Word,
    s: Strategy,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    // SAFETY: the tests pass values of `h` whose reachable blocks are well formed (built
    // by `FakeHeap`), and nothing else touches the fake heap during the call.
    unsafe {
        match s {
            Strategy::Marks(mark) => copy::traverse(root, h, HeaderMarks::new(mark), alloc),
            Strategy::Table => copy::traverse(root, h, SideTable::with_capacity(0), alloc),
            Strategy::Copy => copy::copy(root, h, HeaderMarks::new(Color::C2), alloc),
        }
    }
}

/// `copy::measure` with a fresh visited set of strategy `s`; checks that it leaves the
/// source as it was and gives back the Rust memory it took.
fn raw_measure(h: &mut FakeHeap, root: Word, s: Strategy) -> Result<Measured, CopyError> {
    let before = h.snapshot();
    let live = thread_live();
    // SAFETY: as in `raw_copy`.
    let m = unsafe {
        match s {
            Strategy::Marks(mark) => copy::measure(root, h, HeaderMarks::new(mark)),
            Strategy::Table => copy::measure(root, h, SideTable::with_capacity(0)),
            Strategy::Copy => copy::measure(root, h, HeaderMarks::new(Color::C2)),
        }
    };
    let held = match &m {
        Err(CopyError::Custom(name)) => name.capacity() as isize,
        _ => 0,
    };
    assert_eq!(
        thread_live() - held,
        live,
        "{s:?}: measure kept Rust heap memory"
    );
    assert_same_source(&before, &h.snapshot(), &format!("{s:?} after a measure"));
    m
}

/// Panics at the first word that differs, without printing whole arenas.
fn assert_same_source(before: &[Word], after: &[Word], what: &str) {
    assert_eq!(before.len(), after.len(), "{what}: arena sizes changed");
    if let Some(i) = (0..before.len()).find(|&i| before[i] != after[i]) {
        panic!(
            "{what}: source word {i} changed: {:#x} -> {:#x}",
            before[i], after[i]
        );
    }
}

/// Reads the header of block `v` (of the source or of a copy).
fn header(v: Word) -> Header {
    // SAFETY: tests pass pointers to blocks of the fake heap or of a live copy.
    unsafe { layout::read_header(v) }
}

/// Reads word `i` after `p` (a copy or the source).
fn word_at(p: Word, i: usize) -> Word {
    // SAFETY: tests pass addresses inside the fake heap or a live copy.
    unsafe { *(p as *const Word).add(i) }
}

/// Distinct blocks reachable from `root` that `h` copies, and their size in words: a
/// depth-first walk with a hash set, written independently of the traversal under test.
fn reachable(h: &mut FakeHeap, root: Word) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    let mut words = 0;
    while let Some(v) = stack.pop() {
        if layout::is_immediate(v) || !h.should_copy(v) {
            continue;
        }
        let hd = header(v);
        let start = if hd.tag() == layout::INFIX_TAG {
            v - hd.wosize() * WORD_BYTES
        } else {
            v
        };
        if !seen.insert(start) {
            continue;
        }
        let hd = header(start);
        assert_ne!(
            hd.tag(),
            layout::INFIX_TAG,
            "an infix header leads to a closure"
        );
        words += hd.whsize();
        let n = hd.wosize();
        let first = match hd.tag() {
            layout::CLOSURE_TAG if n >= 2 => layout::start_env(h.field(start, 1)).min(n),
            layout::CLOSURE_TAG => n,
            t if t < layout::NO_SCAN_TAG => 0,
            _ => n,
        };
        stack.extend((first..n).map(|i| h.field(start, i)));
    }
    (seen.len(), words)
}

/// Walks the allocation header by header: every block `Unmarkable`, the blocks tile the
/// allocation exactly, and there are `c.blocks` of them.
fn assert_copy_layout(c: &Copied) {
    assert_eq!(c.base as usize % WORD_BYTES, 0, "copy word aligned");
    assert_eq!(c.bytes % WORD_BYTES, 0, "copy a whole number of words");
    let words = c.bytes / WORD_BYTES;
    let (mut at, mut n) = (0, 0);
    while at < words {
        let hd = Header(word_at(c.base as Word, at));
        assert_eq!(
            hd.color(),
            Color::Unmarkable,
            "block {n} at word {at} of the copy: {hd:?}"
        );
        at += hd.whsize();
        n += 1;
    }
    assert_eq!(at, words, "the blocks of the copy tile the allocation");
    assert_eq!(n, c.blocks, "Copied.blocks counts the blocks of the copy");
    if !layout::is_immediate(c.root) {
        let base = c.base as Word;
        assert!(
            c.root > base && c.root - WORD_BYTES < base + c.bytes,
            "root's header inside the copy"
        );
    }
}

/// A successful copy and its allocator; [`Done::free`] gives the memory back.
struct Done {
    c: Copied,
    alloc: Counting,
}

impl Done {
    fn free(mut self) {
        if !self.c.base.is_null() {
            // SAFETY: `base` and `bytes` came from this allocator, and the copy is dropped.
            unsafe { self.alloc.free(self.c.base, self.c.bytes) };
        }
        assert!(
            self.alloc.live.is_empty(),
            "copy memory leaked: {:?}",
            self.alloc.live
        );
    }

    /// The copy of field `i` of the root.
    fn root_field(&self, i: usize) -> Word {
        word_at(self.c.root, i)
    }
}

/// Copies `root`, expecting success with `expect = (blocks, words)`; checks the source is
/// unchanged, one allocation of the measured size, no Rust memory kept, the copy's layout.
fn copy_checked(h: &mut FakeHeap, root: Word, s: Strategy, expect: (usize, usize)) -> Done {
    let measured = raw_measure(h, root, s).unwrap_or_else(|e| panic!("{s:?}: measure: {e}"));
    let before = h.snapshot();
    let mut alloc = Counting::new();
    let live = thread_live();
    let c = raw_copy(h, root, s, &mut alloc).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    let copied = (c.bytes, c.blocks, c.transient_bytes);
    let m = (measured.bytes, measured.blocks, measured.transient_bytes);
    match s {
        // `measure` takes the path `copy` takes.
        Strategy::Copy => assert_eq!(
            m, copied,
            "{s:?}: measure = the copy's bytes, blocks, transient bytes"
        ),
        // The general traversal: the same copy; its tables may differ from the path
        // of small values that `measure` may take.
        _ => assert_eq!(
            (m.0, m.1),
            (copied.0, copied.1),
            "{s:?}: measure = the copy's bytes, blocks"
        ),
    }
    assert_eq!(
        thread_live(),
        live,
        "{s:?}: the traversal kept Rust heap memory"
    );
    assert_same_source(&before, &h.snapshot(), &format!("{s:?} after a copy"));
    drop(before);
    let (blocks, words) = expect;
    if blocks == 0 {
        assert_eq!(c.root, root, "{s:?}: nothing copied, root kept");
        assert!(c.base.is_null());
        assert_eq!((c.bytes, c.blocks, c.transient_bytes), (0, 0, 0));
        assert!(
            alloc.allocs.is_empty(),
            "{s:?}: allocated for nothing: {:?}",
            alloc.allocs
        );
    } else {
        assert_eq!(
            alloc.allocs,
            [words * WORD_BYTES],
            "{s:?}: exactly one allocation of the measured size"
        );
        assert_eq!(c.bytes, words * WORD_BYTES, "{s:?}: Copied.bytes");
        assert_eq!(c.blocks, blocks, "{s:?}: Copied.blocks");
        assert_copy_layout(&c);
    }
    Done { c, alloc }
}

/// [`copy_checked`] with the expected size from [`reachable`], and an isomorphism check.
fn copy_ok(h: &mut FakeHeap, root: Word, s: Strategy) -> Done {
    let expect = reachable(h, root);
    let done = copy_checked(h, root, s, expect);
    if expect.0 > 0 {
        let n = assert_isomorphic(h, root, done.c.root, done.c.base as Word, done.c.bytes);
        assert_eq!(n, expect.0, "{s:?}: blocks in the copy");
    }
    done
}

/// Copies `root` with `alloc`, expecting failure; checks the source is unchanged and the
/// traversal gave back its Rust memory.
fn copy_refused<A: Allocator>(
    h: &mut FakeHeap,
    root: Word,
    s: Strategy,
    alloc: &mut A,
) -> CopyError {
    let before = h.snapshot();
    let live = thread_live();
    let err = match raw_copy(h, root, s, alloc) {
        Ok(c) => panic!("{s:?}: copied {} blocks, expected an error", c.blocks),
        Err(e) => e,
    };
    // The value's errors are measure's too; the allocator's are not (nothing allocated).
    match (&err, raw_measure(h, root, s)) {
        (CopyError::OutOfMemory(_) | CopyError::Misaligned, m) => {
            assert!(
                m.is_ok(),
                "{s:?}: measure failed where only the allocator did"
            )
        }
        (e, m) => assert_eq!(m.as_ref().err(), Some(e), "{s:?}: measure's error"),
    }
    let held = match &err {
        CopyError::Custom(name) => name.capacity() as isize,
        _ => 0,
    };
    assert_eq!(
        thread_live() - held,
        live,
        "{s:?}: a failed copy kept Rust heap memory"
    );
    assert_same_source(
        &before,
        &h.snapshot(),
        &format!("{s:?} after a failed copy ({err})"),
    );
    err
}

/// [`copy_refused`] with a counting allocator that must not have been asked for anything
/// (value errors are found before the allocation).
fn copy_err(h: &mut FakeHeap, root: Word, s: Strategy) -> CopyError {
    let mut alloc = Counting::new();
    let err = copy_refused(h, root, s, &mut alloc);
    assert!(
        alloc.allocs.is_empty(),
        "{s:?}: allocated {:?} before refusing",
        alloc.allocs
    );
    err
}

/// The OCaml list `[from; from+1; ...; to-1]` in `h`.
fn int_list(h: &mut FakeHeap, from: isize, to: isize) -> Word {
    let mut list = layout::val_int(0);
    for i in (from..to).rev() {
        list = h.block(0, &[layout::val_int(i), list]);
    }
    list
}

// ---------------------------------------------------------------------------------------
// Immediates and static data.
// ---------------------------------------------------------------------------------------

#[test]
fn immediate_root_copies_nothing() {
    let mut h = FakeHeap::new(1 << 10);
    let _unrelated = int_list(&mut h, 0, 10);
    for s in ALL {
        for n in [0, 1, -1, 42, isize::MAX >> 1, isize::MIN >> 1] {
            let v = layout::val_int(n);
            let done = copy_checked(&mut h, v, s, (0, 0));
            assert_eq!(done.c.root, v);
            done.free();
        }
    }
}

#[test]
fn static_root_is_shared_unless_copy_static() {
    let mut h = FakeHeap::new(1 << 10);
    let heap_str = h.string(b"in the heap");
    let inner = h.static_block(3, &[layout::val_int(5)]);
    let root = h.static_block(0, &[inner, heap_str, layout::val_int(1)]);
    let from_heap = h.block(1, &[root, heap_str]);
    for s in ALL {
        h.copy_static = false;
        // A static root is returned as it is, nothing allocated.
        copy_checked(&mut h, root, s, (0, 0)).free();
        // A heap block's pointer to static data is kept as is; only the heap is copied.
        let done = copy_ok(&mut h, from_heap, s);
        assert_eq!(done.c.blocks, 2, "the block and the string");
        assert_eq!(done.root_field(0), root, "static pointer shared");
        assert_ne!(done.root_field(1), heap_str, "heap pointer translated");
        done.free();

        h.copy_static = true;
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 3, "both static blocks and the heap string");
        assert_ne!(
            done.c.root, root,
            "a static root is copied with copy_static"
        );
        assert_ne!(done.root_field(0), inner);
        assert_eq!(
            header(done.root_field(0)),
            Header::new(1, Color::Unmarkable, 3)
        );
        done.free();
        let done = copy_ok(&mut h, from_heap, s);
        assert_eq!(done.c.blocks, 4);
        assert_ne!(
            done.root_field(0),
            root,
            "static pointer translated with copy_static"
        );
        done.free();
    }
}

// ---------------------------------------------------------------------------------------
// Ordinary blocks.
// ---------------------------------------------------------------------------------------

#[test]
fn tuples_records_and_variants_with_various_tags() {
    let mut h = FakeHeap::new(1 << 12);
    let tags = [0u8, 1, 2, 7, 42, 100, 200, 243];
    let shared = h.string(b"shared");
    let mut variants = Vec::new();
    for (k, &tag) in tags.iter().enumerate() {
        let inner = h.block(
            tags[(k + 3) % tags.len()],
            &[layout::val_int(k as isize), shared],
        );
        let fields: Vec<Word> = (0..=k)
            .map(|i| {
                if i % 2 == 0 {
                    layout::val_int(i as isize)
                } else {
                    inner
                }
            })
            .collect();
        variants.push(h.block(tag, &fields));
    }
    let record = h.block(0, &variants);
    let root = h.block(5, &[record, variants[3], layout::val_int(-7)]);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(header(done.c.root), Header::new(3, Color::Unmarkable, 5));
        let rec = done.root_field(0);
        for (k, &tag) in tags.iter().enumerate() {
            assert_eq!(header(word_at(rec, k)).tag(), tag, "variant {k}");
        }
        assert_eq!(word_at(rec, 3), done.root_field(1), "variant 3 shared");
        done.free();
    }
}

#[test]
fn empty_and_nearly_empty_blocks() {
    let mut h = FakeHeap::new(1 << 10);
    let e0 = h.block(0, &[]);
    let e5 = h.block(5, &[]);
    let empty_floats = h.block(layout::DOUBLE_ARRAY_TAG, &[]);
    let one = h.block(0, &[layout::val_int(0)]);
    let no_env = h.closure(&[1], &[])[0];
    let trailer = h.block(1, &[one]);
    // Breadth first, the empty blocks come before `trailer`, so none is last in the copy.
    let root = h.block(0, &[e0, e5, empty_floats, e0, no_env, trailer]);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 7);
        assert_eq!(
            done.root_field(0),
            done.root_field(3),
            "one empty block, one copy"
        );
        assert_ne!(
            done.root_field(0),
            done.root_field(1),
            "two empty blocks, two copies"
        );
        assert_eq!(
            header(done.root_field(1)),
            Header::new(0, Color::Unmarkable, 5)
        );
        assert_eq!(
            header(done.root_field(2)),
            Header::new(0, Color::Unmarkable, layout::DOUBLE_ARRAY_TAG)
        );
        done.free();

        // An empty block alone: one header word. (Its value is one past the allocation:
        // checked by hand, `assert_isomorphic` expects values strictly inside.)
        let done = copy_checked(&mut h, e5, s, (1, 1));
        assert_eq!(done.c.root, done.c.base as Word + WORD_BYTES);
        assert_eq!(header(done.c.root), Header::new(0, Color::Unmarkable, 5));
        done.free();
    }
}

#[test]
fn blocks_with_more_than_256_fields() {
    let mut h = FakeHeap::new(1 << 16);
    let shared = h.string(b"many fields");
    for n in [257, 300, 1024, 1025, 5000] {
        let fields: Vec<Word> = (0..n)
            .map(|i| match i % 3 {
                0 => layout::val_int(i as isize),
                1 => shared,
                _ => h.block(1, &[layout::val_int(i as isize)]),
            })
            .collect();
        let root = h.block(0, &fields);
        for s in ALL {
            let done = copy_ok(&mut h, root, s);
            assert_eq!(header(done.c.root).wosize(), n);
            assert_eq!(
                done.c.blocks,
                2 + n / 3,
                "root, the shared string, one block per third field"
            );
            for i in (0..n).step_by(97) {
                if i % 3 == 0 {
                    assert_eq!(done.root_field(i), layout::val_int(i as isize));
                }
            }
            done.free();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw blocks: strings, floats, custom blocks.
// ---------------------------------------------------------------------------------------

#[test]
fn strings_of_every_length_keep_bytes_and_padding() {
    let mut h = FakeHeap::new(1 << 12);
    let mut strings = Vec::new();
    for len in 0..=40usize {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i * 37 + len * 11) as u8 | ((i == 0) as u8 * 0x80))
            .collect();
        strings.push((bytes.clone(), h.string(&bytes)));
    }
    let all = h.block(0, &strings.iter().map(|&(_, v)| v).collect::<Vec<_>>());
    for s in ALL {
        for (bytes, v) in &strings {
            let len = bytes.len();
            let done = copy_ok(&mut h, *v, s);
            let hd = header(done.c.root);
            assert_eq!(
                hd,
                Header::new(len / WORD_BYTES + 1, Color::Unmarkable, layout::STRING_TAG)
            );
            assert_eq!(done.c.bytes, (len / WORD_BYTES + 2) * WORD_BYTES);
            // SAFETY: the copied string block holds `wosize * 8` bytes.
            let copied = unsafe {
                std::slice::from_raw_parts(done.c.root as *const u8, hd.wosize() * WORD_BYTES)
            };
            let last = *copied.last().unwrap();
            assert_eq!(
                last as usize,
                hd.wosize() * WORD_BYTES - 1 - len,
                "padding byte, length {len}"
            );
            assert_eq!(layout::string_length(hd, last), len);
            assert_eq!(&copied[..len], &bytes[..], "bytes, length {len}");
            assert!(
                copied[len..copied.len() - 1].iter().all(|&b| b == 0),
                "padding zeros, length {len}"
            );
            done.free();
        }
        let done = copy_ok(&mut h, all, s);
        assert_eq!(done.c.blocks, 42);
        done.free();
    }
}

/// Bit patterns a float field must keep exactly: NaNs with payloads (signalling and
/// quiet, both signs), -0, a subnormal, infinity, and a word that is the address of a
/// heap block (raw data must never be taken for a pointer).
fn float_bits(decoy: Word) -> Vec<u64> {
    vec![
        0x7ff0_0000_0000_0001,
        0x7ff4_dead_beef_0001,
        0x7ff8_0000_0000_0000,
        0xfff8_dead_beef_cafe,
        0x7fff_ffff_ffff_ffff,
        0xffff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x7ff0_0000_0000_0000,
        1.5f64.to_bits(),
        decoy as u64,
    ]
}

#[test]
fn boxed_floats_and_float_arrays_are_bit_exact() {
    let mut h = FakeHeap::new(1 << 12);
    let decoy = h.block(0, &[layout::val_int(99)]);
    let bits = float_bits(decoy);
    let boxed: Vec<Word> = bits
        .iter()
        .map(|&b| h.block(layout::DOUBLE_TAG, &[b as Word]))
        .collect();
    let raw: Vec<Word> = bits.iter().map(|&b| b as Word).collect();
    let array = h.block(layout::DOUBLE_ARRAY_TAG, &raw);
    let mut fields = boxed.clone();
    fields.push(array);
    let root = h.block(0, &fields);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(
            done.c.blocks,
            1 + bits.len() + 1,
            "the decoy is not reachable"
        );
        for (i, &b) in bits.iter().enumerate() {
            let f = done.root_field(i);
            assert_eq!(
                header(f),
                Header::new(1, Color::Unmarkable, layout::DOUBLE_TAG)
            );
            assert_eq!(word_at(f, 0) as u64, b, "boxed float {i}");
        }
        let a = done.root_field(bits.len());
        for (i, &b) in bits.iter().enumerate() {
            assert_eq!(word_at(a, i) as u64, b, "float array element {i}");
        }
        done.free();
        // A float array alone, and a boxed float alone.
        copy_ok(&mut h, array, s).free();
        copy_ok(&mut h, boxed[0], s).free();
    }
}

#[test]
fn int64_custom_blocks_copy() {
    let mut h = FakeHeap::new(1 << 10);
    let decoy = h.string(b"decoy");
    let values: Vec<Word> = [i64::MIN, -1, 0, 42, i64::MAX, decoy as i64]
        .iter()
        .map(|&n| h.int64(n))
        .collect();
    let root = h.block(0, &values);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 7, "the decoy in the payload is not followed");
        for (i, &v) in values.iter().enumerate() {
            let c = done.root_field(i);
            assert_ne!(c, v);
            assert_eq!(
                header(c),
                Header::new(2, Color::Unmarkable, layout::CUSTOM_TAG)
            );
            assert_eq!(
                word_at(c, 0),
                INT64_OPS.as_ptr() as Word,
                "ops pointer kept"
            );
            assert_eq!(word_at(c, 1), h.field(v, 1), "payload kept");
        }
        done.free();
    }
}

#[test]
fn foreign_custom_block_is_refused() {
    let mut h = FakeHeap::new(1 << 10);
    let big = h.foreign_custom();
    let ok = h.int64(7);
    let list = int_list(&mut h, 0, 50);
    let inner = h.block(0, &[list, big]);
    let root = h.block(0, &[ok, inner]);
    for s in ALL {
        for v in [big, root] {
            assert_eq!(
                copy_err(&mut h, v, s),
                CopyError::Custom("_bigarr02".into())
            );
        }
    }
}

#[test]
fn abstract_block_is_refused_even_deep_in_a_big_graph() {
    let mut h = FakeHeap::new(1 << 21);
    let abs = h.block(layout::ABSTRACT_TAG, &[0x1234, 0x5678]);
    for s in ALL {
        assert_eq!(copy_err(&mut h, abs, s), CopyError::Abstract);
    }
    // 100k records with two edges each; the abstract block hangs off the last one of a
    // chain through all of them, so it is found only after every record was marked.
    let n = 100_000;
    let mut rng = Rng(1);
    let nodes: Vec<Word> = (0..n)
        .map(|_| h.block(0, &[layout::val_int(0); 3]))
        .collect();
    for i in 0..n {
        let next = if i + 1 < n { nodes[i + 1] } else { abs };
        let other = nodes[rng.below(n)];
        h.set(nodes[i], 0, next);
        h.set(nodes[i], 1, other);
        h.set(nodes[i], 2, layout::val_int(i as isize));
    }
    for s in ALL {
        assert_eq!(copy_err(&mut h, nodes[0], s), CopyError::Abstract);
        assert_eq!(copy_err(&mut h, nodes[n / 2], s), CopyError::Abstract);
    }
    // Without the abstract block the same graph copies.
    let last = nodes[n - 1];
    h.set(last, 0, layout::val_int(0));
    for s in ALL {
        let done = copy_ok(&mut h, nodes[0], s);
        assert_eq!(done.c.blocks, n);
        done.free();
    }
}

// ---------------------------------------------------------------------------------------
// Closures.
// ---------------------------------------------------------------------------------------

#[test]
fn closure_with_one_function() {
    let mut h = FakeHeap::new(1 << 10);
    let s1 = h.string(b"env");
    let t = h.block(0, &[s1, layout::val_int(3)]);
    let decoy = h.block(0, &[layout::val_int(1)]);
    let f = h.closure(&[2], &[s1, layout::val_int(7), t])[0];
    // The code pointer is raw: make it look like a heap pointer; it must not be followed.
    h.set(f, 0, decoy);
    for s in ALL {
        let done = copy_ok(&mut h, f, s);
        assert_eq!(done.c.blocks, 3, "closure, string, tuple; not the decoy");
        assert_eq!(done.root_field(0), decoy, "code pointer copied as is");
        assert_eq!(done.root_field(1), h.field(f, 1), "closinfo copied as is");
        assert_eq!(
            word_at(done.root_field(4), 0),
            done.root_field(2),
            "env sharing"
        );
        done.free();
    }
}

#[test]
fn closure_with_several_functions_and_infix_roots() {
    let mut h = FakeHeap::new(1 << 10);
    let s1 = h.string(b"env of three");
    let fns = h.closure(&[1, 2, 3], &[s1, layout::val_int(5)]);
    assert_eq!(fns.len(), 3);
    let record = h.block(0, &[fns[2], fns[0], fns[1], fns[2]]);
    for s in ALL {
        for (k, &f) in fns.iter().enumerate() {
            let done = copy_ok(&mut h, f, s);
            assert_eq!(done.c.blocks, 2, "function {k}: the closure and the string");
            let base = done.c.base as Word;
            assert_eq!(
                done.c.root,
                base + WORD_BYTES + (f - fns[0]),
                "function {k}: infix offset kept"
            );
            // The closure's own header gets the copy's color; infix headers are raw words.
            let hd = if k == 0 {
                header(f).with_color(Color::Unmarkable)
            } else {
                header(f)
            };
            assert_eq!(
                header(done.c.root),
                hd,
                "function {k}: header in front of the root"
            );
            done.free();
        }
        let done = copy_ok(&mut h, record, s);
        assert_eq!(done.c.blocks, 3);
        let closure = done.root_field(1);
        for (i, k) in [2, 0, 1, 2].into_iter().enumerate() {
            assert_eq!(
                done.root_field(i),
                closure + (fns[k] - fns[0]),
                "record field {i}"
            );
        }
        done.free();
    }
}

#[test]
fn mutually_recursive_closures_through_infix_pointers() {
    let mut h = FakeHeap::new(1 << 10);
    let placeholder = layout::val_int(0);
    let a = h.closure(&[1, 1], &[placeholder, layout::val_int(10)]);
    let b = h.closure(&[2, 1], &[placeholder, layout::val_int(20)]);
    // Two functions: code words 2 + 3, so the environment starts at field 5.
    let env = 5;
    assert_eq!(layout::start_env(h.field(a[0], 1)), env);
    h.set(a[0], env, b[1]);
    h.set(b[0], env, a[1]);
    let record = h.block(0, &[a[1], b[1]]);
    // A closure whose environment points to its own second function.
    let own = h.closure(&[1, 1], &[placeholder]);
    h.set(own[0], env, own[1]);
    for s in ALL {
        for root in [record, a[1], b[0]] {
            let done = copy_ok(&mut h, root, s);
            assert_eq!(done.c.blocks, if root == record { 3 } else { 2 });
            done.free();
        }
        let done = copy_ok(&mut h, record, s);
        let (ca, cb) = (done.root_field(0), done.root_field(1));
        let a_start = ca - (a[1] - a[0]);
        let b_start = cb - (b[1] - b[0]);
        assert_eq!(
            word_at(a_start, env),
            cb,
            "a's environment points at b's infix copy"
        );
        assert_eq!(
            word_at(b_start, env),
            ca,
            "b's environment points at a's infix copy"
        );
        done.free();
        let done = copy_ok(&mut h, own[1], s);
        assert_eq!(done.c.blocks, 1);
        assert_eq!(
            word_at(done.c.base as Word + WORD_BYTES, env),
            done.c.root,
            "self reference kept"
        );
        done.free();
    }
}

// ---------------------------------------------------------------------------------------
// Lazy values, OCaml 5 tags, objects.
// ---------------------------------------------------------------------------------------

#[test]
fn forced_lazy_forward_block_copies() {
    let mut h = FakeHeap::new(1 << 10);
    let value = h.string(b"forced");
    let fwd = h.block(layout::FORWARD_TAG, &[value]);
    let root = h.block(0, &[fwd, fwd, value]);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 3);
        assert_eq!(header(done.root_field(0)).tag(), layout::FORWARD_TAG);
        assert_eq!(word_at(done.root_field(0), 0), done.root_field(2));
        done.free();
        copy_ok(&mut h, fwd, s).free();
    }
}

#[test]
fn unforced_lazy_is_refused() {
    let mut h = FakeHeap::new(1 << 10);
    let thunk = h.closure(&[1], &[layout::val_int(1)])[0];
    let lazy = h.block(layout::LAZY_TAG, &[thunk]);
    let deep = h.block(0, &[layout::val_int(1), lazy]);
    let list = int_list(&mut h, 0, 20);
    let root = h.block(0, &[list, deep]);
    for s in ALL {
        for v in [lazy, root] {
            assert_eq!(copy_err(&mut h, v, s), CopyError::UnforcedLazy);
        }
    }
}

#[test]
fn ocaml5_tags_are_refused_only_on_ocaml5() {
    let mut h = FakeHeap::new(1 << 10);
    let s1 = h.string(b"x");
    let forcing = h.block(layout::FORCING_TAG, &[s1]);
    let cont = h.block(layout::CONT_TAG, &[layout::val_int(3), s1]);
    let root = h.block(0, &[forcing, cont]);
    for s in ALL {
        h.ocaml5_tags = true;
        assert_eq!(copy_err(&mut h, forcing, s), CopyError::ForcingLazy);
        assert_eq!(copy_err(&mut h, cont, s), CopyError::Continuation);
        assert_eq!(copy_err(&mut h, root, s), CopyError::ForcingLazy);
        h.ocaml5_tags = false;
        for v in [forcing, cont] {
            copy_ok(&mut h, v, s).free();
        }
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 4);
        assert_eq!(header(done.root_field(1)).tag(), layout::CONT_TAG);
        done.free();
    }
}

#[test]
fn objects_and_exception_constructors_copy() {
    let mut h = FakeHeap::new(1 << 10);
    let meth = h.closure(&[2], &[layout::val_int(0)])[0];
    let class = h.block(0, &[layout::val_int(2), meth, meth]);
    let obj = h.block(
        layout::OBJECT_TAG,
        &[class, layout::val_int(17), layout::val_int(5)],
    );
    let obj2 = h.block(layout::OBJECT_TAG, &[class, layout::val_int(18), obj]);
    let name = h.string(b"Not_found_again");
    let exn_ctor = h.block(layout::OBJECT_TAG, &[name, layout::val_int(-12)]);
    let exn = h.block(0, &[exn_ctor, layout::val_int(3)]);
    let root = h.block(0, &[obj, obj2, exn]);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 8);
        let (o1, o2) = (done.root_field(0), done.root_field(1));
        assert_eq!(header(o1).tag(), layout::OBJECT_TAG);
        assert_eq!(word_at(o1, 0), word_at(o2, 0), "class shared");
        assert_eq!(word_at(o2, 2), o1);
        done.free();
        copy_ok(&mut h, obj, s).free();
    }
}

// ---------------------------------------------------------------------------------------
// Allocators.
// ---------------------------------------------------------------------------------------

#[test]
fn null_allocator_is_out_of_memory_of_the_measured_size() {
    let mut h = FakeHeap::new(1 << 12);
    let list = int_list(&mut h, 0, 100);
    let s1 = h.string(b"oom");
    let root = h.block(0, &[list, s1, list]);
    let bytes = reachable(&mut h, root).1 * WORD_BYTES;
    assert_eq!(bytes, (4 + 100 * 3 + 2) * WORD_BYTES);
    for s in ALL {
        let mut alloc = NullAlloc::default();
        let err = copy_refused(&mut h, root, s, &mut alloc);
        assert_eq!(err, CopyError::OutOfMemory(bytes));
        assert!(err.is_out_of_memory());
        assert_eq!(alloc.asked, [bytes]);
    }
}

#[test]
fn misaligned_allocator_is_refused_and_freed() {
    let mut h = FakeHeap::new(1 << 12);
    let list = int_list(&mut h, 0, 10);
    let f = h.float(2.5);
    let root = h.block(0, &[list, f]);
    let bytes = reachable(&mut h, root).1 * WORD_BYTES;
    for s in ALL {
        let mut alloc = MisalignedAlloc::default();
        let err = copy_refused(&mut h, root, s, &mut alloc);
        assert_eq!(err, CopyError::Misaligned);
        assert!(!err.is_out_of_memory());
        assert_eq!(alloc.freed, 1, "the misaligned memory was given back");
        assert!(alloc.given.is_none());
        // The allocator was asked for the measured size: a second copy with a good
        // allocator asks for the same.
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.bytes, bytes);
        done.free();
    }
}

#[test]
fn one_allocation_of_exactly_the_reachable_size() {
    let mut h = FakeHeap::new(1 << 14);
    // Sizes by hand: whsize of each distinct reachable heap block.
    let s1 = h.string(b"abcdefgh"); // 8 bytes: 2 words + header = 3
    let fl = h.float(1.0); // 2
    let fa = h.float_array(&[1.0, 2.0, 3.0]); // 4
    let i64v = h.int64(5); // 3
    let fns = h.closure(&[1, 1], &[s1, fl]); // 2 + 3 + 2 env + header = 8
    let stat = h.static_block(0, &[layout::val_int(1)]); // shared: 0
    let unreachable = h.string(b"never reached"); // 0
    let cell2 = h.block(0, &[layout::val_int(2), layout::val_int(0)]); // 3
    let cell1 = h.block(0, &[layout::val_int(1), cell2]); // 3
    h.set(cell2, 1, cell1); // a cycle
    let root = h.block(0, &[s1, fl, fa, i64v, fns[1], stat, cell1, s1, fns[0]]); // 10
    let by_hand = 3 + 2 + 4 + 3 + 8 + 3 + 3 + 10;
    let _ = unreachable;
    assert_eq!(reachable(&mut h, root), (8, by_hand));
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.alloc.allocs, [by_hand * WORD_BYTES]);
        assert_eq!(done.c.bytes, by_hand * WORD_BYTES);
        done.free();
    }
}

// ---------------------------------------------------------------------------------------
// Sharing and cycles.
// ---------------------------------------------------------------------------------------

#[test]
fn sharing_is_preserved() {
    let mut h = FakeHeap::new(1 << 10);
    let a = h.string(b"a");
    let b = h.block(0, &[a, a]);
    let c = h.block(0, &[b, b, a]);
    let root = h.block(0, &[c, b, a, c]);
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 4, "a diamond is not unfolded");
        let (cc, cb, ca) = (done.root_field(0), done.root_field(1), done.root_field(2));
        assert_eq!(done.root_field(3), cc);
        assert_eq!(
            (word_at(cc, 0), word_at(cc, 1), word_at(cc, 2)),
            (cb, cb, ca)
        );
        assert_eq!((word_at(cb, 0), word_at(cb, 1)), (ca, ca));
        done.free();
    }
}

#[test]
fn cycles_are_preserved() {
    let mut h = FakeHeap::new(1 << 16);
    let selfloop = h.block(0, &[layout::val_int(0), layout::val_int(1)]);
    h.set(selfloop, 0, selfloop);
    let x = h.block(1, &[layout::val_int(0)]);
    let y = h.block(2, &[x]);
    h.set(x, 0, y);
    // A ring of 1000 cells, entered from the middle.
    let ring: Vec<Word> = (0..1000)
        .map(|i| h.block(0, &[layout::val_int(i), layout::val_int(0)]))
        .collect();
    for i in 0..1000 {
        h.set(ring[i], 1, ring[(i + 1) % 1000]);
    }
    let root = h.block(0, &[selfloop, x, ring[500]]);
    h.set(selfloop, 1, root); // back to the root
    for s in ALL {
        let done = copy_ok(&mut h, root, s);
        assert_eq!(done.c.blocks, 1004);
        let cs = done.root_field(0);
        assert_eq!(word_at(cs, 0), cs, "self loop");
        assert_eq!(word_at(cs, 1), done.c.root, "cycle through the root");
        let cx = done.root_field(1);
        assert_eq!(word_at(word_at(cx, 0), 0), cx, "two-cycle");
        let start = done.root_field(2);
        let mut cell = start;
        for _ in 0..1000 {
            cell = word_at(cell, 1);
        }
        assert_eq!(cell, start, "the ring closes after 1000 cells");
        done.free();
        copy_ok(&mut h, ring[0], s).free();
    }
}

// ---------------------------------------------------------------------------------------
// Big values: no recursion, bounded memory.
// ---------------------------------------------------------------------------------------

/// Checks the copy of `int_list(0, n)` cell by cell (cheaper than a hash map for 10M).
fn assert_int_list_copy(c: &Copied, n: usize) {
    let (base, end) = (c.base as Word, c.base as Word + c.bytes);
    let mut cell = c.root;
    for i in 0..n {
        assert!(cell > base && cell < end, "cell {i} inside the copy");
        assert_eq!(
            header(cell),
            Header::new(2, Color::Unmarkable, 0),
            "cell {i}"
        );
        assert_eq!(word_at(cell, 0), layout::val_int(i as isize), "cell {i}");
        cell = word_at(cell, 1);
    }
    assert_eq!(cell, layout::val_int(0), "the list ends");
}

#[test]
fn ten_million_element_list() {
    let n = 10_000_000;
    let mut h = FakeHeap::new(3 * n + 16);
    let list = int_list(&mut h, 0, n as isize);
    for s in ALL {
        let done = copy_checked(&mut h, list, s, (n, 3 * n));
        assert_int_list_copy(&done.c, n);
        done.free();
    }
}

#[test]
fn million_deep_nested_tuples() {
    let n = 1_000_000;
    let mut h = FakeHeap::new(3 * n + 64);
    let leaf = h.string(b"bottom");
    let mut t = leaf;
    for k in 0..n {
        t = h.block((k % 200) as u8, &[t, layout::val_int(k as isize)]);
    }
    for s in ALL {
        let done = copy_ok(&mut h, t, s);
        let mut cell = done.c.root;
        for k in (0..n).rev() {
            assert_eq!(
                header(cell),
                Header::new(2, Color::Unmarkable, (k % 200) as u8)
            );
            assert_eq!(word_at(cell, 1), layout::val_int(k as isize));
            cell = word_at(cell, 0);
        }
        assert_eq!(header(cell).tag(), layout::STRING_TAG);
        done.free();
    }
}

/// A random tree whose node `k` is a block of `children` pointers, then its label `k`.
fn labelled_tree(h: &mut FakeHeap, rng: &mut Rng, nodes: usize) -> Word {
    let mut made = 0;
    fn node(h: &mut FakeHeap, rng: &mut Rng, budget: usize, made: &mut usize) -> Word {
        let label = *made;
        *made += 1;
        let mut left = budget - 1;
        let mut fields = Vec::new();
        while left > 0 && fields.len() < 3 {
            let size = if fields.len() == 2 {
                left
            } else {
                1 + rng.below(left)
            };
            fields.push(node(h, rng, size, made));
            left -= size;
        }
        fields.push(layout::val_int(label as isize));
        h.block(0, &fields)
    }
    node(h, rng, nodes, &mut made)
}

/// The labels of a [`labelled_tree`] in the order the copy lays its blocks out, by the
/// definition of depth first by groups: the root, then `expand(root)`, where `expand(b)`
/// is the children of `b`, then `expand` of each child in turn.
fn grouped_depth_first(h: &FakeHeap, root: Word) -> Vec<isize> {
    let label = |b: Word| h.field(b, header(b).wosize() - 1) as isize >> 1;
    let children =
        |b: Word| -> Vec<Word> { (0..header(b).wosize() - 1).map(|i| h.field(b, i)).collect() };
    fn expand(
        b: Word,
        out: &mut Vec<isize>,
        label: &dyn Fn(Word) -> isize,
        children: &dyn Fn(Word) -> Vec<Word>,
    ) {
        let cs = children(b);
        out.extend(cs.iter().map(|&c| label(c)));
        for c in cs {
            expand(c, out, label, children);
        }
    }
    let mut out = vec![label(root)];
    expand(root, &mut out, &label, &children);
    out
}

/// The label a tree node of [`FakeHeap::binary_tree`] or `labelled_tree` holds: its
/// last field, an OCaml integer.
fn last_field_label(block: Word) -> isize {
    word_at(block, header(block).wosize() - 1) as isize >> 1
}

/// `label` of every block of the copy `c`, in the order the copy lays them out.
fn labels_in_copy(c: &Copied, label: impl Fn(Word) -> isize) -> Vec<isize> {
    let mut at = 0;
    let mut labels = Vec::new();
    while at < c.bytes / WORD_BYTES {
        let block = c.base as Word + (at + 1) * WORD_BYTES;
        labels.push(label(block));
        at += header(block).wosize() + 1;
    }
    labels
}

#[test]
fn trees_are_laid_out_depth_first_by_groups() {
    let mut rng = Rng(41);
    for nodes in [1, 2, 3, 10, 100, 5_000] {
        let mut h = FakeHeap::new(5 * nodes + 16);
        let root = labelled_tree(&mut h, &mut rng, nodes);
        let expected = grouped_depth_first(&h, root);
        assert_eq!(expected.len(), nodes);
        for s in ALL {
            let done = copy_ok(&mut h, root, s);
            let labels = labels_in_copy(&done.c, last_field_label);
            assert_eq!(labels, expected, "{s:?}: {nodes} nodes");
            done.free();
        }
    }
}

/// The labels of the blocks of [`FakeHeap::buckets`] in the order the copy lays them out, by the
/// definition: the root, then its children; the children of a run are expanded depth
/// first by groups, unless the run is batched (the root's children when there are
/// `batched_from` of them: pass 1 then switches to batches as soon as it has scanned
/// the root, the queue past `batches::SWITCH_FROM` blocks, many waiting and scattered;
/// and every run that comes from a batch): then the unseen children of each group of
/// `BATCH` blocks, followed by their own expansion, batched too.
fn batched_order(root: Word, batched_from: usize) -> Vec<isize> {
    const BATCH: usize = offheap::copy::batches::BATCH;
    let children = |b: Word, seen: &mut HashSet<Word>| -> Vec<Word> {
        let hd = header(b);
        if hd.tag() == layout::STRING_TAG {
            return Vec::new();
        }
        (0..hd.wosize())
            .map(|i| word_at(b, i))
            .filter(|&f| !layout::is_immediate(f) && seen.insert(f))
            .collect()
    };
    fn expand(
        run: &[Word],
        batched: bool,
        out: &mut Vec<isize>,
        seen: &mut HashSet<Word>,
        children: &dyn Fn(Word, &mut HashSet<Word>) -> Vec<Word>,
        batched_from: usize,
    ) {
        if batched {
            for group in run.chunks(BATCH) {
                let kids: Vec<Word> = group.iter().flat_map(|&b| children(b, seen)).collect();
                out.extend(kids.iter().map(|&c| bucket_label(c)));
                expand(&kids, true, out, seen, children, batched_from);
            }
        } else {
            for &b in run {
                let kids = children(b, seen);
                out.extend(kids.iter().map(|&c| bucket_label(c)));
                let wide = kids.len() >= batched_from;
                expand(&kids, wide, out, seen, children, batched_from);
            }
        }
    }
    let mut seen = HashSet::from([root]);
    let mut out = vec![bucket_label(root)];
    expand(&[root], false, &mut out, &mut seen, &children, batched_from);
    out
}

#[test]
fn wide_runs_of_scattered_blocks_are_laid_out_in_batches() {
    // 20 000 chains: past the 16384 blocks from which pass 1 may switch to batches, so
    // that the path of small values never meets a batched run. Scattered (the array's
    // heads in random order), the buckets are walked in batches; in allocation order,
    // depth first by groups.
    let mut rng = Rng(43);
    for (scattered, batched_from) in [(true, 16384), (false, usize::MAX)] {
        let n = 20_000;
        let mut h = FakeHeap::new(24 * n);
        let root = h.buckets(&mut rng, n, 8, scattered);
        let expected = batched_order(root, batched_from);
        for s in ALL {
            let done = copy_ok(&mut h, root, s);
            let labels = labels_in_copy(&done.c, bucket_label);
            assert_eq!(labels.len(), expected.len(), "{s:?}, scattered {scattered}");
            let first_difference = labels.iter().zip(&expected).position(|(a, b)| a != b);
            assert_eq!(first_difference, None, "{s:?}, scattered {scattered}");
            done.free();
        }
    }
}

#[test]
fn scattered_trees_go_on_by_batches_once_past_the_small_values() {
    // A tree whose nodes lie far from their children is walked depth first by groups
    // until the queue passes `batches::SWITCH_FROM` blocks (as the path of small values
    // lays out what it copies), then by batches; built depth first, it stays depth
    // first by groups to the end. Every strategy (header marks, and the side table
    // with its snapshot) gives a copy of the same shape either way.
    let n = 60_000;
    let first = offheap::copy::batches::SWITCH_FROM + 1;
    for scattered in [true, false] {
        let mut h = FakeHeap::new(4 * n);
        let root = h.binary_tree(&mut Rng(47), n, scattered, &mut |_, _, _| Vec::new())[n / 2];
        let expected = grouped_depth_first(&h, root);
        assert_eq!(expected.len(), n);
        for s in ALL {
            let done = copy_ok(&mut h, root, s);
            let labels = labels_in_copy(&done.c, last_field_label);
            let mut sorted = labels.clone();
            sorted.sort_unstable();
            assert!(
                sorted.iter().copied().eq(0..n as isize),
                "{s:?}: every node once"
            );
            assert_eq!(
                labels[..first],
                expected[..first],
                "{s:?}: depth first at first"
            );
            if scattered {
                assert_ne!(labels, expected, "{s:?}: by batches from there");
            } else {
                assert_eq!(labels, expected, "{s:?}: depth first by groups throughout");
            }
            done.free();
        }
    }
}

#[test]
fn million_deep_tree_with_a_pending_sibling_at_every_level() {
    // Every level leaves a sibling to scan after the deep branch: pass 1 then holds one
    // pending run per level, and must hold them in its own (fallible) memory.
    let n = 1_000_000;
    let mut h = FakeHeap::new(6 * n + 64);
    let mut t = h.string(b"bottom");
    for k in 0..n {
        let sibling = h.float(k as f64);
        t = h.block(0, &[t, sibling]);
    }
    for s in ALL {
        let done = copy_ok(&mut h, t, s);
        assert!(
            done.c.transient_bytes >= 8 * 2 * n + 24 * n,
            "{s:?}: the queue and one pending run per level are counted: {}",
            done.c.transient_bytes
        );
        done.free();
    }
}

#[test]
fn million_deep_scattered_tree_by_batches() {
    // The same shape, its blocks made in random order: pass 1 goes on by batches with
    // some 8000 runs on its stack, and goes a million levels down one batch of two
    // blocks at a time.
    let n = 1_000_000;
    let mut h = FakeHeap::new(6 * n + 64);
    let mut rng = Rng(53);
    let mut order: Vec<usize> = (0..2 * n).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut nodes = vec![0; n];
    let mut floats = vec![0; n];
    for &i in &order {
        if i < n {
            nodes[i] = h.block(0, &[layout::val_int(0), layout::val_int(0)]);
        } else {
            floats[i - n] = h.float(i as f64);
        }
    }
    let bottom = h.string(b"bottom");
    for k in 0..n {
        let below = if k == 0 { bottom } else { nodes[k - 1] };
        h.set(nodes[k], 0, below);
        h.set(nodes[k], 1, floats[k]);
    }
    for s in ALL {
        copy_ok(&mut h, nodes[n - 1], s).free();
    }
}

#[test]
fn scattered_cyclic_graph_by_batches() {
    // 50 000 nodes made in random order, each with 1 to 3 edges to random nodes (cycles,
    // sharing, self loops), a string and, for one node in 8, a closure of two
    // functions whose infix pointer is another node's edge: past the point where pass 1
    // goes on by batches, every strategy copies the same graph.
    let n = 50_000;
    let mut h = FakeHeap::new(24 * n);
    let mut rng = Rng(59);
    let nodes: Vec<Word> = (0..n)
        .map(|i| {
            let s = h.string(format!("node {i}").as_bytes());
            let zero = layout::val_int(0);
            h.block(0, &[s, zero, zero, zero, zero])
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut last_infix = layout::val_int(0);
    for &i in &order {
        for e in 1..=1 + rng.below(3) {
            h.set(nodes[i], e, nodes[rng.below(n)]);
        }
        if rng.below(8) == 0 {
            let fns = h.closure(&[1, 2], &[nodes[rng.below(n)]]);
            h.set(nodes[i], 4, last_infix);
            last_infix = fns[1];
        }
    }
    let root = h.block(0, &[nodes[order[0]], last_infix]);
    for s in ALL {
        copy_ok(&mut h, root, s).free();
    }
}

#[test]
fn transient_memory_is_8_bytes_a_block_with_header_marks() {
    let n = 1_000_000;
    let mut h = FakeHeap::new(3 * n + 16);
    let list = int_list(&mut h, 0, n as isize);
    let marks = copy_checked(&mut h, list, MARKS, (n, 3 * n));
    let t = marks.c.transient_bytes;
    assert!(
        t <= 8 * n + (2 << 20),
        "HeaderMarks held {t} bytes for {n} blocks"
    );
    assert!(
        t >= 8 * n,
        "the queue alone is 8 bytes a block; reported {t}"
    );
    marks.free();
    let table = copy_checked(&mut h, list, Strategy::Table, (n, 3 * n));
    let t = table.c.transient_bytes;
    assert!(
        t > 8 * n + (2 << 20),
        "the table's memory is counted too; reported {t}"
    );
    assert!(
        t <= 8 * n + (2 << 20) + 16 * 4 * n,
        "SideTable held {t} bytes for {n} blocks"
    );
    table.free();
}

/// Sets the color bits of block `v`'s header (the fake heap makes heap blocks `C0`).
fn recolor(v: Word, color: Color) {
    // SAFETY: `v` is a block of the fake heap; its header word is writable.
    unsafe { layout::write_header(v, header(v).with_color(color)) }
}

#[test]
fn header_marks_with_any_color_the_source_does_not_carry() {
    // The OCaml 5 backend marks with whichever color is garbage in the running cycle, so
    // the mark color varies; the source blocks carry the other colors.
    for (source, mark) in [
        (Color::C0, Color::C1),
        (Color::C1, Color::C0),
        (Color::C2, Color::C0),
        (Color::C1, Color::C2),
        (Color::C2, Color::C1),
    ] {
        let mut h = FakeHeap::new(1 << 12);
        let s1 = h.string(b"colors");
        let fns = h.closure(&[1, 1], &[s1]);
        let cell = h.block(0, &[layout::val_int(1), layout::val_int(0)]);
        h.set(cell, 1, cell);
        let root = h.block(3, &[fns[1], cell, s1, fns[0]]);
        for v in [s1, fns[0], cell, root] {
            recolor(v, source);
        }
        let done = copy_ok(&mut h, root, Strategy::Marks(mark));
        assert_eq!(done.c.blocks, 4, "source {source:?}, mark {mark:?}");
        done.free();
    }
}

// ---------------------------------------------------------------------------------------
// A visited set with a budget of blocks (OCaml 5's side table before a copy stops the
// other domains).
// ---------------------------------------------------------------------------------------

thread_local! {
    static EXCEEDED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note_exceeded() {
    EXCEEDED.with(|e| e.set(e.get() + 1));
}

/// A general traversal with `Budgeted<SideTable>` of `blocks` blocks.
fn budgeted_copy<A: Allocator>(
    h: &mut FakeHeap,
    root: Word,
    blocks: usize,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    let set = Budgeted::new(SideTable::with_capacity(0), blocks, note_exceeded);
    // SAFETY: as in `raw_copy`.
    unsafe { copy::traverse(root, h, set, alloc) }
}

#[test]
fn a_budget_of_blocks_refuses_larger_values_having_changed_nothing() {
    for (n, shared) in [(20usize, false), (300, false), (300, true), (5000, true)] {
        let mut h = FakeHeap::new(4 * n + 64);
        let list = int_list(&mut h, 0, n as isize);
        // Sharing and a cycle: a block seen again costs no budget.
        let root = if shared {
            let pair = h.block(0, &[list, list]);
            let cell = h.block(0, &[pair, layout::val_int(0)]);
            // SAFETY: field 1 of the fresh cell, written to make a cycle.
            unsafe { *(cell as *mut Word).add(1) = cell };
            cell
        } else {
            list
        };
        let blocks = n + if shared { 2 } else { 0 };
        let before = h.snapshot();
        // Within the budget (exactly): the same copy as without one.
        let mut alloc = Counting::new();
        EXCEEDED.with(|e| e.set(0));
        let c = budgeted_copy(&mut h, root, blocks, &mut alloc).expect("within the budget");
        assert_eq!(c.blocks, blocks, "{n}: blocks copied");
        assert_eq!(EXCEEDED.with(|e| e.get()), 0, "{n}: not exceeded");
        let mut plain = Counting::new();
        // SAFETY: as in `raw_copy`.
        let p = unsafe { copy::traverse(root, &mut h, SideTable::with_capacity(0), &mut plain) }
            .unwrap();
        // SAFETY: both copies hold `bytes` bytes.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(c.base, c.bytes),
                std::slice::from_raw_parts(p.base, p.bytes),
            )
        };
        let rebase = |bytes: &[u8], base: *mut u8| -> Vec<Word> {
            bytes
                .chunks(WORD_BYTES)
                .map(|w| Word::from_ne_bytes(w.try_into().unwrap()))
                .map(|w| {
                    let base = base as Word;
                    if w >= base && w < base + bytes.len() {
                        w - base
                    } else {
                        w
                    }
                })
                .collect()
        };
        assert_eq!(rebase(a, c.base), rebase(b, p.base), "{n}: same layout");
        // SAFETY: the copies were made by these allocators.
        unsafe {
            alloc.free(c.base, c.bytes);
            plain.free(p.base, p.bytes);
        }
        // One block short: refused before anything is allocated, the source unchanged,
        // the traversal's memory given back, and the caller told why.
        let mut alloc = Counting::new();
        let live = thread_live();
        let err = budgeted_copy(&mut h, root, blocks - 1, &mut alloc).unwrap_err();
        assert!(err.is_out_of_memory(), "{n}: {err}");
        assert_eq!(EXCEEDED.with(|e| e.get()), 1, "{n}: the caller is told");
        assert!(alloc.allocs.is_empty(), "{n}: allocated {:?}", alloc.allocs);
        assert_eq!(thread_live(), live, "{n}: Rust memory kept");
        assert_same_source(&before, &h.snapshot(), "after an exceeded budget");
    }
}
