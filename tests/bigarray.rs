//! Bigarrays on the fake heap (issue 13): every kind and layout, 0 to 16 dimensions,
//! zero-length dimensions, data shared in every way (nested, partial overlaps, identical
//! ranges, touching, disjoint), mutation through the copy seen by every alias, malformed
//! custom blocks refused with the source intact, and images holding Bigarrays through
//! the bad-file checks (truncation, bit flips, forged dimensions, data pointers, flags).
//! Each copy runs with both visited sets (header marks, and the side table whose pass 1
//! reads a snapshot).

mod fake_heap;

use fake_heap::{assert_isomorphic, FakeHeap, Rng, BIGARRAY_OPS, INT64_OPS, MAPPED_OPS};
use offheap::alloc::{Allocator, Malloc};
use offheap::bigarray::{self, DATA_FIELD, DIM_FIELD, FLAGS_FIELD, NUM_DIMS_FIELD, PROXY_FIELD};
use offheap::copy::data::DATA_ALIGN;
use offheap::copy::visited::{HeaderMarks, SideTable};
use offheap::copy::{self, Copied, CopyError};
use offheap::image::{self, format, LoadError, Options, Process};
use offheap::layout::{self, Color, Header, Word, WORD_BYTES};

fn ba_ops() -> Word {
    BIGARRAY_OPS.as_ptr() as Word
}

/// Copies `root` with header marks (`table` false) or the side table.
fn copy_with(h: &mut FakeHeap, root: Word, table: bool) -> Result<Copied, CopyError> {
    // SAFETY: well-formed fake values; nothing else touches the heap.
    unsafe {
        if table {
            copy::copy(root, h, SideTable::with_capacity(0), &mut Malloc)
        } else {
            copy::copy(root, h, HeaderMarks::new(Color::C2), &mut Malloc)
        }
    }
}

fn free(c: &Copied) {
    if !c.base.is_null() {
        // SAFETY: from Malloc with this size.
        unsafe { Malloc.free(c.base, c.bytes) };
    }
}

/// Source words and every data buffer, for byte-for-byte comparisons.
fn source_state(h: &FakeHeap) -> (Vec<Word>, Vec<Vec<u64>>) {
    (h.snapshot(), h.buffers.iter().map(|b| b.to_vec()).collect())
}

/// Copies `root` both ways, checks the copy is isomorphic (Bigarrays: same shape, data
/// copied inside the copy, external, no proxy), the source unchanged, the data blocks
/// tile the end of the copy; runs `more` on each copy, then frees it.
fn check_copy(h: &mut FakeHeap, root: Word, mut more: impl FnMut(&FakeHeap, &Copied)) {
    for table in [false, true] {
        let before = source_state(h);
        let c = copy_with(h, root, table).unwrap_or_else(|e| panic!("table {table}: {e}"));
        assert!(before == source_state(h), "the source is untouched");
        assert_isomorphic(h, root, c.root, c.base as Word, c.bytes);
        assert_tiled(&c);
        more(h, &c);
        free(&c);
    }
}

/// The copy is a run of blocks ending exactly at its end, `c.blocks` of them, the data
/// blocks (`Abstract_tag`) last.
fn assert_tiled(c: &Copied) {
    let words = c.bytes / WORD_BYTES;
    let mut i = 0;
    let mut blocks = 0;
    let mut data_seen = false;
    let mut first_data = None;
    while i < words {
        // SAFETY: inside the copy.
        let hd = Header(unsafe { *(c.base as *const Word).add(i) });
        assert_eq!(hd.color(), Color::Unmarkable);
        let is_data = hd.tag() == layout::ABSTRACT_TAG;
        assert!(is_data || !data_seen, "data blocks come last");
        if is_data && !data_seen {
            first_data = Some(i);
        }
        data_seen |= is_data;
        blocks += 1;
        i += hd.whsize();
    }
    assert_eq!(i, words, "blocks tile the copy");
    assert_eq!(blocks, c.blocks, "Copied.blocks counts the data blocks");
    // Copied.data_bytes: the data blocks, from the first one's header to the end.
    let expected = first_data.map_or(0, |at| c.bytes - at * WORD_BYTES);
    assert_eq!(c.data_bytes, expected, "Copied.data_bytes");
    assert!(c.blocks_bytes() <= c.bytes);
}

