//! A fake OCaml heap: Rust memory laid out as OCaml blocks, with a [`Heap`] classifier
//! that says which ranges are "heap" (copied) and which are "static" (shared).
//!
//! Shared by the Rust tests and the criterion benches (`#[path]`-included).
#![allow(dead_code)]

use std::collections::HashMap;

use offheap::alloc::{Allocator, Malloc};
use offheap::copy::Heap;
use offheap::layout::{self, Color, Header, Word, WORD_BYTES};

/// Operations "pointers" of the fake custom blocks: the addresses of these statics.
pub static INT64_OPS: [u8; 16] = *b"_j\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
/// Stands for a custom block that cannot be copied (a bigarray, say).
pub static FOREIGN_OPS: [u8; 16] = *b"_bigarr02\0\0\0\0\0\0\0";
/// The fake `caml_ba_ops`: what every Bigarray's copy gets.
pub static BIGARRAY_OPS: [u8; 16] = *b"_bigarr02\0fake\0\0";
/// Stands for the unix library's operations of mapped Bigarrays (another finaliser).
pub static MAPPED_OPS: [u8; 16] = *b"_bigarray\0fake\0\0";

/// One arena of words; blocks are bump-allocated and never move.
pub struct Arena {
    words: Box<[Word]>,
    used: usize,
}

impl Arena {
    fn new(capacity: usize) -> Arena {
        Arena {
            words: vec![0; capacity].into_boxed_slice(),
            used: 0,
        }
    }

    fn start(&self) -> Word {
        self.words.as_ptr() as Word
    }

    fn end(&self) -> Word {
        self.start() + self.words.len() * WORD_BYTES
    }

    fn contains(&self, v: Word) -> bool {
        v > self.start() && v < self.end()
    }

    /// A block of `wosize` zero fields with this header; returns the value.
    fn alloc(&mut self, hd: Header) -> Word {
        let whsize = hd.whsize();
        assert!(self.used + whsize <= self.words.len(), "fake arena full");
        self.words[self.used] = hd.0;
        let v = self.start() + (self.used + 1) * WORD_BYTES;
        self.used += whsize;
        v
    }
}

/// A fake heap with a "heap" arena (copied) and a "static" arena (not copied).
pub struct FakeHeap {
    pub heap: Arena,
    pub statics: Arena,
    /// Whether static blocks are copied too (`copy_static`).
    pub copy_static: bool,
    /// Whether tags 244/245 are OCaml 5 special tags.
    pub ocaml5_tags: bool,
    /// Data of the Bigarrays made by [`FakeHeap::data`]: C memory, outside both arenas.
    pub buffers: Vec<Box<[u64]>>,
}

impl FakeHeap {
    /// A heap of `words` words and a static area of 4096 words.
    pub fn new(words: usize) -> FakeHeap {
        FakeHeap {
            heap: Arena::new(words),
            statics: Arena::new(4096),
            copy_static: false,
            ocaml5_tags: false,
            buffers: Vec::new(),
        }
    }

    /// The heap arena's bounds, `(start, end)`.
    pub fn heap_range(&self) -> (Word, Word) {
        (self.heap.start(), self.heap.end())
    }

    /// A block with these fields (values or raw words), in the heap.
    pub fn block(&mut self, tag: u8, fields: &[Word]) -> Word {
        let v = self.heap.alloc(Header::new(fields.len(), Color::C0, tag));
        for (i, &f) in fields.iter().enumerate() {
            self.set(v, i, f);
        }
        v
    }

    /// A block with these fields in the static area.
    pub fn static_block(&mut self, tag: u8, fields: &[Word]) -> Word {
        let v = self
            .statics
            .alloc(Header::new(fields.len(), Color::Unmarkable, tag));
        for (i, &f) in fields.iter().enumerate() {
            self.set(v, i, f);
        }
        v
    }

