//! Large copies that pass 1 writes as it goes (`offheap::copy::direct`): into address
//! space it reserved, when the allocator frees such mappings, from 4 MiB of copy on.
//! They must be the very copy the two passes make, whatever the value holds and however
//! the copy ends (an error after pass 1 began writing, a Bigarray, no allocator that
//! takes the mapping).

mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap, Rng, BIGARRAY_OPS};
use offheap::alloc::{Allocator, Malloc};
use offheap::copy::visited::{HeaderMarks, SideTable};
use offheap::copy::{self, Copied, CopyError};
use offheap::layout::{self, Color, Word, WORD_BYTES};

/// Held by each test: one reads the process's address space, which another test's
/// reservation (64 GiB while a copy runs) would change.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The default allocator, counting the requests it gets: a copy that pass 1 wrote asks
/// for nothing (the reservation becomes the copy).
struct Adopting {
    allocs: usize,
}

impl Allocator for Adopting {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.allocs += 1;
        Malloc.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: from `Malloc.alloc(bytes)`, or a mapping as `map_huge(bytes)` makes it.
        unsafe { Malloc.free(ptr, bytes) }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        Some(0)
    }
}

/// [`Adopting`] with room kept in front of each copy (as the stubs keep a handle's
/// record there): `alloc(bytes)` is `prefix` bytes into an allocation of
/// `bytes + prefix`.
struct Prefixed {
    inner: Adopting,
    prefix: usize,
}

impl Allocator for Prefixed {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.inner
            .alloc(bytes + self.prefix)
            .wrapping_add(self.prefix)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: `ptr` came from `alloc(bytes)` above.
        unsafe {
            self.inner
                .free(ptr.wrapping_sub(self.prefix), bytes + self.prefix)
        }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        Some(self.inner.huge_mapping_prefix()? + self.prefix)
    }
}

/// A value of some `records` records (each 22 words or so), a 6 MB string among the
/// late ones, with every kind of block the traversal tells apart: strings, floats,
/// Int64, closures with infix pointers (some shared), float arrays, blocks of 20 fields,
/// static blocks (shared, not copied), sharing at random and a cycle through the whole
/// chain. Returns the root (the last record).
fn big_value(h: &mut FakeHeap, records: usize, seed: u64) -> Word {
    let mut rng = Rng(seed);
    let shared_static = h.static_block(0, &[layout::val_int(7)]);
    let mut all: Vec<Word> = Vec::with_capacity(records);
    let mut closure = h.closure(&[1, 2], &[layout::val_int(1)])[1];
    let mut prev = layout::val_int(0);
    for i in 0..records {
        let s = h.string(format!("record {i} {}", rng.next()).as_bytes());
        let f = h.float(i as f64 * 0.5);
        let n = h.int64(-(i as i64));
        if rng.below(4) == 0 {
            let fns = h.closure(&[1, 2], &[s, prev]);
            closure = fns[rng.below(2)];
        }
        let other = match rng.below(8) {
            0 => shared_static,
            1 | 2 if !all.is_empty() => all[rng.below(all.len())],
            3 if i % 1000 == 0 => h.float_array(&[1.5; 20]),
            4 if i % 1000 == 1 => {
                let fields: Vec<Word> = (0..20).map(|k| if k % 2 == 0 { s } else { f }).collect();
                h.block(3, &fields)
            }
            _ => layout::val_int(i as isize),
        };
        let big = if i == records * 2 / 3 {
            h.string(&vec![b'x'; 6 << 20])
        } else {
            layout::val_int(0)
        };
        let r = h.block(0, &[s, f, n, closure, prev, other, big]);
        all.push(r);
        prev = r;
    }
    // The first record's link closes the chain into a cycle.
    h.set(all[0], 4, prev);
    prev
}

