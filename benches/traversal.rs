//! Criterion benchmarks of `offheap::copy::copy` on the fake heap.
//!
//! Five shapes of value, each copied with both visited strategies:
//! - `list_1m`: a list of 1M ints (long and thin: one pointer per block).
//! - `tree_200k`: a balanced binary tree of 200k records `{left; right; value: float}`.
//! - `strings_100k`: an array of 100k short strings (one wide block, many raw leaves).
//! - `float_array_1m`: one float array of 1M elements (one big raw block).
//! - `graph_100k`: 100k records of two edges each, in random order (a random cycle
//!   through all of them, so that all are reachable, plus one random edge each).
//!
//! What one iteration times, the same in every benchmark: a fresh visited set
//! (`HeaderMarks::new(C2)`, or `SideTable::with_capacity(0)` so that its growth is
//! counted), the copy with the default allocator, and freeing the copy (`Malloc.free`).
//! Allocation and free are part of the timed closure: copies of 4 MiB and more come from
//! fresh huge-page mappings, so their page faults are part of the cost, as in real use.
//! Throughput is the size of the copy in bytes.
//!
//! Run with `cargo bench --bench traversal` (about a minute), or add `-- --quick`.

#[path = "../tests/fake_heap/mod.rs"]
mod fake_heap;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fake_heap::{FakeHeap, Rng};
use offheap::alloc::{Allocator, Malloc};
use offheap::copy::visited::{HeaderMarks, SideTable, VisitedSet};
use offheap::copy::{self, Copied};
use offheap::layout::{self, Color, Word, DOUBLE_ARRAY_TAG};

/// Copies `root` with `visited` and the default allocator.
fn copy_with<V: VisitedSet>(h: &mut FakeHeap, root: Word, visited: V) -> Copied {
    // SAFETY: every root is a value of `h` built by the workloads below (well formed
    // blocks), and nothing else touches the fake heap while the benchmark runs.
    unsafe { copy::copy(root, h, visited, &mut Malloc) }.expect("the workloads copy")
}

/// One timed iteration: a fresh visited set, the copy, the free.
fn copy_and_free(h: &mut FakeHeap, root: Word, marks: bool) -> usize {
    let c = if marks {
        copy_with(h, root, HeaderMarks::new(Color::C2))
    } else {
        copy_with(h, root, SideTable::with_capacity(0))
    };
    // SAFETY: `base`/`bytes` came from `Malloc` in `copy_with`; nothing uses the copy.
    unsafe { Malloc.free(c.base, c.bytes) };
    c.blocks
}

/// Benchmarks the copy of `root` in `h` with both strategies, as group `name`.
fn bench_value(c: &mut Criterion, name: &str, mut h: FakeHeap, root: Word) {
    let probe = copy_with(&mut h, root, HeaderMarks::new(Color::C2));
    // SAFETY: `base`/`bytes` came from `Malloc`; the probe copy is not used.
    unsafe { Malloc.free(probe.base, probe.bytes) };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(probe.bytes as u64));
    for (strategy, marks) in [("header_marks", true), ("side_table", false)] {
        group.bench_function(strategy, |b| {
            b.iter(|| {
                let blocks = copy_and_free(&mut h, black_box(root), marks);
                debug_assert_eq!(blocks, probe.blocks);
                blocks
            })
        });
    }
    group.finish();
}

fn list_1m(c: &mut Criterion) {
    let n = 1_000_000;
    let mut h = FakeHeap::new(3 * n + 16);
    let mut list = layout::val_int(0);
    for i in (0..n as isize).rev() {
        list = h.block(0, &[layout::val_int(i), list]);
    }
    bench_value(c, "list_1m", h, list);
}

/// A balanced tree of `n` records `{left; right; value}`, `value` a boxed float.
fn tree(h: &mut FakeHeap, n: usize, next: &mut f64) -> Word {
    if n == 0 {
        return layout::val_int(0);
    }
    let left = tree(h, (n - 1) / 2, next);
    let right = tree(h, n - 1 - (n - 1) / 2, next);
    *next += 1.0;
    let value = h.float(*next);
    h.block(0, &[left, right, value])
}

fn tree_200k(c: &mut Criterion) {
    let n = 200_000;
    let mut h = FakeHeap::new(6 * n + 16);
    let root = tree(&mut h, n, &mut 0.0);
    bench_value(c, "tree_200k", h, root);
}

fn strings_100k(c: &mut Criterion) {
    let n = 100_000;
    let mut h = FakeHeap::new(4 * n + n + 16);
    let mut rng = Rng(7);
    let strings: Vec<Word> = (0..n)
        .map(|i| {
            let len = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect();
            h.string(&bytes)
        })
        .collect();
    let array = h.block(0, &strings);
    bench_value(c, "strings_100k", h, array);
}

fn float_array_1m(c: &mut Criterion) {
    let n = 1_000_000;
    let mut h = FakeHeap::new(n + 16);
    let raw: Vec<Word> = (0..n).map(|i| (i as f64 * 0.5).to_bits() as Word).collect();
    let array = h.block(DOUBLE_ARRAY_TAG, &raw);
    bench_value(c, "float_array_1m", h, array);
}

fn graph_100k(c: &mut Criterion) {
    let n = 100_000;
    let mut h = FakeHeap::new(3 * n + 16);
    let mut rng = Rng(42);
    let nodes: Vec<Word> = (0..n)
        .map(|_| h.block(0, &[layout::val_int(0); 2]))
        .collect();
    // A random order of all nodes; each points to the next in it (a cycle through all)
    // and to one node at random.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for k in 0..n {
        let (from, to) = (nodes[order[k]], nodes[order[(k + 1) % n]]);
        h.set(from, 0, to);
        h.set(from, 1, nodes[rng.below(n)]);
    }
    bench_value(c, "graph_100k", h, nodes[order[0]]);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = list_1m, tree_200k, strings_100k, float_array_1m, graph_100k
}
criterion_main!(benches);
