//! The traversal: a deep copy of a graph of OCaml blocks into one allocation.
//!
//! Three passes, named after what they do:
//! 1. **measure**: a walk from the root gives every reachable block that must be copied
//!    an offset in the copy, in the order it is first seen, and records it in the
//!    [`Queue`]. The walk goes depth first by groups ([`pending`]): the unseen children
//!    of the block being scanned are queued together and scanned next, so trees built
//!    depth first (ASTs, lists) are read close to their allocation order and each
//!    block's children follow it in the copy. Where the blocks it discovers lie
//!    scattered over the heap and many wait to be scanned (a `Map` of random keys, a
//!    hash table's buckets), it goes on by batches instead ([`batches`]), so that
//!    the cache misses of many blocks overlap instead of following one another. The
//!    walk is iterative: its only memory is
//!    the queue (8 bytes a block), the stack of [`pending`] runs (24 bytes per level of
//!    the source's depth, none for a list), the visited set and, for a shared source,
//!    the snapshot (below). All of it is allocated fallibly: running out is
//!    [`CopyError::OutOfMemory`], like a NULL from the allocator.
//! 2. **write**: the queue is walked front to back, which hands the copy to an
//!    [`Output`] sequentially, in runs of words: one allocation of exactly the measured
//!    size for [`copy`], a file written as it goes for images ([`copy_into`]). Headers
//!    get the color no GC ever marks; pointer fields to copied blocks are translated to
//!    the copy, infix offsets kept.
//! 3. **restore**: the visited set gives back whatever it changed in the source.
//!
//! A large copy into memory of the default allocator is mostly made in pass 1 alone
//! ([`direct`]): from 4 MiB on, pass 1 writes each block it discovers into address
//! space reserved for the copy, and pass 2 writes only the blocks before that point.
//!
//! Every error (a block that cannot be copied, an allocator that fails, including the
//! traversal's own memory) is detected in pass 1 or right after it, before anything was
//! written to the output (what pass 1 wrote into its reservation is unmapped), and takes
//! the same exit: restore, free what was allocated, report. The source is left as it
//! was, byte for byte.
//!
//! **A source that other domains write to** (OCaml 5, [`VisitedSet::SOURCE_SHARED`]):
//! reading a block in pass 1 and again in pass 2 would let a write in between give pass 2
//! a pointer to a block pass 1 never saw, or a field the measure did not follow. So with
//! such a visited set pass 1 reads each scannable block once, when it queues it, into a
//! snapshot (a growing buffer laid out like the copy's scannable blocks), then follows
//! what it read when it scans the block, and stores
//! each pointer to a copied block already translated: its byte offset in the copy, tagged
//! `RELOCATED`. Pass 2 then writes scannable blocks from the snapshot (adding the base
//! to tagged words) and never reads them again; raw blocks (strings, floats, boxed
//! integers), whose size is fixed and which hold no pointers, are read once, in pass 2.
//! Every header is the one pass 1 read. The copy is then well formed whatever the other
//! domains do: each block is a copy of a block reachable during the copy, each field
//! holds a value that field held at some moment, sharing and cycles are as pass 1 saw
//! them. Why reading blocks that another domain writes to is safe on OCaml 5:
//! `read_field`.
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

pub mod batches;
pub mod data;
pub mod direct;
pub mod pending;
pub mod queue;
pub mod shallow;
pub mod small;
pub mod visited;

use std::fmt;

use crate::alloc::{Allocator, NoMemory};
use crate::layout::{self, Color, Header, Word, WORD_BYTES};
use data::DataTable;
use direct::{Reservation, DIRECT_FROM_WORDS};
use pending::{Pending, Run};
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

    /// A name for the custom operations at `ops`, for error messages; [`NoMemory`] when
    /// there is no memory for it.
    fn custom_name(&self, ops: Word) -> Result<String, NoMemory>;

    /// Whether tags 244 and 245 are OCaml 5's lazy-being-forced and continuation tags
    /// (on OCaml 4 they are ordinary constructor tags).
    fn has_ocaml5_tags(&self) -> bool;

    /// When `ops` are the operations of a Bigarray laid out as the runtime's
    /// `struct caml_ba_array` (see [`crate::bigarray`]), the operations its copy gets;
    /// `None` for any other custom block. The copy of a Bigarray holds its data in the
    /// same allocation ([`data`]).
    fn bigarray_ops(&self, ops: Word) -> Option<Word> {
        let _ = ops;
        None
    }
}

/// Why a value could not be copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyError {
    /// An `Abstract_tag` block (C data the runtime cannot look into).
    Abstract,
    /// A custom block other than Int32, Int64, Nativeint and Bigarray; the operations'
    /// identifier.
    Custom(String),
    /// A lazy value not forced yet.
    UnforcedLazy,
    /// A lazy value being forced by another domain (OCaml 5).
    ForcingLazy,
    /// A continuation (OCaml 5).
    Continuation,
    /// The allocator returned NULL for this many bytes, or the traversal could not get
    /// this many bytes for its own tables.
    OutOfMemory(usize),
    /// The allocator returned memory that is not word aligned.
    Misaligned,
    /// A Bigarray whose custom block is not what the runtime makes; what was found.
    Bigarray(crate::bigarray::BadBigarray),
}

impl From<NoMemory> for CopyError {
    fn from(NoMemory(bytes): NoMemory) -> CopyError {
        CopyError::OutOfMemory(bytes)
    }
}

impl CopyError {
    /// Whether the error is the allocator's (reported as `Out_of_memory`), not the value's.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CopyError::OutOfMemory(_))
    }
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Offheap.copy: {}", self.what())
    }
}

impl CopyError {
    /// What went wrong, without the name of the operation (formatted when shown, with no
    /// allocation of its own).
    pub fn what(&self) -> What<'_> {
        What(self)
    }
}

/// [`CopyError::what`].
pub struct What<'a>(&'a CopyError);

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            CopyError::Abstract => f.write_str("abstract block"),
            CopyError::Custom(name) => write!(
                f,
                "custom block \"{name}\" (only Int32, Int64, Nativeint and Bigarray custom blocks can be copied)"
            ),
            CopyError::UnforcedLazy => f.write_str("unforced lazy value (force it before copying)"),
            CopyError::ForcingLazy => f.write_str("lazy value being forced"),
            CopyError::Continuation => f.write_str("continuation"),
            CopyError::OutOfMemory(bytes) => write!(f, "no memory for {bytes} bytes"),
            CopyError::Misaligned => {
                f.write_str("the allocator returned memory that is not word aligned")
            }
            CopyError::Bigarray(what) => write!(f, "Bigarray that cannot be copied: {what}"),
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
    /// Bytes of the data blocks (Bigarray data) at the end of the allocation, after
    /// every other block; 0 when there are none.
    pub data_bytes: usize,
    /// Peak memory the traversal held besides the copy (queue, visited set and, when the
    /// source is shared, the snapshot), in bytes.
    pub transient_bytes: usize,
}

