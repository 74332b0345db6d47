//! The traversal: a deep copy of a graph of OCaml blocks into one allocation.
//!
//! Three passes, named after what they do:
//! 1. **measure**: a breadth-first walk from the root gives every reachable block that
//!    must be copied an offset in the copy, in the order it is first seen, and records it
//!    in the [`Queue`]. The walk is iterative: its only memory is the queue (16 bytes a
//!    block) and the visited set.
//! 2. **write**: one allocation of exactly the measured size; the queue is walked front to
//!    back, which writes the copy sequentially. Headers get the color no GC ever marks;
//!    pointer fields to copied blocks are translated to the copy, infix offsets kept.
//! 3. **restore**: the visited set gives back whatever it changed in the source.
//!
//! Every error (a block that cannot be copied, an allocator that fails) is detected in or
//! right after pass 1, before anything was written, and takes the same exit: restore, free
//! what was allocated, report. The source is left as it was, byte for byte. One error
//! shows only in pass 2: on OCaml 5 another domain may write a pointer to a new block into
//! the source between the passes; the copy has no room for it, so it is freed and the
//! error reported.
//!
//! Most of a copy's time goes to cache misses on a scattered source. Each header is read
//! once per pass, marks sit in the headers themselves where the runtime allows, and the
//! misses that remain are overlapped: the passes prefetch the blocks queued a few places
//! ahead and the targets of their fields when the source is scattered
//! (`Traversal::prefetch_ahead`), and large blocks prefetch their own fields' targets.
//!
//! The core knows nothing of ocaml-rs or of a particular runtime: a [`Heap`] says which
//! addresses are to be copied, an [`Allocator`] gives memory, a [`VisitedSet`] remembers
//! what was seen. The same code runs on OCaml 4, OCaml 5 and the fake heap of the tests.

pub mod queue;
pub mod visited;

use std::fmt;

use crate::alloc::Allocator;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};
use queue::{Entry, Queue};
use visited::{Seen, VisitedSet};

/// What the traversal needs to know about the memory it walks.
pub trait Heap {
    /// Whether the block that the pointer `v` points to is to be copied (it lives in the
    /// OCaml heap, or it is static data and static data is copied). Blocks not copied are
    /// shared: the copy keeps pointing at them.
    fn should_copy(&mut self, v: Word) -> bool;

    /// Whether a custom block whose operations are at `ops` holds plain bytes that can be
    /// copied as they are (Int32, Int64, Nativeint).
    fn is_copyable_custom(&self, ops: Word) -> bool;

    /// A name for the custom operations at `ops`, for error messages.
    fn custom_name(&self, ops: Word) -> String;

    /// Whether tags 244 and 245 are OCaml 5's lazy-being-forced and continuation tags
    /// (on OCaml 4 they are ordinary constructor tags).
    fn has_ocaml5_tags(&self) -> bool;
}

/// Why a value could not be copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyError {
    /// An `Abstract_tag` block (C data the runtime cannot look into).
    Abstract,
    /// A custom block other than Int32, Int64 and Nativeint; the operations' identifier.
    Custom(String),
    /// A lazy value not forced yet.
    UnforcedLazy,
    /// A lazy value being forced by another domain (OCaml 5).
    ForcingLazy,
    /// A continuation (OCaml 5).
    Continuation,
    /// The allocator returned NULL for this many bytes.
    OutOfMemory(usize),
    /// The allocator returned memory that is not word aligned.
    Misaligned,
    /// Another domain wrote a pointer to a new block into the value during the copy.
    Mutated,
}

impl CopyError {
    /// Whether the error is the allocator's (reported as `Out_of_memory`), not the value's.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CopyError::OutOfMemory(_))
    }
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Offheap.copy: ")?;
        match self {
            CopyError::Abstract => f.write_str("abstract block"),
            CopyError::Custom(name) => write!(
                f,
                "custom block \"{name}\" (only Int32, Int64 and Nativeint custom blocks can be copied)"
            ),
            CopyError::UnforcedLazy => f.write_str("unforced lazy value (force it before copying)"),
            CopyError::ForcingLazy => f.write_str("lazy value being forced"),
            CopyError::Continuation => f.write_str("continuation"),
            CopyError::OutOfMemory(bytes) => write!(f, "the allocator returned NULL for {bytes} bytes"),
            CopyError::Misaligned => f.write_str("the allocator returned memory that is not word aligned"),
            CopyError::Mutated => f.write_str("the value changed while it was copied (another domain wrote to it)"),
        }
    }
}

