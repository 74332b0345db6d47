//! Property tests: random graphs of blocks of every kind, with sharing, cycles, infix
//! pointers, static blocks and immediates, copied from a random root with both visited
//! strategies.
//!
//! The expected outcome is computed from the generated description alone (not from the
//! fake heap's memory): which nodes are reachable through copied blocks, their total size,
//! and whether an abstract or foreign custom block is among them. The copy must then
//! either succeed, be isomorphic to the source and have exactly that size, or fail with
//! the matching error; in both cases the source is byte-identical afterwards and the
//! allocator holds nothing once the copy is freed.

mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::{HeaderMarks, MarksOutside, SideTable};
use offheap::copy::{self, Copied, CopyError};
use offheap::layout::{self, Color, Word, WORD_BYTES};
use proptest::collection::vec;
use proptest::prelude::*;

/// A value in a field: an immediate, or a pointer to node `node` (modulo the number of
/// nodes), to its function `function` (modulo its number of functions) if it is a closure.
#[derive(Clone, Copy, Debug)]
enum Edge {
    Imm(i32),
    Node { node: usize, function: usize },
}

/// A raw word: random bits, or the address of a node (raw data that looks like a pointer
/// and must not be followed).
#[derive(Clone, Copy, Debug)]
enum Raw {
    Bits(u64),
    AddressOf(usize),
}

#[derive(Clone, Debug)]
enum Kind {
    /// A tuple, record or constructor with arguments.
    Tuple {
        tag: u8,
        fields: Vec<Edge>,
    },
    Str(Vec<u8>),
    Float(Raw),
    FloatArray(Vec<Raw>),
    Int64(Raw),
    /// A closure block of `functions` functions (infix headers after the first), whose
    /// code pointers all hold `code` (raw: never followed, even when it looks like a
    /// pointer into the heap).
    Closure {
        functions: usize,
        env: Vec<Edge>,
        code: Raw,
    },
    /// A block of the static area (copied only with `copy_static`).
    Static {
        tag: u8,
        fields: Vec<Edge>,
    },
    Abstract(Vec<Raw>),
    Foreign,
}

impl Kind {
    /// Size in words, header included.
    fn whsize(&self) -> usize {
        1 + match self {
            Kind::Tuple { fields, .. } | Kind::Static { fields, .. } => fields.len(),
            Kind::Str(bytes) => bytes.len() / WORD_BYTES + 1,
            Kind::Float(_) => 1,
            Kind::FloatArray(raw) | Kind::Abstract(raw) => raw.len(),
            Kind::Int64(_) | Kind::Foreign => 2,
            Kind::Closure { functions, env, .. } => 2 + 3 * (functions - 1) + env.len(),
        }
    }

    /// The fields that hold values (followed when the block is copied).
    fn edges(&self) -> &[Edge] {
        match self {
            Kind::Tuple { fields, .. } | Kind::Static { fields, .. } => fields,
            Kind::Closure { env, .. } => env,
            _ => &[],
        }
    }
}

#[derive(Clone, Debug)]
struct Graph {
    nodes: Vec<Kind>,
    root: Edge,
    copy_static: bool,
}

fn edge() -> impl Strategy<Value = Edge> {
    prop_oneof![
        1 => any::<i32>().prop_map(Edge::Imm),
        4 => (0usize..1000, 0usize..3).prop_map(|(node, function)| Edge::Node { node, function }),
    ]
}

fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        4 => any::<u64>().prop_map(Raw::Bits),
        1 => (0usize..1000).prop_map(Raw::AddressOf),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        76 => copyable_kind(),
        1 => vec(raw(), 1..=3).prop_map(Kind::Abstract),
        1 => Just(Kind::Foreign),
    ]
}

/// The kinds of block of large graphs: copyable ones, mostly blocks of several fields so
/// that most of the graph is reachable.
fn large_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        2 => (0u8..244, vec(edge(), 2..=6)).prop_map(|(tag, fields)| Kind::Tuple { tag, fields }),
        1 => copyable_kind(),
    ]
}

/// The kinds of block that copy: large graphs are made of these alone (a few hundred
/// nodes would almost always reach an abstract or foreign one).
fn copyable_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        30 => (0u8..244, vec(edge(), 1..=6)).prop_map(|(tag, fields)| Kind::Tuple { tag, fields }),
        10 => vec(any::<u8>(), 0..=24).prop_map(Kind::Str),
        6 => raw().prop_map(Kind::Float),
        6 => vec(raw(), 1..=5).prop_map(Kind::FloatArray),
        6 => raw().prop_map(Kind::Int64),
        12 => (1usize..=3, vec(edge(), 0..=4), raw()).prop_map(|(functions, env, code)| Kind::Closure { functions, env, code }),
        6 => (0u8..244, vec(edge(), 1..=4)).prop_map(|(tag, fields)| Kind::Static { tag, fields }),
    ]
}