    /// An OCaml string.
    pub fn string(&mut self, s: &[u8]) -> Word {
        let wosize = (s.len() + WORD_BYTES) / WORD_BYTES;
        let v = self
            .heap
            .alloc(Header::new(wosize, Color::C0, layout::STRING_TAG));
        // SAFETY: the block has wosize words of room.
        unsafe {
            let bytes = v as *mut u8;
            std::ptr::copy_nonoverlapping(s.as_ptr(), bytes, s.len());
            let last = wosize * WORD_BYTES - 1;
            *bytes.add(last) = (last - s.len()) as u8;
        }
        v
    }

    /// A boxed float.
    pub fn float(&mut self, x: f64) -> Word {
        self.block(layout::DOUBLE_TAG, &[x.to_bits() as Word])
    }

    /// A flat float array.
    pub fn float_array(&mut self, xs: &[f64]) -> Word {
        let raw: Vec<Word> = xs.iter().map(|x| x.to_bits() as Word).collect();
        self.block(layout::DOUBLE_ARRAY_TAG, &raw)
    }

    /// A boxed Int64 (custom block with the copyable fake ops).
    pub fn int64(&mut self, n: i64) -> Word {
        self.block(layout::CUSTOM_TAG, &[INT64_OPS.as_ptr() as Word, n as Word])
    }

    /// `bytes` bytes of Bigarray data outside the heap, every byte from `rng`; returns
    /// its address (16-byte aligned, as malloc's).
    pub fn data(&mut self, bytes: usize, rng: &mut Rng) -> Word {
        let mut buffer = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        for w in buffer.iter_mut() {
            *w = rng.next();
        }
        let at = buffer.as_ptr() as Word;
        self.buffers.push(buffer);
        at
    }

    /// A Bigarray custom block laid out as `struct caml_ba_array`: operations `ops`,
    /// data at `data`, flags `flags`, proxy `proxy`, dimensions `dims`.
    pub fn bigarray_block(
        &mut self,
        ops: Word,
        data: Word,
        flags: Word,
        proxy: Word,
        dims: &[usize],
    ) -> Word {
        let mut fields = vec![ops, data, dims.len(), flags, proxy];
        fields.extend_from_slice(dims);
        self.block(layout::CUSTOM_TAG, &fields)
    }

    /// The bytes of a Bigarray: its data pointer and length (by [`offheap::bigarray::read`]).
    pub fn bigarray_bytes(&self, v: Word, ocaml5: bool) -> (Word, usize) {
        // SAFETY: `v` is a custom block with its header before it.
        let n = unsafe { layout::read_header(v) }.wosize();
        // SAFETY: `n` readable fields.
        let fields = unsafe { std::slice::from_raw_parts(v as *const Word, n) };
        let d = offheap::bigarray::read(fields, ocaml5).expect("a well-formed Bigarray");
        (d.start, d.bytes)
    }

    /// A custom block that cannot be copied.
    pub fn foreign_custom(&mut self) -> Word {
        self.block(layout::CUSTOM_TAG, &[FOREIGN_OPS.as_ptr() as Word, 0xdead])
    }

    /// A closure block holding `functions` (each one's arity) followed by `env` values.
    /// Functions after the first get an infix header; returns the pointers to each
    /// function (the block itself, then the infix pointers).
    pub fn closure(&mut self, arities: &[u8], env: &[Word]) -> Vec<Word> {
        assert!(!arities.is_empty());
        // Layout per function: [code, closinfo] for the first, [infix hd, code, closinfo]
        // for the others (arity > 1 would add a second code pointer; kept to 2 words).
        let code_words = 2 + 3 * (arities.len() - 1);
        let wosize = code_words + env.len();
        let v = self
            .heap
            .alloc(Header::new(wosize, Color::C0, layout::CLOSURE_TAG));
        let mut fns = vec![v];
        let mut i = 0;
        for (k, &arity) in arities.iter().enumerate() {
            if k > 0 {
                self.set(v, i, Header::new(i + 1, Color::C0, layout::INFIX_TAG).0);
                i += 1;
                fns.push(v + i * WORD_BYTES);
            }
            self.set(v, i, 0x4000_0000 + k * 16); // a fake code pointer (even: looks like a pointer)
            self.set(v, i + 1, layout::make_closinfo(arity, code_words - i));
            i += 2;
        }
        for (j, &e) in env.iter().enumerate() {
            self.set(v, code_words + j, e);
        }
        fns
    }