impl std::error::Error for CopyError {}

/// A finished copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The copy of the root value: an immediate or a shared pointer when nothing was
    /// copied, else a pointer into `[base, base + bytes]` (the end only for a root block
    /// of no fields, whose header is the last word).
    pub root: Word,
    /// Start of the allocation (the root block's header), or null when nothing was copied.
    pub base: *mut u8,
    /// Size of the allocation in bytes; 0 when nothing was copied.
    pub bytes: usize,
    /// Number of blocks copied.
    pub blocks: usize,
    /// Peak memory the traversal held besides the copy (queue and visited set), in bytes.
    pub transient_bytes: usize,
}

/// Copies the graph reachable from `root` into one allocation from `alloc`.
///
/// Immediates and pointers to blocks that `heap` says not to copy are returned as they
/// are, with nothing allocated.
///
/// `visited` is taken by value: a visited set serves one copy, and the compiler
/// refuses a second use.
///
/// ```compile_fail,E0382
/// # use offheap::{alloc::Malloc, copy::{self, Heap, visited::SideTable}};
/// # fn again<H: Heap>(heap: &mut H, v: usize) {
/// let table = SideTable::with_capacity(0);
/// let first = unsafe { copy::copy(v, heap, table, &mut Malloc) };
/// let second = unsafe { copy::copy(v, heap, table, &mut Malloc) }; // `table` moved
/// # }
/// ```
///
/// # Errors
/// [`CopyError`] when a reachable block cannot be copied or the allocator fails; the
/// source is then as it was and nothing stays allocated.
///
/// # Safety
/// `root` must be a valid OCaml value whose reachable blocks (those `heap` says to copy)
/// are well formed, and nothing else may read or write them during the call unless
/// `visited` never writes to the source ([`visited::SideTable`]). `alloc` must return
/// memory that nothing else uses.
pub unsafe fn copy<H: Heap, V: VisitedSet, A: Allocator>(
    root: Word,
    heap: &mut H,
    visited: V,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    if layout::is_immediate(root) || !heap.should_copy(root) {
        let kept = Copied {
            root,
            base: std::ptr::null_mut(),
            bytes: 0,
            blocks: 0,
            transient_bytes: 0,
        };
        return Ok(kept);
    }
    let mut traversal = Traversal {
        heap,
        visited,
        queue: Queue::new(),
        words: 0,
        mutated: false,
        last_discovered: 0,
        jumps: 0,
    };
    // SAFETY: the caller's contract on `root` and its graph is the traversal's.
    let outcome = unsafe { traversal.run(root, alloc) };
    crate::fault::point("restore");
    // SAFETY: the queue lists exactly the blocks the visited set marked.
    unsafe { traversal.visited.restore(&traversal.queue) };
    outcome
}

/// The state of one copy: nothing global, so concurrent copies do not meet.
struct Traversal<'a, H, V> {
    heap: &'a mut H,
    visited: V,
    /// Every block given an offset, in offset order.
    queue: Queue,
    /// Words measured so far: the offset of the next block.
    words: usize,
    /// Pass 2 met a pointer to a block that pass 1 did not see: the source changed.
    mutated: bool,
    /// The block discovered last.
    last_discovered: Word,
    /// Blocks discovered more than [`JUMP_BYTES`] away from the one before, and pointers
    /// more than that away from the block holding them: when the source is laid out in
    /// the order of the traversal and its pointers lead next door (a list, a list of
    /// boxed numbers) the hardware prefetcher does better than software prefetching,
    /// which pass 2 then skips.
    jumps: usize,
}

