//! The checks a payload passes before its root is handed out, and its relocation.
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

use super::format::CustomKind;
use super::LoadError;
use crate::bigarray;
use crate::copy::data::data_wosize;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

fn bad(check: &'static str, detail: String) -> LoadError {
    LoadError::Bad { check, detail }
}

/// One bit per word of the payload (and one past its end): set where a block's first
/// field is.
struct Starts {
    bits: Vec<u64>,
}

impl Starts {
    fn new(words: usize) -> Starts {
        Starts {
            bits: vec![0; (words + 1).div_ceil(64)],
        }
    }

    #[inline(always)]
    fn set(&mut self, word: usize) {
        self.bits[word / 64] |= 1 << (word % 64);
    }

    #[inline(always)]
    fn get(&self, word: usize) -> bool {
        self.bits
            .get(word / 64)
            .is_some_and(|b| b & (1 << (word % 64)) != 0)
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
fn string_padding_ok(fields: &[Word]) -> bool {
    let last_word = fields[fields.len() - 1].to_ne_bytes();
    let pad = last_word[WORD_BYTES - 1] as usize;
    pad < WORD_BYTES
        && last_word[WORD_BYTES - 1 - pad..WORD_BYTES - 1]
            .iter()
            .all(|&b| b == 0)
}

/// What pass 1 found besides the block starts.
struct Tiled {
    /// The first field of every block that a pointer field may point to: every block
    /// but the data blocks.
    starts: Starts,
    /// The data blocks, as word ranges of their fields, in increasing order.
    data_blocks: Vec<std::ops::Range<usize>>,
    /// The Bigarrays: the word of their first field (the operations) and their bytes.
    bigarrays: Vec<(usize, usize)>,
}

/// A Bigarray's custom block `fields` (operations first) at byte `at`, as an image may
/// hold it; returns its data's bytes.
fn check_bigarray(fields: &[Word], at: usize, ocaml5: bool) -> Result<usize, LoadError> {
    let data = bigarray::read(fields, ocaml5)
        .map_err(|what| bad("Bigarray", format!("{what} at byte {at}")))?;
    if data.flags & bigarray::MANAGED_MASK != 0 || fields[bigarray::PROXY_FIELD] != 0 {
        return Err(bad(
            "Bigarray",
            format!("the Bigarray at byte {at} has data managed elsewhere"),
        ));
    }
    Ok(data.bytes)
}

/// Pass 1: the blocks tile the payload; headers, sizes, tags, string padding, custom
/// blocks against the fix-up table. Returns the block starts, data blocks and Bigarrays.
fn tile(payload: &[Word], customs: &[u64], blocks: u64, ocaml5: bool) -> Result<Tiled, LoadError> {
    let n = payload.len();
    let mut starts = Starts::new(n);
    let mut data_blocks: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bigarrays = Vec::new();
    let mut i = 0;
    let mut found = 0u64;
    let mut next_custom = 0;
    while i < n {
        let hd = Header(payload[i]);
        let at = i * WORD_BYTES;
        if hd.color() != Color::Unmarkable {
            return Err(bad(
                "block header",
                format!(
                    "the block at byte {at} has GC color {}, not 3",
                    hd.color() as u8
                ),
            ));
        }
        let wosize = hd.wosize();
        if wosize > n - i - 1 {
            return Err(bad(
                "block size",
                format!(
                    "the block at byte {at} ({wosize} words) overruns the payload ({} bytes)",
                    n * WORD_BYTES
                ),
            ));
        }
        let fields = &payload[i + 1..i + 1 + wosize];
        let tag = hd.tag();
        if let Some(what) = refused_tag(tag, ocaml5) {
            return Err(bad("tag", format!("{what} (tag {tag}) at byte {at}")));
        }
        // Data blocks: each with its slack, all after every other block (as the writer
        // lays them out).
        let misplaced_data = match data_blocks.first() {
            Some(r) if tag != layout::ABSTRACT_TAG => Some(r.start - 1),
            _ if tag == layout::ABSTRACT_TAG && wosize < data_wosize(0) => Some(i),
            _ => None,
        };
        if let Some(data_at) = misplaced_data {
            return Err(bad(
                "tag",
                format!(
                    "abstract block (tag {}) at byte {}: abstract blocks hold Bigarray data, after every other block",
                    layout::ABSTRACT_TAG,
                    data_at * WORD_BYTES
                ),
            ));
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
            return Err(bad(
                "block size",
                format!("a block of tag {tag} with {wosize} fields at byte {at}"),
            ));
        }
        if tag == layout::STRING_TAG && !string_padding_ok(fields) {
            return Err(bad("string padding", format!("the string at byte {at}")));
        }
        if tag == layout::CUSTOM_TAG {
            match CustomKind::from_id(fields[0] as u64) {
                None => {
                    return Err(bad(
                        "custom block",
                        format!("unknown custom block {:#x} at byte {at}", fields[0]),
                    ))
                }
                Some(CustomKind::Bigarray) => {
                    bigarrays.push((i + 1, check_bigarray(fields, at, ocaml5)?));
                }
                Some(_) => {}
            }
            if customs.get(next_custom) != Some(&(at as u64 + 8)) {
                return Err(bad(
                    "fix-up table",
                    format!("the custom block at byte {at} is not entry {next_custom}"),
                ));
            }
            next_custom += 1;
        }
        if tag == layout::ABSTRACT_TAG {
            data_blocks.push(i + 1..i + 1 + wosize);
        } else {
            starts.set(i + 1);
        }
        found += 1;
        i += 1 + wosize;
    }
    if next_custom != customs.len() {
        return Err(bad(
            "fix-up table",
            format!("{} entries for {next_custom} custom blocks", customs.len()),
        ));
    }
    if found != blocks {
        return Err(bad(
            "block count",
            format!("the header says {blocks} blocks, the payload holds {found}"),
        ));
    }
    Ok(Tiled {
        starts,
        data_blocks,
        bigarrays,
    })
}

/// Checks that the data of each Bigarray lies inside one data block, and relocates its
/// data pointer by `delta`.
fn check_bigarray_data(
    payload: &mut [Word],
    tiled: &Tiled,
    address: Word,
    delta: Word,
) -> Result<(), LoadError> {
    for &(field, bytes) in &tiled.bigarrays {
        let slot = field + bigarray::DATA_FIELD;
        let data = payload[slot];
        let off = data.wrapping_sub(address);
        // The data block whose fields start at or before `off`, if `off` is in the payload.
        let k = tiled
            .data_blocks
            .partition_point(|r| r.start * WORD_BYTES <= off);
        let inside = k.checked_sub(1).is_some_and(|k| {
            let r = &tiled.data_blocks[k];
            off.checked_add(bytes)
                .is_some_and(|end| end <= r.end * WORD_BYTES)
        });
        if !inside {
            return Err(bad(
                "Bigarray",
                format!(
                    "the data of the Bigarray at byte {} ({bytes} bytes at {data:#x}) is not inside a data block",
                    (field - 1) * WORD_BYTES
                ),
            ));
        }
        payload[slot] = data.wrapping_add(delta);
    }
    Ok(())
}

/// Where the value `v` of a payload written for `address` points, in words from the
/// payload's start; `None` unless it is the first field of a block.
#[inline(always)]
fn target(v: Word, address: Word, starts: &Starts) -> Option<usize> {
    let off = v.wrapping_sub(address);
    (off.is_multiple_of(WORD_BYTES) && starts.get(off / WORD_BYTES) && off != 0)
        .then_some(off / WORD_BYTES)
}

/// Checks `payload` (written for `address`, now at `payload.as_ptr()`) and relocates its
/// pointers to where it is. Returns the root.
///
/// # Errors
/// [`LoadError::Bad`] naming the first check that failed; the payload may then be half
/// relocated and must be dropped.
pub fn check(
    payload: &mut [Word],
    address: Word,
    root: u64,
    customs: &[u64],
    blocks: u64,
    ocaml5: bool,
) -> Result<Word, LoadError> {
    let tiled = tile(payload, customs, blocks, ocaml5)?;
    let starts = &tiled.starts;
    let base = payload.as_ptr() as Word;
    let delta = base.wrapping_sub(address);
    let n = payload.len();
    let mut i = 0;
    while i < n {
        let hd = Header(payload[i]);
        let wosize = hd.wosize();
        if hd.is_scannable() {
            for (k, field) in payload[i + 1..i + 1 + wosize].iter_mut().enumerate() {
                let v = *field;
                if layout::is_immediate(v) {
                    continue;
                }
                if target(v, address, starts).is_none() {
                    return Err(bad(
                        "pointer",
                        format!(
                            "field {k} of the block at byte {} holds {v:#x}, not a block of the payload",
                            i * WORD_BYTES
                        ),
                    ));
                }
                if delta != 0 {
                    // Never written at the recorded address: the page stays shared.
                    *field = v.wrapping_add(delta);
                }
            }
        }
        i += 1 + wosize;
    }
    check_bigarray_data(payload, &tiled, address, delta)?;
    check_forward_chains(payload)?;
    let root = root as Word;
    if layout::is_immediate(root) {
        return Ok(root);
    }
    if !starts.get(root / WORD_BYTES) || !root.is_multiple_of(WORD_BYTES) {
        return Err(bad("root", format!("offset {root} is not a block")));
    }
    Ok(base + root)
}

/// Refuses a cycle of forward blocks (each the only field of the one before): compare
/// follows `Forward_val` without end on one (OCaml 4.13 and 5.3, `runtime/compare.c`),
/// where a genuine value has chains, never cycles. `payload` is checked and relocated:
/// every pointer field leads to a block of it.
fn check_forward_chains(payload: &[Word]) -> Result<(), LoadError> {
    let base = payload.as_ptr() as Word;
    // The forward blocks by the word of their header; 0 unseen, else the walk that saw it.
    let mut seen: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut i = 0;
    while i < payload.len() {
        let hd = Header(payload[i]);
        if hd.tag() == layout::FORWARD_TAG {
            seen.insert(i, 0);
        }
        i += 1 + hd.wosize();
    }
    let starts: Vec<usize> = seen.keys().copied().collect();
    for (walk, start) in starts.into_iter().enumerate() {
        let walk = walk + 1;
        let mut at = start;
        loop {
            match seen.get(&at) {
                Some(0) => {
                    seen.insert(at, walk);
                }
                Some(&w) if w == walk => {
                    return Err(bad(
                        "forward cycle",
                        format!(
                            "the forward block at byte {} leads back to itself",
                            at * WORD_BYTES
                        ),
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
        return Err(bad("root", format!("offset {root} is outside the payload")));
    }
    Ok(payload.as_ptr() as Word + root)
}

/// Puts the running program's custom operations (`ops`, indexed by [`CustomKind`] - 1)
/// into the custom blocks that `customs` lists. Each entry is checked on its own (inside
/// the payload, increasing, a custom block with a known identifier and the size of its
/// kind), so this is safe on a trusted payload too.
///
/// # Errors
/// [`LoadError::Bad`] ("fix-up table") on a bad entry; entries before it were applied.
pub fn fix_customs(
    payload: &mut [Word],
    customs: &[u64],
    ops: &[Word; 4],
) -> Result<(), LoadError> {
    let n = payload.len();
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
            return Err(bad(
                "fix-up table",
                format!("entry {k} (byte {entry}) is not a custom block"),
            ));
        };
        payload[field] = ops[kind as usize - 1];
        previous = entry;
    }
    Ok(())
}