    /// A hash table's buckets: an array of `n` chains of 1 to 3 cells `[key, next or
    /// (), label]`, each key a string of `key_bytes` bytes that starts with its own
    /// label in decimal (then NULs), and a last field holding a label. The chains are
    /// allocated one after the other; with `scattered`, the array holds their heads in
    /// random order, so that the cells it leads to lie far apart, as a hash table's do.
    /// [`bucket_label`] reads the labels back.
    pub fn buckets(&mut self, rng: &mut Rng, n: usize, key_bytes: usize, scattered: bool) -> Word {
        let mut label = 0isize;
        let mut heads = Vec::new();
        for _ in 0..n {
            let mut next = layout::val_int(0);
            for _ in 0..1 + rng.below(3) {
                label += 1;
                let mut key = format!("{label}").into_bytes();
                key.resize(key_bytes.max(key.len()), 0);
                let key = self.string(&key);
                label += 1;
                next = self.block(0, &[key, next, layout::val_int(label)]);
            }
            heads.push(next);
        }
        if scattered {
            for i in (1..heads.len()).rev() {
                heads.swap(i, rng.below(i + 1));
            }
        }
        heads.push(layout::val_int(label + 1));
        self.block(0, &heads)
    }

    /// A balanced binary tree of `n` nodes `[children..., extra..., label]`: a node's
    /// 0 to 2 children, the fields `extra` makes for it (made just before the node, so
    /// that they lie beside it), then its in-order index as an immediate. With
    /// `scattered` the nodes are made in random order, so that a node lies far from its
    /// children, as in a `Map` of random keys; else in depth-first order (each node
    /// before its children, left subtree first), as a tree built depth first. Returns
    /// the nodes by label; the root is node `n / 2`.
    pub fn binary_tree(
        &mut self,
        rng: &mut Rng,
        n: usize,
        scattered: bool,
        extra: &mut dyn FnMut(&mut FakeHeap, &mut Rng, usize) -> Vec<Word>,
    ) -> Vec<Word> {
        let mut kids: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut preorder = Vec::with_capacity(n);
        let mut ranges = vec![(0, n)];
        while let Some((lo, hi)) = ranges.pop() {
            let mid = (lo + hi) / 2;
            preorder.push(mid);
            if mid + 1 < hi {
                ranges.push((mid + 1, hi));
            }
            if lo < mid {
                ranges.push((lo, mid));
                kids[mid].push((lo + mid) / 2);
            }
            if mid + 1 < hi {
                kids[mid].push((mid + 1 + hi) / 2);
            }
        }
        let mut order = preorder;
        if scattered {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        let mut addr = vec![0; n];
        for &i in &order {
            let mut fields = vec![layout::val_int(0); kids[i].len()];
            fields.extend(extra(self, rng, i));
            fields.push(layout::val_int(i as isize));
            addr[i] = self.block(0, &fields);
        }
        for (i, kids) in kids.iter().enumerate() {
            for (j, &k) in kids.iter().enumerate() {
                self.set(addr[i], j, addr[k]);
            }
        }
        addr
    }

    /// Field `i` of block `v`.
    pub fn field(&self, v: Word, i: usize) -> Word {
        // SAFETY: tests pass blocks of this heap and fields in range.
        unsafe { *(v as *const Word).add(i) }
    }

    /// Sets field `i` of block `v`.
    pub fn set(&mut self, v: Word, i: usize, x: Word) {
        // SAFETY: tests pass blocks of this heap and fields in range.
        unsafe { *(v as *mut Word).add(i) = x }
    }

    /// Every word of both arenas, for byte-for-byte comparisons.
    pub fn snapshot(&self) -> Vec<Word> {
        let mut all = self.heap.words[..self.heap.used].to_vec();
        all.extend_from_slice(&self.statics.words[..self.statics.used]);
        all
    }
}

impl Heap for FakeHeap {
    fn should_copy(&mut self, v: Word) -> bool {
        self.heap.contains(v) || (self.copy_static && self.statics.contains(v))
    }