fn dims_of(h: &FakeHeap, v: Word) -> Vec<usize> {
    let n = h.field(v, NUM_DIMS_FIELD);
    (0..n).map(|i| h.field(v, DIM_FIELD + i)).collect()
}

/// Every shape of 0 to 16 dimensions the tests use: small, one 3, one 0; and empty
/// arrays whose other dimensions multiply past the address space (the runtime makes
/// them: `[|1 lsl 60; 0|]`).
fn shapes() -> Vec<Vec<usize>> {
    let max_int = (isize::MAX >> 1) as usize;
    let mut all = vec![vec![1 << 60, 0], vec![0, 1 << 60], vec![max_int, 2, 0, 5]];
    for n in 0..=bigarray::MAX_NUM_DIMS {
        all.push((0..n).map(|i| if i < 3 { 2 } else { 1 }).collect());
        if n > 0 {
            all.push((0..n).map(|i| if i == n - 1 { 3 } else { 1 }).collect());
            all.push((0..n).map(|i| if i == n / 2 { 0 } else { 2 }).collect());
        }
    }
    all
}

#[test]
fn every_kind_layout_and_shape_copies() {
    for ocaml5 in [false, true] {
        let kinds = if ocaml5 { 14 } else { 13 };
        for kind in 0..kinds {
            for layout in [0, bigarray::LAYOUT_MASK] {
                for managed in [0, bigarray::MANAGED, bigarray::MAPPED_FILE] {
                    let mut h = FakeHeap::new(1 << 14);
                    h.ocaml5_tags = ocaml5;
                    let mut rng = Rng(kind as u64 * 31 + layout as u64 + managed as u64);
                    let mut arrays = Vec::new();
                    for dims in shapes() {
                        let bytes = bigarray::element_bytes(kind, ocaml5).unwrap()
                            * dims.iter().product::<usize>();
                        let data = h.data(bytes, &mut rng);
                        let ops = if managed == bigarray::MAPPED_FILE {
                            MAPPED_OPS.as_ptr()
                        } else {
                            BIGARRAY_OPS.as_ptr()
                        };
                        let proxy = if managed == 0 { 0 } else { 0x7000_0000 };
                        arrays.push(h.bigarray_block(
                            ops as Word,
                            data,
                            kind | layout | managed,
                            proxy,
                            &dims,
                        ));
                    }
                    let root = h.block(0, &arrays);
                    check_copy(&mut h, root, |h, c| {
                        for (k, &source) in arrays.iter().enumerate() {
                            let ba = h.field(c.root, k);
                            assert_eq!(dims_of(h, ba), dims_of(h, source));
                            assert_eq!(
                                h.field(ba, DATA_FIELD) % DATA_ALIGN,
                                0,
                                "the data of each array starts 64-byte aligned"
                            );
                        }
                    });
                }
            }
        }
    }
}

#[test]
fn data_is_counted_in_the_copy() {
    let mut h = FakeHeap::new(1024);
    let mut rng = Rng(1);
    let data = h.data(100_000, &mut rng);
    let ba = h.bigarray_block(ba_ops(), data, 12, 0, &[100_000]);
    let c = copy_with(&mut h, ba, false).unwrap();
    assert_eq!(c.blocks, 2, "the custom block and its data block");
    assert!(
        c.bytes >= 100_000 && c.bytes < 100_000 + 200,
        "{} bytes",
        c.bytes
    );
    free(&c);
}