fn graph() -> impl Strategy<Value = Graph> {
    // Mostly a few dozen nodes, some hundreds: the path of small values on the stack and
    // in its own buffers, with blocks told apart one by one or through its index.
    let nodes = prop_oneof![4 => vec(kind(), 1..=40), 1 => vec(large_kind(), 200..=500)];
    (nodes, edge(), any::<bool>()).prop_map(|(nodes, root, copy_static)| Graph {
        nodes,
        root,
        copy_static,
    })
}

/// The shapes of the shallow path (`copy::shallow`): a root block of up to one field
/// more than the path takes, whose fields lead mostly to raw blocks (some shared, some
/// to the root itself, some to static blocks), now and then to a block the path leaves
/// to the walk (a tuple, an abstract or foreign block); or a raw root. Strings long
/// enough to pass the path's limit of words.
fn shallow_graph() -> impl Strategy<Value = Graph> {
    let child = prop_oneof![
        10 => vec(any::<u8>(), 0..=1100).prop_map(Kind::Str),
        4 => raw().prop_map(Kind::Float),
        3 => vec(raw(), 1..=5).prop_map(Kind::FloatArray),
        3 => raw().prop_map(Kind::Int64),
        2 => (0u8..244, vec(edge(), 1..=3)).prop_map(|(tag, fields)| Kind::Static { tag, fields }),
        1 => (0u8..244, vec(edge(), 1..=3)).prop_map(|(tag, fields)| Kind::Tuple { tag, fields }),
        1 => vec(raw(), 1..=3).prop_map(Kind::Abstract),
        1 => Just(Kind::Foreign),
    ];
    let field = prop_oneof![
        1 => any::<i32>().prop_map(Edge::Imm),
        4 => (0usize..12).prop_map(|node| Edge::Node { node, function: 0 }),
    ];
    let fields = vec(field, 1..=copy::shallow::MAX_FIELDS + 1);
    (0u8..244, fields, vec(child, 1..=11), any::<bool>(), 0u8..8).prop_map(
        |(tag, fields, children, copy_static, pick)| {
            let mut nodes = vec![Kind::Tuple { tag, fields }];
            nodes.extend(children);
            // Mostly the tuple; now and then its first child as the root.
            let root = Edge::Node {
                node: usize::from(pick == 0),
                function: 0,
            };
            Graph {
                nodes,
                root,
                copy_static,
            }
        },
    )
}

/// Whether the shallow path copies `g`: its root is a raw block, or a tuple of at most
/// `MAX_FIELDS` fields whose copied children are raw; all within the stack's words.
fn shallow_takes(g: &Graph) -> bool {
    let Edge::Node { node, .. } = g.root else {
        return false;
    };
    let n = g.nodes.len();
    let raw = |k: &Kind| {
        matches!(
            k,
            Kind::Str(_) | Kind::Float(_) | Kind::FloatArray(_) | Kind::Int64(_)
        )
    };
    let copied = |i: usize| !matches!(g.nodes[i], Kind::Static { .. }) || g.copy_static;
    let root = &g.nodes[node % n];
    let e = expected(g);
    let fits = e.words <= copy::small::MAX_WORDS;
    match root {
        Kind::Tuple { fields, .. } if fields.len() <= copy::shallow::MAX_FIELDS => {
            fits && fields.iter().all(|f| match *f {
                Edge::Imm(_) => true,
                Edge::Node { node: j, .. } => {
                    let j = j % n;
                    j == node % n || !copied(j) || raw(&g.nodes[j])
                }
            })
        }
        k => fits && raw(k),
    }
}

/// What a copy of `g` must do, from the description alone.
#[derive(Debug, Default)]
struct Expected {
    /// Distinct copied blocks reachable from the root, and their size in words.
    blocks: usize,
    words: usize,
    abstract_reachable: bool,
    foreign_reachable: bool,
}

