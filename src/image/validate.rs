//! The checks a payload passes before its root is handed out, and its relocation, split
//! by chunk over threads.
//!
//! Everything here works on a payload as a slice of words at the place it will be used
//! from: no `unsafe`, no assumption about the bytes. A payload that passes [`check`] is a
//! well-formed graph of OCaml blocks: blocks tile it exactly, every header has the color
//! no GC marks, every tag is one an image may hold, every block is at least as large as
//! what the runtime's compare, hash and Marshal read for its tag
//! ([`layout::min_wosize`]), every pointer field points to the first field of a block of
//! the payload (relocated to where the payload is now), no chain of forward blocks loops,
//! string padding is consistent, the fix-up table lists exactly its custom blocks, and
//! every Bigarray is one the runtime could have made (kind, layout, dimensions, flags
//! `CAML_BA_EXTERNAL`, no proxy) whose data lies inside one data block: an
//! `Abstract_tag` block that no pointer field may point to ([`crate::copy::data`]).
//! What it does not and cannot check is the OCaml type: as with `Marshal`, that is the
//! caller's promise.
//!
//! The work is split by the chunks of the chunk index ([`format::Chunk`]), each checked
//! on its own by whichever thread takes it:
//! 1. **tile** (parallel): the chunk's blocks, walked from the first header the index
//!    gives for it to the first block that ends past it: headers, sizes, tags, string
//!    padding, custom blocks against the fix-up table, Bigarray blocks (kind, layout,
//!    dimensions, flags), data blocks after the others. Raw blocks (strings, floats,
//!    boxed integers) cost their header and, for a string, its last word: their
//!    contents are never read. Block starts go into a bitmap, and the starts of
//!    scannable blocks into another, each chunk writing its own words of them. Then the
//!    chunk's checksum, while the walk has left it in the cache, where the checksum
//!    ([`super::xxh3`], AVX2) runs at twice the pace memory gives it (the checksum
//!    first, then the walk: phase 1 of a verified load of 894 MB 7% slower on two
//!    threads, 17% on one, medians of 11 fresh processes). A damaged chunk may fail its
//!    walk too: the damage is what is reported.
//! 2. **join** (one thread, a few words per chunk): the index is consistent (every chunk's
//!    first block is where the blocks of the chunks before it end, the last ends at the
//!    payload's end), so the blocks of all chunks tile the payload exactly; block and
//!    custom counts; no data block before a block of a later chunk.
//! 3. **pointers** (parallel): every word of the chunk that is a field of a scannable
//!    block (the block that covers the chunk's start included) is checked against the
//!    bitmap of block starts and relocated; the scannable blocks are found by their
//!    bitmap, so raw blocks are not read again.
//! 4. Bigarray data (each Bigarray's data inside one data block, of any chunk; its
//!    pointer relocated), forward chains and the root (one thread, Bigarrays and
//!    forward blocks only).
//!
//! Errors are deterministic whatever the number of threads: a damaged checksum is
//! reported before anything else, for the first damaged chunk; else the first chunk's
//! first structural error.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::format::{self, Chunk, CustomKind, NO_BLOCK};
use super::parallel::parallel;
use super::LoadError;
use crate::alloc::{NoMemory, ZeroedArray};
use crate::bigarray;
use crate::copy::data::data_wosize;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

/// What [`check`] checks a payload against: the header's fields and the tables.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// The address the payload was written for.
    pub address: Word,
    /// The root as the header stores it.
    pub root: u64,
    /// The fix-up table.
    pub customs: &'a [u64],
    /// The chunk index.
    pub chunks: &'a [Chunk],
    /// Payload bytes per chunk.
    pub chunk_bytes: usize,
    /// Blocks in the payload.
    pub blocks: u64,
    /// Whether the payload is checked for OCaml 5 (tags 244 and 245 refused).
    pub ocaml5: bool,
    /// Whether chunk checksums are verified.
    pub verify: bool,
    /// Threads to use, at least 1.
    pub threads: usize,
    /// Threads to use for the pointer phase (which relocates), at least 1.
    pub pointer_threads: usize,
    /// Whether [`check`] says which chunks the load leaves as they are in the file.
    pub find_unwritten: bool,
}

/// What [`check`] found.
#[derive(Debug)]
pub struct Checked {
    /// The root value.
    pub root: Word,
    /// For each chunk, whether no block that covers part of it may be written by the
    /// load (only raw blocks other than custom ones: strings, floats, float arrays,
    /// data blocks), so that its bytes stay those of the file; empty unless
    /// [`Expected::find_unwritten`].
    pub unwritten: Vec<bool>,
}

/// The smallest index whose work failed, shared by the threads so that chunks after a
/// failure skip their structural work (their result cannot be the one reported).
struct FirstFailure(AtomicUsize);

