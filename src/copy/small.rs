//! The path of small values: a copy of at most [`MAX_BLOCKS`] blocks and [`MAX_WORDS`]
//! words made by one walk into a buffer on the stack, and beyond, up to
//! [`LARGE_MAX_BLOCKS`] and [`LARGE_MAX_WORDS`], the same walk into buffers of its own.
//!
//! Most copies that a cache makes one entry at a time, and most region adds, are values
//! of a few blocks to a few thousand: a record and its strings, a list of them. For
//! those, the general traversal's fixed costs (its queue, visited set and pending stack,
//! the prefetch accounting, a second read of every block, the restore pass) are much of
//! the call, and its cost per block (some 430 instructions against this walk's 150) is
//! paid again at every copy. Here each block is read once: the header and the fields of
//! a scannable block into a buffer laid out as the copy will be (a pointer to a copied
//! block stored as its byte offset in the copy), a raw block (string, float, boxed
//! integer) straight from the source when the copy is written. A block seen before is
//! told by its address: compared with each block found so far while they are at most
//! [`LINEAR_BLOCKS`] (a 64-bit filter first), then looked up in an index by address (a
//! hash table, built at that moment and doubled as blocks are found). Nothing is written
//! to the source and nothing needs restoring, so the walk needs no side table and no
//! stop-the-world section beside other domains. The buffer then goes to the [`Output`]
//! as one run, the raw blocks read into it and the copy's address added to the offsets.
//!
//! The shallowest values (a raw block, or a block whose fields lead only to raw blocks)
//! do not come here: [`super::shallow`] copies them first, without the walk's buffers.
//!
//! The stack holds the smallest values only (its frame is some 2.6 KiB, so that copies run
//! on threads with small stacks). A value too large for it is walked again from its root
//! in buffers of its own, which each thread keeps for its next copies (1.3 MiB of address
//! space, of which a walk touches what it uses; given back after a copy of more than
//! `KEEP_WORDS`), and the thread's next copies start there (`SKIPPED` of them, unless
//! one turns out small), so that a run of such values does not pay for a walk on the
//! stack that gives up each time. After a value too large for those buffers too, the
//! thread's next `SKIPPED` copies do not use them (the stack still takes small values),
//! unless values that they take and the stack does not come meanwhile, as many blocks of
//! them as a walk that gives up reads.
//!
//! The walk is the general one's, depth first by groups ([`super::pending`]): a value
//! copies to the same bytes whichever path takes it. It gives up, having written nothing
//! and keeping nothing allocated, on anything out of its way: more blocks or words than
//! its larger buffers hold, an infix pointer, a tag that may be refused (lazy values,
//! abstract blocks, custom blocks other than the boxed integers, OCaml 5's
//! continuations); the general traversal then copies the value or says why it cannot.
//!
//! Each field and header is read once, so the copy is well formed even when other
//! domains write to the source, as `read_field` (in `copy`) explains: every field of the
//! copy holds a value that the field held at some moment.

use std::cell::Cell;
use std::mem::MaybeUninit;

use super::{first_value_of, read_field, Heap, Measured, Output, Written};
use crate::copy::CopyError;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

/// The most blocks a copy made on the stack holds: twice as many as are told apart
/// without the index.
pub const MAX_BLOCKS: usize = 2 * LINEAR_BLOCKS;
/// The most words (headers included) a copy made on the stack holds: the walk's frame
/// takes some 2.6 KiB of stack, so that a copy runs on threads with small stacks (C
/// threads of the C API, a low `ulimit -s`); with 28 KiB, 48 KiB stacks overflowed.
pub const MAX_WORDS: usize = 128;
/// The most blocks a copy made by the walk holds, in buffers of its own beyond the
/// stack's limits.
pub const LARGE_MAX_BLOCKS: usize = 16384;
/// The most words a copy made by the walk holds: one run of the [`Output`].
pub const LARGE_MAX_WORDS: usize = super::MAX_RUN;
/// Blocks told apart by comparing addresses one by one; beyond, through an index by
/// address.
pub const LINEAR_BLOCKS: usize = 16;
/// Bytes of the buffers of a walk beyond the stack's limits: what it reports as its
/// transient memory.
pub const LARGE_SPACE_BYTES: usize = std::mem::size_of::<LargeSpace>();