/// [`big_value`]'s kinds of blocks in a tree whose nodes lie scattered (a `Map` of
/// random keys): `nodes` nodes `[children..., string, float, Int64, closure, other,
/// big, label]`, where pass 1 goes on by batches after its first blocks. `other` is a
/// shared static block, a node seen before (sharing, and cycles through the tree), a
/// float array or a block of 20 fields; `big` a 6 MB string in one late node. Returns
/// the root and the node of label `nodes - 1`, at the bottom right of the tree: one of
/// the last discovered.
fn scattered_value(h: &mut FakeHeap, nodes: usize, seed: u64) -> (Word, Word) {
    let shared_static = h.static_block(0, &[layout::val_int(7)]);
    let mut made: Vec<Word> = Vec::new();
    let mut closure = h.closure(&[1, 2], &[layout::val_int(1)])[1];
    let mut extra = |h: &mut FakeHeap, rng: &mut Rng, i: usize| -> Vec<Word> {
        let s = h.string(format!("node {i} {}", rng.next()).as_bytes());
        let f = h.float(i as f64 * 0.5);
        let n = h.int64(-(i as i64));
        if rng.below(4) == 0 {
            let fns = h.closure(&[1, 2], &[s, f]);
            closure = fns[rng.below(2)];
        }
        let other = match rng.below(8) {
            0 => shared_static,
            1 | 2 if !made.is_empty() => made[rng.below(made.len())],
            3 if i.is_multiple_of(1000) => h.float_array(&[1.5; 20]),
            4 if i % 1000 == 1 => {
                let fields: Vec<Word> = (0..20).map(|k| if k % 2 == 0 { s } else { f }).collect();
                h.block(3, &fields)
            }
            _ => layout::val_int(i as isize),
        };
        let big = if i == nodes - 2 {
            h.string(&vec![b'x'; 6 << 20])
        } else {
            layout::val_int(0)
        };
        made.push(s);
        made.push(n);
        vec![s, f, n, closure, other, big]
    };
    let all = h.binary_tree(&mut Rng(seed), nodes, true, &mut extra);
    (all[nodes / 2], all[nodes - 1])
}

/// Sets the field `other` of a node of [`scattered_value`].
fn set_other(h: &mut FakeHeap, node: Word, other: Word) {
    // SAFETY: a block of the fake heap.
    let wosize = unsafe { layout::read_header(node) }.wosize();
    // [children..., string, float, Int64, closure, other, big, label]
    h.set(node, wosize - 3, other);
}

/// `copy::copy` of `root` with a side table (`with_table`) or header marks.
fn copy_either<A: Allocator>(
    h: &mut FakeHeap,
    root: Word,
    with_table: bool,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    // SAFETY: the tests' values are well formed, and nothing else touches them.
    unsafe {
        if with_table {
            copy::copy(root, h, SideTable::new(), alloc)
        } else {
            copy::copy(root, h, HeaderMarks::new(Color::C2), alloc)
        }
    }
}

/// Hangs the abstract block `abs`, then the foreign custom block `foreign`, in the
/// value of `root` (`hang`), and copies it with each visited set of `tables` in turn
/// (`true`: the side table): every copy is refused with the block's error, allocates
/// nothing and leaves the source as it was, and no reservation stays mapped.
fn assert_refusals_leave_everything(
    h: &mut FakeHeap,
    root: Word,
    abs: Word,
    foreign: Word,
    tables: &[bool],
    hang: impl Fn(&mut FakeHeap, Word),
) {
    let vm_before = vm_size_kb();
    for (bad, expected) in [
        (abs, CopyError::Abstract),
        (foreign, CopyError::Custom("_bigarr02".into())),
    ] {
        hang(h, bad);
        let before = h.snapshot();
        for &with_table in tables {
            let mut adopting = Adopting { allocs: 0 };
            let e = copy_either(h, root, with_table, &mut adopting).expect_err("refused");
            assert_eq!(e, expected);
            assert_eq!(adopting.allocs, 0);
            assert!(before == h.snapshot(), "source restored after {e:?}");
        }
    }
    // A reservation left mapped would be 64 GiB of address space each.
    assert!(
        vm_size_kb() < vm_before + (16 << 20),
        "reservations unmapped"
    );
}

/// The copy's words with every pointer into it made relative to its start, so that two
/// copies at different addresses compare equal when laid out alike.
fn relative_words(c: &Copied) -> Vec<Word> {
    let base = c.base as Word;
    let end = base + c.bytes;
    // SAFETY: the copy is `c.bytes` readable bytes at `c.base`.
    let words = unsafe { std::slice::from_raw_parts(c.base as *const Word, c.bytes / WORD_BYTES) };
    words
        .iter()
        .map(|&w| {
            if w >= base && w <= end {
                (w - base) | 1 << 63
            } else {
                w
            }
        })
        .collect()
}