impl Copied {
    /// Bytes from `base` to the end of the blocks and the word after them: all of the
    /// copy but its Bigarray data, and what a pointer to a last block of no fields
    /// (one past the blocks) needs. Of at most `bytes`.
    pub fn blocks_bytes(&self) -> usize {
        if self.data_bytes == 0 {
            self.bytes
        } else {
            self.bytes - self.data_bytes + WORD_BYTES
        }
    }
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
/// let table = SideTable::new();
/// let first = unsafe { copy::copy(v, heap, table, &mut Malloc) };
/// let second = unsafe { copy::copy(v, heap, table, &mut Malloc) }; // `table` moved
/// # }
/// ```
///
/// # Errors
/// [`CopyError`] when a reachable block cannot be copied, or memory cannot be had (the
/// allocator's for the copy, or the traversal's own); the source is then as it was and
/// nothing stays allocated.
///
/// # Safety
/// `root` must be a valid OCaml value whose reachable blocks (those `heap` says to copy)
/// are well formed. Nothing else may read or write them during the call unless `visited`
/// is [`VisitedSet::SOURCE_SHARED`] ([`visited::SideTable`]); then others may read them
/// and write values into fields of scannable blocks, provided every block reachable at
/// any moment of the call stays allocated and well formed until it returns (OCaml 5,
/// see `read_field` in the source). `alloc` must return memory that nothing else uses.
pub unsafe fn copy<H: Heap, V: VisitedSet, A: Allocator>(
    root: Word,
    heap: &mut H,
    visited: V,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    // SAFETY: forwarded.
    contiguous(alloc, |out| unsafe { copy_into(root, heap, visited, out) })
}

/// [`copy`] by the general traversal, whatever the value's size ([`traverse_into`]).
///
/// # Errors
/// As [`copy`].
///
/// # Safety
/// As [`copy`].
pub unsafe fn traverse<H: Heap, V: VisitedSet, A: Allocator>(
    root: Word,
    heap: &mut H,
    visited: V,
    alloc: &mut A,
) -> Result<Copied, CopyError> {
    // SAFETY: forwarded.
    contiguous(alloc, |out| unsafe {
        traverse_into(root, heap, visited, out)
    })
}

/// Runs `write` into one allocation from `alloc` ([`Contiguous`]).
fn contiguous<A: Allocator>(
    alloc: &mut A,
    write: impl FnOnce(&mut Contiguous<'_, A>) -> Result<Written, CopyError>,
) -> Result<Copied, CopyError> {
    let mut out = Contiguous {
        alloc,
        base: std::ptr::null_mut(),
        next: std::ptr::null_mut(),
    };
    let written = write(&mut out)?;
    Ok(Copied {
        root: written.root,
        base: out.base,
        bytes: written.bytes,
        blocks: written.blocks,
        data_bytes: written.data_bytes,
        transient_bytes: written.transient_bytes,
    })
}

/// What [`copy_into`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The copy of the root value: an immediate or a shared pointer when nothing was
    /// copied, else a pointer for the address [`Output::begin`] returned.
    pub root: Word,
    /// Bytes written to the output; 0 when nothing was copied (then `begin` was not
    /// called).
    pub bytes: usize,
    /// Number of blocks copied.
    pub blocks: usize,
    /// Bytes of the data blocks at the end (as [`Copied::data_bytes`]).
    pub data_bytes: usize,
    /// Peak memory the traversal held besides the output, in bytes (as
    /// [`Copied::transient_bytes`]).
    pub transient_bytes: usize,
}

impl Written {
    /// What a copy of `root` is when nothing is copied: `root` itself.
    fn kept(root: Word) -> Written {
        Written {
            root,
            bytes: 0,
            blocks: 0,
            data_bytes: 0,
            transient_bytes: 0,
        }
    }
}

/// Where pass 2 puts a copy: its words arrive in offset order, front to back, in runs of
/// at most [`MAX_RUN`] words (in the general traversal a block's header is a run of its
/// own and its fields one run, or several when it has more than [`MAX_RUN`]; the path of
/// small values hands over its whole copy as one run). One allocation
/// ([`copy`]) is one output; an image file written as the copy is made is another.
pub trait Output {
    /// Called once, after pass 1 and before any [`Output::next`], with the size of the
    /// copy in bytes. Returns the address the copy is made for: pointers in the copy are
    /// written as if its first word (the first block's header) were at that address.
    ///
    /// # Errors
    /// A [`CopyError`] when the output cannot take the copy; nothing was written then.
    fn begin(&mut self, bytes: usize) -> Result<Word, CopyError>;

    /// Room for the next `words` words of the copy (`1 <= words <= MAX_RUN`): valid,
    /// word aligned and writable for `words` words, written in full before the next
    /// call. Pass 2 cannot fail: an output that meets an error (a full disk) records it
    /// and keeps giving room.
    fn next(&mut self, words: usize) -> *mut Word;

    /// `Some(p)` when [`Output::adopt`] takes memory, a copy laid out `p` bytes into a
    /// mapping: then pass 1 writes a large copy into a [`Reservation`] made with that
    /// prefix as it goes ([`direct`]). `None` by default.
    fn adopts(&self) -> Option<usize> {
        None
    }

    /// Instead of [`Output::begin`]: takes the first `bytes` bytes of `reservation`
    /// (made with the prefix [`Output::adopts`] gave), which holds the copy's blocks
    /// from some offset on, as the copy's memory, and returns its address;
    /// [`Output::next`] then gives room from its start. Gives the reservation back when
    /// the output cannot take it (the default).
    fn adopt(&mut self, reservation: Reservation, bytes: usize) -> Result<Word, Reservation> {
        let _ = bytes;
        Err(reservation)
    }

    /// A new empty file, of the traversal's own, for its queue ([`Queue::keep_in`]),
    /// asked for when the general traversal starts: an output that must not need
    /// memory growing with the value (an image written as it is copied) gives one, so
    /// that the queue lives in the page cache. `None` (memory) by default.
    fn queue_file(&mut self) -> Option<std::fs::File> {
        None
    }
}

/// The longest run of words pass 2 asks an [`Output`] for at once.
pub const MAX_RUN: usize = 1 << 16;

/// The [`Output`] of [`copy`]: one allocation of exactly the measured size.
struct Contiguous<'a, A> {
    alloc: &'a mut A,
    /// The allocation; null until [`Output::begin`].
    base: *mut u8,
    /// Where the next run goes.
    next: *mut Word,
}

impl<A: Allocator> Output for Contiguous<'_, A> {
    fn begin(&mut self, bytes: usize) -> Result<Word, CopyError> {
        let base = self.alloc.alloc(bytes);
        if base.is_null() {
            return Err(CopyError::OutOfMemory(bytes));
        }
        if !(base as usize).is_multiple_of(WORD_BYTES) {
            // SAFETY: `base` came from this allocator with this size and is unused.
            unsafe { self.alloc.free(base, bytes) };
            return Err(CopyError::Misaligned);
        }
        self.base = base;
        self.next = base as *mut Word;
        Ok(base as Word)
    }

    #[inline(always)]
    fn next(&mut self, words: usize) -> *mut Word {
        let run = self.next;
        // SAFETY: pass 1 measured the copy; the runs pass 2 asks for add up to it, so
        // this stays inside the allocation (or one past its end).
        self.next = unsafe { run.add(words) };
        run
    }

    fn adopts(&self) -> Option<usize> {
        self.alloc.huge_mapping_prefix()
    }

    fn adopt(&mut self, reservation: Reservation, bytes: usize) -> Result<Word, Reservation> {
        if self.adopts() != Some(reservation.prefix()) || bytes < crate::alloc::LARGE_BYTES {
            return Err(reservation);
        }
        // The allocator's `free(base, bytes)` releases such a mapping (`adopts`).
        let base = reservation.into_mapping(bytes);
        self.base = base;
        self.next = base as *mut Word;
        Ok(base as Word)
    }
}