impl FirstFailure {
    fn new() -> FirstFailure {
        FirstFailure(AtomicUsize::new(usize::MAX))
    }
    fn record(&self, k: usize) {
        self.0.fetch_min(k, Ordering::Relaxed);
    }
    fn before(&self, k: usize) -> bool {
        self.0.load(Ordering::Relaxed) < k
    }
}

/// Why a tag may not appear in an image; `None` when it may (size checked apart).
fn refused_tag(tag: u8, ocaml5: bool) -> Option<&'static str> {
    match tag {
        layout::FORCING_TAG if ocaml5 => Some("lazy value being forced"),
        layout::CONT_TAG if ocaml5 => Some("continuation"),
        layout::LAZY_TAG => Some("unforced lazy value"),
        layout::CLOSURE_TAG => Some("closure"),
        layout::INFIX_TAG => Some("infix header outside a closure"),
        _ => None,
    }
}

/// Whether the string block `fields` (wosize >= 1) has consistent padding: last byte
/// at most 7 and the padding bytes before it zero.
#[inline(always)]
fn string_padding_ok(fields: &[Word]) -> bool {
    // The last word's bytes in memory order, byte `j` in bits `8j..8j + 8`.
    let last = u64::from_le_bytes(fields[fields.len() - 1].to_ne_bytes());
    let pad = (last >> 56) as usize;
    // The `pad` bytes before the last one: bits `8 * (7 - pad)..56`.
    pad < WORD_BYTES && last & ((1 << 56) - (1u64 << (8 * (WORD_BYTES - 1 - pad)))) == 0
}

/// Whether a block of tag `tag` and fields `fields` (colored, inside the payload, before
/// any data block) is one of the common blocks that pass every check of
/// [`tile_chunk`] and need no record but their start: an ordinary block (a tag below
/// the lazy ones and continuations, no minimum size), a float array, or a string of
/// consistent padding.
#[inline(always)]
fn plain_block(tag: u8, fields: &[Word]) -> bool {
    match tag {
        layout::STRING_TAG => !fields.is_empty() && string_padding_ok(fields),
        layout::DOUBLE_ARRAY_TAG => true,
        _ => tag < layout::FORCING_TAG,
    }
}

/// What tiling one chunk found.
#[derive(Debug, Default)]
struct Tiled {
    /// Blocks whose header lies in the chunk.
    blocks: u64,
    /// Custom blocks among them.
    customs: usize,
    /// The word after the last block walked (the first past the chunk, or the payload's
    /// end); unused when the chunk holds no header.
    end: usize,
    /// The header word of the last block walked.
    last_header: usize,
    /// The header words of the forward blocks.
    forwards: Vec<usize>,
    /// The data blocks whose headers lie in the chunk, as word ranges of their fields.
    data_blocks: Vec<std::ops::Range<usize>>,
    /// The header word of the last block that is not a data block.
    last_other: Option<usize>,
    /// The Bigarrays whose headers lie in the chunk: the word of their first field (the
    /// operations) and their data's bytes.
    bigarrays: Vec<(usize, usize)>,
    /// Whether a block whose header lies in the chunk may be written by the load: a
    /// scannable block (its pointers relocated) or a custom block (its operations fixed
    /// up, a Bigarray's data pointer relocated).
    written: bool,
}

/// Whether a load may write to a block with header `hd` (see [`Tiled::written`]).
fn may_be_written(hd: Header) -> bool {
    hd.is_scannable() || hd.tag() == layout::CUSTOM_TAG
}

/// A Bigarray's custom block `fields` (operations first) at byte `at`, as an image may
/// hold it; returns its data's bytes.
fn check_bigarray(fields: &[Word], at: usize, ocaml5: bool) -> Result<usize, LoadError> {
    let data =
        bigarray::read(fields, ocaml5).map_err(|what| bad!("Bigarray", "{what} at byte {at}"))?;
    if data.flags & bigarray::MANAGED_MASK != 0 || fields[bigarray::PROXY_FIELD] != 0 {
        return Err(bad!(
            "Bigarray",
            "the Bigarray at byte {at} has data managed elsewhere"
        ));
    }
    Ok(data.bytes)
}

/// The error for a data block at word `data_at` that is not after every other block, or
/// too small for its slack.
fn misplaced_data(data_at: usize) -> LoadError {
    bad!("tag", "abstract block (tag {}) at byte {}: abstract blocks hold Bigarray data, after every other block",
            layout::ABSTRACT_TAG,
            data_at * WORD_BYTES)
}

/// The words of chunk `k` of `chunk_words` words in a payload of `n` words.
fn chunk_range(k: usize, chunk_words: usize, n: usize) -> std::ops::Range<usize> {
    k * chunk_words..((k + 1) * chunk_words).min(n)
}