/// Copies made without the walk in buffers of its own (on the stack, or by the general
/// traversal beyond), after the walk gave up on a value: a run of values just beyond its
/// limits (a list of 20 000 cells copied one at a time) then pays for a walk that gives
/// up once in `SKIPPED + 1` copies, not at every copy, and so do such values between
/// small ones (which the stack still takes). Also the copies that start with buffers of
/// their own, not the stack, after a value was found too large for the stack.
const SKIPPED: u8 = 8;

thread_local! {
    /// Copies this thread still makes without the walk in buffers of its own.
    static SKIP: Cell<u8> = const { Cell::new(0) };
    /// Blocks of the values that those buffers would have taken, copied by the general
    /// traversal since the skipping began: at [`LARGE_MAX_BLOCKS`], what a walk that
    /// gives up costs, the skipping ends.
    static SKIPPED_BLOCKS: Cell<u16> = const { Cell::new(0) };
    /// Copies this thread still starts in buffers of their own.
    static LARGE_FIRST: Cell<u8> = const { Cell::new(0) };
}

// `SKIPPED_BLOCKS` holds counts below `LARGE_MAX_BLOCKS`.
const _: () = assert!(LARGE_MAX_BLOCKS <= u16::MAX as usize);

/// Counts one copy off `counter` (one of this thread's counts of copies left): whether
/// any was left.
#[inline(always)]
fn count_down(counter: &'static std::thread::LocalKey<Cell<u8>>) -> bool {
    counter.with(|left| {
        let n = left.get();
        left.set(n.saturating_sub(1));
        n != 0
    })
}

/// Whether the next copy of this thread may walk in buffers of its own: not for the
/// `SKIPPED` (8) copies after the walk gave up, unless one of them turns out to be a
/// value that those buffers take and the stack does not. Counts the copy.
#[inline(always)]
pub fn may_walk_large() -> bool {
    !count_down(&SKIP)
}

/// This thread's counts of copies left ([`counts`]), to be put back by
/// [`restore_counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// `SKIP`'s.
    skip: u8,
    /// `LARGE_FIRST`'s.
    large_first: u8,
    /// `SKIPPED_BLOCKS`'.
    skipped_blocks: u16,
}

/// This thread's counts of copies left now: saved before a copy that may be abandoned and
/// made again.
pub fn counts() -> Counts {
    Counts {
        skip: SKIP.with(Cell::get),
        large_first: LARGE_FIRST.with(Cell::get),
        skipped_blocks: SKIPPED_BLOCKS.with(Cell::get),
    }
}

/// Puts back the counts that [`counts`] saved, when the copy made since was abandoned to
/// be made again (on OCaml 5 beside other domains, a value beyond the side table's budget
/// is copied again with them stopped): the copy counts once, as the one [`measure`]
/// answered for. An abandoned copy changes nothing else here: only a copy made records
/// what it was ([`note_general_copy`]).
pub fn restore_counts(counts: Counts) {
    SKIP.with(|skip| skip.set(counts.skip));
    LARGE_FIRST.with(|n| n.set(counts.large_first));
    SKIPPED_BLOCKS.with(|n| n.set(counts.skipped_blocks));
}

/// Whether a value of `blocks` blocks and `words` words fits the stack's buffers.
#[inline(always)]
fn fits_stack(blocks: usize, words: usize) -> bool {
    blocks <= MAX_BLOCKS && words <= MAX_WORDS
}

/// Records a copy of `blocks` blocks and `bytes` bytes made by the general traversal
/// after the walk gave up on it, having been allowed its own buffers (`large`): the
/// skipping begins. Or without them: a value those buffers take and the stack does not
/// counts towards ending the skipping, which ends once such values hold as many blocks
/// as a walk that gives up reads (copied by the traversal, they cost more than the walk
/// would, some 200 instructions a block; a walk that gives up, some 200 a block it
/// read). Ending it at the first such value made a value beyond the limits walk and give
/// up at every copy when such values came between (1.4x, helper's find); never ending
/// it, a run of them after one value beyond, up to `SKIPPED` copies (+15% on lists of
/// 8000 cells).
#[inline(always)]
pub fn note_general_copy(large: bool, blocks: usize, bytes: usize) {
    let words = bytes / WORD_BYTES;
    if large {
        SKIP.with(|skip| skip.set(SKIPPED));
        SKIPPED_BLOCKS.with(|n| n.set(0));
    } else if blocks <= LARGE_MAX_BLOCKS && words <= LARGE_MAX_WORDS && !fits_stack(blocks, words) {
        let total = SKIPPED_BLOCKS.with(Cell::get) as usize + blocks;
        if total >= LARGE_MAX_BLOCKS {
            SKIP.with(|skip| skip.set(0));
            SKIPPED_BLOCKS.with(|n| n.set(0));
        } else {
            // Below `LARGE_MAX_BLOCKS`, which a u16 holds.
            SKIPPED_BLOCKS.with(|n| n.set(total as u16));
        }
    }
}

