//! The path of small values: a copy of at most [`MAX_BLOCKS`] blocks and [`MAX_WORDS`]
//! words, made by one walk into a buffer on the stack.
//!
//! Most copies that a cache makes one entry at a time, and most region adds, are values
//! of a few blocks to a few hundred: a record and its strings, a short list of them.
//! For those, the general traversal's fixed costs (its queue, visited set and pending
//! stack, the prefetch accounting, a second read of every block, the restore pass) are
//! most of the call, and its cost per block (some 400 instructions against this walk's
//! 150) is paid again at every copy. Here each block is read once: the header and the
//! fields of a scannable block into a buffer laid out as the copy will be (a pointer to
//! a copied block stored as its byte offset in the copy), a raw block (string, float,
//! boxed integer) straight from the source when the copy is written. A block seen
//! before is told by its address: compared with each block found so far while they are
//! at most [`LINEAR_BLOCKS`] (a 64-bit filter first), then looked up in an index by
//! address built at that moment (a hash table on the stack). Nothing is written to the
//! source and nothing needs restoring. The buffer then goes to the [`Output`] as one
//! run, the raw blocks read into it and the copy's address added to the offsets.
//!
//! The walk is the general one's, depth first by groups ([`super::pending`]): a value
//! copies to the same bytes whichever path takes it. It gives up, having written and
//! allocated nothing, on anything out of its way: more blocks or words than the buffer
//! holds, an infix pointer, a tag that may be refused (lazy values, abstract blocks,
//! custom blocks other than the boxed integers, OCaml 5's continuations); the general
//! traversal then copies the value or says why it cannot.
//!
//! Each field and header is read once, so the copy is well formed even when other
//! domains write to the source, as `read_field` (in `copy`) explains: every field of the
//! copy holds a value that the field held at some moment.

use std::cell::Cell;
use std::mem::MaybeUninit;

use super::{first_value_of, read_field, Heap, Measured, Output, Written};
use crate::copy::CopyError;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

/// The most blocks a small copy holds.
pub const MAX_BLOCKS: usize = 256;
/// The most words (headers included) a small copy holds: 16 KiB of stack, and offsets
/// that fit a `u16`.
pub const MAX_WORDS: usize = 2048;
/// Blocks told apart by comparing addresses one by one; beyond, through an index by
/// address.
pub const LINEAR_BLOCKS: usize = 16;

/// Copies made by the general traversal, without trying this path, after the walk gave
/// up on a value: a run of values just beyond its limits (a list of 20 cells copied one
/// at a time) then pays for a walk that gives up once in `SKIPPED + 1` copies, not at
/// every copy.
const SKIPPED: u8 = 8;

thread_local! {
    /// Copies this thread still makes without trying this path.
    static SKIP: Cell<u8> = const { Cell::new(0) };
}

/// Whether the next copy of this thread should try this path: not for the `SKIPPED` (8)
/// copies after the walk gave up, unless one of them turns out small.
#[inline(always)]
pub fn worth_trying() -> bool {
    SKIP.with(|skip| {
        let left = skip.get();
        if left == 0 {
            return true;
        }
        skip.set(left - 1);
        false
    })
}

/// Records a copy of `blocks` blocks and `bytes` bytes made by the general traversal,
/// after the walk gave up on it (`tried`) or without trying: a value small enough for
/// this path that was not tried ends the skipping at once.
#[inline(always)]
pub fn note_general_copy(tried: bool, blocks: usize, bytes: usize) {
    let small = blocks <= MAX_BLOCKS && bytes <= MAX_WORDS * WORD_BYTES;
    if tried || small {
        SKIP.with(|skip| skip.set(if tried { SKIPPED } else { 0 }));
    }
}

/// A block found by the walk.
#[derive(Clone, Copy)]
struct Found {
    /// Its first field, in the source.
    block: Word,
    /// Its header, as read when it was found.
    header: Header,
    /// Offset of its header in the copy, in words.
    at: usize,
}