/// One chunk's words of phase 1's two bitmaps (a bit per payload word, from the chunk's
/// first): the block starts, and the starts of scannable blocks, whose fields phase 3
/// checks. Blocks are recorded in increasing order, so the bits of one bitmap word are
/// gathered in registers and stored once the walk leaves it ([`ChunkBits::flush`]):
/// or-ing each block's bit into memory made it wait for the store of the block before.
struct ChunkBits<'a> {
    starts: &'a mut [u64],
    scannable: &'a mut [u64],
    /// The bitmap word being gathered, and its bits so far.
    word: usize,
    starts_bits: u64,
    scannable_bits: u64,
}

impl<'a> ChunkBits<'a> {
    /// Bits to record in `starts` and `scannable`, all clear.
    fn new(starts: &'a mut [u64], scannable: &'a mut [u64]) -> ChunkBits<'a> {
        ChunkBits {
            starts,
            scannable,
            word: 0,
            starts_bits: 0,
            scannable_bits: 0,
        }
    }

    /// Records the start of a block at word `bit` of the chunk, after every block
    /// recorded before.
    #[inline(always)]
    fn set(&mut self, bit: usize, scannable: bool) {
        if bit / 64 != self.word {
            self.flush();
            self.word = bit / 64;
        }
        self.starts_bits |= 1 << (bit % 64);
        self.scannable_bits |= (scannable as u64) << (bit % 64);
    }

    /// Stores the bits gathered.
    fn flush(&mut self) {
        if self.starts_bits != 0 {
            self.starts[self.word] |= self.starts_bits;
            self.scannable[self.word] |= self.scannable_bits;
        }
        (self.starts_bits, self.scannable_bits) = (0, 0);
    }
}

/// Phase 1 for chunk `k`: its blocks from its first header, recorded in `bits`.
fn tile_chunk(
    payload: &[Word],
    k: usize,
    e: &Expected,
    mut bits: ChunkBits,
) -> Result<Tiled, LoadError> {
    let n = payload.len();
    let chunk_words = e.chunk_bytes / WORD_BYTES;
    let range = chunk_range(k, chunk_words, n);
    let first = e.chunks[k].first;
    let mut tiled = Tiled::default();
    if first == NO_BLOCK {
        return Ok(tiled);
    }
    let in_chunk = first.is_multiple_of(WORD_BYTES as u64)
        && first >= (range.start * WORD_BYTES) as u64
        && first < (range.end * WORD_BYTES) as u64;
    if !in_chunk {
        return Err(bad!(
            "chunk index",
            "chunk {k}: first block at byte {first}, outside the chunk"
        ));
    }
    let start_byte = range.start * WORD_BYTES;
    // The fix-up entries of the custom blocks whose headers lie in this chunk.
    let lo = e
        .customs
        .partition_point(|&c| c < start_byte as u64 + WORD_BYTES as u64);
    let hi = e
        .customs
        .partition_point(|&c| c < (range.end * WORD_BYTES) as u64 + WORD_BYTES as u64);
    let mut next_custom = lo;
    let mut i = first as usize / WORD_BYTES;
    // Kept apart from `tiled` while the loop runs (in registers): the block count, the
    // last header, the last header of a block that is not a data block (`NONE` if none).
    const NONE: usize = usize::MAX;
    let (mut blocks, mut last_header, mut last_other) = (0, 0, NONE);
    let mut written = false;
    while i < range.end {
        let hd = Header(payload[i]);
        let wosize = hd.wosize();
        if hd.color() == Color::Unmarkable
            && wosize < n - i
            && tiled.data_blocks.is_empty()
            && plain_block(hd.tag(), &payload[i + 1..i + 1 + wosize])
        {
            // What the checks below accept with nothing more to record than the block.
            bits.set(i - range.start, hd.is_scannable());
            (last_other, last_header) = (i, i);
            written |= hd.is_scannable();
            blocks += 1;
            i += 1 + wosize;
            continue;
        }
        let at = i * WORD_BYTES;
        if hd.color() != Color::Unmarkable {
            return Err(bad!(
                "block header",
                "the block at byte {at} has GC color {}, not 3",
                hd.color() as u8
            ));
        }
        if wosize > n - i - 1 {
            return Err(bad!(
                "block size",
                "the block at byte {at} ({wosize} words) overruns the payload ({} bytes)",
                n * WORD_BYTES
            ));
        }
        let fields = &payload[i + 1..i + 1 + wosize];
        let tag = hd.tag();
        if let Some(what) = refused_tag(tag, e.ocaml5) {
            return Err(bad!("tag", "{what} (tag {tag}) at byte {at}"));
        }
        // Data blocks: each with its slack, all after every other block (as the writer
        // lays them out); across chunks, checked when they join.
        let misplaced = match tiled.data_blocks.first() {
            Some(r) if tag != layout::ABSTRACT_TAG => Some(r.start - 1),
            _ if tag == layout::ABSTRACT_TAG && wosize < data_wosize(0) => Some(i),
            _ => None,
        };
        if let Some(data_at) = misplaced {
            return Err(misplaced_data(data_at));
        }
        // At least what compare, hash and Marshal read ([`layout::min_wosize`]); a boxed
        // float and a boxed integer exactly one word of payload, a forward one field.
        let size_ok = match tag {
            layout::FORWARD_TAG | layout::DOUBLE_TAG => wosize == 1,
            // A Bigarray's size is checked with its dimensions below.
            layout::CUSTOM_TAG => {
                wosize == 2 || fields.first() == Some(&(CustomKind::Bigarray as Word))
            }
            _ => layout::min_wosize(tag).is_none_or(|min| wosize >= min),
        };
        if !size_ok {
            return Err(bad!(
                "block size",
                "a block of tag {tag} with {wosize} fields at byte {at}"
            ));
        }
        match tag {
            layout::STRING_TAG if !string_padding_ok(fields) => {
                return Err(bad!("string padding", "the string at byte {at}"));
            }
            layout::CUSTOM_TAG => {
                let id = fields[0];
                match CustomKind::from_id(id as u64) {
                    None => {
                        return Err(bad!(
                            "custom block",
                            "unknown custom block {id:#x} at byte {at}"
                        ))
                    }
                    Some(CustomKind::Bigarray) => {
                        let bytes = check_bigarray(fields, at, e.ocaml5)?;
                        push(&mut tiled.bigarrays, (i + 1, bytes))?;
                    }
                    Some(_) => {}
                }
                if next_custom >= hi || e.customs[next_custom] != at as u64 + 8 {
                    return Err(bad!(
                        "fix-up table",
                        "the custom block at byte {at} is not entry {next_custom}"
                    ));
                }
                next_custom += 1;
            }
            layout::FORWARD_TAG => push(&mut tiled.forwards, i)?,
            _ => {}
        }
        if tag == layout::ABSTRACT_TAG {
            // Not in the bitmap: no pointer field may point to a data block.
            push(&mut tiled.data_blocks, i + 1..i + 1 + wosize)?;
        } else {
            bits.set(i - range.start, hd.is_scannable());
            last_other = i;
        }
        written |= may_be_written(hd);
        blocks += 1;
        last_header = i;
        i += 1 + wosize;
    }
    if next_custom != hi {
        return Err(bad!(
            "fix-up table",
            "entry {next_custom} (byte {}) is not a custom block",
            e.customs[next_custom]
        ));
    }
    tiled.customs = hi - lo;
    tiled.end = i;
    tiled.blocks = blocks;
    tiled.last_header = last_header;
    tiled.last_other = (last_other != NONE).then_some(last_other);
    tiled.written = written;
    bits.flush();
    Ok(tiled)
}