/// Whether the next copy of this thread may walk in buffers of its own: what
/// [`may_walk_large`] will answer, without counting the copy ([`measure`] answers for the
/// next copy).
#[inline(always)]
fn will_walk_large() -> bool {
    SKIP.with(Cell::get) == 0
}

/// Whether the next copy of this thread should start in buffers of its own: for the
/// `SKIPPED` copies after one was too large for the stack.
#[inline(always)]
fn large_first() -> bool {
    count_down(&LARGE_FIRST)
}

/// Why the walk gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GiveUp {
    /// More blocks or words than its buffers hold.
    TooLarge,
    /// A block it does not handle: an infix pointer, a tag that may be refused.
    Unsupported,
}

/// A block found by the walk (or by [`super::shallow`]).
#[derive(Clone, Copy)]
pub(super) struct Found {
    /// Its first field, in the source.
    pub(super) block: Word,
    /// Its header, as read when it was found.
    pub(super) header: Header,
    /// Offset of its header in the copy, in words.
    pub(super) at: usize,
}

/// Where a walk keeps what it builds: `B` blocks, `W` words, an index of `I` slots (`2 *
/// B`). Every element is `MaybeUninit`, so the arrays need no initialisation; their
/// lengths are constants, so that the walk's bounds checks compare with constants.
struct Space<const B: usize, const W: usize, const I: usize> {
    /// The blocks found, in the order of the copy.
    found: [MaybeUninit<Found>; B],
    /// The copy's words.
    words: [MaybeUninit<Word>; W],
    /// The words of the copy that are pointers into it (held as their offset in bytes).
    pointers: [MaybeUninit<u32>; W],
    /// Runs of found blocks waiting to be scanned, `(next, end)`.
    runs: [MaybeUninit<(u32, u32)>; B],
    /// The found blocks by address (their index in `found`, plus one; 0 for an empty
    /// slot), of which the walk uses a power of two of slots at least twice its count,
    /// once past [`LINEAR_BLOCKS`] (see [`Walk::known`]).
    index: [MaybeUninit<u16>; I],
}

/// The space of a walk on the stack: 2.6 KiB, inside the walk itself (reached through a
/// reference, the walk of a 3-block value took some 5% more instructions).
type SmallSpace = Space<MAX_BLOCKS, MAX_WORDS, { 2 * MAX_BLOCKS }>;
/// The space of a walk beyond the stack's limits: [`LARGE_SPACE_BYTES`] (1.3 MiB of
/// address space), kept by each thread for its next copies while they use little of it
/// ([`KEEP_WORDS`]).
type LargeSpace = Space<LARGE_MAX_BLOCKS, LARGE_MAX_WORDS, { 2 * LARGE_MAX_BLOCKS }>;

/// A space held in place, for a walk on the stack.
struct Inline<T>(T);

impl<T> std::ops::Deref for Inline<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Inline<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl LargeSpace {
    /// A space on the heap, uninitialised; `None` when there is no memory for it (the
    /// general traversal then copies the value, or says that there is no memory).
    fn boxed() -> Option<Box<LargeSpace>> {
        let layout = std::alloc::Layout::new::<LargeSpace>();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) } as *mut LargeSpace;
        if p.is_null() {
            return None;
        }
        // SAFETY: allocated by the global allocator with the layout of `LargeSpace`, as
        // `Box` expects; a space of `MaybeUninit` elements is valid uninitialised.
        Some(unsafe { Box::from_raw(p) })
    }
}

/// Words of a copy up to which a thread keeps its [`LargeSpace`] for its next copies:
/// the memory a thread keeps is then at most some 300 KiB (the pages a walk of that size
/// touched), and a copy beyond gives its space back.
const KEEP_WORDS: usize = 16 * 1024;