impl<H: Heap, V: VisitedSet> Traversal<'_, H, V> {
    /// Passes 1 and 2; the caller restores.
    unsafe fn run<A: Allocator>(&mut self, root: Word, alloc: &mut A) -> Result<Copied, CopyError> {
        // SAFETY: forwarded from `copy`.
        unsafe { self.measure(root)? };
        let transient_bytes = self.queue.allocated_bytes() + self.visited.allocated_bytes();
        let bytes = self.words * WORD_BYTES;
        let base = alloc.alloc(bytes);
        if base.is_null() {
            return Err(CopyError::OutOfMemory(bytes));
        }
        if !(base as usize).is_multiple_of(WORD_BYTES) {
            // SAFETY: `base` came from this allocator with this size and is unused.
            unsafe { alloc.free(base, bytes) };
            return Err(CopyError::Misaligned);
        }
        // SAFETY: `base` holds `bytes` bytes, exactly what pass 1 measured.
        let root = unsafe { self.write(root, base as *mut Word) };
        if self.mutated {
            // SAFETY: `base` came from this allocator with this size; nothing refers to it.
            unsafe { alloc.free(base, bytes) };
            return Err(CopyError::Mutated);
        }
        Ok(Copied {
            root,
            base,
            bytes,
            blocks: self.queue.len(),
            transient_bytes,
        })
    }

    /// Pass 1: gives every block to copy its offset.
    unsafe fn measure(&mut self, root: Word) -> Result<(), CopyError> {
        // SAFETY: `root` is a pointer to a block to copy.
        unsafe { self.discover(root)? };
        crate::fault::point("measure");
        let mut next = 0;
        while let Some(entry) = self.queue.get(next) {
            self.prefetch_ahead(next);
            next += 1;
            let fields = entry.block as *const Word;
            // SAFETY: queued entries are blocks of the source.
            let scanned = unsafe { scanned_fields(entry) };
            let mut i = scanned.start;
            // Large blocks (arrays, hash-table buckets): the target of a field a few
            // places on is fetched while this one is handled.
            while i + PREFETCH_DISTANCE < scanned.end {
                // SAFETY: `i + PREFETCH_DISTANCE` is below the block's wosize.
                prefetch(unsafe { *fields.add(i + PREFETCH_DISTANCE) }.wrapping_sub(WORD_BYTES));
                // SAFETY: `i` is below the block's wosize.
                unsafe { self.measure_field(entry.block, *fields.add(i))? };
                i += 1;
            }
            for i in i..scanned.end {
                // SAFETY: `i` is below the block's wosize.
                unsafe { self.measure_field(entry.block, *fields.add(i))? };
            }
        }
        Ok(())
    }

    /// A software pipeline for passes 1 and 2, which walk the queue in order but touch
    /// the source at random: while entry `k` is processed, the block of entry
    /// `k + 2 * PREFETCH_DISTANCE` is fetched, and the headers that the (by then cached)
    /// fields of entry `k + PREFETCH_DISTANCE` point to. Prefetches never fault, so
    /// fields that are not pointers cost nothing but the hint.
    #[inline(always)]
    fn prefetch_ahead(&self, k: usize) {
        if let Some(far) = self.queue.get(k + 2 * PREFETCH_DISTANCE) {
            prefetch(far.block - WORD_BYTES);
        }
        let Some(near) = self.queue.get(k + PREFETCH_DISTANCE) else {
            return;
        };
        if near.header.is_scannable() {
            let fields = near.block as *const Word;
            for i in 0..near.header.wosize().min(PREFETCH_FIELDS) {
                // SAFETY: `i` is below the block's wosize; the block is readable.
                let field = unsafe { *fields.add(i) };
                if !layout::is_immediate(field) {
                    prefetch(field.wrapping_sub(WORD_BYTES));
                }
            }
        }
    }

    /// Pass 1 for field `field` of `block`: discovers its block if it is a pointer to one
    /// to copy.
    #[inline(always)]
    unsafe fn measure_field(&mut self, block: Word, field: Word) -> Result<(), CopyError> {
        if !layout::is_immediate(field) && self.heap.should_copy(field) {
            self.jumps += usize::from(field.abs_diff(block) > JUMP_BYTES);
            // SAFETY: a pointer field of a well-formed block, to a block to copy.
            unsafe { self.discover(field)? };
        }
        Ok(())
    }

    /// Pass 1 for one pointer: queues its block if it was not seen yet.
    #[inline(always)]
    unsafe fn discover(&mut self, v: Word) -> Result<(), CopyError> {
        // SAFETY: `v` points to a block (or an infix header) of the source graph.
        let (block, hd) = unsafe { block_of(v) };
        // SAFETY: `block` is a block start and `hd` its current header.
        match unsafe { self.visited.lookup(block, hd) } {
            Seen::At(_) => Ok(()),
            Seen::New(hd) => {
                // SAFETY: `block` is a block start with header `hd`.
                unsafe { self.check_copyable(block, hd)? };
                // SAFETY: `block` is a block start of the source graph not yet marked.
                unsafe { self.visited.mark(block, hd, self.words) };
                self.queue.push(Entry { block, header: hd });
                self.words += hd.whsize();
                self.jumps += usize::from(block.abs_diff(self.last_discovered) > JUMP_BYTES);
                self.last_discovered = block;
                Ok(())
            }
        }
    }

    /// Rejects the blocks that cannot be copied.
    #[inline(always)]
    unsafe fn check_copyable(&self, block: Word, hd: Header) -> Result<(), CopyError> {
        match hd.tag() {
            layout::FORCING_TAG..=layout::LAZY_TAG | layout::ABSTRACT_TAG | layout::CUSTOM_TAG => {
                // SAFETY: forwarded from the caller.
                unsafe { self.check_special(block, hd) }
            }
            _ => Ok(()),
        }
    }

    /// [`Self::check_copyable`] for the few tags that may be refused.
    #[cold]
    #[inline(never)]
    unsafe fn check_special(&self, block: Word, hd: Header) -> Result<(), CopyError> {
        match hd.tag() {
            layout::ABSTRACT_TAG => Err(CopyError::Abstract),
            layout::CUSTOM_TAG => {
                // SAFETY: field 0 of a custom block is its operations pointer.
                let ops = unsafe { *(block as *const Word) };
                if self.heap.is_copyable_custom(ops) {
                    Ok(())
                } else {
                    Err(CopyError::Custom(self.heap.custom_name(ops)))
                }
            }
            layout::LAZY_TAG => Err(CopyError::UnforcedLazy),
            layout::FORCING_TAG if self.heap.has_ocaml5_tags() => Err(CopyError::ForcingLazy),
            layout::CONT_TAG if self.heap.has_ocaml5_tags() => Err(CopyError::Continuation),
            _ => Ok(()),
        }
    }

    /// Pass 2: writes every queued block at its offset from `base`; returns the root's copy.
    unsafe fn write(&mut self, root: Word, base: *mut Word) -> Word {
        crate::fault::point("write");
        let mut dst_header = base;
        let prefetching = self.jumps * 8 > self.queue.len();
        for k in 0..self.queue.len() {
            if prefetching {
                self.prefetch_ahead(k);
            }
            let entry = self.queue.get(k).expect("k < len");
            let hd = entry.header;
            let n = hd.wosize();
            let src = entry.block as *const Word;
            // SAFETY: pass 1 measured this block at this offset, inside the allocation.
            let dst = unsafe {
                dst_header.write(hd.with_color(Color::Unmarkable).0);
                dst_header.add(1)
            };
            if hd.is_scannable() {
                // SAFETY: queued entries are blocks of the source.
                let first_value = unsafe { first_value_field(entry) };
                // SAFETY: fields below `first_value` are raw words of the same block.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, first_value) };
                let mut i = first_value;
                // Large blocks (arrays, hash-table buckets): the target of a field a few
                // places on is fetched while this one is translated.
                while i + PREFETCH_DISTANCE < n {
                    // SAFETY: `i + PREFETCH_DISTANCE < n`, in bounds of both blocks.
                    unsafe {
                        prefetch((*src.add(i + PREFETCH_DISTANCE)).wrapping_sub(WORD_BYTES));
                        *dst.add(i) = self.translate(*src.add(i), base);
                    }
                    i += 1;
                }
                for i in i..n {
                    // SAFETY: `i < n`, in bounds of both blocks.
                    unsafe { *dst.add(i) = self.translate(*src.add(i), base) };
                }
            } else {
                // SAFETY: raw blocks are copied whole, both sides `n` words.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
            }
            // SAFETY: the next block starts right after this one (or at the end).
            dst_header = unsafe { dst.add(n) };
        }
        debug_assert_eq!(
            dst_header as usize - base as usize,
            self.words * WORD_BYTES,
            "measured size != written size"
        );
        // SAFETY: the root was discovered in pass 1.
        unsafe { self.translate(root, base) }
    }

    /// The value that stands in the copy for the source value `v`.
    #[inline(always)]
    unsafe fn translate(&mut self, v: Word, base: *mut Word) -> Word {
        if layout::is_immediate(v) || !self.heap.should_copy(v) {
            return v;
        }
        // SAFETY: `v` points into the source graph, all of which was discovered.
        let (block, hd) = unsafe { block_of(v) };
        // SAFETY: `block` is a block start and `hd` its current header.
        match unsafe { self.visited.lookup(block, hd) } {
            // SAFETY: pointer arithmetic inside the allocation; `v - block` is the infix
            // offset, 0 for an ordinary block.
            Seen::At(offset) => unsafe { base.add(offset + 1) as Word + (v - block) },
            // Pass 1 discovered every block, unless another domain wrote a new pointer
            // into the source meanwhile: there is no room for its block in the copy.
            Seen::New(_) => {
                self.mutated = true;
                layout::val_int(0)
            }
        }
    }
}