#[test]
fn copies_written_by_pass_1_are_the_two_pass_copies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (records, seed) in [(30_000, 1), (120_000, 2), (300_000, 3)] {
        let mut h = FakeHeap::new(12 << 20);
        let root = big_value(&mut h, records, seed);
        let before = h.snapshot();
        let mut adopting = Adopting { allocs: 0 };
        // SAFETY: a well-formed value of the fake heap, which nothing else touches.
        let direct =
            unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut adopting) }
                .expect("copied by pass 1");
        assert!(direct.bytes > 8 << 20, "{records}: a copy beyond 4 MiB");
        assert_eq!(adopting.allocs, 0, "{records}: pass 1 wrote the copy");
        assert_eq!(before, h.snapshot(), "{records}: source restored");
        let mut counting = Counting::new();
        // SAFETY: as above.
        let two_pass =
            unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut counting) }
                .expect("copied in two passes");
        assert_eq!(
            counting.allocs,
            vec![direct.bytes],
            "{records}: one allocation"
        );
        assert_eq!(direct.bytes, two_pass.bytes);
        assert_eq!(direct.blocks, two_pass.blocks);
        assert!(
            relative_words(&direct) == relative_words(&two_pass),
            "{records}: pass 1 wrote what pass 2 writes"
        );
        let n = assert_isomorphic(&mut h, root, direct.root, direct.base as Word, direct.bytes);
        assert_eq!(n, direct.blocks);
        // SAFETY: each copy goes back to the allocator that made it.
        unsafe {
            adopting.free(direct.base, direct.bytes);
            counting.free(two_pass.base, two_pass.bytes);
        }
    }
}

#[test]
fn batched_copies_written_by_pass_1_are_the_two_pass_copies() {
    // A hash table's buckets, scattered, of 20 000 chains (past the run length from
    // which pass 1 walks in batches) with keys of 200 bytes (a copy of some 10 MB):
    // pass 1 writes it in the batched order, as pass 2 would.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(4 << 20);
    let root = h.buckets(&mut Rng(5), 20_000, 200, true);
    let mut adopting = Adopting { allocs: 0 };
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let direct = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut adopting) }
        .expect("copied by pass 1");
    assert!(direct.bytes > 8 << 20, "a copy beyond 4 MiB");
    assert_eq!(adopting.allocs, 0, "pass 1 wrote the copy");
    let mut counting = Counting::new();
    // SAFETY: as above.
    let two_pass = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut counting) }
        .expect("copied in two passes");
    assert!(relative_words(&direct) == relative_words(&two_pass));
    let n = assert_isomorphic(&mut h, root, direct.root, direct.base as Word, direct.bytes);
    assert_eq!(n, direct.blocks);
    // SAFETY: each copy goes back to the allocator that made it.
    unsafe {
        adopting.free(direct.base, direct.bytes);
        counting.free(two_pass.base, two_pass.bytes);
    }
}

#[test]
fn scattered_copies_written_by_pass_1_by_batches_are_the_two_pass_copies() {
    // Pass 1 goes on by batches here, every pointer it writes into the copy deferred:
    // the copy is the one two passes make, and the one the side table (its snapshot)
    // makes.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (nodes, seed) in [(40_000, 11), (150_000, 12)] {
        let mut h = FakeHeap::new(6 << 20);
        let (root, _) = scattered_value(&mut h, nodes, seed);
        let before = h.snapshot();
        let mut adopting = Adopting { allocs: 0 };
        // SAFETY: a well-formed value of the fake heap, which nothing else touches.
        let direct =
            unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut adopting) }
                .expect("copied by pass 1");
        assert!(direct.bytes > 8 << 20, "{nodes}: a copy beyond 4 MiB");
        assert_eq!(adopting.allocs, 0, "{nodes}: pass 1 wrote the copy");
        assert!(before == h.snapshot(), "{nodes}: source restored");
        let n = assert_isomorphic(&mut h, root, direct.root, direct.base as Word, direct.bytes);
        assert_eq!(n, direct.blocks);
        let mut counting = Counting::new();
        // SAFETY: as above.
        let two_pass =
            unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut counting) }
                .expect("copied in two passes");
        // SAFETY: as above.
        let shared = unsafe { copy::copy(root, &mut h, SideTable::new(), &mut counting) }
            .expect("copied from a snapshot");
        assert!(before == h.snapshot(), "{nodes}: source restored");
        let words = relative_words(&direct);
        assert!(
            words == relative_words(&two_pass),
            "{nodes}: pass 1 wrote what pass 2 writes"
        );
        assert!(
            words == relative_words(&shared),
            "{nodes}: the snapshot's copy is the same"
        );
        // SAFETY: each copy goes back to the allocator that made it.
        unsafe {
            adopting.free(direct.base, direct.bytes);
            counting.free(two_pass.base, two_pass.bytes);
            counting.free(shared.base, shared.bytes);
        }
    }
}