thread_local! {
    /// This thread's space for walks beyond the stack, once it has made one (a box given
    /// up by `Box::into_raw`), else null; null too while a walk uses it.
    static LARGE_SPACE: Cell<*mut LargeSpace> = const { Cell::new(std::ptr::null_mut()) };
    /// Whether a walk of this thread uses its space now.
    static LARGE_SPACE_BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `walk` in this thread's [`LargeSpace`], made when it has none; gives the space
/// back when the walk used more than [`KEEP_WORDS`], or when the thread's end is not
/// watched ([`crate::thread_end`]). `None` when there is no memory for the space, or
/// when the thread's space is in use (a copy made from a C allocator called by a copy).
fn with_large_space<R>(walk: impl FnOnce(&mut LargeSpace) -> (R, usize)) -> Option<R> {
    if LARGE_SPACE_BUSY.get() {
        return None;
    }
    let kept = LARGE_SPACE.replace(std::ptr::null_mut());
    let mut space = if kept.is_null() {
        LargeSpace::boxed()?
    } else {
        // SAFETY: a box given up by `Box::into_raw` below, owned by nothing else since.
        unsafe { Box::from_raw(kept) }
    };
    LARGE_SPACE_BUSY.set(true);
    let (result, words) = walk(&mut space);
    LARGE_SPACE_BUSY.set(false);
    if words <= KEEP_WORDS && crate::thread_end::watched() {
        LARGE_SPACE.set(Box::into_raw(space));
    }
    Some(result)
}

/// Frees the thread's space: its thread ends.
pub(crate) fn thread_ends() {
    let kept = LARGE_SPACE.replace(std::ptr::null_mut());
    if !kept.is_null() {
        // SAFETY: as in `with_large_space`.
        drop(unsafe { Box::from_raw(kept) });
    }
}

/// Bytes of the space for walks beyond the stack that this thread keeps for its next
/// copies: [`LARGE_SPACE_BYTES`] once it has made such a walk, 0 before (and while a
/// walk uses it, and after a walk of more than `KEEP_WORDS`, which gives it back).
pub fn thread_space_bytes() -> usize {
    if LARGE_SPACE.get().is_null() {
        0
    } else {
        LARGE_SPACE_BYTES
    }
}

/// The walk over a value and the copy it builds, in a space `S` of `B` blocks, `W` words
/// and `I` index slots: held in place ([`Inline`]) or borrowed.
struct Walk<'a, H, S, const B: usize, const W: usize, const I: usize> {
    heap: &'a mut H,
    space: S,
    /// Blocks found: `space.found[..count]` are initialised.
    count: usize,
    /// Words of the copy: `space.words[..len]` are written once the walk is done.
    len: usize,
    /// `space.pointers[..pointer_count]` are initialised.
    pointer_count: usize,
    /// A filter of the first [`LINEAR_BLOCKS`] blocks found: bit [`filter_bit`] of each
    /// is set, so a block whose bit is clear was not found, and is not looked for.
    filter: u64,
    /// Slots of the index in use (`space.index[..index_slots]` initialised), a power of
    /// two; 0 until the count passes [`LINEAR_BLOCKS`].
    index_slots: usize,
    /// `64 - log2(index_slots)`: the shift that takes a hash to a slot.
    index_shift: u32,
}

/// Slots of the index when it is first built in buffers of its own: 512 bytes to clear,
/// and no rebuilding for values of up to 128 blocks (from 64 slots, a copy of 100 blocks
/// spent some 15% of its instructions rebuilding). A walk on the stack builds its whole
/// index at once, `2 * MAX_BLOCKS` slots (128 bytes).
const FIRST_INDEX_SLOTS: usize = 256;

/// The bit of [`Walk::filter`] for the block at `v`: blocks are mostly two words long or
/// more, so neighbouring blocks differ in the address bits from 4 on.
#[inline(always)]
fn filter_bit(v: Word) -> u64 {
    1 << ((v >> 4) & 63)
}

/// The first slot to probe for the block at `v` in an index of `2^(64 - shift)` slots:
/// Fibonacci hashing of its word address.
#[inline(always)]
fn index_slot_of(v: Word, shift: u32) -> usize {
    let hash = ((v / WORD_BYTES) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hash >> shift) as usize
}