/// [`copy`] into any [`Output`]: passes 1 and 2 as [`copy`] does, the words of the copy
/// handed to `out` in offset order.
///
/// # Errors
/// As [`copy`]; [`Output::begin`]'s error. The source is then as it was.
///
/// # Safety
/// As [`copy`]; `out` gives memory that nothing else uses.
pub unsafe fn copy_into<H: Heap, V: VisitedSet, O: Output>(
    root: Word,
    heap: &mut H,
    visited: V,
    out: &mut O,
) -> Result<Written, CopyError> {
    if layout::is_immediate(root) || !heap.should_copy(root) {
        return Ok(Written::kept(root));
    }
    // SAFETY: the caller's contract on `root` and its graph is the shallow path's.
    if let Some(written) = unsafe { shallow::copy_into(root, heap, out) } {
        return written;
    }
    let large = small::may_walk_large();
    // SAFETY: the caller's contract on `root` and its graph is the walk's.
    if let Some(written) = unsafe { small::copy_into(root, heap, out, large) } {
        return written;
    }
    // SAFETY: forwarded; `root` is a block to copy.
    let written = unsafe { traverse_block(root, heap, visited, out) };
    if let Ok(w) = &written {
        small::note_general_copy(large, w.blocks, w.bytes);
    }
    written
}

/// [`copy_into`] by the general traversal, whatever the value's size: the path of small
/// values ([`small`]) is not tried. Both give the same bytes; tests compare them.
///
/// # Errors
/// As [`copy_into`].
///
/// # Safety
/// As [`copy_into`].
pub unsafe fn traverse_into<H: Heap, V: VisitedSet, O: Output>(
    root: Word,
    heap: &mut H,
    visited: V,
    out: &mut O,
) -> Result<Written, CopyError> {
    if layout::is_immediate(root) || !heap.should_copy(root) {
        return Ok(Written::kept(root));
    }
    // SAFETY: forwarded; `root` is a block to copy.
    unsafe { traverse_block(root, heap, visited, out) }
}

/// [`traverse_into`] for a `root` already known to point to a block to copy.
///
/// # Safety
/// As [`copy_into`]; `heap` says to copy the block `root` points to.
unsafe fn traverse_block<H: Heap, V: VisitedSet, O: Output>(
    root: Word,
    heap: &mut H,
    visited: V,
    out: &mut O,
) -> Result<Written, CopyError> {
    let mut traversal = Traversal::new(heap, visited);
    if let Some(file) = out.queue_file() {
        traversal.queue.keep_in(file);
    }
    if let Some(prefix) = out.adopts().filter(|_| !V::SOURCE_SHARED) {
        traversal.direct_from = DIRECT_FROM_WORDS;
        traversal.direct_prefix = prefix;
    }
    // SAFETY: the caller's contract on `root` and its graph is the traversal's.
    let outcome = unsafe { traversal.run(root, out) };
    crate::fault::point("restore");
    // SAFETY: the queue lists exactly the blocks the visited set marked.
    unsafe { traversal.visited.restore(&traversal.queue) };
    outcome
}

/// What a copy of a value would take, from pass 1 alone ([`measure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measured {
    /// Size the copy's allocation would have, in bytes; 0 when nothing would be copied.
    pub bytes: usize,
    /// Blocks that would be copied.
    pub blocks: usize,
    /// Peak memory the traversal held besides the copy, as [`Copied::transient_bytes`].
    pub transient_bytes: usize,
}

/// Pass 1 of [`copy`] alone: what a copy of `root` would take, with the same errors,
/// without allocating the copy. The source is restored; the only memory used is the
/// traversal's own tables, freed on return.
///
/// # Errors
/// As [`copy`], except that the copy's own allocation never fails (it is not made).
///
/// # Safety
/// As [`copy`].
pub unsafe fn measure<H: Heap, V: VisitedSet>(
    root: Word,
    heap: &mut H,
    visited: V,
) -> Result<Measured, CopyError> {
    if layout::is_immediate(root) || !heap.should_copy(root) {
        let nothing = Measured {
            bytes: 0,
            blocks: 0,
            transient_bytes: 0,
        };
        return Ok(nothing);
    }
    // SAFETY: the caller's contract on `root` and its graph is the shallow path's and
    // the walk's.
    if let Some(measured) = unsafe { shallow::measure(root, heap) } {
        return Ok(measured);
    }
    // SAFETY: as above.
    if let Some(measured) = unsafe { small::measure(root, heap) } {
        return Ok(measured);
    }
    let mut traversal = Traversal::new(heap, visited);
    // SAFETY: the caller's contract on `root` and its graph is the traversal's.
    let outcome = unsafe { traversal.measure(root) }.and_then(|()| {
        let data_words = traversal.data.lay_out(traversal.words)?;
        Ok(Measured {
            bytes: (traversal.words + data_words) * WORD_BYTES,
            blocks: traversal.queue.len() + traversal.data.blocks(),
            transient_bytes: traversal.transient_bytes(),
        })
    });
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
    /// The Bigarrays queued and their data, laid out after the blocks.
    data: DataTable,
    /// With a [`VisitedSet::SOURCE_SHARED`] set: the fields of every scannable queued
    /// block, in queue order, as pass 1 read them, pointers to copied blocks stored as
    /// `RELOCATED` offsets. Empty otherwise.
    snapshot: Vec<Word>,
    /// Words measured so far: the offset of the next block.
    words: usize,
    /// Bytes from the root's block to the root (its infix offset; 0 for most roots).
    root_in_block: usize,
    /// The block discovered last.
    last_discovered: Word,
    /// Blocks discovered more than [`JUMP_BYTES`] away from the one before, and pointers
    /// more than that away from the block holding them: when the source is laid out in
    /// the order of the traversal and its pointers lead next door (a list, a list of
    /// boxed numbers) the hardware prefetcher does better than software prefetching,
    /// which pass 2 then skips.
    jumps: usize,
    /// Peak bytes of pass 1's [`Pending`] stack (freed when pass 1 ends).
    pending_bytes: usize,
    /// Pass 1 writes the blocks at this offset (in words) and beyond into `reservation`
    /// ([`direct`]), made when the first such block is discovered; `usize::MAX` when it
    /// writes nothing: a source shared with other domains, an output that adopts no
    /// memory, or no address space or memory to be had.
    direct_from: usize,
    /// The memory pass 1 writes into, while it writes; given back as soon as pass 1
    /// stops writing ([`Self::stop_direct`]).
    reservation: Option<Reservation>,
    /// The queue index of the first block pass 1 wrote.
    direct_from_k: usize,
    /// Bytes of the mapping before the copy ([`Output::adopts`]).
    direct_prefix: usize,
    /// Pass 1 goes by batches ([`batches`]): a block discovered is scanned after the
    /// rest of its batch, and fetching what its fields point to at once would be wasted.
    by_batches: bool,
}