/// The walk over a small value and the copy it builds.
struct Walk<'a, H> {
    heap: &'a mut H,
    /// The blocks found, in the order of the copy; `found[..count]` are initialised.
    found: [MaybeUninit<Found>; MAX_BLOCKS],
    count: usize,
    /// The copy's words; `words[..len]` are written once the walk is done.
    words: [MaybeUninit<Word>; MAX_WORDS],
    len: usize,
    /// The words of the copy that are pointers into it, held as their offset in bytes:
    /// `pointers[..pointer_count]` are initialised.
    pointers: [MaybeUninit<u16>; MAX_WORDS],
    pointer_count: usize,
    /// A filter of the first [`LINEAR_BLOCKS`] blocks found: bit [`filter_bit`] of each
    /// is set, so a block whose bit is clear was not found, and is not looked for.
    filter: u64,
    /// The found blocks by address, once there are more than [`LINEAR_BLOCKS`]
    /// (uninitialised before).
    index: MaybeUninit<Index>,
}

/// Slots of an [`Index`]: twice the most blocks, so that it is at most half full and
/// its probe sequences stay short.
const INDEX_SLOTS: usize = 2 * MAX_BLOCKS;

/// Found blocks by address: open addressing with linear probing; a slot holds the
/// block's index in [`Walk::found`] plus one, 0 when empty.
struct Index([u16; INDEX_SLOTS]);

impl Index {
    /// The first slot to probe for the block at `v`: Fibonacci hashing of its word
    /// address.
    #[inline(always)]
    fn slot_of(v: Word) -> usize {
        let hash = ((v / WORD_BYTES) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (hash >> (64 - INDEX_SLOTS.trailing_zeros())) as usize
    }
}

/// The bit of [`Walk::filter`] for the block at `v`: blocks are mostly two words long or
/// more, so neighbouring blocks differ in the address bits from 4 on.
#[inline(always)]
fn filter_bit(v: Word) -> u64 {
    1 << ((v >> 4) & 63)
}

/// Copies `root`, a pointer to a block that `heap` says to copy, into `out` when the value
/// is small; `None` when it is not for this path (then nothing was written or allocated,
/// and the source is as it was).
///
/// # Errors
/// [`Output::begin`]'s; nothing was written then.
///
/// # Safety
/// As [`super::copy_into`]: `root` and the blocks it reaches are well formed; others may
/// write to fields of its scannable blocks only as `read_field` (in `copy`) allows.
#[inline]
pub unsafe fn copy_into<H: Heap, O: Output>(
    root: Word,
    heap: &mut H,
    out: &mut O,
) -> Option<Result<Written, CopyError>> {
    let mut slot = MaybeUninit::uninit();
    let walk = Walk::new(&mut slot, heap);
    // SAFETY: forwarded.
    unsafe { walk.run(root)? };
    Some(walk.write(out))
}

/// What a copy of `root` takes when the value is small ([`super::measure`]'s answer; no
/// memory besides the stack); `None` when it is not for this path.
///
/// # Safety
/// As [`copy_into`].
pub unsafe fn measure<H: Heap>(root: Word, heap: &mut H) -> Option<Measured> {
    let mut slot = MaybeUninit::uninit();
    let walk = Walk::new(&mut slot, heap);
    // SAFETY: forwarded.
    unsafe { walk.run(root)? };
    Some(Measured {
        bytes: walk.len * WORD_BYTES,
        blocks: walk.count,
        transient_bytes: 0,
    })
}

impl<'a, H: Heap> Walk<'a, H> {
    /// A walk that has found nothing yet, made in `slot`. Only its few scalar fields are
    /// written: its arrays (a kilobyte) stay uninitialised, where a struct literal let
    /// the compiler clear them with `memset` (seen in `Region.add`).
    #[inline(always)]
    fn new<'s>(slot: &'s mut MaybeUninit<Walk<'a, H>>, heap: &'a mut H) -> &'s mut Walk<'a, H> {
        let p = slot.as_mut_ptr();
        // SAFETY: `p` is valid for writes; every field but the arrays is written here,
        // and the arrays hold `MaybeUninit` elements, valid uninitialised: the walk is
        // then initialised.
        unsafe {
            std::ptr::addr_of_mut!((*p).heap).write(heap);
            std::ptr::addr_of_mut!((*p).count).write(0);
            std::ptr::addr_of_mut!((*p).len).write(0);
            std::ptr::addr_of_mut!((*p).pointer_count).write(0);
            std::ptr::addr_of_mut!((*p).filter).write(0);
            slot.assume_init_mut()
        }
    }