/// How many queue entries ahead [`Traversal::prefetch_ahead`] works.
const PREFETCH_DISTANCE: usize = 8;
/// Blocks discovered one after the other, or a pointer and its target, further apart
/// than this count as a jump.
const JUMP_BYTES: usize = 256;
/// The fields of one block whose targets are prefetched.
const PREFETCH_FIELDS: usize = 8;

/// Hints the CPU to bring the cache line of `addr` in. Never faults, whatever `addr` is.
#[inline(always)]
fn prefetch(addr: Word) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing architecturally and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch(addr as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// The block that `v` points into, with the header in front of that block now: `v`
/// itself, or the enclosing closure when `v` points at an infix header.
///
/// # Safety
/// `v` points to a block or to an infix header inside a closure block.
#[inline(always)]
unsafe fn block_of(v: Word) -> (Word, Header) {
    // SAFETY: the caller guarantees a header precedes `v`.
    let hd = unsafe { layout::read_header(v) };
    // A mark keeps the block's own tag, never the infix tag, so this test is exact.
    if hd.tag() == layout::INFIX_TAG {
        let block = v - layout::infix_offset_bytes(hd);
        // SAFETY: an infix header's wosize leads back to its closure's first field.
        (block, unsafe { layout::read_header(block) })
    } else {
        (v, hd)
    }
}

/// The first field of a scannable block that holds an OCaml value: 0, or for a closure
/// the start of its environment (code pointers and closure info come before it).
///
/// # Safety
/// `entry` describes a readable block of the source.
#[inline(always)]
unsafe fn first_value_field(entry: Entry) -> usize {
    let n = entry.header.wosize();
    if entry.header.tag() != layout::CLOSURE_TAG {
        return 0;
    }
    if n < 2 {
        return n; // no closure-info word: nothing in it is a value
    }
    // SAFETY: field 1 of a closure is the closure-info word, and `n >= 2`.
    let closinfo = unsafe { *(entry.block as *const Word).add(1) };
    layout::start_env(closinfo).min(n)
}

/// The fields of a queued block that pass 1 follows.
///
/// # Safety
/// `entry` describes a readable block of the source.
#[inline(always)]
unsafe fn scanned_fields(entry: Entry) -> std::ops::Range<usize> {
    if entry.header.is_scannable() {
        // SAFETY: forwarded.
        (unsafe { first_value_field(entry) })..entry.header.wosize()
    } else {
        0..0
    }
}