/// Phase 4 (one thread, a few words per Bigarray): the data of each Bigarray lies inside
/// one data block (the blocks of every chunk, which may be another than the Bigarray's);
/// its data pointer is relocated by `delta`.
fn check_bigarray_data(
    payload: &mut [Word],
    tiled: &[Tiled],
    address: Word,
    delta: Word,
) -> Result<(), LoadError> {
    let data_blocks = gather(tiled.iter().map(|t| t.data_blocks.iter()))?;
    for &(field, bytes) in tiled.iter().flat_map(|t| &t.bigarrays) {
        let slot = field + bigarray::DATA_FIELD;
        let data = payload[slot];
        let off = data.wrapping_sub(address);
        // The data block whose fields start at or before `off`, if `off` is in the payload.
        let k = data_blocks.partition_point(|r| r.start * WORD_BYTES <= off);
        let inside = k.checked_sub(1).is_some_and(|k| {
            off.checked_add(bytes)
                .is_some_and(|end| end <= data_blocks[k].end * WORD_BYTES)
        });
        if !inside {
            return Err(bad!("Bigarray", "the data of the Bigarray at byte {} ({bytes} bytes at {data:#x}) is not inside a data block",
                    (field - 1) * WORD_BYTES));
        }
        if delta != 0 {
            payload[slot] = data.wrapping_add(delta);
        }
    }
    Ok(())
}

/// Why phase 1 gave up on a chunk.
#[derive(Debug)]
enum ChunkFailure {
    /// Its checksum does not match.
    Damaged,
    /// A chunk before it failed: its structure was not checked.
    Skipped,
    /// Its structure is bad.
    Bad(LoadError),
}

/// The block-start bitmap: one bit per payload word, set at block headers.
struct Starts<'a> {
    bits: &'a [u64],
}