    /// Hands the copy to `out`.
    #[inline(always)]
    fn write<O: Output>(&self, out: &mut O) -> Result<Written, CopyError> {
        let bytes = self.len * WORD_BYTES;
        let base = out.begin(bytes)?;
        crate::fault::point("write");
        // The whole copy as one run (at most `MAX_WORDS`, far below `MAX_RUN`): first the
        // walk's words, then the fields of raw blocks over the words the walk left
        // unwritten, then the base added to every pointer.
        let dst = out.next(self.len);
        // SAFETY: `dst` has room for `len` words. `MaybeUninit` words are copied as they
        // are: those the walk left unwritten (the fields of raw blocks) are overwritten
        // below, before anyone reads the copy.
        unsafe {
            let words = self.words.as_ptr();
            std::ptr::copy_nonoverlapping(words, dst.cast::<MaybeUninit<Word>>(), self.len)
        };
        for k in 0..self.count {
            let f = self.found(k);
            let n = f.header.wosize();
            if n != 0 && !f.header.is_scannable() {
                // SAFETY: a raw block of the source has `n` readable words, none a
                // pointer, read here once (as the general traversal's snapshot does: its
                // size is fixed, and each byte copied is one the block held); its fields
                // are words `f.at + 1..f.at + 1 + n` of the copy.
                unsafe { copy_short(f.block as *const Word, dst.add(f.at + 1), n) };
            }
        }
        for p in &self.pointers[..self.pointer_count] {
            // SAFETY: `pointers[..pointer_count]` are initialised, each with a word below
            // `len`, written above.
            unsafe { *dst.add(usize::from(p.assume_init())) += base };
        }
        Ok(Written {
            // The root's block is the first one found.
            root: base + WORD_BYTES,
            bytes,
            blocks: self.count,
            data_bytes: 0,
            transient_bytes: 0,
        })
    }

    /// Block `k` found.
    #[inline(always)]
    fn found(&self, k: usize) -> Found {
        debug_assert!(k < self.count);
        // SAFETY: callers pass `k < count`: found blocks are initialised.
        unsafe { self.found[k].assume_init() }
    }

    /// Finds the root's block and then every block it leads to, depth first by groups:
    /// the blocks that one block's fields lead to, found together, are scanned next.
    unsafe fn run(&mut self, root: Word) -> Option<()> {
        // SAFETY: `root` points to a block of the source.
        unsafe { self.discover(root)? };
        crate::fault::point("measure");
        // Runs of found blocks waiting to be scanned, `(next, end)`; a run is pushed
        // only when its blocks were just found, so there are at most `MAX_BLOCKS`.
        // `runs[..depth]` are initialised.
        let mut runs = [MaybeUninit::<(u16, u16)>::uninit(); MAX_BLOCKS];
        runs[0].write((0, 1));
        let mut depth = 1;
        while depth > 0 {
            // SAFETY: `depth - 1 < depth`: an initialised run.
            let run = unsafe { runs[depth - 1].assume_init_mut() };
            let (next, end) = *run;
            if next == end {
                depth -= 1;
                continue;
            }
            run.0 += 1;
            let children = self.count;
            // SAFETY: `next < count`: runs hold found blocks.
            unsafe { self.scan(self.found(usize::from(next)))? };
            if self.count > children {
                // At most `MAX_BLOCKS` blocks: both fit a `u16`.
                runs[depth].write((children as u16, self.count as u16));
                depth += 1;
            }
        }
        Some(())
    }

    /// Reads the header of the block `v` points to and, when the path can copy it, gives
    /// it the next place in the copy. Returns its index.
    #[inline(always)]
    unsafe fn discover(&mut self, v: Word) -> Option<usize> {
        // SAFETY: `v` points to a block (or an infix header) of the source.
        let hd = unsafe { layout::read_header(v) };
        let n = hd.wosize();
        if self.count == MAX_BLOCKS || n >= MAX_WORDS - self.len {
            return None;
        }
        match hd.tag() {
            layout::FORCING_TAG..=layout::LAZY_TAG | layout::INFIX_TAG | layout::ABSTRACT_TAG => {
                return None
            }
            // SAFETY: field 0 of a custom block is its operations pointer.
            layout::CUSTOM_TAG if !self.heap.is_copyable_custom(unsafe { *(v as *const Word) }) => {
                return None
            }
            _ => {}
        }
        let at = self.len;
        self.words[at].write(hd.with_color(Color::Unmarkable).0);
        let index = self.count;
        self.found[index].write(Found {
            block: v,
            header: hd,
            at,
        });
        self.count += 1;
        self.len += 1 + n;
        if self.count <= LINEAR_BLOCKS {
            self.filter |= filter_bit(v);
        } else if self.count == LINEAR_BLOCKS + 1 {
            self.build_index();
        } else {
            self.index_insert(index);
        }
        Some(index)
    }

