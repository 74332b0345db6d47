//! Images on the fake heap: round trips of every kind (closures refused), files loaded at
//! their recorded address and relocated, bad images (truncated, flipped, forged, blocks
//! smaller than their tag, forward cycles, addresses out of the writer's range), each
//! refused with the check it failed, never a panic; a last block of no fields, files that
//! are not regular; writes (long names, leftovers, modes, symbolic links, failures).
//!
//! The fuzzing part is a bounded proptest over a corpus of valid images; set
//! `IMAGE_FUZZ_CASES` for a longer run.

mod fake_heap;

use std::collections::HashSet;

use fake_heap::{assert_isomorphic, FakeHeap, Rng, BIGARRAY_OPS, INT64_OPS};
use offheap::alloc::{Allocator, Malloc};
use offheap::copy::{
    self,
    visited::{HeaderMarks, SideTable},
};
use offheap::image::{self, file, format, LoadError, Options, Process, WriteError};
use offheap::layout::{self, Color, Header, Word, WORD_BYTES};
use proptest::prelude::*;

fn process() -> Process {
    Process {
        ocaml_family: 4,
        flat_float_array: true,
        custom_ops: [
            0x1111_0000,
            INT64_OPS.as_ptr() as Word,
            0x3333_0000,
            BIGARRAY_OPS.as_ptr() as Word,
        ],
    }
}

const ADDRESS: Word = 0x2345_6780_0000;

fn verified() -> Options {
    Options {
        verify: true,
        ..Options::default()
    }
}

/// Copies `root` (static data too) and encodes its image; the buffer is freed.
fn image_of(heap: &mut FakeHeap, root: Word, key: &[u8]) -> Result<Vec<u8>, WriteError> {
    heap.copy_static = true;
    // SAFETY: a well-formed fake graph.
    let copied = unsafe { copy::copy(root, heap, SideTable::with_capacity(0), &mut Malloc) }
        .expect("the fake values copy");
    // SAFETY: the copy just made, ours alone.
    let image = unsafe { image::encode(&copied, key, ADDRESS, &process()) };
    if !copied.base.is_null() {
        // SAFETY: from Malloc with this size.
        unsafe { Malloc.free(copied.base, copied.bytes) };
    }
    image
}

/// Encodes, decodes, and checks the result is isomorphic to the source.
fn round_trip(heap: &mut FakeHeap, root: Word) -> image::Decoded {
    let bytes = image_of(heap, root, b"").expect("encodes");
    let decoded = image::load_bytes(&bytes, &verified(), &process()).expect("decodes");
    let base = decoded.words.as_ptr() as Word;
    if layout::is_immediate(root) {
        assert_eq!(decoded.root, root);
    } else {
        // A pointer to a last block of no fields is the payload's end: one word more.
        assert_isomorphic(
            heap,
            root,
            decoded.root,
            base,
            decoded.words.len() * WORD_BYTES + file::TAIL_BYTES,
        );
    }
    assert_well_formed(&decoded.words, decoded.root);
    decoded
}

/// An independent walk: blocks tile the words, every pointer field and the root point
/// to the first field of a block in them.
fn assert_well_formed(words: &[Word], root: Word) {
    let base = words.as_ptr() as Word;
    let mut starts = HashSet::new();
    let mut i = 0;
    while i < words.len() {
        let hd = Header(words[i]);
        assert_eq!(hd.color(), Color::Unmarkable);
        starts.insert(base + (i + 1) * WORD_BYTES);
        i += hd.whsize();
    }
    assert_eq!(i, words.len(), "blocks tile the payload");
    let mut i = 0;
    while i < words.len() {
        let hd = Header(words[i]);
        if hd.is_scannable() {
            for &f in &words[i + 1..i + hd.whsize()] {
                assert!(
                    layout::is_immediate(f) || starts.contains(&f),
                    "field {f:#x}"
                );
            }
        }
        i += hd.whsize();
    }
    assert!(layout::is_immediate(root) || starts.contains(&root));
}

/// A value with a bit of everything an image holds.
fn mixed(heap: &mut FakeHeap) -> Word {
    let s = heap.string(b"hello, images");
    let empty = heap.string(b"");
    let eight = heap.string(b"12345678");
    let f = heap.float(-0.5);
    let fa = heap.float_array(&[1.0, f64::NAN, 3.5]);
    let i64a = heap.int64(-42);
    let i64b = heap.int64(1 << 40);
    let atom = heap.static_block(0, &[]);
    let static_str = heap.static_block(layout::STRING_TAG, &[0x0700_0000_0000_0000]);
    let shared = heap.block(0, &[s, layout::val_int(7)]);
    let forward = heap.block(layout::FORWARD_TAG, &[shared]);
    let exn_name = heap.string(b"Not_found");
    let exn = heap.block(layout::OBJECT_TAG, &[exn_name, layout::val_int(-3)]);
    let cons2 = heap.block(0, &[layout::val_int(2), layout::val_int(0)]);
    let cons1 = heap.block(0, &[layout::val_int(1), cons2]);
    heap.set(cons2, 1, cons1); // a cycle
    let variant = heap.block(200, &[shared, shared, atom, static_str]);
    heap.block(
        3,
        &[
            s,
            empty,
            eight,
            f,
            fa,
            i64a,
            i64b,
            shared,
            forward,
            exn,
            cons1,
            variant,
            layout::val_int(-1),
        ],
    )
}

#[test]
fn immediates_round_trip_without_payload() {
    let mut heap = FakeHeap::new(64);
    for n in [0, 1, -1, isize::MAX >> 1] {
        let d = round_trip(&mut heap, layout::val_int(n));
        assert!(d.words.is_empty());
    }
}

#[test]
fn every_kind_round_trips() {
    let mut heap = FakeHeap::new(4096);
    let root = mixed(&mut heap);
    let d = round_trip(&mut heap, root);
    // The Int64 blocks got the process's operations back.
    let int64s = d
        .words
        .iter()
        .filter(|&&w| w == INT64_OPS.as_ptr() as Word)
        .count();
    assert_eq!(int64s, 2);
}

#[test]
fn strings_of_every_padding() {
    let mut heap = FakeHeap::new(4096);
    let strings: Vec<Word> = (0..20).map(|n| heap.string(&vec![b'x'; n])).collect();
    let root = heap.block(0, &strings);
    round_trip(&mut heap, root);
}