impl Starts<'_> {
    /// Where the value `v` of a payload of `n` words written for `address` points, in
    /// words from the payload's start; `None` unless it is the first field of a block.
    #[inline(always)]
    fn target(&self, v: Word, address: Word, n: usize) -> Option<usize> {
        let off = v.wrapping_sub(address);
        if !off.is_multiple_of(WORD_BYTES) || off == 0 || off / WORD_BYTES > n {
            return None;
        }
        let header = off / WORD_BYTES - 1;
        (self.bits[header / 64] & (1 << (header % 64)) != 0).then_some(header + 1)
    }
}

/// The block that covers the start of a chunk, from an earlier chunk: its header word and
/// header.
#[derive(Clone, Copy, Debug)]
struct Cover {
    at: usize,
    header: Header,
}

/// Phase 3 for one chunk (`words`, starting at word `start` of a payload of `n` words,
/// with `scannable`, phase 1's bitmap of its scannable blocks' headers): checks and
/// relocates every pointer field in it. Raw blocks are not read again.
#[allow(clippy::too_many_arguments)]
fn pointers_chunk(
    words: &mut [Word],
    start: usize,
    n: usize,
    first: u64,
    cover: Option<Cover>,
    scannable: &[u64],
    starts: &Starts,
    address: Word,
    delta: Word,
) -> Result<(), LoadError> {
    let end = start + words.len();
    if let Some(c) = cover {
        if c.header.is_scannable() {
            let first_header = if first == NO_BLOCK {
                end
            } else {
                first as usize / WORD_BYTES
            };
            let fields = start..first_header.min(c.at + 1 + c.header.wosize());
            check_fields(words, start, fields, c.at, starts, address, n, delta)?;
        }
    }
    for (w, &word) in scannable.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            // A header phase 1 checked; its fields may run past the chunk.
            let i = start + w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let block_end = i + 1 + Header(words[i - start]).wosize();
            check_fields(
                words,
                start,
                i + 1..block_end.min(end),
                i,
                starts,
                address,
                n,
                delta,
            )?;
        }
    }
    Ok(())
}

/// Phase 3 for the fields `fields` (payload words) of the block whose header is word
/// `header_at`, within the chunk `words` that starts at word `start`: each is an
/// immediate or a pointer to a block of the payload, relocated by `delta`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn check_fields(
    words: &mut [Word],
    start: usize,
    fields: std::ops::Range<usize>,
    header_at: usize,
    starts: &Starts,
    address: Word,
    n: usize,
    delta: Word,
) -> Result<(), LoadError> {
    // An empty range may end before it starts (a covering block that ends early).
    let end = fields.end.max(fields.start);
    for (f, field) in words[fields.start - start..end - start]
        .iter_mut()
        .enumerate()
    {
        let v = *field;
        if layout::is_immediate(v) {
            continue;
        }
        if starts.target(v, address, n).is_none() {
            return Err(not_a_block(fields.start + f - header_at - 1, header_at, v));
        }
        if delta != 0 {
            // Never written at the recorded address: the page stays shared.
            *field = v.wrapping_add(delta);
        }
    }
    Ok(())
}

/// The error for field `field` of the block whose header is word `header_at`, which
/// holds `v`, not a pointer to a block of the payload.
#[cold]
#[inline(never)]
fn not_a_block(field: usize, header_at: usize, v: Word) -> LoadError {
    bad!(
        "pointer",
        "field {field} of the block at byte {} holds {v:#x}, not a block of the payload",
        header_at * WORD_BYTES
    )
}