    fn is_copyable_custom(&self, ops: Word) -> bool {
        ops == INT64_OPS.as_ptr() as Word
    }

    fn custom_name(&self, ops: Word) -> Result<String, offheap::alloc::NoMemory> {
        // SAFETY: fake ops are NUL-terminated statics.
        Ok(
            unsafe { std::ffi::CStr::from_ptr(ops as *const libc::c_char) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    fn has_ocaml5_tags(&self) -> bool {
        self.ocaml5_tags
    }

    fn bigarray_ops(&self, ops: Word) -> Option<Word> {
        let ba = BIGARRAY_OPS.as_ptr() as Word;
        (ops == ba || ops == MAPPED_OPS.as_ptr() as Word).then_some(ba)
    }
}

/// Whether `v` (a block) is a fake Bigarray.
fn is_bigarray(heap: &FakeHeap, v: Word) -> bool {
    // SAFETY: `v` is a block with its header before it.
    let hd = unsafe { layout::read_header(v) };
    hd.tag() == layout::CUSTOM_TAG && heap.bigarray_ops(heap.field(v, 0)).is_some()
}

/// The Bigarray `dst` is a copy of `src`: same dimensions, kind and layout, data
/// `EXTERNAL` with no proxy, the copy's operations, and equal bytes of data inside the
/// copy `[base, base + bytes)`.
fn assert_bigarray_copied(heap: &FakeHeap, src: Word, dst: Word, base: Word, bytes: usize) {
    let n = heap.field(src, offheap::bigarray::NUM_DIMS_FIELD);
    for i in 0..n {
        let f = offheap::bigarray::DIM_FIELD + i;
        assert_eq!(heap.field(src, f), heap.field(dst, f), "dimension {i}");
    }
    assert_eq!(
        heap.field(dst, 0),
        BIGARRAY_OPS.as_ptr() as Word,
        "the copy's operations"
    );
    let flags = heap.field(src, offheap::bigarray::FLAGS_FIELD);
    assert_eq!(
        heap.field(dst, offheap::bigarray::FLAGS_FIELD),
        flags & !offheap::bigarray::MANAGED_MASK,
        "kind and layout kept, data external"
    );
    assert_eq!(
        heap.field(dst, offheap::bigarray::PROXY_FIELD),
        0,
        "no proxy"
    );
    let (s, len) = heap.bigarray_bytes(src, heap.ocaml5_tags);
    let (d, dlen) = heap.bigarray_bytes(dst, heap.ocaml5_tags);
    assert_eq!(len, dlen);
    assert!(
        d >= base && d + len <= base + bytes,
        "the data is inside the copy"
    );
    // SAFETY: both ranges are readable (source buffer, copy).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(s as *const u8, len),
            std::slice::from_raw_parts(d as *const u8, len),
        )
    };
    assert!(a == b, "the data is copied");
}

/// Checks that the copy rooted at `dst` (inside `[base, base + bytes)`) is isomorphic to
/// the source graph rooted at `src`: same shape, same raw contents, sharing and cycles
/// mapped one to one, headers `Unmarkable`, pointers to blocks not copied kept as they
/// are. Returns the number of distinct blocks in the copy.
pub fn assert_isomorphic(
    heap: &mut FakeHeap,
    src: Word,
    dst: Word,
    base: Word,
    bytes: usize,
) -> usize {
    let inside = |v: Word| v > base && v < base + bytes;
    let mut map: HashMap<Word, Word> = HashMap::new(); // source block -> copy block
    let mut back: HashMap<Word, Word> = HashMap::new();
    let mut todo = vec![(src, dst)];
    while let Some((s, d)) = todo.pop() {
        if layout::is_immediate(s) || !heap.should_copy(s) {
            assert_eq!(s, d, "immediates and shared pointers are kept");
            continue;
        }
        assert!(inside(d), "a copied pointer points into the copy");
        // SAFETY: `s` is a source block, `d` a block of the copy.
        let (shd, dhd) = unsafe { (layout::read_header(s), layout::read_header(d)) };
        let (sb, db, delta) = if shd.tag() == layout::INFIX_TAG {
            assert_eq!(dhd, shd, "infix headers are copied as they are");
            let off = layout::infix_offset_bytes(shd);
            (s - off, d - off, off)
        } else {
            (s, d, 0)
        };
        let _ = delta;
        if let Some(&seen) = map.get(&sb) {
            assert_eq!(seen, db, "sharing: one source block has one copy");
            continue;
        }
        assert!(
            back.insert(db, sb).is_none(),
            "two source blocks share one copy"
        );
        map.insert(sb, db);
        // SAFETY: as above.
        let (shd, dhd) = unsafe { (layout::read_header(sb), layout::read_header(db)) };
        assert_eq!(
            dhd,
            shd.with_color(Color::Unmarkable),
            "header copied, color unmarkable"
        );
        let n = shd.wosize();
        let first_value = if shd.tag() == layout::CLOSURE_TAG {
            layout::start_env(heap.field(sb, 1)).min(n)
        } else if shd.is_scannable() {
            0
        } else {
            n
        };
        if is_bigarray(heap, sb) {
            assert_bigarray_copied(heap, sb, db, base, bytes);
            continue;
        }
        for i in 0..n {
            let (sf, df) = (heap.field(sb, i), heap.field(db, i));
            if i < first_value {
                assert_eq!(sf, df, "raw field {i} copied as is");
            } else {
                todo.push((sf, df));
            }
        }
    }
    map.len()
}

/// Wraps [`Malloc`]; records every request and checks every free.
pub struct Counting {
    /// Sizes asked for, in order.
    pub allocs: Vec<usize>,
    /// Live allocations: address -> size.
    pub live: HashMap<usize, usize>,
}

impl Counting {
    /// Reserved up front so that bookkeeping never allocates during a copy (the Rust heap
    /// accounting around a copy must see only the traversal's own memory).
    pub fn new() -> Counting {
        Counting {
            allocs: Vec::with_capacity(8),
            live: HashMap::with_capacity(8),
        }
    }
}

impl Allocator for Counting {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        self.allocs.push(bytes);
        let p = Malloc.alloc(bytes);
        if !p.is_null() {
            self.live.insert(p as usize, bytes);
        }
        p
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        assert_eq!(
            self.live.remove(&(ptr as usize)),
            Some(bytes),
            "free of {ptr:?} ({bytes} bytes) not from alloc"
        );
        // SAFETY: `ptr` came from `Malloc.alloc(bytes)` (checked just above).
        unsafe { Malloc.free(ptr, bytes) }
    }
}

/// A deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The label of a block of [`FakeHeap::buckets`], in the fake heap or in a copy: its last
/// field, or a key's text.
pub fn bucket_label(b: Word) -> isize {
    // SAFETY: `b` is a block of the fake heap or of a live copy.
    let hd = unsafe { layout::read_header(b) };
    // SAFETY: as above; the block has `wosize` words.
    let words = unsafe { std::slice::from_raw_parts(b as *const Word, hd.wosize()) };
    if hd.tag() == layout::STRING_TAG {
        // SAFETY: the words of a string, read as bytes.
        let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, hd.wosize() * WORD_BYTES) };
        let text = bytes.split(|&c| c == 0).next().unwrap_or(&[]);
        std::str::from_utf8(text).unwrap().parse().unwrap()
    } else {
        words[hd.wosize() - 1] as isize >> 1
    }
}