#[test]
fn big_blocks_and_long_lists() {
    let mut heap = FakeHeap::new(1 << 20);
    let mut list = layout::val_int(0);
    for k in 0..50_000 {
        list = heap.block(0, &[layout::val_int(k), list]);
    }
    let wide: Vec<Word> = (0..5000).map(|k| layout::val_int(k as isize)).collect();
    let wide = heap.block(0, &wide);
    let root = heap.block(0, &[list, wide]);
    round_trip(&mut heap, root);
}

/// A binary tree of `n` nodes lying scattered over a fake heap, each with a string
/// (`"{key} {i}"` for node `i`), and its root.
fn scattered_tree(n: usize, seed: u64, key: &str) -> (FakeHeap, Word) {
    let mut heap = FakeHeap::new(10 * n);
    let nodes = heap.binary_tree(&mut Rng(seed), n, true, &mut |h, _, i| {
        vec![h.string(format!("{key} {i}").as_bytes())]
    });
    let root = nodes[n / 2];
    (heap, root)
}

#[test]
fn scattered_values_stream_with_their_queue_in_a_file() {
    // A tree of 300 000 nodes lying scattered, a string each: pass 1 goes on by batches,
    // its queue past its first 256 Ki entries in a file, as `Image.write` makes it. The
    // payload streamed is the one made from a copy in memory, and loads as a copy of
    // the source.
    let n = 300_000;
    let (mut heap, root) = scattered_tree(n, 21, "key");
    let image = image_of(&mut heap, root, b"").expect("encodes");
    let end = format::HEADER_BYTES + header(&image).payload_bytes as usize;
    let before = heap.snapshot();
    let ops = process().custom_ops;
    let mut out = Vec::new();
    let mut w =
        image::writer::PayloadWriter::new(&mut out, Some(ADDRESS), &ops, format::CHUNK_BYTES)
            .unwrap();
    w.writes_a_file(std::env::temp_dir());
    // SAFETY: the fake heap's value, nothing else touching it.
    let written =
        unsafe { copy::copy_into(root, &mut heap, HeaderMarks::new(Color::C2), &mut w) }.unwrap();
    let (payload, _) = w.finish().unwrap();
    assert_eq!(written.blocks, 2 * n);
    assert_eq!(written.bytes as u64, payload.bytes);
    assert!(
        out == image[format::HEADER_BYTES..end],
        "the payload of the copy"
    );
    assert!(before == heap.snapshot(), "source restored");
    round_trip(&mut heap, root);
}

#[test]
fn the_writing_thread_writes_buffers_in_order() {
    // Buffers of every length up to the buffer's size, each filled with its number,
    // handed over one after the other: the file holds them in order, and each buffer
    // handed back has the full size.
    use image::background::Background;
    let (_dir, path) = temp_path("ordered.bin");
    let f = std::fs::File::create(&path).unwrap();
    let size = 1000;
    let mut b = Background::start(&f, size).unwrap();
    let mut buf = vec![0 as Word; size];
    let mut expected = Vec::new();
    for k in 0..64 {
        let words = (k * 37) % (size + 1);
        buf[..words].fill(k as Word);
        expected.extend(std::iter::repeat_n(k as Word, words));
        b.write(&mut buf, words).unwrap();
        assert_eq!(buf.len(), size);
    }
    b.finish().unwrap();
    assert!(std::fs::read(&path).unwrap() == layout::words_as_bytes(&expected));
}

#[test]
fn the_writing_thread_reports_its_error_and_keeps_a_buffer() {
    // A descriptor open for reading only: the thread's first write fails. The next
    // hand-over reports it (EBADF) and leaves the caller its buffer; nothing was
    // written; the thread has ended, and dropping the writer returns.
    use image::background::Background;
    let (_dir, path) = temp_path("read-only.bin");
    std::fs::write(&path, b"").unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let mut b = Background::start(&f, 16).unwrap();
    let mut buf = vec![7 as Word; 16];
    b.write(&mut buf, 16).unwrap();
    let e = b.write(&mut buf, 16).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    assert_eq!(buf.len(), 16);
    drop(b);
    // Ended after a write that failed in `finish` too.
    let mut b = Background::start(&f, 16).unwrap();
    b.write(&mut buf, 16).unwrap();
    let e = b.finish().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    assert!(std::fs::read(&path).unwrap().is_empty());
}