fn expected(g: &Graph) -> Expected {
    let n = g.nodes.len();
    let copied = |i: usize| !matches!(g.nodes[i], Kind::Static { .. }) || g.copy_static;
    let mut e = Expected::default();
    let mut seen = vec![false; n];
    let mut stack = vec![g.root];
    while let Some(edge) = stack.pop() {
        let Edge::Node { node, .. } = edge else {
            continue;
        };
        let i = node % n;
        if !copied(i) || seen[i] {
            continue;
        }
        seen[i] = true;
        e.blocks += 1;
        e.words += g.nodes[i].whsize();
        match g.nodes[i] {
            Kind::Abstract(_) => e.abstract_reachable = true,
            Kind::Foreign => e.foreign_reachable = true,
            _ => {}
        }
        stack.extend_from_slice(g.nodes[i].edges());
    }
    e
}

/// The fake heap holding `g`, and for each node its values (one per function for a
/// closure, else one).
fn build(g: &Graph) -> (FakeHeap, Vec<Vec<Word>>) {
    let words: usize = g.nodes.iter().map(Kind::whsize).sum();
    let mut h = FakeHeap::new(words + 16);
    h.copy_static = g.copy_static;
    // First every block, with placeholder fields, so that edges can point anywhere.
    let zero = layout::val_int(0);
    let values: Vec<Vec<Word>> = g
        .nodes
        .iter()
        .map(|k| match k {
            Kind::Tuple { tag, fields } => vec![h.block(*tag, &vec![zero; fields.len()])],
            Kind::Static { tag, fields } => vec![h.static_block(*tag, &vec![zero; fields.len()])],
            Kind::Str(bytes) => vec![h.string(bytes)],
            Kind::Float(_) => vec![h.block(layout::DOUBLE_TAG, &[0])],
            Kind::FloatArray(raw) => vec![h.block(layout::DOUBLE_ARRAY_TAG, &vec![0; raw.len()])],
            Kind::Int64(_) => vec![h.int64(0)],
            Kind::Closure { functions, env, .. } => {
                h.closure(&vec![1; *functions], &vec![zero; env.len()])
            }
            Kind::Abstract(raw) => vec![h.block(layout::ABSTRACT_TAG, &vec![0; raw.len()])],
            Kind::Foreign => vec![h.foreign_custom()],
        })
        .collect();
    let n = g.nodes.len();
    let value = |e: Edge| match e {
        Edge::Imm(x) => layout::val_int(x as isize),
        Edge::Node { node, function } => {
            let fns = &values[node % n];
            fns[function % fns.len()]
        }
    };
    let bits = |r: Raw| match r {
        Raw::Bits(b) => b as Word,
        Raw::AddressOf(node) => values[node % n][0],
    };
    for (k, v) in g.nodes.iter().zip(&values) {
        let v = v[0];
        match k {
            Kind::Tuple { fields, .. } | Kind::Static { fields, .. } => {
                for (i, &e) in fields.iter().enumerate() {
                    h.set(v, i, value(e));
                }
            }
            Kind::Closure {
                functions,
                env,
                code,
            } => {
                let start = 2 + 3 * (functions - 1);
                assert_eq!(layout::start_env(h.field(v, 1)), start);
                // Code pointers: field 0, then the field after each infix header.
                for f in 0..*functions {
                    h.set(v, 3 * f, bits(*code));
                }
                for (i, &e) in env.iter().enumerate() {
                    h.set(v, start + i, value(e));
                }
            }
            Kind::Float(r) | Kind::Int64(r) => {
                let i = matches!(k, Kind::Int64(_)) as usize;
                h.set(v, i, bits(*r));
            }
            Kind::FloatArray(raw) | Kind::Abstract(raw) => {
                for (i, &r) in raw.iter().enumerate() {
                    h.set(v, i, bits(r));
                }
            }
            Kind::Str(_) | Kind::Foreign => {}
        }
    }
    (h, values)
}

/// A visited set of the tests.
#[derive(Clone, Copy, Debug)]
enum Set {
    Marks,
    Table,
    /// OCaml 5's, with the heap's blocks (all of color 0, as OCaml 5's young blocks) in
    /// its young range: the lower half of the heap, marked in color 2 above it; or all
    /// of the heap, the others' mark color being 0, the color of every block of the heap
    /// (the minor heap's blocks when the GC's mark color is 0).
    Young {
        all: bool,
    },
}