#[test]
fn errors_met_by_batches_leave_the_source_and_no_memory() {
    // The bad block hangs from one of the last nodes discovered, long after pass 1 went
    // on by batches, with pointers still waiting in its ring.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(6 << 20);
    let (root, last) = scattered_value(&mut h, 150_000, 13);
    let abs = h.block(layout::ABSTRACT_TAG, &[0x1234]);
    let foreign = h.foreign_custom();
    assert_refusals_leave_everything(&mut h, root, abs, foreign, &[false, true], |h, bad| {
        set_other(h, last, bad)
    });
}

#[test]
fn a_bigarray_met_by_batches_hands_the_copy_to_pass_2() {
    // Pass 1 stops writing in the middle of a batch, pointers waiting in its ring for
    // places in the reservation it gives back: pass 2 writes the whole copy.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(6 << 20);
    let (root, last) = scattered_value(&mut h, 150_000, 14);
    let data = h.data(4096, &mut Rng(15));
    let ba = h.bigarray_block(BIGARRAY_OPS.as_ptr() as Word, data, 0, 0, &[512]);
    set_other(&mut h, last, ba);
    let before = h.snapshot();
    for with_table in [false, true] {
        let mut adopting = Adopting { allocs: 0 };
        let c = copy_either(&mut h, root, with_table, &mut adopting).expect("copied");
        assert_eq!(adopting.allocs, 1, "the copy written by pass 2");
        assert!(before == h.snapshot(), "source restored");
        let n = assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
        assert_eq!(n + 1, c.blocks, "and the Bigarray's data block");
        // SAFETY: from this allocator, with this size.
        unsafe { adopting.free(c.base, c.bytes) };
    }
}

#[test]
fn a_prefix_in_front_of_the_copy_is_kept_and_freed_with_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(12 << 20);
    let root = big_value(&mut h, 200_000, 4);
    let prefix = 3 * WORD_BYTES;
    let mut prefixed = Prefixed {
        inner: Adopting { allocs: 0 },
        prefix,
    };
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let c = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut prefixed) }
        .expect("copied");
    assert_eq!(prefixed.inner.allocs, 0, "pass 1 wrote the copy");
    let start = c.base.wrapping_sub(prefix);
    assert_eq!(
        start as usize % offheap::alloc::HUGE_PAGE,
        0,
        "laid out as map_huge lays it"
    );
    // SAFETY: the prefix is the allocation's, writable.
    unsafe { start.write_bytes(0xAB, prefix) };
    assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
    // SAFETY: from this allocator, with this size.
    unsafe { prefixed.free(c.base, c.bytes) };
}

#[test]
fn errors_after_pass_1_began_writing_leave_the_source_and_no_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(12 << 20);
    let root = big_value(&mut h, 200_000, 5);
    let abs = h.block(layout::ABSTRACT_TAG, &[0x1234]);
    let foreign = h.foreign_custom();
    // The first record (copied last, as the cycle leads back to it) gets the bad block.
    let mut first = root;
    while h.field(first, 4) != root {
        first = h.field(first, 4);
    }
    assert_refusals_leave_everything(
        &mut h,
        root,
        abs,
        foreign,
        &[false, false, false],
        |h, bad| h.set(first, 5, bad),
    );
}