/// A float64 parent of 100 elements and views of it by element ranges.
fn views(h: &mut FakeHeap, ranges: &[(usize, usize)]) -> (Word, Vec<Word>, Word) {
    let mut rng = Rng(7);
    let data = h.data(800, &mut rng);
    let parent = h.bigarray_block(ba_ops(), data, 1 | bigarray::MANAGED, 0x7000_0000, &[100]);
    let subs: Vec<Word> = ranges
        .iter()
        .map(|&(from, len)| {
            h.bigarray_block(
                ba_ops(),
                data + 8 * from,
                1 | bigarray::MANAGED,
                0x7000_0000,
                &[len],
            )
        })
        .collect();
    (parent, subs, data)
}

/// The copies of the Bigarrays `arrays` (fields of the copy's root) keep the distances
/// between their data pointers, and a byte written through one is read through every
/// other that covers it.
fn assert_shared_like_source(h: &FakeHeap, c: &Copied, arrays: &[Word]) {
    let copies: Vec<Word> = (0..arrays.len()).map(|k| h.field(c.root, k)).collect();
    for a in 0..arrays.len() {
        for b in 0..arrays.len() {
            let (sa, la) = h.bigarray_bytes(arrays[a], false);
            let (sb, lb) = h.bigarray_bytes(arrays[b], false);
            let overlap = sa < sb + lb && sb < sa + la;
            let (da, _) = h.bigarray_bytes(copies[a], false);
            let (db, _) = h.bigarray_bytes(copies[b], false);
            if overlap {
                assert_eq!(
                    da.wrapping_sub(db),
                    sa.wrapping_sub(sb),
                    "arrays {a} and {b}"
                );
                // A write through `a` at the first shared byte is seen through `b`.
                let at = sa.max(sb);
                // SAFETY: both copies' data lie in the copy, `at` inside both ranges.
                unsafe {
                    let pa = (da + (at - sa)) as *mut u8;
                    let pb = (db + (at - sb)) as *const u8;
                    let old = *pa;
                    *pa = old ^ 0x5a;
                    assert_eq!(*pb, old ^ 0x5a, "a set through {a} is seen through {b}");
                    assert_ne!(*(at as *const u8), old ^ 0x5a, "not through the source");
                    *pa = old;
                }
            } else if la > 0 && lb > 0 {
                assert!(
                    da + la <= db || db + lb <= da,
                    "disjoint arrays stay disjoint"
                );
            }
        }
    }
}

#[test]
fn shared_data_stays_shared() {
    // (from, len) in elements of the parent's 100.
    let cases: &[&[(usize, usize)]] = &[
        &[(10, 20)],                     // a sub-array
        &[(10, 20), (25, 30)],           // partial overlap
        &[(10, 20), (25, 30), (50, 40)], // a chain of partial overlaps
        &[(10, 20), (15, 5), (16, 2)],   // nested
        &[(0, 100), (0, 100)],           // identical ranges
        &[(30, 0), (100, 0), (0, 0)],    // empty views inside and at the ends
        &[(90, 10), (0, 10)],            // the two ends
    ];
    for ranges in cases {
        let mut h = FakeHeap::new(4096);
        let (parent, subs, _) = views(&mut h, ranges);
        let mut arrays = vec![parent];
        arrays.extend(subs);
        let root = h.block(0, &arrays);
        check_copy(&mut h, root, |h, c| {
            assert_shared_like_source(h, c, &arrays);
            assert_eq!(
                c.blocks,
                arrays.len() + 2,
                "one data block for all: {ranges:?}"
            );
        });
    }
}