#[test]
fn streamed_files_of_many_buffers_load_back() {
    // As `Image.write` writes: the traversal streams the payload to a file, its full
    // buffers written by the writer's own thread while the next fills. 600 000 nodes
    // with a string each, some 38 MB of payload: five buffers, the last one partly
    // full, after the zeros that put the payload 2 MiB into the file. Loaded back, read
    // and mapped, it is a copy of the source, which is left as it was.
    let (mut heap, root) = scattered_tree(600_000, 22, "the key of node");
    let before = heap.snapshot();
    let (_dir, path) = temp_path("streamed.img");
    image::write_with(&path, b"", &process(), |w| {
        // SAFETY: the fake heap's value, nothing else touching it.
        let written = unsafe { copy::copy_into(root, &mut heap, HeaderMarks::new(Color::C2), w) }
            .map_err(WriteError::NotCopyable)?;
        assert!(written.bytes > 4 * image::writer::BUFFER_WORDS * WORD_BYTES);
        Ok(written.root)
    })
    .unwrap();
    assert!(before == heap.snapshot(), "source restored");
    let h = format::Header::decode(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(h.header_bytes, format::PAYLOAD_AT);
    for share in [false, true] {
        let opts = Options {
            share,
            ..verified()
        };
        let l = image::load_file(&path, &opts, &process()).unwrap();
        check_loaded(&mut heap, root, &l);
        // SAFETY: loaded above, unused from here on.
        unsafe { file::unmap(l.base, l.held(), l.mapping) };
    }
}

#[test]
fn sharing_and_cycles_kept() {
    let mut heap = FakeHeap::new(256);
    let s = heap.string(b"shared");
    let a = heap.block(0, &[s, s, layout::val_int(0)]);
    heap.set(a, 2, a);
    let d = round_trip(&mut heap, a);
    let root = d.root;
    // SAFETY: the decoded root block has three fields.
    unsafe {
        let fields = root as *const Word;
        assert_eq!(*fields, *fields.add(1), "one copy of the shared string");
        assert_eq!(*fields.add(2), root, "the cycle leads back to the root");
    }
}

#[test]
fn closures_are_refused() {
    let mut heap = FakeHeap::new(256);
    let fns = heap.closure(&[1], &[layout::val_int(3)]);
    let root = heap.block(0, &[fns[0]]);
    let e = image_of(&mut heap, root, b"").unwrap_err();
    assert!(e.to_string().contains("closure"), "{e}");
}

#[test]
fn pointers_out_of_the_copy_are_refused() {
    // Static data not copied (copy_static off) stands for C memory.
    let mut heap = FakeHeap::new(256);
    let outside = heap.static_block(0, &[layout::val_int(1)]);
    let root = heap.block(0, &[outside]);
    // SAFETY: a well-formed fake graph.
    let copied =
        unsafe { copy::copy(root, &mut heap, SideTable::with_capacity(0), &mut Malloc) }.unwrap();
    // SAFETY: the copy just made.
    let e = unsafe { image::encode(&copied, b"", ADDRESS, &process()) }.unwrap_err();
    assert!(e.to_string().contains("outside the OCaml heap"), "{e}");
    // SAFETY: from Malloc with this size.
    unsafe { Malloc.free(copied.base, copied.bytes) };
}

#[test]
fn key_too_long_is_refused() {
    let mut heap = FakeHeap::new(64);
    let root = heap.string(b"k");
    let e = image_of(&mut heap, root, &vec![b'k'; format::MAX_KEY + 1]).unwrap_err();
    assert!(matches!(e, WriteError::KeyTooLong(_)));
}

// ---------------------------------------------------------------------------------------
// Files: the recorded address and relocation.
// ---------------------------------------------------------------------------------------

/// A `write_atomically` filler writing `parts` one after the other.
fn parts<'a>(
    parts: &'a [&'a [u8]],
) -> impl FnMut(&mut std::fs::File) -> Result<(), WriteError> + 'a {
    move |f| {
        use std::io::Write;
        Ok(parts.iter().try_for_each(|p| f.write_all(p))?)
    }
}

/// The system's error code of a failed write.
fn os_error(e: &WriteError) -> Option<i32> {
    match e {
        WriteError::Io(e) => e.raw_os_error(),
        _ => None,
    }
}