/// A copy of `root` with the visited set `set`, by `copy` (which takes the path of
/// small values when it applies) or by the general traversal alone (`general`).
fn copy_with(
    h: &mut FakeHeap,
    root: Word,
    set: Set,
    general: bool,
    alloc: &mut Counting,
) -> Result<Copied, CopyError> {
    let (start, end) = h.heap_range();
    let young = |all: bool| {
        let (mark, end) = if all {
            (Color::C0, end)
        } else {
            (Color::C2, start + (end - start) / 2)
        };
        MarksOutside::new(mark, (start - WORD_BYTES, end))
    };
    // SAFETY: `root` is a value of `h`, whose blocks `build` laid out well formed, and
    // nothing else touches the fake heap during the call.
    unsafe {
        match (set, general) {
            (Set::Marks, false) => copy::copy(root, h, HeaderMarks::new(Color::C2), alloc),
            (Set::Table, false) => copy::copy(root, h, SideTable::with_capacity(0), alloc),
            (Set::Young { all }, false) => copy::copy(root, h, young(all), alloc),
            (Set::Marks, true) => copy::traverse(root, h, HeaderMarks::new(Color::C2), alloc),
            (Set::Table, true) => copy::traverse(root, h, SideTable::with_capacity(0), alloc),
            (Set::Young { all }, true) => copy::traverse(root, h, young(all), alloc),
        }
    }
}

/// An [`copy::Output`] into a vector, for a copy made as if at [`VecOutput::BASE`].
struct VecOutput {
    words: Vec<Word>,
    next: usize,
}

impl VecOutput {
    const BASE: Word = 0x7000_0000_0000;
}

impl copy::Output for VecOutput {
    fn begin(&mut self, bytes: usize) -> Result<Word, CopyError> {
        self.words = vec![0; bytes / WORD_BYTES];
        Ok(Self::BASE)
    }

    fn next(&mut self, words: usize) -> *mut Word {
        let run = self.words[self.next..self.next + words].as_mut_ptr();
        self.next += words;
        run
    }
}

/// The words of the copy of `root` and what was written, by `copy_into` (which takes
/// the path of small values when it applies) or by the general traversal alone.
fn copy_words(
    h: &mut FakeHeap,
    root: Word,
    general: bool,
) -> Result<(Vec<Word>, copy::Written), CopyError> {
    let mut out = VecOutput {
        words: Vec::new(),
        next: 0,
    };
    // SAFETY: as in `copy_with`.
    let written = unsafe {
        if general {
            copy::traverse_into(root, h, HeaderMarks::new(Color::C2), &mut out)
        } else {
            copy::copy_into(root, h, HeaderMarks::new(Color::C2), &mut out)
        }
    }?;
    assert_eq!(out.next, out.words.len(), "the whole copy written");
    Ok((out.words, written))
}

/// The path of small values and the general traversal give the same bytes, or the same
/// error.
fn check_paths_agree(h: &mut FakeHeap, root: Word) -> Result<(), TestCaseError> {
    let before = h.snapshot();
    let either = copy_words(h, root, false);
    let general = copy_words(h, root, true);
    prop_assert!(before == h.snapshot(), "source changed");
    match (either, general) {
        (Ok((a, wa)), Ok((b, wb))) => {
            prop_assert_eq!(
                (wa.root, wa.bytes, wa.blocks),
                (wb.root, wb.bytes, wb.blocks)
            );
            prop_assert!(a == b, "the two paths wrote different copies");
        }
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        (a, b) => prop_assert!(false, "one path failed: {:?} / {:?}", a.err(), b.err()),
    }
    Ok(())
}