/// Copies `root`, a pointer to a block that `heap` says to copy, into `out` when the
/// value is for this path: on the stack, or beyond its limits in buffers of its own when
/// `large` (see [`may_walk_large`]); `None` when it is not for this path (then nothing
/// was written to `out` or to the source, and nothing stays allocated).
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
    large: bool,
) -> Option<Result<Written, CopyError>> {
    if !large || !large_first() {
        let mut slot = MaybeUninit::uninit();
        let walk = Walk::on_stack(&mut slot, heap);
        // SAFETY: forwarded.
        match unsafe { walk.run(root) } {
            Ok(()) => return Some(walk.write(out, 0)),
            Err(GiveUp::Unsupported) => return None,
            Err(GiveUp::TooLarge) if large => LARGE_FIRST.with(|n| n.set(SKIPPED)),
            Err(GiveUp::TooLarge) => return None,
        }
    }
    // SAFETY: forwarded.
    unsafe { copy_large(root, heap, out) }
}

/// [`copy_into`] in buffers of its own.
///
/// # Safety
/// As [`copy_into`].
#[inline(never)]
unsafe fn copy_large<H: Heap, O: Output>(
    root: Word,
    heap: &mut H,
    out: &mut O,
) -> Option<Result<Written, CopyError>> {
    with_large_space(|space| {
        let mut walk = Walk::in_space(space, heap);
        // SAFETY: forwarded.
        let written = unsafe { walk.run(root) }.ok().map(|()| {
            walk.note_size();
            walk.write(out, walk.space_bytes())
        });
        (written, walk.len)
    })?
}

/// What a copy of `root` takes when the value is for this path ([`super::measure`]'s
/// answer); `None` when it is not.
///
/// # Safety
/// As [`copy_into`].
pub unsafe fn measure<H: Heap>(root: Word, heap: &mut H) -> Option<Measured> {
    let mut slot = MaybeUninit::uninit();
    let walk = Walk::on_stack(&mut slot, heap);
    // SAFETY: forwarded.
    match unsafe { walk.run(root) } {
        Ok(()) => return Some(walk.measured(0)),
        Err(GiveUp::Unsupported) => return None,
        Err(GiveUp::TooLarge) if will_walk_large() => {}
        Err(GiveUp::TooLarge) => return None,
    }
    with_large_space(|space| {
        let mut walk = Walk::in_space(space, heap);
        // SAFETY: forwarded.
        let measured = unsafe { walk.run(root) }
            .ok()
            .map(|()| walk.measured(walk.space_bytes()));
        (measured, walk.len)
    })?
}

/// A walk on the stack, its space in place.
type StackWalk<'a, H> = Walk<'a, H, Inline<SmallSpace>, MAX_BLOCKS, MAX_WORDS, { 2 * MAX_BLOCKS }>;

impl<'a, H: Heap> StackWalk<'a, H> {
    /// A walk on the stack that has found nothing yet, made in `slot`. Only its scalar
    /// fields are written: its space stays uninitialised, where a struct literal let the
    /// compiler clear it with `memset` (seen in `Region.add`).
    #[inline(always)]
    fn on_stack<'s>(slot: &'s mut MaybeUninit<Self>, heap: &'a mut H) -> &'s mut Self {
        let p = slot.as_mut_ptr();
        // SAFETY: `p` is valid for writes; every field but the space is written here, and
        // the space holds `MaybeUninit` elements, valid uninitialised: the walk is then
        // initialised.
        unsafe {
            std::ptr::addr_of_mut!((*p).heap).write(heap);
            std::ptr::addr_of_mut!((*p).count).write(0);
            std::ptr::addr_of_mut!((*p).len).write(0);
            std::ptr::addr_of_mut!((*p).pointer_count).write(0);
            std::ptr::addr_of_mut!((*p).filter).write(0);
            std::ptr::addr_of_mut!((*p).index_slots).write(0);
            std::ptr::addr_of_mut!((*p).index_shift).write(64);
            slot.assume_init_mut()
        }
    }
}

impl<'a, 's, H: Heap>
    Walk<'a, H, &'s mut LargeSpace, LARGE_MAX_BLOCKS, LARGE_MAX_WORDS, { 2 * LARGE_MAX_BLOCKS }>
{
    /// A walk in `space` that has found nothing yet.
    fn in_space(space: &'s mut LargeSpace, heap: &'a mut H) -> Self {
        Walk {
            heap,
            space,
            count: 0,
            len: 0,
            pointer_count: 0,
            filter: 0,
            index_slots: 0,
            index_shift: 64,
        }
    }
}