impl<H: Heap, V: VisitedSet> Traversal<'_, H, V> {
    /// A traversal that has seen nothing yet.
    fn new<'a>(heap: &'a mut H, visited: V) -> Traversal<'a, H, V> {
        Traversal {
            heap,
            visited,
            queue: Queue::new(),
            data: DataTable::new(),
            snapshot: Vec::new(),
            words: 0,
            root_in_block: 0,
            last_discovered: 0,
            jumps: 0,
            pending_bytes: 0,
            direct_from: usize::MAX,
            reservation: None,
            direct_from_k: 0,
            direct_prefix: 0,
            by_batches: false,
        }
    }

    /// Passes 1 and 2; the caller restores.
    unsafe fn run<O: Output>(&mut self, root: Word, out: &mut O) -> Result<Written, CopyError> {
        // SAFETY: forwarded from `copy_into`.
        unsafe { self.measure(root)? };
        let data_words = self.data.lay_out(self.words)?;
        let transient_bytes = self.transient_bytes();
        let bytes = (self.words + data_words) * WORD_BYTES;
        // What pass 1 wrote: it keeps its reservation only when it wrote to the end
        // (with memory enough, and no Bigarray, whose data pass 2 lays out).
        let written = self.reservation.take();
        debug_assert!(
            written.is_none() || self.data.is_empty(),
            "direct with data"
        );
        let (base, pass2_blocks) = match written.and_then(|r| out.adopt(r, bytes).ok()) {
            Some(base) => (base, self.direct_from_k),
            None => (out.begin(bytes)?, self.queue.len()),
        };
        // SAFETY: `out` takes the `bytes` bytes pass 1 measured and the data laid out:
        // the blocks first (those before `pass2_blocks`: the others pass 1 wrote), then
        // the data blocks; the noted data is the source's.
        unsafe {
            if V::SOURCE_SHARED {
                self.write_from_snapshot(base, out)
            } else {
                self.write(base, out, pass2_blocks)
            }
            self.data.write(base, out);
        };
        // The root's block was discovered first: it is at offset 0.
        let root = base + WORD_BYTES + self.root_in_block;
        Ok(Written {
            root,
            bytes,
            blocks: self.queue.len() + self.data.blocks(),
            data_bytes: data_words * WORD_BYTES,
            transient_bytes,
        })
    }

    /// The memory the traversal holds now besides the copy.
    fn transient_bytes(&self) -> usize {
        self.queue.allocated_bytes()
            + self.visited.allocated_bytes()
            + self.snapshot.capacity() * WORD_BYTES
            + self.data.allocated_bytes()
            + self.pending_bytes
    }

    /// Pass 1: gives every block to copy its offset.
    ///
    /// Depth first by groups ([`Pending`]): scanning a block queues its unseen children
    /// together, and they are scanned next, before the rest. A tree is thus read and
    /// laid out close to the depth-first order in which programs usually build it, and a
    /// block's children follow it in the copy, so that pass 2 finds the targets of the
    /// fields it translates among the blocks it has just read.
    unsafe fn measure(&mut self, root: Word) -> Result<(), CopyError> {
        // SAFETY: `root` is a pointer to a block to copy.
        let (_, root_in_block) = unsafe { self.discover(root)? };
        self.root_in_block = root_in_block;
        crate::fault::point("measure");
        let mut pending = Pending::new();
        let first = Run {
            next: 0,
            end: 1,
            at: 0,
        };
        let outcome = pending.push(first).map_err(CopyError::from).and_then(|()| {
            // SAFETY: forwarded.
            unsafe {
                if self.queue.is_in_file() {
                    self.scan::<true>(&mut pending)
                } else {
                    self.scan::<false>(&mut pending)
                }
            }
        });
        self.pending_bytes = pending.allocated_bytes();
        outcome
    }

    /// Scans the blocks of `pending` and those they lead to, until none is left: depth
    /// first by groups, or by batches from the point where the blocks discovered lie
    /// scattered ([`batches`]), which is asked once the queue holds more than
    /// [`batches::SWITCH_FROM`] blocks, then each time it has grown four times.
    unsafe fn scan<const IN_FILE: bool>(&mut self, pending: &mut Pending) -> Result<(), CopyError> {
        let mut ask_after = batches::SWITCH_FROM;
        loop {
            // SAFETY: forwarded.
            unsafe { self.scan_pending::<IN_FILE>(pending, ask_after)? };
            if pending.depth() == 0 {
                return Ok(());
            }
            if self.by_batches_from_here(pending) {
                // SAFETY: forwarded.
                return unsafe { self.scan_by_batches::<IN_FILE>(pending) };
            }
            ask_after = self.queue.len().saturating_mul(4);
        }
    }

    /// Scans the blocks of `pending` and those they lead to, depth first by groups, until
    /// none is left or the queue holds more than `until` blocks. `IN_FILE`: the queue is
    /// in a file ([`Queue::is_in_file`]), told where the scan reads (a copy's scan, with
    /// its queue in memory, is spared the test).
    unsafe fn scan_pending<const IN_FILE: bool>(
        &mut self,
        pending: &mut Pending,
        until: usize,
    ) -> Result<(), CopyError> {
        while self.queue.len() <= until {
            let Some(run) = pending.top() else {
                break;
            };
            let k = run.next;
            // SAFETY: `run` is the top run.
            let entry = unsafe { self.take_next::<IN_FILE>(pending, k) };
            if !entry.header.is_scannable() {
                continue;
            }
            self.prefetch_ahead_in(k, run.end);
            let children = self.queue.len();
            let children_at = self.children_at();
            // SAFETY: a queued block, the top run's next, which starts at `run.at`.
            unsafe { self.scan_entry(entry, run.at)? };
            self.push_run(pending, children, children_at)?;
        }
        Ok(())
    }

    /// Takes block `k`, the next of the top run of `pending`, and returns its entry.
    ///
    /// # Safety
    /// `k` is the `next` of the top run of `pending`.
    #[inline(always)]
    unsafe fn take_next<const IN_FILE: bool>(&self, pending: &mut Pending, k: usize) -> Entry {
        if IN_FILE {
            self.queue.note_read(k);
        }
        // SAFETY: `k` is below the queue's length: runs hold queued indices.
        let entry = unsafe { self.queue.get(k).unwrap_unchecked() };
        pending.take(self.run_words(entry));
        entry
    }

    /// The words a queued block takes where [`Run::at`] counts: in the copy, or in the
    /// snapshot when the source is shared (its fields, if it is scannable).
    #[inline(always)]
    fn run_words(&self, entry: Entry) -> usize {
        if !V::SOURCE_SHARED {
            entry.header.whsize()
        } else if entry.header.is_scannable() {
            entry.header.wosize()
        } else {
            0
        }
    }

    /// Pass 1 for one queued scannable block, which starts at `at` ([`Run::at`]):
    /// discovers what its fields lead to, from the snapshot, or writing the block when
    /// pass 1 writes it, or reading the source.
    ///
    /// # Safety
    /// `entry` is a queued scannable block of the source, at `at`.
    #[inline(always)]
    unsafe fn scan_entry(&mut self, entry: Entry, at: usize) -> Result<(), CopyError> {
        // SAFETY: queued entries are blocks of the source, this one at `at`, which is
        // what each of the three scans below requires.
        unsafe {
            if V::SOURCE_SHARED {
                self.scan_snapshot(entry, at)
            } else if at >= self.direct_from {
                self.scan_block_direct(entry, at)
            } else {
                self.scan_block(entry)
            }
        }
    }

    /// Where the blocks discovered next start: in the snapshot when the source is
    /// shared, else in the copy ([`Run::at`]).
    #[inline(always)]
    fn children_at(&self) -> usize {
        if V::SOURCE_SHARED {
            self.snapshot.len()
        } else {
            self.words
        }
    }

    /// Pushes onto `pending` the run of the blocks queued from index `next` on, the first
    /// at `at` ([`Run::at`]).
    #[inline(always)]
    fn push_run(&mut self, pending: &mut Pending, next: usize, at: usize) -> Result<(), CopyError> {
        let run = Run {
            next,
            end: self.queue.len(),
            at,
        };
        if let Err(e) = pending.push(run) {
            // The memory the reservation holds may be what is missing.
            if !self.stop_direct() {
                return Err(e.into());
            }
            pending.push(run)?;
        }
        Ok(())
    }

    /// Pass 1 for one queued block read from the source: discovers what its fields
    /// point to.
    ///
    /// # Safety
    /// `entry` is a queued block of the source.
    #[inline(always)]
    unsafe fn scan_block(&mut self, entry: Entry) -> Result<(), CopyError> {
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
        Ok(())
    }

    /// [`Self::scan_block`] for a block that pass 1 writes: discovers what its fields
    /// point to and writes them, translated, into its place in the reservation (its
    /// header, and its raw words, were written when it was discovered).
    ///
    /// # Safety
    /// `entry` is a queued block of the source, at offset `at` of the copy, at or beyond
    /// `direct_from`, so written by [`Self::write_discovered`] into the reservation.
    #[inline(always)]
    unsafe fn scan_block_direct(&mut self, entry: Entry, at: usize) -> Result<(), CopyError> {
        // SAFETY: the block was discovered with a reservation (it is at or beyond
        // `direct_from`), which stays until the copy ends.
        let base = unsafe { self.reservation.as_ref().unwrap_unchecked() }.base() as Word;
        let fields = entry.block as *const Word;
        // Its fields: committed when it was discovered (`write_discovered`).
        let dst = (base + (at + 1) * WORD_BYTES) as *mut Word;
        // SAFETY: queued entries are blocks of the source.
        let scanned = unsafe { scanned_fields(entry) };
        // SAFETY: a closure's words before its environment (code pointers and closure
        // info) are copied as they are; the block and its place hold that many words.
        unsafe { copy_words(fields, dst, scanned.start) };
        for i in scanned {
            if i + PREFETCH_DISTANCE < entry.header.wosize() {
                // SAFETY: `i + PREFETCH_DISTANCE` is below the block's wosize.
                prefetch(unsafe { *fields.add(i + PREFETCH_DISTANCE) }.wrapping_sub(WORD_BYTES));
            }
            // SAFETY: `i` is below the block's wosize.
            let field = unsafe { *fields.add(i) };
            let word = if !layout::is_immediate(field) && self.heap.should_copy(field) {
                self.jumps += usize::from(field.abs_diff(entry.block) > JUMP_BYTES);
                // SAFETY: a pointer field of a well-formed block, to a block to copy.
                let (offset, in_block) = unsafe { self.discover(field)? };
                if self.reservation.is_none() {
                    // Pass 1 stopped writing (its memory is gone): the rest of the block
                    // is only measured, and pass 2 writes it.
                    // SAFETY: forwarded; `i + 1` is at most the block's wosize.
                    return unsafe { self.measure_fields(entry, i + 1) };
                }
                base + (offset + 1) * WORD_BYTES + in_block
            } else {
                field
            };
            // SAFETY: `i` is below the block's wosize: inside its place in the copy.
            unsafe { dst.add(i).write(word) };
        }
        Ok(())
    }

    /// [`Self::scan_block`] from field `from` on, for a block of which pass 1 stopped
    /// writing in the middle.
    ///
    /// # Safety
    /// `entry` is a queued block of the source; `from` is at most its wosize.
    #[cold]
    #[inline(never)]
    unsafe fn measure_fields(&mut self, entry: Entry, from: usize) -> Result<(), CopyError> {
        let fields = entry.block as *const Word;
        for i in from..entry.header.wosize() {
            // SAFETY: `i` is below the block's wosize.
            unsafe { self.measure_field(entry.block, *fields.add(i))? };
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
        self.prefetch_ahead_in(k, usize::MAX);
    }

    /// [`Self::prefetch_ahead`] for pass 1, where only the blocks of the current run,
    /// below `end`, are known to come next.
    #[inline(always)]
    fn prefetch_ahead_in(&self, k: usize, end: usize) {
        if k + 2 * PREFETCH_DISTANCE < end {
            if let Some(far) = self.queue.block_hint(k + 2 * PREFETCH_DISTANCE) {
                prefetch(far.wrapping_sub(WORD_BYTES));
            }
        }
        if k + PREFETCH_DISTANCE >= end {
            return;
        }
        let Some(near) = self.queue.get(k + PREFETCH_DISTANCE) else {
            return;
        };
        if near.header.is_scannable() {
            let fields = near.block as *const Word;
            for i in 0..near.header.wosize().min(PREFETCH_FIELDS) {
                // SAFETY: `i` is below the block's wosize; the block is readable, and
                // other domains write its fields only with word-sized stores. The value
                // is only a hint: an atomic load (a plain load on x86-64 and arm64)
                // keeps a racing read defined.
                let field =
                    unsafe { std::sync::atomic::AtomicUsize::from_ptr(fields.add(i) as *mut Word) }
                        .load(std::sync::atomic::Ordering::Relaxed);
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

    /// Pass 1 with a [`VisitedSet::SOURCE_SHARED`] set, when a scannable block is
    /// queued: reads its fields once, appending them to the snapshot (which is thus in
    /// queue order, as pass 2 reads it).
    ///
    /// # Safety
    /// `entry` is a block of the source, just queued.
    unsafe fn snapshot_fields(&mut self, entry: Entry) -> Result<(), CopyError> {
        let n = entry.header.wosize();
        if self.snapshot.capacity() - self.snapshot.len() < n {
            self.grow_snapshot(n)?;
        }
        let src = entry.block as *const Word;
        for i in 0..n {
            // SAFETY: `i` is below the wosize pass 1 read for this block.
            let field = unsafe { read_field(src.add(i)) };
            // Within the capacity reserved above: never reallocates.
            self.snapshot.push(field);
        }
        Ok(())
    }

    /// Pass 1 with a [`VisitedSet::SOURCE_SHARED`] set, for one queued block whose
    /// fields are in the snapshot from word `at`: discovers what they point to and
    /// replaces each pointer to a copied block with its `RELOCATED` offset in the copy.
    ///
    /// # Safety
    /// `entry` is a queued scannable block of the source, snapshotted at `at`.
    unsafe fn scan_snapshot(&mut self, entry: Entry, at: usize) -> Result<(), CopyError> {
        let n = entry.header.wosize();
        let first_value = first_value_of(entry.header, &self.snapshot[at..at + n]);
        for i in at + first_value..at + n {
            let field = self.snapshot[i];
            if !layout::is_immediate(field) && self.heap.should_copy(field) {
                self.jumps += usize::from(field.abs_diff(entry.block) > JUMP_BYTES);
                // SAFETY: a pointer that was in a field of a block of the source graph.
                let (offset, in_block) = unsafe { self.discover(field)? };
                self.snapshot[i] = ((offset + 1) * WORD_BYTES + in_block) | RELOCATED;
            }
        }
        Ok(())
    }

    /// Makes room for `n` more words in the snapshot: at least doubles it, so that the
    /// pushes cost amortised constant time.
    #[cold]
    #[inline(never)]
    fn grow_snapshot(&mut self, n: usize) -> Result<(), CopyError> {
        let more = n.max(self.snapshot.capacity()).max(FIRST_SNAPSHOT);
        self.snapshot
            .try_reserve_exact(more)
            .map_err(|_| CopyError::OutOfMemory(more.saturating_mul(WORD_BYTES)))
    }

    /// Pass 1 for one pointer: queues its block if it was not seen yet. Returns the
    /// block's offset in the copy, in words, and the bytes from the block to `v` (an
    /// infix offset, or 0).
    #[inline(always)]
    unsafe fn discover(&mut self, v: Word) -> Result<(usize, usize), CopyError> {
        // SAFETY: `v` points to a block (or an infix header) of the source graph.
        let (block, hd) = unsafe { block_of(v) };
        // SAFETY: `block` is a block start and `hd` its current header.
        match unsafe { self.visited.lookup(block, hd) } {
            Seen::At(offset) => Ok((offset, v - block)),
            Seen::New(hd) => {
                // SAFETY: `block` is a block start with header `hd`.
                unsafe { self.check_copyable(block, hd)? };
                // Queue first: a failed mark leaves the entry to be restored, harmlessly
                // (restoring an unmarked header rewrites the header it has).
                let entry = Entry { block, header: hd };
                if let Err(e) = self.queue.push(entry) {
                    self.retry_without_reservation(e, |t| t.queue.push(entry))?;
                }
                let offset = self.words;
                // SAFETY: `block` is a block start of the source graph not yet marked.
                if let Err(e) = unsafe { self.visited.mark(block, hd, offset) } {
                    self.retry_without_reservation(e, |t| {
                        // SAFETY: as above; the failed mark recorded nothing.
                        unsafe { t.visited.mark(block, hd, offset) }
                    })?;
                }
                if V::SOURCE_SHARED && hd.is_scannable() {
                    // SAFETY: `block` is a block of the source with header `hd`.
                    unsafe { self.snapshot_fields(entry)? };
                }
                self.words += hd.whsize();
                self.jumps += usize::from(block.abs_diff(self.last_discovered) > JUMP_BYTES);
                self.last_discovered = block;
                if hd.is_scannable() && !self.by_batches {
                    prefetch_targets(block, hd.wosize().min(PREFETCH_FIELDS));
                }
                if offset >= self.direct_from {
                    // SAFETY: `block` is a block of the source with header `hd`, just
                    // queued at `offset`.
                    unsafe { self.write_discovered(block, hd, offset) };
                }
                Ok((offset, v - block))
            }
        }
    }

    /// Pass 1 writing the copy ([`direct`]), for a block just discovered at `offset`,
    /// at or beyond `direct_from`: its header, and a raw block's words, into its place in
    /// the reservation (made now for the first such block). When the reservation
    /// cannot hold it, pass 1 stops writing and pass 2 will write every block.
    ///
    /// # Safety
    /// `block` is a block of the source with header `hd`, the last queued.
    #[inline(always)]
    unsafe fn write_discovered(&mut self, block: Word, hd: Header, offset: usize) {
        let Some(reservation) = self.reservation.as_mut() else {
            // SAFETY: forwarded.
            return unsafe { self.start_direct(block, hd, offset) };
        };
        if !reservation.commit((offset + hd.whsize()) * WORD_BYTES) {
            self.stop_direct();
            return;
        }
        let dst = reservation.base().wrapping_add(offset * WORD_BYTES) as *mut Word;
        // SAFETY: the place of the block, `hd.whsize()` words at `offset`, is committed;
        // a raw block's words are copied whole (nothing else writes to the source).
        unsafe {
            dst.write(hd.with_color(Color::Unmarkable).0);
            if !hd.is_scannable() {
                copy_words(block as *const Word, dst.add(1), hd.wosize());
            }
        }
    }

    /// [`Self::write_discovered`] for the first block pass 1 writes: reserves the memory
    /// (or gives up writing when the process cannot have it).
    ///
    /// # Safety
    /// As [`Self::write_discovered`].
    #[cold]
    #[inline(never)]
    unsafe fn start_direct(&mut self, block: Word, hd: Header, offset: usize) {
        let Some(reservation) = Reservation::new(self.direct_prefix) else {
            self.direct_from = usize::MAX;
            return;
        };
        self.reservation = Some(reservation);
        self.direct_from = offset;
        self.direct_from_k = self.queue.len() - 1;
        // SAFETY: forwarded; now with a reservation.
        unsafe { self.write_discovered(block, hd, offset) };
    }

    /// Pass 1 stops writing the copy and gives back its reservation: memory ran short
    /// (a commit failed, or the traversal's own tables could not grow while the
    /// reservation held address space and memory that two passes would not), or a
    /// Bigarray was found (the copy then goes where pass 2 can lay out its data). The
    /// copy is then made in two passes and takes no more memory at any moment than two
    /// passes do. Whether there was a reservation to give back.
    ///
    /// While a block is being written into the reservation, only called from
    /// [`Self::discover`], after which [`Self::scan_block_direct`] checks whether the
    /// reservation is still there.
    #[cold]
    #[inline(never)]
    fn stop_direct(&mut self) -> bool {
        self.direct_from = usize::MAX;
        self.reservation.take().is_some()
    }

    /// The traversal could not get memory (`e`) while pass 1 may be holding a
    /// reservation: gives that back ([`Self::stop_direct`]) and tries `again`, or
    /// reports `e` when there was none.
    #[cold]
    #[inline(never)]
    fn retry_without_reservation(
        &mut self,
        e: NoMemory,
        again: impl FnOnce(&mut Self) -> Result<(), NoMemory>,
    ) -> Result<(), CopyError> {
        if !self.stop_direct() {
            return Err(e.into());
        }
        Ok(again(self)?)
    }

    /// Rejects the blocks that cannot be copied.
    #[inline(always)]
    unsafe fn check_copyable(&mut self, block: Word, hd: Header) -> Result<(), CopyError> {
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
    unsafe fn check_special(&mut self, block: Word, hd: Header) -> Result<(), CopyError> {
        match hd.tag() {
            layout::ABSTRACT_TAG => Err(CopyError::Abstract),
            layout::CUSTOM_TAG => {
                // SAFETY: field 0 of a custom block is its operations pointer.
                let ops = unsafe { *(block as *const Word) };
                if self.heap.is_copyable_custom(ops) {
                    Ok(())
                } else if let Some(copy_ops) = self.heap.bigarray_ops(ops) {
                    // Pass 2 lays out the data: what pass 1 would write is not kept.
                    self.stop_direct();
                    // SAFETY: a custom block of the source with this header.
                    unsafe { self.note_bigarray(block, hd, copy_ops) }
                } else {
                    Err(self
                        .heap
                        .custom_name(ops)
                        .map_or_else(CopyError::from, CopyError::Custom))
                }
            }
            layout::LAZY_TAG => Err(CopyError::UnforcedLazy),
            layout::FORCING_TAG if self.heap.has_ocaml5_tags() => Err(CopyError::ForcingLazy),
            layout::CONT_TAG if self.heap.has_ocaml5_tags() => Err(CopyError::Continuation),
            _ => Ok(()),
        }
    }

    /// Notes the Bigarray `block` (header `hd`), about to be queued at `self.words`,
    /// whose copy gets the operations `copy_ops`.
    ///
    /// # Safety
    /// `block` is a custom block of the source with header `hd`.
    unsafe fn note_bigarray(
        &mut self,
        block: Word,
        hd: Header,
        copy_ops: Word,
    ) -> Result<(), CopyError> {
        // SAFETY: the block has `wosize` readable fields. A Bigarray's fields never change
        // once it is made, so a read racing another domain sees what pass 2 will copy.
        let fields = unsafe { std::slice::from_raw_parts(block as *const Word, hd.wosize()) };
        let data = crate::bigarray::read(fields, self.heap.has_ocaml5_tags())
            .map_err(CopyError::Bigarray)?;
        self.data.note(self.words, data, copy_ops)
    }

    /// Pass 2: hands the first `blocks` queued blocks (all those pass 1 did not write)
    /// to `out`, in offset order, reading the source again; pointers are made for a copy
    /// at `base`.
    unsafe fn write<O: Output>(&mut self, base: Word, out: &mut O, blocks: usize) {
        crate::fault::point("write");
        let prefetching = self.jumps * 8 > self.queue.len();
        let in_file = self.queue.is_in_file();
        let mut written = 0;
        for k in 0..blocks {
            if prefetching {
                self.prefetch_ahead(k);
            }
            if in_file {
                self.queue.note_read(k);
            }
            let entry = self.queue.get(k).expect("k < len");
            let hd = entry.header;
            let n = hd.wosize();
            let src = entry.block as *const Word;
            // SAFETY: room for one word, the header.
            unsafe { out.next(1).write(hd.with_color(Color::Unmarkable).0) };
            let first_value = if hd.is_scannable() {
                // SAFETY: queued entries are blocks of the source.
                unsafe { first_value_field(entry) }
            } else {
                n // raw blocks are copied whole
            };
            let mut start = 0;
            while start < n {
                let end = n.min(start + MAX_RUN);
                let dst = out.next(end - start);
                let raw_end = first_value.max(start).min(end);
                // SAFETY: words `start..raw_end` of the block: raw words (a raw block,
                // or a closure's code pointers and info), `dst` has room for them.
                unsafe { copy_words(src.add(start), dst, raw_end - start) };
                let mut i = raw_end;
                // Large blocks (arrays, hash-table buckets): the target of a field a few
                // places on is fetched while this one is translated.
                while i + PREFETCH_DISTANCE < end {
                    // SAFETY: `i + PREFETCH_DISTANCE < end <= n`, in bounds of the block
                    // and of the run.
                    unsafe {
                        prefetch((*src.add(i + PREFETCH_DISTANCE)).wrapping_sub(WORD_BYTES));
                        *dst.add(i - start) = self.translate(*src.add(i), base);
                    }
                    i += 1;
                }
                for i in i..end {
                    // SAFETY: `i < end <= n`, in bounds of the block and of the run.
                    unsafe { *dst.add(i - start) = self.translate(*src.add(i), base) };
                }
                if start == 0 && hd.tag() == layout::CUSTOM_TAG {
                    // SAFETY: `dst` holds the block's first run, written; a Bigarray's
                    // block is one run.
                    unsafe { self.data.patch(written, dst, base) };
                }
                start = end;
            }
            written += 1 + n;
        }
        let expected = if blocks == self.queue.len() {
            self.words
        } else {
            self.direct_from // where the blocks pass 1 wrote begin
        };
        debug_assert_eq!(written, expected, "measured size != written size");
    }

    /// Pass 2 with a [`VisitedSet::SOURCE_SHARED`] set: hands every queued block to
    /// `out`, in offset order, scannable ones from the snapshot (which holds their fields
    /// already translated, but for the base), raw ones from the source, read once here.
    unsafe fn write_from_snapshot<O: Output>(&mut self, base: Word, out: &mut O) {
        crate::fault::point("write");
        let mut fields = self.snapshot.as_slice();
        let mut written = 0;
        for k in 0..self.queue.len() {
            self.queue.note_read(k);
            let entry = self.queue.get(k).expect("k < len");
            let hd = entry.header;
            let n = hd.wosize();
            // SAFETY: room for one word, the header.
            unsafe { out.next(1).write(hd.with_color(Color::Unmarkable).0) };
            if hd.is_scannable() {
                let (block, rest) = fields.split_at(n);
                fields = rest;
                let first_value = first_value_of(hd, block);
                for (start, run) in block.chunks(MAX_RUN).enumerate() {
                    let start = start * MAX_RUN;
                    let dst = out.next(run.len());
                    for (j, &field) in run.iter().enumerate() {
                        let word =
                            if start + j >= first_value && field & RELOCATED_MASK == RELOCATED {
                                base + (field - RELOCATED)
                            } else {
                                field
                            };
                        // SAFETY: `j < run.len()`, inside the run.
                        unsafe { dst.add(j).write(word) };
                    }
                }
            } else {
                let src = entry.block as *const Word;
                let mut start = 0;
                while start < n {
                    let len = (n - start).min(MAX_RUN);
                    let dst = out.next(len);
                    // SAFETY: raw blocks are copied whole, `len` words at a time: their
                    // size is fixed and they hold no pointers, so one read now is as good
                    // as one in pass 1. Bytes may be written meanwhile (`Bytes.set` in
                    // another domain): each byte copied is one the block held, as for
                    // any unsynchronised OCaml read of it.
                    unsafe { copy_words(src.add(start), dst, len) };
                    if start == 0 && hd.tag() == layout::CUSTOM_TAG {
                        // SAFETY: `dst` holds the block's first run, written; a
                        // Bigarray's block is one run.
                        unsafe { self.data.patch(written, dst, base) };
                    }
                    start += len;
                }
            }
            written += 1 + n;
        }
        debug_assert!(fields.is_empty(), "snapshot not used up");
        debug_assert_eq!(written, self.words, "measured size != written size");
    }

    /// The value that stands in the copy for the source value `v` (pass 2 without a
    /// snapshot).
    #[inline(always)]
    unsafe fn translate(&mut self, v: Word, base: Word) -> Word {
        if layout::is_immediate(v) || !self.heap.should_copy(v) {
            return v;
        }
        // SAFETY: `v` points into the source graph, all of which was discovered.
        let (block, hd) = unsafe { block_of(v) };
        // SAFETY: `block` is a block start and `hd` its current header.
        match unsafe { self.visited.lookup(block, hd) } {
            // `v - block` is the infix offset, 0 for an ordinary block.
            Seen::At(offset) => base + (offset + 1) * WORD_BYTES + (v - block),
            // Pass 1 discovered every block: without a snapshot nothing else writes to
            // the source (`copy`'s contract), so this cannot happen. Were the contract
            // broken, an immediate keeps the copy well formed.
            Seen::New(_) => {
                debug_assert!(false, "pass 2 met a block pass 1 did not see");
                layout::val_int(0)
            }
        }
    }
}

/// Reads a field of a source block that other domains may be writing to.
///
/// Why this is sound on OCaml 5 (checked against the 5.3 runtime sources):
/// - Writes to fields go through `caml_modify` (runtime/memory.c), which ends with
///   `atomic_store_release` of the new value; the loads here are `Acquire`, so the
///   block a loaded pointer leads to is seen initialised (header and fields written
///   before it was published). Other writes (`caml_initialize`, array fills) hit
///   blocks not yet shared or are word-sized stores too: each read returns a value
///   that the field held at some moment, never a torn word.
/// - Every block this domain reaches stays allocated until the stub returns. Freeing
///   happens only by sweeping blocks left unmarked at the end of a major cycle, and
///   by emptying minor heaps; both the end of a cycle (`stw_cycle_all_domains` in
///   runtime/major_gc.c, which also empties every minor heap) and a minor collection
///   (runtime/minor_gc.c) run stop-the-world through `caml_try_run_on_all_domains`,
///   which waits for every domain, this one included, to reach a safe point; this
///   domain reaches none inside the copy (no OCaml allocation, no poll, the domain
///   lock held). So no block moves or dies during the copy.
/// - A block that was reachable at some moment of the cycle is marked by its end:
///   the minor heaps are empty when a cycle starts, blocks are allocated or promoted
///   already marked, and when a field of a major block is overwritten during marking
///   the write barrier (`caml_darken` of the old value in `write_barrier`,
///   runtime/memory.c) keeps the old target alive to the cycle's end. A pointer read
///   here to a block that was since unlinked still leads to a live block.
/// - Headers: only the color bits of a heap block change under us (marking); a tag
///   changes for lazy values (`Lazy_tag` -> `Forcing_tag` -> `Forward_tag`, with
///   field 0 written before the tag). The traversal reads each header once, in
///   pass 1, and uses that header for the size, the tag and the layout of the copy.
///
/// # Safety
/// `p` is a field of a block of the source graph.
#[inline(always)]
pub(crate) unsafe fn read_field(p: *const Word) -> Word {
    // SAFETY: a field is an aligned word, valid for reads (caller's contract); others
    // write it only with word-sized stores, so an atomic load of it is sound.
    unsafe { std::sync::atomic::AtomicUsize::from_ptr(p as *mut Word) }
        .load(std::sync::atomic::Ordering::Acquire)
}

/// The tag of a snapshot word that stands for a pointer into the copy: `RELOCATED` plus
/// the pointer's byte offset from the start of the copy. Never mistaken for a value read
/// from the source: those are immediates (low bit 1) or pointers, which are word aligned
/// (low bits `00`), and offsets in the copy are word aligned too.
const RELOCATED: Word = 2;
/// The low bits that tell a `RELOCATED` word.
const RELOCATED_MASK: Word = 3;
/// Words of the snapshot's first allocation.
const FIRST_SNAPSHOT: usize = 512;

/// How many queue entries ahead [`Traversal::prefetch_ahead`] works, and how many fields
/// ahead a large block's fields have their targets fetched. 16 rather than 8 (medians of
/// 7, rounds in turn): on OCaml 5.3 the graph 36-41 -> 31-32 ms, the `Hashtbl`s 69-73 ->
/// 64-68 and 67-75 -> 68-69; on OCaml 4.13 the `Hashtbl` of records 79 -> 75, that of
/// strings 86 -> 89, the others unchanged.
const PREFETCH_DISTANCE: usize = 16;
/// Blocks discovered one after the other, or a pointer and its target, further apart
/// than this count as a jump.
const JUMP_BYTES: usize = 256;
/// The fields of one block whose targets are prefetched.
const PREFETCH_FIELDS: usize = 8;

/// Copies `len` words from `src` to `dst`. The short runs of most blocks (none for a
/// block of values, one or two words for a boxed float or a short string) are copied
/// inline: a call to `memcpy` was a tenth of pass 2's instructions for small copies.
///
/// # Safety
/// As [`std::ptr::copy_nonoverlapping`] for `len` words.
#[inline(always)]
unsafe fn copy_words(src: *const Word, dst: *mut Word, len: usize) {
    // SAFETY: the caller's contract; each arm copies exactly `len` words.
    unsafe {
        match len {
            0 => {}
            1 => dst.write(src.read()),
            2 => {
                dst.write(src.read());
                dst.add(1).write(src.add(1).read());
            }
            _ => crate::memcopy::copy_nonoverlapping(src.cast(), dst.cast(), len * WORD_BYTES),
        }
    }
}

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

/// Hints the CPU to fetch the headers that the first `n` fields of `block` point to (a
/// block just discovered, whose first fields are likely in the cache line of its
/// header): it is scanned soon, often next (depth first), and then needs them.
#[inline(always)]
fn prefetch_targets(block: Word, n: usize) {
    let fields = block as *const Word;
    for i in 0..n {
        // SAFETY: `i` is below the block's wosize; the block is readable, and other
        // domains write its fields only with word-sized stores. The value is only a
        // hint: an atomic load (a plain load on x86-64 and arm64) keeps a racing read
        // defined.
        let field = unsafe { std::sync::atomic::AtomicUsize::from_ptr(fields.add(i) as *mut Word) }
            .load(std::sync::atomic::Ordering::Relaxed);
        if !layout::is_immediate(field) {
            prefetch(field.wrapping_sub(WORD_BYTES));
        }
    }
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
    // SAFETY: the block has `n` readable fields.
    first_value_of(entry.header, unsafe {
        std::slice::from_raw_parts(entry.block as *const Word, n.min(2))
    })
}

/// [`first_value_field`] of a block with header `hd` whose fields start with `fields`
/// (at least its first two, when it has two).
#[inline(always)]
fn first_value_of(hd: Header, fields: &[Word]) -> usize {
    let n = hd.wosize();
    if hd.tag() != layout::CLOSURE_TAG {
        return 0;
    }
    if n < 2 {
        return n; // no closure-info word: nothing in it is a value
    }
    // Field 1 of a closure is the closure-info word.
    layout::start_env(fields[1]).min(n)
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