/// Checks `payload` (written for `e.address`, now at `payload.as_ptr()`) and relocates
/// its pointers to where it is, on up to `e.threads` threads. Returns the root.
///
/// # Errors
/// [`LoadError::Bad`] naming the first check that failed (see the module's
/// documentation for which is first); [`LoadError::OutOfMemory`] when the bitmap cannot
/// be had. The payload may then be half relocated and must be dropped.
pub fn check(payload: &mut [Word], e: &Expected) -> Result<Checked, LoadError> {
    let n = payload.len();
    let chunk_words = e.chunk_bytes / WORD_BYTES;
    let chunks = n.div_ceil(chunk_words);
    if e.chunks.len() != chunks {
        return Err(bad!(
            "chunk index",
            "{} entries for {chunks} chunks",
            e.chunks.len()
        ));
    }
    let bits_per_chunk = chunk_words / 64;
    // Zeroed by the kernel as each thread first writes its part (in huge pages from 2
    // MiB on): filling them here took a page fault per 4 KiB on one thread, 4% of a
    // verified load of a 919 MB image.
    // SAFETY: all-zero bytes are a valid `u64`.
    let zeroed = || unsafe { ZeroedArray::<u64>::new(chunks * bits_per_chunk) };
    let (mut starts, mut scannable) = zeroed()
        .and_then(|starts| Ok((starts, zeroed()?)))
        .map_err(|NoMemory(bytes)| LoadError::OutOfMemory(bytes))?;

    // Phase 1: checksums and tiling, per chunk.
    let failed = FirstFailure::new();
    let shared: &[Word] = payload;
    let bitmaps = starts
        .chunks_mut(bits_per_chunk)
        .zip(scannable.chunks_mut(bits_per_chunk))
        .map(|(starts, scannable)| ChunkBits::new(starts, scannable));
    let tiled = parallel(bitmaps, e.threads, |k, bits| {
        let range = chunk_range(k, chunk_words, n);
        let tiled = if failed.before(k) {
            Err(ChunkFailure::Skipped)
        } else {
            tile_chunk(shared, k, e, bits).map_err(|err| {
                failed.record(k);
                ChunkFailure::Bad(err)
            })
        };
        if e.verify
            && format::chunk_checksum(layout::words_as_bytes(&shared[range]))
                != e.chunks[k].checksum
        {
            return Err(ChunkFailure::Damaged);
        }
        tiled
    })
    .map_err(no_memory)?;
    if let Some(k) = tiled
        .iter()
        .position(|t| matches!(t, Err(ChunkFailure::Damaged)))
    {
        return Err(damaged_chunk(k, chunk_words, n));
    }
    let mut ok = with_capacity(chunks)?;
    for t in tiled {
        match t {
            Ok(t) => ok.push(t),
            Err(ChunkFailure::Bad(err)) => return Err(err),
            Err(_) => unreachable!("a chunk is skipped only after a failed one"),
        }
    }
    let tiled = ok;

    // Phase 2: the chunks' walks join up.
    let mut covers = with_capacity(chunks)?;
    let mut next_block = 0;
    let mut cover: Option<Cover> = None;
    let (mut blocks, mut customs) = (0u64, 0usize);
    let mut first_data: Option<usize> = None;
    for (k, t) in tiled.iter().enumerate() {
        let range = chunk_range(k, chunk_words, n);
        let first = e.chunks[k].first;
        let expected = if next_block < range.end {
            next_block as u64 * WORD_BYTES as u64
        } else {
            NO_BLOCK
        };
        if first != expected {
            return Err(bad!(
                "chunk index",
                "chunk {k}: first block at {}, the blocks before it give {}",
                BlockAt(first, "none"),
                BlockAt(expected, "none (a block covers the chunk)")
            ));
        }
        covers.push(cover.filter(|_| first != range.start as u64 * WORD_BYTES as u64));
        if first != NO_BLOCK {
            next_block = t.end;
            cover = Some(Cover {
                at: t.last_header,
                header: Header(payload[t.last_header]),
            });
        }
        blocks += t.blocks;
        customs += t.customs;
        // Data blocks after every other block, across chunks (within one: phase 1).
        if let (Some(d), Some(_)) = (first_data, t.last_other) {
            return Err(misplaced_data(d));
        }
        first_data = first_data.or(t.data_blocks.first().map(|r| r.start - 1));
    }
    if next_block != n {
        return Err(bad!(
            "chunk index",
            "the blocks end at byte {}, the payload at {}",
            next_block * WORD_BYTES,
            n * WORD_BYTES
        ));
    }
    if customs != e.customs.len() {
        return Err(bad!(
            "fix-up table",
            "{} entries for {customs} custom blocks",
            e.customs.len()
        ));
    }
    if blocks != e.blocks {
        return Err(bad!(
            "block count",
            "the header says {} blocks, the payload holds {blocks}",
            e.blocks
        ));
    }

    let unwritten = if e.find_unwritten {
        let each = tiled
            .iter()
            .zip(&covers)
            .map(|(t, cover)| !t.written && cover.is_none_or(|c| !may_be_written(c.header)));
        gather(std::iter::once(each))?
    } else {
        Vec::new()
    };

    // Phase 3: pointers, per chunk.
    let base = payload.as_ptr() as Word;
    let delta = base.wrapping_sub(e.address);
    let starts = Starts { bits: &starts };
    let work = payload
        .chunks_mut(chunk_words)
        .zip(scannable.chunks(bits_per_chunk))
        .zip(covers);
    let checked = parallel(work, e.pointer_threads, |k, ((words, scannable), cover)| {
        pointers_chunk(
            words,
            k * chunk_words,
            n,
            e.chunks[k].first,
            cover,
            scannable,
            &starts,
            e.address,
            delta,
        )
    })
    .map_err(no_memory)?;
    if let Some(err) = checked.into_iter().find_map(Result::err) {
        return Err(err);
    }

    // Phase 4: Bigarray data, forward chains and the root.
    check_bigarray_data(payload, &tiled, e.address, delta)?;
    let forwards = gather(tiled.iter().map(|t| t.forwards.iter().copied()))?;
    check_forward_chains(payload, &forwards)?;
    let root = e.root as Word;
    if layout::is_immediate(root) {
        return Ok(Checked { root, unwritten });
    }
    if starts.target(e.address + root, e.address, n).is_none() {
        return Err(bad!("root", "offset {root} is not a block"));
    }
    Ok(Checked {
        root: base + root,
        unwritten,
    })
}