#[test]
fn overlapping_and_touching_without_a_parent() {
    let mut h = FakeHeap::new(4096);
    let mut rng = Rng(3);
    let data = h.data(4000, &mut rng);
    let other = h.data(400, &mut rng);
    // Views with no common parent in the value: [0,800) [800,1600) touch, [1500,2000)
    // overlaps the second, [3000,3200) stands apart, `other` is another buffer.
    let parts = [(0, 100), (800, 100), (1500, 62), (3000, 25)];
    let mut arrays: Vec<Word> = parts
        .iter()
        .map(|&(at, n)| h.bigarray_block(ba_ops(), data + at, 7, 0, &[n]))
        .collect();
    arrays.push(h.bigarray_block(ba_ops(), other, 12, 0, &[400]));
    let root = h.block(0, &arrays);
    check_copy(&mut h, root, |h, c| {
        assert_shared_like_source(h, c, &arrays);
        // [0,2000) merged, [3000,3200) and `other` apart: three data blocks.
        assert_eq!(c.blocks, 1 + arrays.len() + 3);
        // Two touching views are laid out next to each other as in the source.
        let (d0, _) = h.bigarray_bytes(h.field(c.root, 0), false);
        let (d1, _) = h.bigarray_bytes(h.field(c.root, 1), false);
        assert_eq!(d1 - d0, 800);
    });
}

#[test]
fn one_block_reached_twice_is_copied_once() {
    let mut h = FakeHeap::new(1024);
    let mut rng = Rng(5);
    let data = h.data(64, &mut rng);
    let ba = h.bigarray_block(ba_ops(), data, 3, 0, &[64]);
    let root = h.block(0, &[ba, ba]);
    check_copy(&mut h, root, |h, c| {
        assert_eq!(h.field(c.root, 0), h.field(c.root, 1));
        assert_eq!(c.blocks, 3);
    });
}

/// Both managed bits are what the runtime gives a view of a mapped array with NULL data
/// (`Unix.map_file` of an empty file, then `sub`): `caml_ba_alloc` mallocs 0 bytes for it
/// and adds `CAML_BA_MANAGED`. Such arrays are copied, external.
#[test]
fn both_managed_bits_are_copied_external() {
    let mut h = FakeHeap::new(1024);
    let mut rng = Rng(11);
    let data = h.data(0, &mut rng);
    let ba = h.bigarray_block(ba_ops(), data, 1 | bigarray::MANAGED_MASK, 0, &[0]);
    let root = h.block(0, &[ba]);
    check_copy(&mut h, root, |h, c| {
        let copied = h.field(c.root, 0);
        assert_eq!(h.field(copied, FLAGS_FIELD), 1, "float64, external");
        assert_eq!(h.field(copied, DIM_FIELD), 0);
    });
}

#[test]
fn malformed_bigarrays_are_refused_and_the_source_kept() {
    let mut rng = Rng(9);
    type Forge = fn(&mut FakeHeap, Word);
    let forgeries: &[(&str, Forge)] = &[
        ("17 dimensions", |h, v| h.set(v, NUM_DIMS_FIELD, 17)),
        ("block size", |h, v| h.set(v, NUM_DIMS_FIELD, 1)),
        ("unknown flag", |h, v| h.set(v, FLAGS_FIELD, 1 | 0x1000)),
        ("sub-array flag on OCaml 4", |h, v| {
            h.set(v, FLAGS_FIELD, 1 | bigarray::SUBARRAY)
        }),
        ("kind 13 on OCaml 4", |h, v| h.set(v, FLAGS_FIELD, 13)),
        ("kind 200", |h, v| h.set(v, FLAGS_FIELD, 200)),
        ("negative dimension", |h, v| h.set(v, DIM_FIELD, usize::MAX)),
        ("overflowing size", |h, v| {
            h.set(v, DIM_FIELD, 1 << 40);
            h.set(v, DIM_FIELD + 1, 1 << 40);
        }),
    ];
    for (what, forge) in forgeries {
        let mut h = FakeHeap::new(1024);
        let data = h.data(64, &mut rng);
        let ba = h.bigarray_block(ba_ops(), data, 1, 0, &[2, 4]);
        forge(&mut h, ba);
        let root = h.block(0, &[ba]);
        for table in [false, true] {
            let before = source_state(&h);
            match copy_with(&mut h, root, table) {
                Err(CopyError::Bigarray(_)) => {}
                other => panic!("{what}: {other:?}"),
            }
            assert!(before == source_state(&h), "{what}: the source is restored");
        }
    }
    // The sub-array flag is legal on OCaml 5.
    let mut h = FakeHeap::new(1024);
    h.ocaml5_tags = true;
    let data = h.data(64, &mut rng);
    let ba = h.bigarray_block(ba_ops(), data, 1 | bigarray::SUBARRAY, 0, &[8]);
    check_copy(&mut h, ba, |_, _| {});
}