/// A directory of this test's own, removed with what it holds when dropped (when the
/// test fails too).
struct ScratchDir(std::path::PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh empty directory named after `name`.
fn fresh_dir(name: &str) -> ScratchDir {
    let dir =
        std::env::temp_dir().join(format!("offheap-image-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    ScratchDir(dir)
}

/// A path `name` in a fresh directory, which goes when the first is dropped.
fn temp_path(name: &str) -> (ScratchDir, std::path::PathBuf) {
    let dir = fresh_dir(name);
    let path = dir.join(name);
    (dir, path)
}

fn write_mixed(path: &std::path::Path, key: &[u8]) -> (FakeHeap, Word) {
    let mut heap = FakeHeap::new(4096);
    heap.copy_static = true;
    let root = mixed(&mut heap);
    // SAFETY: a well-formed fake graph.
    let copied =
        unsafe { copy::copy(root, &mut heap, SideTable::with_capacity(0), &mut Malloc) }.unwrap();
    // SAFETY: the copy just made, ours alone.
    unsafe { image::write_file(path, &copied, key, &process()) }.unwrap();
    // SAFETY: from Malloc with this size.
    unsafe { Malloc.free(copied.base, copied.bytes) };
    (heap, root)
}

fn check_loaded(heap: &mut FakeHeap, src: Word, l: &image::Loaded) {
    assert_isomorphic(heap, src, l.root, l.base as Word, l.held());
    // SAFETY: the loaded payload, `bytes` bytes at `base`.
    let words = unsafe { std::slice::from_raw_parts(l.base as *const Word, l.bytes / WORD_BYTES) };
    assert_well_formed(words, l.root);
}

#[test]
fn file_loads_at_its_address_then_relocated() {
    let (_dir, path) = temp_path("mixed.img");
    let (mut heap, root) = write_mixed(&path, b"schema 1");
    let opts = Options {
        key: b"schema 1".to_vec(),
        verify: true,
        ..Options::default()
    };
    let first = image::load_file(&path, &opts, &process()).unwrap();
    let h = format::Header::decode(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(first.mapping, file::Mapping::Recorded);
    assert_eq!(
        first.base as u64, h.address,
        "mapped at the recorded address"
    );
    check_loaded(&mut heap, root, &first);
    // The address is taken now: the second load relocates.
    let second = image::load_file(&path, &opts, &process()).unwrap();
    assert_eq!(second.mapping, file::Mapping::Relocated);
    assert_ne!(second.base, first.base);
    check_loaded(&mut heap, root, &second);
    // Trusted at the recorded address: no structural walk, same value.
    // SAFETY: loaded above, unused from here on.
    unsafe { file::unmap(first.base, first.held(), first.mapping) };
    let trusted = Options {
        trusted: true,
        verify: false,
        ..opts.clone()
    };
    let third = image::load_file(&path, &trusted, &process()).unwrap();
    assert_eq!(third.mapping, file::Mapping::Recorded);
    check_loaded(&mut heap, root, &third);
    // Forced relocation, trusted or not, checks everything.
    let forced = Options {
        relocate: true,
        ..trusted
    };
    let fourth = image::load_file(&path, &forced, &process()).unwrap();
    assert_eq!(fourth.mapping, file::Mapping::Relocated);
    check_loaded(&mut heap, root, &fourth);
    for l in [second, third, fourth] {
        // SAFETY: loaded above, unused from here on.
        unsafe { file::unmap(l.base, l.held(), l.mapping) };
    }
}

#[test]
fn failed_write_leaves_no_file() {
    let (_dir, path) = temp_path("closure.img");
    std::fs::write(&path, b"previous").unwrap();
    let mut heap = FakeHeap::new(256);
    let fns = heap.closure(&[1], &[]);
    heap.copy_static = true;
    // SAFETY: a well-formed fake graph.
    let copied =
        unsafe { copy::copy(fns[0], &mut heap, SideTable::with_capacity(0), &mut Malloc) }.unwrap();
    // SAFETY: the copy just made.
    assert!(unsafe { image::write_file(&path, &copied, b"", &process()) }.is_err());
    // SAFETY: from Malloc with this size.
    unsafe { Malloc.free(copied.base, copied.bytes) };
    assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty());
    // An unwritable place: the error names the path, nothing is created.
    let nowhere = std::path::Path::new("/nonexistent-dir/x.img");
    let mut heap = FakeHeap::new(64);
    let s = heap.string(b"x");
    heap.copy_static = true;
    // SAFETY: as above.
    let copied =
        unsafe { copy::copy(s, &mut heap, SideTable::with_capacity(0), &mut Malloc) }.unwrap();
    // SAFETY: as above.
    let e = unsafe { image::write_file(nowhere, &copied, b"", &process()) }.unwrap_err();
    assert!(matches!(e, WriteError::Io(_)), "{e}");
    // SAFETY: as above.
    unsafe { Malloc.free(copied.base, copied.bytes) };
}

#[test]
fn missing_file_is_an_io_error() {
    let e = image::load_file(
        std::path::Path::new("/nonexistent.img"),
        &verified(),
        &process(),
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::Io(_)));
}

// ---------------------------------------------------------------------------------------
// Bad images.
// ---------------------------------------------------------------------------------------

fn header(bytes: &[u8]) -> format::Header {
    format::Header::decode(bytes).unwrap()
}

/// Payload words of an image.
fn payload_words(bytes: &[u8]) -> Vec<Word> {
    let h = header(bytes);
    bytes[format::HEADER_BYTES..format::HEADER_BYTES + h.payload_bytes as usize]
        .chunks_exact(8)
        .map(|c| Word::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// `bytes` with payload word `i` set to `w`, checksums recomputed: only the structural
/// checks can catch it.
fn forge_word(bytes: &[u8], i: usize, w: Word) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = format::HEADER_BYTES + i * WORD_BYTES;
    out[at..at + 8].copy_from_slice(&w.to_ne_bytes());
    reseal(&out, |_| {})
}

/// Recomputes every checksum (chunks, tables, header) after `edit` changed header
/// fields.
fn reseal(bytes: &[u8], edit: impl FnOnce(&mut format::Header)) -> Vec<u8> {
    reseal_tables(bytes, |_| {}, edit)
}

/// Recomputes every checksum after `tables` changed the fix-up table or the chunk index
/// (before the chunk checksums are recomputed) and `edit` header fields.
fn reseal_tables(
    bytes: &[u8],
    tables: impl FnOnce(&mut (Vec<u64>, Vec<format::Chunk>)),
    edit: impl FnOnce(&mut format::Header),
) -> Vec<u8> {
    let mut h = header(bytes);
    let payload_end = format::HEADER_BYTES + h.payload_bytes as usize;
    let mut t = format::decode_tables(&h, &bytes[payload_end..]).expect("memory");
    tables(&mut t);
    let payload = &bytes[format::HEADER_BYTES..payload_end];
    for (k, c) in payload.chunks(h.chunk_bytes as usize).enumerate() {
        t.1[k].checksum = format::chunk_checksum(c);
    }
    let table_bytes = format::encode_tables(&t.0, &t.1).expect("memory");
    h.checksum = format::tables_checksum(&table_bytes);
    edit(&mut h);
    let mut out = h.encode().to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(&table_bytes);
    out
}

fn corpus() -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    let mut heap = FakeHeap::new(8192);
    let root = mixed(&mut heap);
    images.push(image_of(&mut heap, root, b"").unwrap());
    let mut heap = FakeHeap::new(8192);
    let strings: Vec<Word> = (0..17).map(|n| heap.string(&vec![b'a'; n])).collect();
    let root = heap.block(0, &strings);
    images.push(image_of(&mut heap, root, b"").unwrap());
    let mut heap = FakeHeap::new(8192);
    let mut list = layout::val_int(0);
    for k in 0..100 {
        let n = heap.int64(k);
        list = heap.block(0, &[n, list]);
    }
    images.push(image_of(&mut heap, list, b"").unwrap());
    let mut heap = FakeHeap::new(64);
    let f = heap.float(1.5);
    images.push(image_of(&mut heap, f, b"").unwrap());
    let mut heap = FakeHeap::new(1 << 16);
    let root = chunky(&mut heap);
    images.push(chunked_image_of(&mut heap, root, SMALL_CHUNK));
    images
}

/// The smallest chunk: images of a few KiB span several chunks.
const SMALL_CHUNK: u64 = format::MIN_CHUNK;

/// A value whose image spans several small chunks, with blocks across chunk boundaries:
/// a long string, a long array of pointers, boxed integers, lists, a forward.
fn chunky(heap: &mut FakeHeap) -> Word {
    let long = heap.string(&vec![b'x'; 9000]);
    let mut fields = Vec::new();
    let mut list = layout::val_int(0);
    for k in 0..300 {
        let n = heap.int64(k);
        let s = heap.string(format!("s{k}").as_bytes());
        list = heap.block(0, &[n, list]);
        fields.push(s);
        fields.push(list);
    }
    let arr = heap.block(0, &fields);
    let fwd = heap.block(layout::FORWARD_TAG, &[arr]);
    let floats = heap.float_array(&[0.5; 700]);
    heap.block(0, &[long, arr, fwd, floats, list])
}

/// [`image_of`] with chunks of `chunk_bytes`.
fn chunked_image_of(heap: &mut FakeHeap, root: Word, chunk_bytes: u64) -> Vec<u8> {
    heap.copy_static = true;
    // SAFETY: a well-formed fake graph.
    let copied = unsafe { copy::copy(root, heap, SideTable::with_capacity(0), &mut Malloc) }
        .expect("the fake values copy");
    // SAFETY: the copy just made, ours alone.
    let image = unsafe { image::encode_chunked(&copied, b"", ADDRESS, chunk_bytes, &process()) };
    // SAFETY: from Malloc with this size.
    unsafe { Malloc.free(copied.base, copied.bytes) };
    image.expect("encodes")
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

#[test]
fn corpus_is_valid() {
    for image in corpus() {
        let d = load(&image, true).unwrap();
        assert_well_formed(&d.words, d.root);
    }
}

#[test]
fn truncated_at_every_sixteenth() {
    for image in corpus() {
        for k in 0..16 {
            let cut = image.len() * k / 16;
            let check = check_of(load(&image[..cut], true));
            assert_eq!(check, "file size", "cut at {cut} of {}", image.len());
        }
        let mut longer = image.clone();
        longer.push(0);
        assert_eq!(check_of(load(&longer, true)), "file size");
    }
}

#[test]
fn wrong_fields_are_named() {
    let image = &corpus()[0];
    let mut m = image.clone();
    m[0] ^= 1;
    assert_eq!(check_of(load(&m, true)), "magic");
    let mut m = image.clone();
    m[8] = 1; // the previous format: refused, naming both versions
    let e = load(&m, true).unwrap_err();
    assert_eq!(e.check(), Some("format version"));
    assert!(
        e.to_string()
            .contains("version 1, this library reads version 2"),
        "{e}"
    );
    let mut m = image.clone();
    m[12] = 4;
    assert_eq!(check_of(load(&m, true)), "word size");
    let mut m = image.clone();
    m[13] = 3 - format::NATIVE_ENDIAN;
    assert_eq!(check_of(load(&m, true)), "byte order");
    let m = reseal(image, |h| h.ocaml_family = 5);
    assert_eq!(check_of(load(&m, true)), "OCaml version");
    let m = reseal(image, |h| h.flat_float_array = false);
    assert_eq!(check_of(load(&m, true)), "flat float arrays");
    let m = reseal(image, |h| h.key = b"v2".to_vec());
    assert_eq!(check_of(load(&m, true)), "key");
    let opts = Options {
        key: b"v1".to_vec(),
        verify: true,
        ..Options::default()
    };
    let e = image::load_bytes(image, &opts, &process()).unwrap_err();
    assert_eq!(e.check(), Some("key"));
    assert!(e.to_string().contains("\"v1\""), "{e}");
    let m = reseal(image, |h| h.address = 0x1234);
    assert_eq!(check_of(load(&m, true)), "header");
    let m = reseal(image, |h| h.root = 3 * 8 + 1_000_000);
    assert_eq!(check_of(load(&m, true)), "root");
    let m = reseal(image, |h| h.blocks += 1);
    assert_eq!(check_of(load(&m, true)), "block count");
    let mut m = image.clone();
    m[40] ^= 0x10; // a header field without its checksum
    assert_eq!(check_of(load(&m, true)), "header checksum");
    let mut m = image.clone();
    m[format::HEADER_BYTES + 20] ^= 0x10; // in the payload
    assert_eq!(check_of(load(&m, true)), "payload checksum");
    let mut m = image.clone();
    let last = m.len() - 9;
    m[last] ^= 0x10; // in the chunk index
    assert_eq!(check_of(load(&m, true)), "table checksum");
}

#[test]
fn forged_payloads_are_named() {
    let image = &corpus()[0];
    let words = payload_words(image);
    let root_block = header(image).root as usize / 8; // the root's first field
                                                      // A pointer aimed outside the payload.
    let m = forge_word(image, root_block, ADDRESS + words.len() * 8 + 64);
    assert_eq!(check_of(load(&m, true)), "pointer");
    // A pointer inside, but not to a block's first field.
    let m = forge_word(image, root_block, ADDRESS);
    assert_eq!(check_of(load(&m, true)), "pointer");
    // A header that overruns the payload.
    let m = forge_word(image, 0, Header::new(words.len(), Color::Unmarkable, 0).0);
    assert_eq!(check_of(load(&m, true)), "block size");
    // The GC's color.
    let hd = Header(words[0]);
    let m = forge_word(image, 0, hd.with_color(Color::C0).0);
    assert_eq!(check_of(load(&m, true)), "block header");
    // Tags no image holds.
    for tag in [
        layout::CLOSURE_TAG,
        layout::LAZY_TAG,
        layout::ABSTRACT_TAG,
        layout::INFIX_TAG,
    ] {
        let m = forge_word(image, 0, Header::new(hd.wosize(), Color::Unmarkable, tag).0);
        assert_eq!(check_of(load(&m, true)), "tag");
    }
    // A string whose padding lies; a custom block with an unknown identifier; a table
    // entry that is no custom block.
    let mut i = 0;
    let (mut string_at, mut custom_at) = (None, None);
    while i < words.len() {
        let hd = Header(words[i]);
        if hd.tag() == layout::STRING_TAG && string_at.is_none() {
            string_at = Some(i + hd.wosize());
        }
        if hd.tag() == layout::CUSTOM_TAG && custom_at.is_none() {
            custom_at = Some(i + 1);
        }
        i += hd.whsize();
    }
    let last = string_at.unwrap();
    let m = forge_word(image, last, 0x0900_0000_0000_0000);
    assert_eq!(check_of(load(&m, true)), "string padding");
    let m = forge_word(image, custom_at.unwrap(), 7);
    assert_eq!(check_of(load(&m, true)), "custom block");
    // The same forgeries pass the checksum with ~verify:false and are caught all the
    // same by the structural checks.
    let mut m = image.clone();
    let at = format::HEADER_BYTES + root_block * 8;
    m[at..at + 8].copy_from_slice(&(ADDRESS + (1 << 30)).to_ne_bytes());
    assert_eq!(check_of(load(&m, false)), "pointer");
    assert_eq!(check_of(load(&m, true)), "payload checksum");
}

fn fuzz_cases() -> u32 {
    std::env::var("IMAGE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

/// A mutation of a valid image: bit flips anywhere, or random words in the payload with
/// the checksums recomputed (so that the structural checks are what stands).
#[derive(Clone, Debug)]
enum Mutation {
    Flips(Vec<(usize, u8)>),
    Words(Vec<(usize, Word)>),
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = prop_oneof![
        any::<Word>(),
        (0usize..64).prop_map(|k| ADDRESS + k * 8),
        (0usize..64, 0u8..=255).prop_map(|(w, t)| Header::new(w, Color::Unmarkable, t).0),
        (0usize..8).prop_map(|k| (k as Word) << 56),
    ];
    prop_oneof![
        prop::collection::vec((any::<usize>(), 0u8..8), 1..4).prop_map(Mutation::Flips),
        prop::collection::vec((any::<usize>(), word), 1..4).prop_map(Mutation::Words),
        any::<usize>().prop_map(Mutation::Cut),
    ]
}

fn apply(image: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Flips(flips) => {
            let mut out = image.to_vec();
            for &(at, bit) in flips {
                let at = at % out.len();
                out[at] ^= 1 << bit;
            }
            out
        }
        Mutation::Words(words) => {
            let n = payload_words(image).len();
            let mut out = image.to_vec();
            for &(i, w) in words {
                let at = format::HEADER_BYTES + (i % n) * 8;
                out[at..at + 8].copy_from_slice(&w.to_ne_bytes());
            }
            reseal(&out, |_| {})
        }
        Mutation::Cut(at) => image[..at % image.len()].to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzzed_images_never_crash(which in 0usize..5, m in mutation()) {
        let images = corpus_cached();
        let image = &images[which % images.len()];
        let bad = apply(image, &m);
        for verify in [true, false] {
            match load(&bad, verify) {
                Ok(d) => {
                    // Accepted: then it is well formed. With the checksum verified only
                    // the forged words (checksums recomputed) can be accepted, when
                    // harmless (a byte of a string, an integer).
                    assert_well_formed(&d.words, d.root);
                    prop_assert!(!verify || bad == *image || matches!(m, Mutation::Words(_)));
                }
                Err(e) => prop_assert!(e.check().is_some(), "{}", e),
            }
        }
    }
}

fn corpus_cached() -> &'static [Vec<u8>] {
    static CORPUS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(corpus)
}

// ---------------------------------------------------------------------------------------
// Odd inputs: sizes below what the tag requires, forward cycles, addresses out of the
// writer's range, a last block of no fields, files that are not regular.
// ---------------------------------------------------------------------------------------

/// The check that refuses the image of `root` (copied and written as is).
fn refused_check(heap: &mut FakeHeap, root: Word) -> &'static str {
    let bytes = image_of(heap, root, b"").expect("encodes");
    check_of(load(&bytes, true))
}

#[test]
fn blocks_smaller_than_their_tag_are_refused() {
    let one = layout::val_int(1);
    let ops = INT64_OPS.as_ptr() as Word;
    // What compare, hash and Marshal read past: the object id (field 1), a string's
    // last byte, a float's word, a forward's field, a custom block's payload.
    let cases: [(u8, Vec<Word>); 8] = [
        (layout::OBJECT_TAG, vec![one]),
        (layout::OBJECT_TAG, vec![]),
        (layout::STRING_TAG, vec![]),
        (layout::DOUBLE_TAG, vec![]),
        (layout::DOUBLE_TAG, vec![0, 0]),
        (layout::FORWARD_TAG, vec![]),
        (layout::FORWARD_TAG, vec![one, one]),
        (layout::CUSTOM_TAG, vec![ops]),
    ];
    for (tag, fields) in cases {
        let mut heap = FakeHeap::new(256);
        let b = heap.block(tag, &fields);
        let root = heap.block(0, &[b, one]);
        assert_eq!(
            refused_check(&mut heap, root),
            "block size",
            "tag {tag} with {} fields",
            fields.len()
        );
    }
    // The smallest legal sizes load: an object of two fields, a block of tag 0 of none.
    let mut heap = FakeHeap::new(256);
    let o = heap.block(layout::OBJECT_TAG, &[one, one]);
    let empty = heap.block(0, &[]);
    let root = heap.block(0, &[o, empty]);
    round_trip(&mut heap, root);
}

#[test]
fn forward_cycles_are_refused_chains_load() {
    let mut heap = FakeHeap::new(256);
    let f = heap.block(layout::FORWARD_TAG, &[layout::val_int(0)]);
    heap.set(f, 0, f);
    assert_eq!(refused_check(&mut heap, f), "forward cycle");
    let mut heap = FakeHeap::new(256);
    let f = heap.block(layout::FORWARD_TAG, &[layout::val_int(0)]);
    let g = heap.block(layout::FORWARD_TAG, &[f]);
    heap.set(f, 0, g);
    let root = heap.block(0, &[layout::val_int(3), g]);
    assert_eq!(refused_check(&mut heap, root), "forward cycle");
    // A chain (a forced lazy value of a forced lazy value) is a genuine value.
    let mut heap = FakeHeap::new(256);
    let s = heap.string(b"end");
    let f = heap.block(layout::FORWARD_TAG, &[s]);
    let g = heap.block(layout::FORWARD_TAG, &[f]);
    let root = heap.block(0, &[g, f, g]);
    round_trip(&mut heap, root);
}

#[test]
fn addresses_out_of_the_writers_range_are_refused() {
    let image = &corpus()[0];
    let payload = header(image).payload_bytes;
    let range = format::ADDRESS_RANGE;
    for address in [
        0x7ffd_0000_0000, // just below a usual stack
        range.start - format::PAGE_BYTES,
        range.end - format::PAGE_BYTES * (payload / format::PAGE_BYTES), // ends past it
        range.end,
        0x1000,
    ] {
        let m = reseal(image, |h| h.address = address);
        assert_eq!(check_of(load(&m, true)), "header", "address {address:#x}");
        // From a file too, before anything is mapped.
        let (_dir, path) = temp_path("forged-address.img");
        std::fs::write(&path, &m).unwrap();
        let e = image::load_file(&path, &verified(), &process()).unwrap_err();
        assert_eq!(e.check(), Some("header"), "{e}");
    }
    // Every address the writer picks is accepted.
    for bytes in [0usize, 8, 4096, 1 << 30, 1 << 40] {
        for _ in 0..100 {
            let a = image::choose_address(bytes) as u64;
            assert!(range.start <= a && a + bytes as u64 <= range.end, "{a:#x}");
            assert_eq!(a % format::PAGE_BYTES, 0);
        }
    }
}

#[test]
fn a_last_block_of_no_fields_lies_in_held_memory() {
    let (_dir, path) = temp_path("last-empty.img");
    let mut heap = FakeHeap::new(1024);
    heap.copy_static = true;
    let s = heap.string(b"a string first");
    let atom = heap.static_block(0, &[]);
    let root = heap.block(0, &[s, atom]);
    // SAFETY: a well-formed fake graph.
    let copied =
        unsafe { copy::copy(root, &mut heap, SideTable::with_capacity(0), &mut Malloc) }.unwrap();
    // SAFETY: the copy just made, ours alone.
    unsafe { image::write_file(&path, &copied, b"", &process()) }.unwrap();
    // SAFETY: from Malloc with this size.
    unsafe { Malloc.free(copied.base, copied.bytes) };
    let words = payload_words(&std::fs::read(&path).unwrap());
    assert_eq!(
        Header(*words.last().unwrap()).wosize(),
        0,
        "the atom is the payload's last block"
    );
    for share in [false, true] {
        let opts = Options {
            verify: true,
            share,
            ..Options::default()
        };
        let l = image::load_file(&path, &opts, &process()).unwrap();
        check_loaded(&mut heap, root, &l);
        // The atom's pointer is the payload's end, and the memory held (what the
        // runtime registers) goes one word past it.
        // SAFETY: the root block has two fields.
        let atom_copy = unsafe { *(l.root as *const Word).add(1) };
        assert_eq!(atom_copy, l.base as Word + l.bytes);
        assert_eq!(l.held(), l.bytes + file::TAIL_BYTES);
        // SAFETY: the tail word is mapped and readable.
        assert_eq!(unsafe { *(atom_copy as *const Word) }, 0);
        // SAFETY: loaded above, unused from here on.
        unsafe { file::unmap(l.base, l.held(), l.mapping) };
    }
}

/// Loads `path` on another thread: the error, or a failure after 10 s (a blocked open).
fn load_error_within_seconds(path: std::path::PathBuf) -> LoadError {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(image::load_file(&path, &verified(), &process()).map(|_| ()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(r) => r.unwrap_err(),
        Err(_) => panic!("load blocked"),
    }
}

#[test]
fn non_regular_files_are_refused_without_blocking() {
    let (_dir, fifo) = temp_path("fifo.img");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.clone(), fifo.parent().unwrap().to_path_buf()] {
        match load_error_within_seconds(path.clone()) {
            LoadError::NotRegularFile => {}
            e => panic!("{}: {e}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writes: temporary files, names, modes, links.
// ---------------------------------------------------------------------------------------

const BOTH: [file::Temporary; 2] = [file::Temporary::Unnamed, file::Temporary::Named];

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn writes_work_for_the_longest_names_and_leave_nothing() {
    for how in BOTH {
        let dir = fresh_dir(&format!("long-{how:?}"));
        let name = "n".repeat(255);
        let path = dir.join(&name);
        file::write_atomically(&path, how, parts(&[b"one", b"two"])).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"onetwo");
        // A leftover of a killed writer, named as the old scheme named it, is no obstacle.
        let short = dir.join("x.img");
        std::fs::write(
            dir.join(format!("x.img.tmp.{}.0", std::process::id())),
            b"leftover",
        )
        .unwrap();
        file::write_atomically(&short, how, parts(&[b"x"])).unwrap();
        let mut expected = vec![name, "x.img".to_string()];
        expected.push(format!("x.img.tmp.{}.0", std::process::id()));
        expected.sort();
        assert_eq!(names_in(&dir), expected, "{how:?}");
    }
}

#[test]
fn failed_writes_leave_no_temporary_file() {
    for how in BOTH {
        let dir = fresh_dir(&format!("fail-{how:?}"));
        // The target is a non-empty directory: the rename fails.
        let target = dir.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"i").unwrap();
        let e = file::write_atomically(&target, how, parts(&[b"data"])).unwrap_err();
        assert!(os_error(&e).is_some(), "{e}");
        assert_eq!(names_in(&dir), ["target"], "{how:?}");
    }
}

#[test]
fn replaced_files_keep_their_mode() {
    use std::os::unix::fs::PermissionsExt;
    for how in BOTH {
        let dir = fresh_dir(&format!("mode-{how:?}"));
        for mode in [0o600, 0o640, 0o444] {
            let path = dir.join(format!("m{mode:o}"));
            std::fs::write(&path, b"old").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            file::write_atomically(&path, how, parts(&[b"new"])).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"new");
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode, "{how:?}");
        }
    }
}

#[test]
fn writes_through_symbolic_links_write_their_target() {
    for how in BOTH {
        let dir = fresh_dir(&format!("link-{how:?}"));
        std::fs::create_dir(dir.join("real")).unwrap();
        let target = dir.join("real").join("index.img");
        std::fs::write(&target, b"old").unwrap();
        // A relative link, and a link to that link.
        let link = dir.join("link.img");
        std::os::unix::fs::symlink("real/index.img", &link).unwrap();
        let link2 = dir.join("link2.img");
        std::os::unix::fs::symlink(&link, &link2).unwrap();
        file::write_atomically(&link2, how, parts(&[b"new"])).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        for l in [&link, &link2] {
            assert!(std::fs::symlink_metadata(l)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert_eq!(names_in(&dir.join("real")), ["index.img"]);
        // A dangling link: its target is created.
        let dangling = dir.join("dangling.img");
        std::os::unix::fs::symlink("real/created.img", &dangling).unwrap();
        file::write_atomically(&dangling, how, parts(&[b"c"])).unwrap();
        assert_eq!(std::fs::read(dir.join("real/created.img")).unwrap(), b"c");
        // A loop of links is an error, not a hang.
        let a = dir.join("a");
        let b = dir.join("b");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = file::write_atomically(&a, how, parts(&[b"x"])).unwrap_err();
        assert_eq!(os_error(&e), Some(libc::ELOOP));
    }
}

// ---------------------------------------------------------------------------------------
// Chunks: the index, damage located, any number of threads.
// ---------------------------------------------------------------------------------------

/// The multi-chunk image of the corpus, with its header.
fn chunky_image() -> (Vec<u8>, format::Header) {
    let mut heap = FakeHeap::new(1 << 16);
    let root = chunky(&mut heap);
    let image = chunked_image_of(&mut heap, root, SMALL_CHUNK);
    let h = header(&image);
    (image, h)
}

fn load_threads(bytes: &[u8], verify: bool, threads: usize) -> Result<image::Decoded, LoadError> {
    let opts = Options {
        verify,
        threads,
        ..Options::default()
    };
    image::load_bytes(bytes, &opts, &process())
}

#[test]
fn chunky_images_round_trip_on_any_number_of_threads() {
    let mut heap = FakeHeap::new(1 << 16);
    let root = chunky(&mut heap);
    let image = chunked_image_of(&mut heap, root, SMALL_CHUNK);
    let h = header(&image);
    assert!(h.chunks >= 8, "{} chunks", h.chunks);
    let t = format::decode_tables(
        &h,
        &image[format::HEADER_BYTES + h.payload_bytes as usize..],
    )
    .expect("memory");
    assert!(
        t.1.iter().any(|c| c.first == format::NO_BLOCK),
        "a chunk covered by one block"
    );
    for threads in [1, 2, 3, 16] {
        let d = load_threads(&image, true, threads).unwrap();
        let base = d.words.as_ptr() as Word;
        assert_isomorphic(
            &mut heap,
            root,
            d.root,
            base,
            d.words.len() * WORD_BYTES + file::TAIL_BYTES,
        );
    }
}

#[test]
fn damaged_chunks_are_named() {
    let (image, h) = chunky_image();
    for k in 0..h.chunks as usize {
        let start = k * h.chunk_bytes as usize;
        let end = (start + h.chunk_bytes as usize).min(h.payload_bytes as usize);
        for at in [start, (start + end) / 2 + 3, end - 1] {
            let mut m = image.clone();
            m[format::HEADER_BYTES + at] ^= 0x04;
            for threads in [1, 4] {
                let e = load_threads(&m, true, threads).unwrap_err();
                assert_eq!(e.check(), Some("payload checksum"));
                let named = format!("chunk {k} (bytes {start} to {end}) is damaged");
                assert!(e.to_string().contains(&named), "{e}, expected {named}");
            }
        }
    }
    // Two damaged chunks: the first is named, whatever the threads.
    let mut m = image.clone();
    let last = h.payload_bytes as usize - 1;
    m[format::HEADER_BYTES + last] ^= 1;
    m[format::HEADER_BYTES + h.chunk_bytes as usize + 5] ^= 1;
    for threads in [1, 2, 5] {
        let e = load_threads(&m, true, threads).unwrap_err();
        assert!(e.to_string().contains("chunk 1 "), "{e}");
    }
}

#[test]
fn chunk_index_damage_is_refused() {
    let (image, h) = chunky_image();
    let payload_end = format::HEADER_BYTES + h.payload_bytes as usize;
    let index_at = payload_end + 8 * h.customs as usize;
    // Damage without resealing: the table checksum, and with it off, the structure.
    for entry in 0..h.chunks as usize {
        for (byte, bit) in [(0, 3), (1, 0), (7, 7)] {
            let mut m = image.clone();
            m[index_at + 16 * entry + byte] ^= 1 << bit;
            assert_eq!(check_of(load(&m, true)), "table checksum");
            let e = load(&m, false).unwrap_err();
            assert!(e.check().is_some(), "{e}");
        }
    }
    // Forged entries, checksums recomputed: every lie about the first block is caught.
    let t = format::decode_tables(&h, &image[payload_end..]).expect("memory");
    let words = payload_words(&image);
    let mut starts = Vec::new();
    let mut i = 0;
    while i < words.len() {
        starts.push(i * 8);
        i += Header(words[i]).whsize();
    }
    for k in 0..t.1.len() {
        let chunk = k * h.chunk_bytes as usize..(k + 1) * h.chunk_bytes as usize;
        let truth = t.1[k].first;
        let mut lies = vec![
            format::NO_BLOCK,
            chunk.start as u64,
            chunk.end as u64,
            // Wrapping: `truth` may be NO_BLOCK (u64::MAX) when one block covers the chunk.
            truth.wrapping_add(8),
        ];
        // Another real block start in the chunk (tiles, but not as the blocks before).
        lies.extend(
            starts
                .iter()
                .filter(|&&s| chunk.contains(&s) && s as u64 != truth)
                .take(2)
                .map(|&s| s as u64),
        );
        for lie in lies {
            if lie == truth {
                continue;
            }
            let m = reseal_tables(&image, |t| t.1[k].first = lie, |_| {});
            for threads in [1, 3] {
                let e = load_threads(&m, true, threads).unwrap_err();
                assert!(e.check().is_some(), "{e}");
                let again = load_threads(&m, true, 1).unwrap_err();
                assert_eq!(e.to_string(), again.to_string());
            }
        }
    }
    // An index of the wrong length, resealed: the header's chunk count disagrees.
    let m = reseal(&image, |h| h.chunks += 1);
    assert_eq!(check_of(load(&m, true)), "header");
    let m = reseal(&image, |h| h.chunk_bytes = 3000);
    assert_eq!(check_of(load(&m, true)), "header");
}

/// A decoded payload with its pointers made relative to its start: equal for equal
/// loads wherever they are.
fn normalized(d: &image::Decoded) -> (Vec<Word>, Word) {
    let base = d.words.as_ptr() as Word;
    let mut words = d.words.clone();
    let mut i = 0;
    while i < words.len() {
        let hd = Header(words[i]);
        if hd.is_scannable() {
            for f in &mut words[i + 1..i + hd.whsize()] {
                if !layout::is_immediate(*f) {
                    *f -= base;
                }
            }
        }
        i += hd.whsize();
    }
    let root = if layout::is_immediate(d.root) {
        d.root
    } else {
        d.root - base
    };
    (words, root)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases() / 20, failure_persistence: None, ..ProptestConfig::default() })]

    /// One thread and many give the same value or the same error, on good and bad images.
    #[test]
    fn threads_do_not_change_results(m in mutation(), threads in 2usize..9) {
        let images = corpus_cached();
        let bad = apply(&images[4], &m);
        for verify in [true, false] {
            let one = load_threads(&bad, verify, 1);
            let many = load_threads(&bad, verify, threads);
            match (one, many) {
                (Ok(a), Ok(b)) => prop_assert_eq!(normalized(&a), normalized(&b)),
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                (a, b) => prop_assert!(false, "1 thread: {:?}, {} threads: {:?}", a.map(|_| ()), threads, b.map(|_| ())),
            }
        }
    }
}