/// Copies the root of `g` with both strategies and checks the outcome against `expected`.
fn check(g: &Graph) -> Result<(), TestCaseError> {
    let e = expected(g);
    let (mut h, values) = build(g);
    let n = g.nodes.len();
    let root = match g.root {
        Edge::Imm(x) => layout::val_int(x as isize),
        Edge::Node { node, function } => {
            let fns = &values[node % n];
            fns[function % fns.len()]
        }
    };
    let sets = [
        Set::Marks,
        Set::Table,
        Set::Young { all: false },
        Set::Young { all: true },
    ];
    for (set, general) in sets.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let what = format!(
            "{set:?}{}",
            if general { ", general traversal" } else { "" }
        );
        let what = what.as_str();
        let before = h.snapshot();
        let mut alloc = Counting::new();
        let outcome = copy_with(&mut h, root, set, general, &mut alloc);
        prop_assert!(
            before == h.snapshot(),
            "{}: source changed ({:?})",
            what,
            outcome
        );
        match outcome {
            Err(err) => {
                let expected_err = match &err {
                    CopyError::Abstract => e.abstract_reachable,
                    CopyError::Custom(name) => e.foreign_reachable && name == "_bigarr02",
                    _ => false,
                };
                prop_assert!(
                    expected_err,
                    "{}: unexpected {:?}; expected {:?}",
                    what,
                    err,
                    e
                );
                prop_assert!(
                    alloc.allocs.is_empty(),
                    "{}: allocated before failing",
                    what
                );
            }
            Ok(c) => {
                prop_assert!(
                    !e.abstract_reachable && !e.foreign_reachable,
                    "{}: copied; expected {:?}",
                    what,
                    e
                );
                prop_assert_eq!(c.blocks, e.blocks, "{}: blocks", what);
                if e.blocks == 0 {
                    prop_assert_eq!(c.root, root, "{}: nothing to copy, root kept", what);
                    prop_assert!(c.base.is_null() && c.bytes == 0, "{}", what);
                    prop_assert!(alloc.allocs.is_empty(), "{}: allocated for nothing", what);
                } else {
                    prop_assert_eq!(
                        &alloc.allocs,
                        &[e.words * WORD_BYTES],
                        "{}: one allocation",
                        what
                    );
                    prop_assert_eq!(c.bytes, e.words * WORD_BYTES, "{}: bytes", what);
                    let copied = assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
                    prop_assert_eq!(copied, e.blocks, "{}: blocks in the copy", what);
                    // SAFETY: `base`/`bytes` came from `alloc`; the copy is not used again.
                    unsafe { alloc.free(c.base, c.bytes) };
                }
            }
        }
        prop_assert!(alloc.live.is_empty(), "{}: leaked {:?}", what, alloc.live);
    }
    check_paths_agree(&mut h, root)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_copy_or_fail_cleanly(g in graph()) {
        check(&g)?;
    }

    #[test]
    fn shallow_shapes_copy_or_fail_cleanly(g in shallow_graph()) {
        check(&g)?;
    }
}

/// The generator of shallow shapes gives values that the shallow path copies and values
/// it leaves to the walk (a guard against a strategy that tests nothing).
#[test]
fn shallow_generator_covers_both_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut taken, mut left, mut errors) = (0, 0, 0);
    for _ in 0..512 {
        let g = shallow_graph().new_tree(&mut runner).unwrap().current();
        let e = expected(&g);
        if e.abstract_reachable || e.foreign_reachable {
            errors += 1;
        } else if shallow_takes(&g) {
            taken += 1;
        } else {
            left += 1;
        }
        check(&g).unwrap();
    }
    for (what, count) in [
        ("taken", taken),
        ("left to the walk", left),
        ("errors", errors),
    ] {
        assert!(count >= 25, "only {count} {what} cases in 512");
    }
}

/// The generator reaches every outcome: success, abstract and foreign errors, nothing to
/// copy, and copies with static blocks (a guard against a strategy that tests nothing).
#[test]
fn generator_covers_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut ok, mut abs, mut foreign, mut nothing, mut statics, mut infix_roots) =
        (0, 0, 0, 0, 0, 0);
    let (mut small, mut indexed) = (0, 0);
    for _ in 0..512 {
        let g = graph().new_tree(&mut runner).unwrap().current();
        let e = expected(&g);
        match (e.blocks, e.abstract_reachable, e.foreign_reachable) {
            (0, ..) => nothing += 1,
            (_, true, _) => abs += 1,
            (_, _, true) => foreign += 1,
            _ => ok += 1,
        }
        // Copies by the path of small values: on the stack, in its own buffers (the general
        // traversal copies every graph too, see `check`).
        if e.blocks > 0 && !e.abstract_reachable && !e.foreign_reachable {
            if e.blocks <= copy::small::MAX_BLOCKS && e.words <= copy::small::MAX_WORDS {
                small += 1;
            } else if e.blocks <= copy::small::LARGE_MAX_BLOCKS {
                indexed += 1;
            }
        }
        statics +=
            (g.copy_static && g.nodes.iter().any(|k| matches!(k, Kind::Static { .. }))) as usize;
        if let Edge::Node { node, function } = g.root {
            if let Kind::Closure { functions, .. } = g.nodes[node % g.nodes.len()] {
                infix_roots += (function % functions != 0) as usize;
            }
        }
        check(&g).unwrap();
    }
    for (what, count) in [
        ("ok", ok),
        ("abstract", abs),
        ("foreign", foreign),
        ("nothing", nothing),
        ("static", statics),
        ("infix root", infix_roots),
        ("on the stack", small),
        ("own buffers", indexed),
    ] {
        assert!(count >= 5, "only {count} {what} cases in 512");
    }
}