/// Verifies the chunk checksums of `payload` only (a trusted load), on up to
/// `e.threads` threads.
///
/// # Errors
/// [`LoadError::Bad`] ("payload checksum") naming the first damaged chunk.
pub fn verify_chunks(payload: &[Word], e: &Expected) -> Result<(), LoadError> {
    let n = payload.len();
    let chunk_words = e.chunk_bytes / WORD_BYTES;
    if e.chunks.len() != n.div_ceil(chunk_words) {
        return Err(bad!(
            "chunk index",
            "{} entries for {} chunks",
            e.chunks.len(),
            n.div_ceil(chunk_words)
        ));
    }
    let damaged = parallel(payload.chunks(chunk_words), e.threads, |k, words| {
        format::chunk_checksum(layout::words_as_bytes(words)) != e.chunks[k].checksum
    })
    .map_err(no_memory)?;
    match damaged.iter().position(|&d| d) {
        Some(k) => Err(damaged_chunk(k, chunk_words, n)),
        None => Ok(()),
    }
}

/// The error for a damaged chunk `k`.
fn damaged_chunk(k: usize, chunk_words: usize, n: usize) -> LoadError {
    let range = chunk_range(k, chunk_words, n);
    bad!(
        "payload checksum",
        "chunk {k} (bytes {} to {}) is damaged",
        range.start * WORD_BYTES,
        range.end * WORD_BYTES
    )
}

/// The items of every list of `lists`, in order, in one vector allocated at once;
/// [`LoadError::OutOfMemory`] when it cannot be had.
fn gather<T, I: ExactSizeIterator<Item = T>>(
    lists: impl Iterator<Item = I> + Clone,
) -> Result<Vec<T>, LoadError> {
    let n = lists.clone().map(|l| l.len()).sum();
    let mut all = Vec::new();
    all.try_reserve_exact(n)
        .map_err(|_| LoadError::OutOfMemory(n * std::mem::size_of::<T>()))?;
    all.extend(lists.flatten());
    Ok(all)
}

/// A chunk's first block as a message names it: "byte N", or `none` for [`NO_BLOCK`].
struct BlockAt(u64, &'static str);

impl std::fmt::Display for BlockAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            NO_BLOCK => f.write_str(self.1),
            at => write!(f, "byte {at}"),
        }
    }
}

/// An empty vector with room for `n` items; [`LoadError::OutOfMemory`] when it cannot
/// be had.
fn with_capacity<T>(n: usize) -> Result<Vec<T>, LoadError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| LoadError::OutOfMemory(n * std::mem::size_of::<T>()))?;
    Ok(v)
}

/// The load's error for memory the checks could not have.
fn no_memory(NoMemory(bytes): NoMemory) -> LoadError {
    LoadError::OutOfMemory(bytes)
}

/// Appends `x` to `v`; [`LoadError::OutOfMemory`] when `v` cannot grow (a list that
/// grows with the payload: the loader reports it, never aborts).
fn push<T>(v: &mut Vec<T>, x: T) -> Result<(), LoadError> {
    v.try_reserve(1)
        .map_err(|_| LoadError::OutOfMemory((v.len() + 1) * std::mem::size_of::<T>()))?;
    v.push(x);
    Ok(())
}

/// Refuses a cycle of forward blocks (each the only field of the one before): compare
/// follows `Forward_val` without end on one (OCaml 4.13 and 5.3, `runtime/compare.c`),
/// where a genuine value has chains, never cycles. `payload` is checked and relocated:
/// every pointer field leads to a block of it; `forwards` lists the header words of its
/// forward blocks.
fn check_forward_chains(payload: &[Word], forwards: &[usize]) -> Result<(), LoadError> {
    let base = payload.as_ptr() as Word;
    // The forward blocks by the word of their header; 0 unseen, else the walk that saw it.
    let mut seen = std::collections::HashMap::new();
    seen.try_reserve(forwards.len())
        .map_err(|_| LoadError::OutOfMemory(forwards.len() * 2 * WORD_BYTES))?;
    seen.extend(forwards.iter().map(|&i| (i, 0usize)));
    for (walk, &start) in forwards.iter().enumerate() {
        let walk = walk + 1;
        let mut at = start;
        loop {
            match seen.get(&at) {
                Some(0) => {
                    seen.insert(at, walk);
                }
                Some(&w) if w == walk => {
                    return Err(bad!(
                        "forward cycle",
                        "the forward block at byte {} leads back to itself",
                        at * WORD_BYTES
                    ))
                }
                // Another walk's chain, or not a forward block: the chain ends.
                _ => break,
            }
            let next = payload[at + 1];
            if layout::is_immediate(next) {
                break;
            }
            at = (next - base) / WORD_BYTES - 1;
        }
    }
    Ok(())
}