#[test]
fn a_copy_with_a_bigarray_is_written_by_pass_2() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = FakeHeap::new(12 << 20);
    let root = big_value(&mut h, 100_000, 6);
    let mut rng = Rng(9);
    let data = h.data(4096, &mut rng);
    let ba = h.bigarray_block(BIGARRAY_OPS.as_ptr() as Word, data, 0, 0, &[512]);
    let holder = h.block(0, &[root, ba]);
    for with_table in [false, true] {
        let mut adopting = Adopting { allocs: 0 };
        let c = copy_either(&mut h, holder, with_table, &mut adopting).expect("copied");
        assert_eq!(
            adopting.allocs, 1,
            "one allocation, the copy written by pass 2"
        );
        assert_isomorphic(&mut h, holder, c.root, c.base as Word, c.bytes);
        // SAFETY: from this allocator, with this size.
        unsafe { adopting.free(c.base, c.bytes) };
    }
}

/// The process's address space in KiB (`VmSize` in /proc/self/status).
fn vm_size_kb() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize")
}

/// The default allocator that, asked for memory, first lifts the limit on the process's
/// data (`RLIMIT_DATA`, which the commits of a reservation count against).
struct Lifting {
    allocs: usize,
}

impl Allocator for Lifting {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.allocs += 1;
        set_limit(libc::RLIMIT_DATA, libc::RLIM_INFINITY);
        Malloc.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: from `Malloc.alloc(bytes)`.
        unsafe { Malloc.free(ptr, bytes) }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        Some(0)
    }
}

/// Sets the process's soft limit on `resource` to `bytes`.
fn set_limit(resource: libc::__rlimit_resource_t, bytes: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(resource, &limit) }, 0);
}

/// The process's private writable memory in KiB (`VmData`).
fn vm_data_kb() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmData:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmData")
}

/// Pass 1 runs out of memory to commit in the middle of a copy of 73 MB (the limit on
/// data lets the reservation commit 64 MiB, not 96, and the queue's 15 MB fit besides):
/// it stops writing, and pass 2 writes the whole copy into memory from the allocator.
/// Run in a child process of its own, as the limit is the whole process's.
#[test]
fn pass_1_stops_writing_when_memory_cannot_be_committed() {
    if !in_child("pass_1_stops_writing_when_memory_cannot_be_committed") {
        return;
    }
    let mut h = FakeHeap::new(12 << 20);
    let root = big_value(&mut h, 400_000, 7);
    let mut adopting = Adopting { allocs: 0 };
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let unlimited = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut adopting) }
        .expect("copied by pass 1");
    assert_eq!(adopting.allocs, 0);
    assert!(unlimited.bytes > 64 << 20, "a copy larger than the limit");
    let before = h.snapshot();
    set_limit(
        libc::RLIMIT_DATA,
        ((vm_data_kb() << 10) + (88 << 20)) as libc::rlim_t,
    );
    let mut lifting = Lifting { allocs: 0 };
    // SAFETY: as above.
    let limited = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut lifting) };
    set_limit(libc::RLIMIT_DATA, libc::RLIM_INFINITY);
    let limited = limited.expect("copied in two passes");
    assert_eq!(lifting.allocs, 1, "the copy came from the allocator");
    assert!(before == h.snapshot(), "source restored");
    assert!(relative_words(&unlimited) == relative_words(&limited));
    assert_isomorphic(
        &mut h,
        root,
        limited.root,
        limited.base as Word,
        limited.bytes,
    );
    // SAFETY: each copy goes back to the allocator that made it.
    unsafe {
        adopting.free(unlimited.base, unlimited.bytes);
        lifting.free(limited.base, limited.bytes);
    }
}

/// Runs the test `name` again in a child process of its own, alone, when called from
/// the test itself (false: the child ran it and passed), and true in that child.
fn in_child(name: &str) -> bool {
    const CHILD: &str = "OFFHEAP_DIRECT_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .status()
        .expect("child test process");
    assert!(status.success(), "the child process failed: {status}");
    false
}

/// Under a limit on the address space that refuses 64 GiB and 8 GiB more (`ulimit -v`),
/// pass 1 still writes a large copy, into a reservation of 1 GiB. Run in a child
/// process of its own, as the limit is the whole process's.
#[test]
fn a_smaller_reservation_under_a_limit_on_address_space() {
    if !in_child("a_smaller_reservation_under_a_limit_on_address_space") {
        return;
    }
    let mut h = FakeHeap::new(12 << 20);
    let root = big_value(&mut h, 100_000, 8);
    set_limit(
        libc::RLIMIT_AS,
        ((vm_size_kb() << 10) + (4 << 30)) as libc::rlim_t,
    );
    let mut adopting = Adopting { allocs: 0 };
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let c = unsafe { copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut adopting) }
        .expect("copied");
    assert!(c.bytes > 8 << 20);
    assert_eq!(adopting.allocs, 0, "pass 1 wrote the copy");
    assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
    // SAFETY: from this allocator, with this size.
    unsafe { adopting.free(c.base, c.bytes) };
}