#[test]
fn other_custom_blocks_still_refused_by_name() {
    let mut h = FakeHeap::new(1024);
    let f = h.foreign_custom();
    let root = h.block(0, &[f]);
    match copy_with(&mut h, root, false) {
        Err(CopyError::Custom(name)) => assert_eq!(name, "_bigarr02"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Images.
// ---------------------------------------------------------------------------------------

const ADDRESS: Word = 0x2345_6780_0000;

fn process() -> Process {
    Process {
        ocaml_family: 4,
        flat_float_array: true,
        custom_ops: [
            0x1111_0000,
            INT64_OPS.as_ptr() as Word,
            0x3333_0000,
            ba_ops(),
        ],
    }
}

fn image_of(h: &mut FakeHeap, root: Word) -> Vec<u8> {
    h.copy_static = true;
    let c = copy_with(h, root, true).unwrap();
    // SAFETY: the copy just made, ours alone.
    let image = unsafe { image::encode(&c, b"", ADDRESS, &process()) }.unwrap();
    free(&c);
    image
}

fn load(bytes: &[u8], verify: bool) -> Result<image::Decoded, LoadError> {
    let opts = Options {
        verify,
        ..Options::default()
    };
    image::load_bytes(bytes, &opts, &process())
}

fn check_of(r: Result<image::Decoded, LoadError>) -> &'static str {
    match r {
        Ok(_) => panic!("a bad image was accepted"),
        Err(e) => e
            .check()
            .unwrap_or_else(|| panic!("not a named check: {e}")),
    }
}

fn header(bytes: &[u8]) -> format::Header {
    format::Header::decode(bytes).unwrap()
}

fn payload_words(bytes: &[u8]) -> Vec<Word> {
    let h = header(bytes);
    bytes[format::HEADER_BYTES..format::HEADER_BYTES + h.payload_bytes as usize]
        .chunks_exact(8)
        .map(|c| Word::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// `bytes` with payload word `i` set to `w`, checksums recomputed (format 2: each
/// chunk's, in the chunk index, and the tables', in the header).
fn forge_word(bytes: &[u8], i: usize, w: Word) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = format::HEADER_BYTES + i * WORD_BYTES;
    out[at..at + 8].copy_from_slice(&w.to_ne_bytes());
    let mut h = header(&out);
    let end = format::HEADER_BYTES + h.payload_bytes as usize;
    let (customs, mut chunks) = format::decode_tables(&h, &out[end..]).expect("memory");
    for (k, c) in out[format::HEADER_BYTES..end]
        .chunks(h.chunk_bytes as usize)
        .enumerate()
    {
        chunks[k].checksum = format::chunk_checksum(c);
    }
    let tables = format::encode_tables(&customs, &chunks).expect("memory");
    h.checksum = format::tables_checksum(&tables);
    out[..format::HEADER_BYTES].copy_from_slice(&h.encode());
    out.truncate(end);
    out.extend_from_slice(&tables);
    out
}

/// The fix-up table of an image.
fn fix_up_table(image: &[u8]) -> Vec<u64> {
    let h = header(image);
    let end = format::HEADER_BYTES + h.payload_bytes as usize;
    format::decode_tables(&h, &image[end..]).expect("memory").0
}

/// A value with shared Bigarrays of several kinds, a record over them, and an Int64.
fn sample(h: &mut FakeHeap) -> Word {
    let (parent, subs, _) = views(h, &[(10, 20), (25, 30), (50, 0)]);
    let mut rng = Rng(11);
    let bytes = h.data(3 * 5 * 2, &mut rng);
    let matrix = h.bigarray_block(ba_ops(), bytes, 3 | bigarray::LAYOUT_MASK, 0, &[3, 5, 2]);
    let scalar_data = h.data(16, &mut rng);
    let scalar = h.bigarray_block(
        MAPPED_OPS.as_ptr() as Word,
        scalar_data,
        11 | bigarray::MAPPED_FILE,
        0,
        &[],
    );
    let n = h.int64(-5);
    let mut fields = vec![parent];
    fields.extend(subs);
    fields.extend([matrix, scalar, n]);
    h.block(0, &fields)
}

/// The custom blocks of the payload that are Bigarrays: the word of their first field.
fn bigarrays_in(words: &[Word]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let hd = Header(words[i]);
        if hd.tag() == layout::CUSTOM_TAG && words[i + 1] == format::CustomKind::Bigarray as Word {
            found.push(i + 1);
        }
        i += hd.whsize();
    }
    found
}

#[test]
fn images_hold_bigarrays() {
    let mut h = FakeHeap::new(4096);
    let root = sample(&mut h);
    let image = image_of(&mut h, root);
    let words = payload_words(&image);
    for &f in &bigarrays_in(&words) {
        let data = words[f + DATA_FIELD] - ADDRESS;
        assert!(data.is_multiple_of(8));
        assert_eq!(words[f + PROXY_FIELD], 0);
        assert_eq!(words[f + FLAGS_FIELD] & bigarray::MANAGED_MASK, 0);
    }
    // The parent's data is 64-byte aligned in the payload, whatever the copy's address.
    let parent = bigarrays_in(&words)[0];
    assert_eq!((words[parent + DATA_FIELD] - ADDRESS) % DATA_ALIGN, 0);
    let d = load(&image, true).unwrap();
    let base = d.words.as_ptr() as Word;
    h.copy_static = false;
    assert_isomorphic(&mut h, root, d.root, base, d.words.len() * WORD_BYTES);
    // Sharing survives the image: the views still alias the parent.
    let copy_view = |k: usize| h.bigarray_bytes(h.field(d.root, k), false).0;
    assert_eq!(copy_view(1) - copy_view(0), 80);
    assert_eq!(copy_view(2) - copy_view(0), 200);
}

#[test]
fn truncated_and_flipped_images_are_refused() {
    let mut h = FakeHeap::new(4096);
    let root = sample(&mut h);
    let image = image_of(&mut h, root);
    for k in 0..32 {
        let cut = image.len() * k / 32;
        assert_eq!(check_of(load(&image[..cut], true)), "file size");
    }
    // A flipped bit anywhere in the payload or the tables: the checksum of the part it
    // is in (format 2: the chunks, the fix-up table and chunk index); and never a panic
    // without it.
    let payload_end = format::HEADER_BYTES + header(&image).payload_bytes as usize;
    let mut rng = Rng(13);
    for _ in 0..500 {
        let at = format::HEADER_BYTES + rng.below(image.len() - format::HEADER_BYTES);
        let mut m = image.clone();
        m[at] ^= 1 << rng.below(8);
        let expected = if at < payload_end {
            "payload checksum"
        } else {
            "table checksum"
        };
        assert_eq!(check_of(load(&m, true)), expected);
        let _ = load(&m, false);
    }
}

#[test]
fn forged_bigarrays_are_named() {
    let mut h = FakeHeap::new(4096);
    let root = sample(&mut h);
    let image = image_of(&mut h, root);
    let words = payload_words(&image);
    let bas = bigarrays_in(&words);
    let parent = bas[0];
    let data = words[parent + DATA_FIELD];
    let end = ADDRESS + words.len() * WORD_BYTES;
    let forged: Vec<(&str, usize, Word, &str)> = vec![
        (
            "a dimension past the data block",
            parent + DIM_FIELD,
            10_000,
            "Bigarray",
        ),
        (
            "a dimension past the payload",
            parent + DIM_FIELD,
            1 << 40,
            "Bigarray",
        ),
        (
            "a negative dimension",
            parent + DIM_FIELD,
            usize::MAX,
            "Bigarray",
        ),
        (
            "data into the first block",
            parent + DATA_FIELD,
            ADDRESS + 8,
            "Bigarray",
        ),
        (
            "data before the payload",
            parent + DATA_FIELD,
            ADDRESS - 64,
            "Bigarray",
        ),
        (
            "data past the payload",
            parent + DATA_FIELD,
            end,
            "Bigarray",
        ),
        (
            "data ending past its block",
            parent + DATA_FIELD,
            data + 64,
            "Bigarray",
        ),
        (
            "managed data",
            parent + FLAGS_FIELD,
            1 | bigarray::MANAGED,
            "Bigarray",
        ),
        (
            "mapped data",
            parent + FLAGS_FIELD,
            1 | bigarray::MAPPED_FILE,
            "Bigarray",
        ),
        (
            "a kind no runtime has",
            parent + FLAGS_FIELD,
            99,
            "Bigarray",
        ),
        ("a proxy", parent + PROXY_FIELD, 0x7000_0000, "Bigarray"),
        ("17 dimensions", parent + NUM_DIMS_FIELD, 17, "Bigarray"),
        (
            "a dimension count for another size",
            parent + NUM_DIMS_FIELD,
            2,
            "Bigarray",
        ),
    ];
    for (what, i, w, check) in forged {
        let m = forge_word(&image, i, w);
        assert_eq!(check_of(load(&m, false)), check, "{what}");
    }
    // A pointer field aimed at a data block: data blocks are not values.
    let data_block = (data - ADDRESS) / WORD_BYTES;
    let data_block_start = (0..data_block)
        .rev()
        .find(|&i| Header(words[i]).tag() == layout::ABSTRACT_TAG)
        .map(|i| i + 1)
        .unwrap();
    let root_field = header(&image).root as usize / WORD_BYTES;
    let m = forge_word(&image, root_field, ADDRESS + data_block_start * WORD_BYTES);
    assert_eq!(check_of(load(&m, false)), "pointer");
    // An abstract block before other blocks, and one too small to hold the slack.
    let m = forge_word(
        &image,
        0,
        Header::new(
            Header(words[0]).wosize(),
            Color::Unmarkable,
            layout::ABSTRACT_TAG,
        )
        .0,
    );
    assert_eq!(check_of(load(&m, false)), "tag");
    // A Bigarray identifier on a two-field custom block (the Int64).
    let int64 = (0..words.len())
        .find(|&i| {
            Header(words[i]).tag() == layout::CUSTOM_TAG
                && words[i + 1] == format::CustomKind::Int64 as Word
        })
        .unwrap();
    let m = forge_word(&image, int64 + 1, format::CustomKind::Bigarray as Word);
    assert_eq!(check_of(load(&m, false)), "Bigarray");
}

#[test]
fn fix_customs_checks_bigarray_sizes_on_trusted_payloads() {
    let mut h = FakeHeap::new(4096);
    let root = sample(&mut h);
    let image = image_of(&mut h, root);
    let mut words = payload_words(&image);
    let table = fix_up_table(&image);
    let parent = bigarrays_in(&words)[0];
    let ops = process().custom_ops;
    let mut good = words.clone();
    // The data pointers as a load relocates them, to where `good` is.
    let address = header(&image).address as Word;
    let here = good.as_ptr() as Word;
    for b in bigarrays_in(&words) {
        good[b + DATA_FIELD] = good[b + DATA_FIELD] - address + here;
    }
    let data_at = image::validate::fix_customs(&mut good, &table, &ops).unwrap();
    assert_eq!(good[parent], ba_ops());
    // The offset returned: inside the first data block, past its header, within the
    // alignment slack; every block before that block is another kind.
    let first_data = {
        let mut i = 0;
        while Header(good[i]).tag() != layout::ABSTRACT_TAG {
            i += Header(good[i]).whsize();
        }
        i * WORD_BYTES
    };
    assert!(
        first_data < data_at && data_at <= first_data + 64,
        "data at {data_at}, first data block at {first_data}"
    );
    let mut plain = FakeHeap::new(64);
    let n = plain.int64(7);
    let plain_root = plain.block(0, &[n, n]);
    let plain_image = image_of(&mut plain, plain_root);
    let mut plain_words = payload_words(&plain_image);
    assert_eq!(
        image::validate::fix_customs(&mut plain_words, &fix_up_table(&plain_image), &ops).unwrap(),
        plain_words.len() * WORD_BYTES,
        "no Bigarray: the whole payload"
    );
    words[parent + NUM_DIMS_FIELD] = 1000;
    assert_eq!(
        image::validate::fix_customs(&mut words, &table, &ops)
            .unwrap_err()
            .check(),
        Some("fix-up table")
    );
}

/// The payload of `root` streamed by the traversal into the image writer (as
/// `Image.write` does), for [`ADDRESS`], and the fix-up table and chunk index.
fn streamed(h: &mut FakeHeap, root: Word, table: bool) -> (Vec<u8>, image::writer::Payload) {
    h.copy_static = true;
    let ops = process().custom_ops;
    let mut out = Vec::new();
    let mut w =
        image::writer::PayloadWriter::new(&mut out, Some(ADDRESS), &ops, format::CHUNK_BYTES)
            .unwrap();
    // SAFETY: the fake heap's value, nothing else touching it.
    let written = unsafe {
        if table {
            copy::copy_into(root, h, SideTable::with_capacity(0), &mut w)
        } else {
            copy::copy_into(root, h, HeaderMarks::new(Color::C2), &mut w)
        }
    }
    .unwrap();
    let (payload, _) = w.finish().unwrap();
    assert_eq!(written.bytes as u64, payload.bytes);
    (out, payload)
}

#[test]
fn streamed_images_equal_images_of_copies() {
    // A Bigarray of several runs of `copy::MAX_RUN` words and more than the writer's
    // buffer, views of it, and the sample (small arrays sharing data, an Int64): the
    // payload the traversal streams to the writer (Bigarrays pointed at their data as
    // their blocks go by, data blocks written run by run) is the one made from a copy
    // in memory (whose data moves to be aligned at the image's address).
    let mut h = FakeHeap::new(1 << 16);
    let mut rng = Rng(17);
    let elements = image::writer::BUFFER_WORDS + 3 * copy::MAX_RUN + 5;
    let big = h.data(elements * 8, &mut rng);
    let parent = h.bigarray_block(ba_ops(), big, 1, 0, &[elements]);
    let view = h.bigarray_block(ba_ops(), big + 8 * 1000, 1, 0, &[copy::MAX_RUN]);
    let small = sample(&mut h);
    let root = h.block(0, &[parent, view, small]);
    let image = image_of(&mut h, root);
    let hd = header(&image);
    let end = format::HEADER_BYTES + hd.payload_bytes as usize;
    let (customs, chunks) = format::decode_tables(&hd, &image[end..]).expect("memory");
    for table in [false, true] {
        let (payload, mut p) = streamed(&mut h, root, table);
        assert!(payload == image[format::HEADER_BYTES..end], "table {table}");
        assert_eq!(p.customs.to_vec().unwrap(), customs);
        assert_eq!(p.chunks, chunks);
    }
    // And it loads, at its address or elsewhere, as a copy of the source.
    // The data of a region (the large array's) starts aligned in the payload.
    let words = payload_words(&image);
    let f = bigarrays_in(&words)[0];
    assert_eq!((words[f + DATA_FIELD] - ADDRESS) % DATA_ALIGN, 0);
    let d = load(&image, true).unwrap();
    h.copy_static = false;
    assert_isomorphic(
        &mut h,
        root,
        d.root,
        d.words.as_ptr() as Word,
        d.words.len() * WORD_BYTES,
    );
}