impl<'a, H, S, const B: usize, const W: usize, const I: usize> Walk<'a, H, S, B, W, I>
where
    H: Heap,
    S: std::ops::DerefMut<Target = Space<B, W, I>>,
{
    /// What the copy takes, the walk's buffers counting `transient_bytes`.
    fn measured(&self, transient_bytes: usize) -> Measured {
        Measured {
            bytes: self.len * WORD_BYTES,
            blocks: self.count,
            transient_bytes,
        }
    }

    /// After a walk in buffers of its own: a value within the stack's limits sends the
    /// next copies to the stack again.
    fn note_size(&self) {
        if fits_stack(self.count, self.len) {
            LARGE_FIRST.with(|n| n.set(0));
        }
    }

    /// The transient memory a walk in buffers of its own reports: theirs, unless the
    /// value fits the stack, where it could have been walked without them (as
    /// [`measure`] does): the figure depends on the value, not on where the thread's
    /// last copies sent this one.
    fn space_bytes(&self) -> usize {
        if fits_stack(self.count, self.len) {
            0
        } else {
            LARGE_SPACE_BYTES
        }
    }

    /// Hands the copy to `out`; the walk's buffers held `transient_bytes`.
    #[inline(always)]
    fn write<O: Output>(&self, out: &mut O, transient_bytes: usize) -> Result<Written, CopyError> {
        let bytes = self.len * WORD_BYTES;
        let base = out.begin(bytes)?;
        crate::fault::point("write");
        // The whole copy as one run (at most `LARGE_MAX_WORDS`, that is `MAX_RUN`): first
        // the walk's words, then the fields of raw blocks over the words the walk left
        // unwritten, then the base added to every pointer.
        let dst = out.next(self.len);
        // SAFETY: `dst` has room for `len` words. `MaybeUninit` words are copied as they
        // are: those the walk left unwritten (the fields of raw blocks) are overwritten
        // below, before anyone reads the copy.
        unsafe {
            let words = self.space.words.as_ptr();
            crate::memcopy::copy_nonoverlapping(words.cast(), dst.cast(), bytes)
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
        for p in &self.space.pointers[..self.pointer_count] {
            // SAFETY: `pointers[..pointer_count]` are initialised, each with a word below
            // `len`, written above.
            unsafe { *dst.add(p.assume_init() as usize) += base };
        }
        Ok(Written {
            // The root's block is the first one found.
            root: base + WORD_BYTES,
            bytes,
            blocks: self.count,
            data_bytes: 0,
            transient_bytes,
        })
    }

    /// Block `k` found.
    #[inline(always)]
    fn found(&self, k: usize) -> Found {
        debug_assert!(k < self.count);
        // SAFETY: callers pass `k < count`: found blocks are initialised.
        unsafe { self.space.found[k].assume_init() }
    }

    /// Finds the root's block and then every block it leads to, depth first by groups:
    /// the blocks that one block's fields lead to, found together, are scanned next.
    unsafe fn run(&mut self, root: Word) -> Result<(), GiveUp> {
        // SAFETY: `root` points to a block of the source.
        unsafe { self.discover(root)? };
        crate::fault::point("measure");
        // A run is pushed only when its blocks were just found, so there are at most as
        // many as blocks. `runs[..depth]` are initialised.
        self.space.runs[0].write((0, 1));
        let mut depth = 1;
        while depth > 0 {
            // SAFETY: `depth - 1 < depth`: an initialised run.
            let run = unsafe { self.space.runs[depth - 1].assume_init_mut() };
            let (next, end) = *run;
            if next == end {
                depth -= 1;
                continue;
            }
            run.0 += 1;
            let children = self.count;
            // SAFETY: `next < count`: runs hold found blocks.
            unsafe { self.scan(self.found(next as usize))? };
            if self.count > children {
                // At most `LARGE_MAX_BLOCKS` blocks: both fit a `u32`.
                self.space.runs[depth].write((children as u32, self.count as u32));
                depth += 1;
            }
        }
        Ok(())
    }

    /// Reads the header of the block `v` points to and, when the path can copy it, gives
    /// it the next place in the copy. Returns its index.
    #[inline(always)]
    unsafe fn discover(&mut self, v: Word) -> Result<usize, GiveUp> {
        // SAFETY: `v` points to a block (or an infix header) of the source.
        let hd = unsafe { layout::read_header(v) };
        let n = hd.wosize();
        if self.count == B || n >= W - self.len {
            return Err(GiveUp::TooLarge);
        }
        match hd.tag() {
            layout::FORCING_TAG..=layout::LAZY_TAG | layout::INFIX_TAG | layout::ABSTRACT_TAG => {
                return Err(GiveUp::Unsupported)
            }
            // SAFETY: field 0 of a custom block is its operations pointer.
            layout::CUSTOM_TAG if !self.heap.is_copyable_custom(unsafe { *(v as *const Word) }) => {
                return Err(GiveUp::Unsupported)
            }
            _ => {}
        }
        let at = self.len;
        self.space.words[at].write(hd.with_color(Color::Unmarkable).0);
        let index = self.count;
        self.space.found[index].write(Found {
            block: v,
            header: hd,
            at,
        });
        self.count += 1;
        self.len += 1 + n;
        if self.count <= LINEAR_BLOCKS {
            self.filter |= filter_bit(v);
        } else if self.count * 2 > self.index_slots {
            self.grow_index();
        } else {
            self.index_insert(index);
        }
        Ok(index)
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
        let mask = self.index_slots - 1;
        let mut slot = index_slot_of(v, self.index_shift);
        loop {
            // SAFETY: slots below `index_slots` are initialised.
            let entry = unsafe { self.space.index[slot].assume_init() } as usize;
            if entry == 0 {
                return None;
            }
            if self.found(entry - 1).block == v {
                return Some(entry - 1);
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Builds the index anew, twice as large (at first [`FIRST_INDEX_SLOTS`]), with every
    /// block found so far: when the count passes [`LINEAR_BLOCKS`], and then whenever it
    /// passes half the slots. Within the space: the count never exceeds the blocks the
    /// space holds, and its index has twice as many slots.
    #[cold]
    #[inline(never)]
    fn grow_index(&mut self) {
        // The stack's index is smaller than `FIRST_INDEX_SLOTS`: all of it at once.
        let slots = (self.index_slots * 2).max(FIRST_INDEX_SLOTS.min(I));
        debug_assert!(slots <= self.space.index.len() && self.count * 2 <= slots);
        for slot in &mut self.space.index[..slots] {
            slot.write(0);
        }
        self.index_slots = slots;
        self.index_shift = 64 - slots.trailing_zeros();
        for k in 0..self.count {
            self.index_insert(k);
        }
    }

    /// Enters found block `k` in the index.
    #[inline(always)]
    fn index_insert(&mut self, k: usize) {
        let block = self.found(k).block;
        let mask = self.index_slots - 1;
        let mut slot = index_slot_of(block, self.index_shift);
        // At most half the slots are taken: an empty one is found.
        // SAFETY: slots below `index_slots` are initialised.
        while unsafe { self.space.index[slot].assume_init() } != 0 {
            slot = (slot + 1) & mask;
        }
        // `k < LARGE_MAX_BLOCKS`, so `k + 1` fits a `u16` (asserted at the top).
        self.space.index[slot].write(k as u16 + 1);
    }

    /// Reads the fields of the found block `f` into the copy, finding the blocks they
    /// lead to.
    #[inline(always)]
    unsafe fn scan(&mut self, f: Found) -> Result<(), GiveUp> {
        if !f.header.is_scannable() {
            return Ok(());
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
                self.space.words[dst + i].write(word);
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
                // `dst + i < len <= LARGE_MAX_WORDS`: fits a `u32`.
                self.space.pointers[self.pointer_count].write((dst + i) as u32);
                self.pointer_count += 1;
                (self.found(j).at + 1) * WORD_BYTES
            } else {
                v
            };
            self.space.words[dst + i].write(word);
        }
        Ok(())
    }
}

/// Copies `n` words from `src` to `dst`: a loop for the few words of most small blocks
/// (a call to `memcpy` costs more than it copies), `memcpy` beyond.
///
/// # Safety
/// As [`std::ptr::copy_nonoverlapping`] for `n` words.
#[inline(always)]
pub(super) unsafe fn copy_short(src: *const Word, dst: *mut Word, n: usize) {
    if n > 8 {
        // SAFETY: the caller's contract.
        unsafe { crate::memcopy::copy_nonoverlapping(src.cast(), dst.cast(), n * WORD_BYTES) };
        return;
    }
    for i in 0..n {
        // SAFETY: `i < n`, inside both ranges (the caller's contract).
        unsafe { dst.add(i).write(src.add(i).read()) };
    }
}