/// The default allocator as a custom allocator is: the copy is made in two passes.
struct TwoPasses;

impl Allocator for TwoPasses {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        Malloc.alloc(bytes)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: from `Malloc.alloc(bytes)`.
        unsafe { Malloc.free(ptr, bytes) }
    }
}

/// Whether a copy of `root` with `alloc` succeeds with the process's `resource` limited
/// to `limit` bytes (freed at once; any error other than out of memory fails the test).
fn fits_under(
    h: &mut FakeHeap,
    root: Word,
    resource: libc::__rlimit_resource_t,
    limit: usize,
    alloc: &mut impl Allocator,
) -> bool {
    set_limit(resource, limit as libc::rlim_t);
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let copied = unsafe { copy::copy(root, h, HeaderMarks::new(Color::C2), alloc) };
    set_limit(resource, libc::RLIM_INFINITY);
    match copied {
        Ok(c) => {
            // SAFETY: from this allocator, with this size.
            unsafe { alloc.free(c.base, c.bytes) };
            true
        }
        Err(e) => {
            assert!(e.is_out_of_memory(), "{e:?}");
            false
        }
    }
}

/// Under a limit on address space (`ulimit -v`) or on data (`RLIMIT_DATA`), a copy that
/// two passes make fits when pass 1 writes it too: the reservation (64 GiB of address
/// space, memory committed ahead) must never be what makes the traversal's own queue
/// fail to grow. Limits are tried in 2 MiB steps across the ranges where this could
/// happen: just above 64 GiB plus the queue for address space (the reservation is made
/// when the queue is small, the queue grows beside it), and from the two-pass peak (queue
/// and copy) to 24 MiB beyond it for data (the reservation commits up to 32 MiB
/// ahead). The value is a chain of 1.6 million one-field blocks, 25 MiB of copy and
/// 12 MiB of queue. Run in a child process of its own, as the limits are the process's.
#[test]
fn under_a_memory_limit_copies_fit_as_two_passes_do() {
    if !in_child("under_a_memory_limit_copies_fit_as_two_passes_do") {
        return;
    }
    let blocks = 1_600_000;
    let mut h = FakeHeap::new(2 * blocks + 16);
    let mut root = layout::val_int(0);
    for _ in 0..blocks {
        root = h.block(0, &[root]);
    }
    let before = h.snapshot();
    // SAFETY: a well-formed value of the fake heap, which nothing else touches.
    let unlimited = unsafe {
        copy::copy(
            root,
            &mut h,
            HeaderMarks::new(Color::C2),
            &mut Adopting { allocs: 0 },
        )
    }
    .expect("copied");
    let (copy_bytes, queue_bytes) = (unlimited.bytes, unlimited.transient_bytes);
    // SAFETY: from `Adopting`, with this size.
    unsafe { Adopting { allocs: 0 }.free(unlimited.base, unlimited.bytes) };
    const MIB: usize = 1 << 20;
    let ranges = [
        (
            libc::RLIMIT_AS,
            (vm_size_kb() << 10) + (64 << 30),
            (queue_bytes + 8 * MIB) / (2 * MIB),
        ),
        (
            libc::RLIMIT_DATA,
            (vm_data_kb() << 10) + copy_bytes + queue_bytes - 4 * MIB,
            14,
        ),
    ];
    for (resource, from, steps) in ranges {
        let mut two_pass_fits = 0;
        for step in 0..steps {
            let limit = from + step * 2 * MIB;
            if fits_under(&mut h, root, resource, limit, &mut TwoPasses) {
                two_pass_fits += 1;
                let mut adopting = Adopting { allocs: 0 };
                assert!(
                    fits_under(&mut h, root, resource, limit, &mut adopting),
                    "limit {resource}: {step} steps into the range: two passes fit, \
                     pass 1 writing did not"
                );
            }
        }
        assert!(two_pass_fits > 0, "limit {resource}: two passes never fit");
    }
    assert!(before == h.snapshot(), "source restored");
}