/// The root of a trusted payload mapped at its recorded address: only its bounds are
/// checked.
///
/// # Errors
/// [`LoadError::Bad`] when the root is not inside the payload.
pub fn trusted_root(payload: &[Word], root: u64) -> Result<Word, LoadError> {
    let root = root as Word;
    if layout::is_immediate(root) {
        return Ok(root);
    }
    if !root.is_multiple_of(WORD_BYTES) || root == 0 || root > payload.len() * WORD_BYTES {
        return Err(bad!("root", "offset {root} is outside the payload"));
    }
    Ok(payload.as_ptr() as Word + root)
}

/// Puts the running program's custom operations (`ops`, indexed by [`CustomKind`] - 1)
/// into the custom blocks that `customs` lists. Each entry is checked on its own (inside
/// the payload, increasing, a custom block with a known identifier and the size of its
/// kind), so this is safe on a trusted payload too.
///
/// Returns the bytes of the payload before the lowest Bigarray data pointer into it
/// (the blocks, then the first data block's header and slack: data blocks follow every
/// other block), or the payload's bytes when no Bigarray points into it. On a trusted
/// payload that offset is as trusted as the rest.
///
/// # Errors
/// [`LoadError::Bad`] ("fix-up table") on a bad entry; entries before it were applied.
pub fn fix_customs(
    payload: &mut [Word],
    customs: &[u64],
    ops: &[Word; 4],
) -> Result<usize, LoadError> {
    let n = payload.len();
    let base = payload.as_ptr() as Word;
    let mut data_at = n * WORD_BYTES;
    let mut previous = 0u64;
    for (k, &entry) in customs.iter().enumerate() {
        let field = (entry / WORD_BYTES as u64) as usize;
        let wosize =
            (entry > previous && entry % WORD_BYTES as u64 == 0 && field >= 1 && field + 1 < n)
                .then(|| Header(payload[field - 1]))
                .filter(|hd| hd.tag() == layout::CUSTOM_TAG && hd.color() == Color::Unmarkable)
                .map(|hd| hd.wosize())
                .filter(|&w| w <= n - field);
        let kind = wosize.and_then(|w| {
            let kind = CustomKind::from_id(payload[field] as u64)?;
            let size_ok = match kind {
                CustomKind::Bigarray => {
                    w > bigarray::NUM_DIMS_FIELD
                        && payload[field + bigarray::NUM_DIMS_FIELD] <= bigarray::MAX_NUM_DIMS
                        && w == bigarray::wosize(payload[field + bigarray::NUM_DIMS_FIELD])
                }
                _ => w == 2,
            };
            size_ok.then_some(kind)
        });
        let Some(kind) = kind else {
            return Err(bad!(
                "fix-up table",
                "entry {k} (byte {entry}) is not a custom block"
            ));
        };
        payload[field] = ops[kind as usize - 1];
        if kind == CustomKind::Bigarray {
            let offset = payload[field + bigarray::DATA_FIELD].wrapping_sub(base);
            data_at = data_at.min(offset);
        }
        previous = entry;
    }
    Ok(data_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The padding rule byte by byte: last byte `pad` at most 7, the `pad` bytes before
    /// it zero.
    fn padding_by_bytes(word: Word) -> bool {
        let bytes = word.to_ne_bytes();
        let pad = bytes[WORD_BYTES - 1] as usize;
        pad < WORD_BYTES
            && bytes[WORD_BYTES - 1 - pad..WORD_BYTES - 1]
                .iter()
                .all(|&b| b == 0)
    }

    #[test]
    fn string_padding_matches_the_rule_byte_by_byte() {
        let mut words = Vec::new();
        for pad in 0..=9u8 {
            for zeros in 0..=7usize {
                // `zeros` zero bytes before the last one, other bytes nonzero.
                let mut bytes = [0x61u8; WORD_BYTES];
                bytes[WORD_BYTES - 1] = pad;
                for b in &mut bytes[WORD_BYTES - 1 - zeros..WORD_BYTES - 1] {
                    *b = 0;
                }
                words.push(Word::from_ne_bytes(bytes));
                // and one nonzero byte inside the zeros, at each place
                for j in WORD_BYTES - 1 - zeros..WORD_BYTES - 1 {
                    let mut b = bytes;
                    b[j] = 1;
                    words.push(Word::from_ne_bytes(b));
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            words.push(x as Word);
            words.push((x as Word) & !(0xff << 56) | ((x as Word % 9) << 56));
        }
        let mut accepted = 0;
        for w in words {
            assert_eq!(string_padding_ok(&[w]), padding_by_bytes(w), "{w:#x}");
            accepted += usize::from(padding_by_bytes(w));
        }
        assert!(accepted > 100, "both answers occur");
    }
}