    /// The index of the found block at `v`, if it was found.
    #[inline(always)]
    fn known(&self, v: Word) -> Option<usize> {
        if self.count <= LINEAR_BLOCKS {
            if self.filter & filter_bit(v) == 0 {
                return None;
            }
            return (0..self.count).find(|&j| self.found(j).block == v);
        }
        // SAFETY: built when the count passed `LINEAR_BLOCKS`.
        let index = unsafe { self.index.assume_init_ref() };
        let mut slot = Index::slot_of(v);
        loop {
            let entry = usize::from(index.0[slot]);
            if entry == 0 {
                return None;
            }
            if self.found(entry - 1).block == v {
                return Some(entry - 1);
            }
            slot = (slot + 1) % INDEX_SLOTS;
        }
    }

    /// Builds the index of the blocks found so far, when they have just become more than
    /// [`LINEAR_BLOCKS`].
    #[cold]
    #[inline(never)]
    fn build_index(&mut self) {
        self.index.write(Index([0; INDEX_SLOTS]));
        for k in 0..self.count {
            self.index_insert(k);
        }
    }

    /// Enters found block `k` in the index.
    #[inline(always)]
    fn index_insert(&mut self, k: usize) {
        let block = self.found(k).block;
        // SAFETY: built when the count passed `LINEAR_BLOCKS`, before any insertion.
        let index = unsafe { self.index.assume_init_mut() };
        let mut slot = Index::slot_of(block);
        // At most `MAX_BLOCKS` entries in twice as many slots: an empty one is found.
        while index.0[slot] != 0 {
            slot = (slot + 1) % INDEX_SLOTS;
        }
        // `k < MAX_BLOCKS`: fits a `u16`.
        index.0[slot] = k as u16 + 1;
    }

    /// Reads the fields of the found block `f` into the copy, finding the blocks they
    /// lead to.
    #[inline(always)]
    unsafe fn scan(&mut self, f: Found) -> Option<()> {
        if !f.header.is_scannable() {
            return Some(());
        }
        let n = f.header.wosize();
        let src = f.block as *const Word;
        let dst = f.at + 1;
        let mut first_value = 0;
        if f.header.tag() == layout::CLOSURE_TAG {
            // Code pointers, closure information and infix headers, copied as they are.
            let mut raw = [0; 2];
            for (i, word) in raw.iter_mut().enumerate().take(n) {
                // SAFETY: `i < n`, a field of the block.
                *word = unsafe { read_field(src.add(i)) };
            }
            first_value = first_value_of(f.header, &raw[..n.min(2)]);
            for i in 0..first_value {
                let word = match raw.get(i) {
                    Some(&word) => word,
                    // SAFETY: `i < first_value <= n`, a field of the block.
                    None => unsafe { read_field(src.add(i)) },
                };
                self.words[dst + i].write(word);
            }
        }
        for i in first_value..n {
            // SAFETY: `i < n`, a field of the block.
            let v = unsafe { read_field(src.add(i)) };
            let word = if !layout::is_immediate(v) && self.heap.should_copy(v) {
                let j = match self.known(v) {
                    Some(j) => j,
                    // SAFETY: a pointer read from a block of the source graph.
                    None => unsafe { self.discover(v)? },
                };
                // `dst + i < len <= MAX_WORDS`: fits a `u16`.
                self.pointers[self.pointer_count].write((dst + i) as u16);
                self.pointer_count += 1;
                (self.found(j).at + 1) * WORD_BYTES
            } else {
                v
            };
            self.words[dst + i].write(word);
        }
        Some(())
    }
}

/// Copies `n` words from `src` to `dst`: a loop for the few words of most small blocks
/// (a call to `memcpy` costs more than it copies), `memcpy` beyond.
///
/// # Safety
/// As [`std::ptr::copy_nonoverlapping`] for `n` words.
#[inline(always)]
unsafe fn copy_short(src: *const Word, dst: *mut Word, n: usize) {
    if n > 8 {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
        return;
    }
    for i in 0..n {
        // SAFETY: `i < n`, inside both ranges (the caller's contract).
        unsafe { dst.add(i).write(src.add(i).read()) };
    }
}
