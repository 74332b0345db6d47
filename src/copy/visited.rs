//! Which source blocks were already given a place in the copy, and where.
//!
//! Two strategies with one interface:
//! - [`HeaderMarks`] overwrites each visited block's header with a mark holding its
//!   offset, and puts the original headers back at the end. No table, no hashing: the
//!   fastest, but it writes to the source, so it is only sound while no other thread or
//!   domain can read those headers (OCaml 4's runtime lock).
//! - [`SideTable`] keeps an open-addressing hash table from block address to offset and
//!   never writes to the source (OCaml 5, where other domains' collectors read headers).
//! - [`MarksOutside`] marks headers except of blocks outside the GC heap, which go to a
//!   side table (OCaml 5 with one domain: static data, which may be read-only), and
//!   marks the blocks of one address range (the minor heap, whose blocks' color could
//!   be the mark color) with another color.

use crate::alloc::{NoMemory, ZeroedArray};
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

use super::queue::Queue;

/// What a visited set knows of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Visited: the copy holds it at this offset, in words, from the start (its header).
    At(usize),
    /// Not visited yet; its header.
    New(Header),
}

/// A set of visited blocks with their offsets in the copy.
///
/// # Safety
/// Implementations may read and write the headers of the blocks they are given; callers
/// pass only blocks of the source graph (first fields of readable, writable blocks).
pub unsafe trait VisitedSet {
    /// Whether the set never writes to the source, so that the copy may run while other
    /// threads or domains read it and write to it. The traversal then reads each block
    /// of the source once ([`crate::copy`]'s snapshot) instead of once per pass.
    const SOURCE_SHARED: bool;

    /// Looks `block` up, given `hd`, the header word currently in front of it.
    ///
    /// # Safety
    /// `block` is a block start of the source graph and `hd` was just read from it.
    unsafe fn lookup(&self, block: Word, hd: Header) -> Seen;

    /// Records that `block`, whose original header is `hd`, lives at `offset` words;
    /// [`NoMemory`], with nothing recorded, when the set cannot grow.
    ///
    /// # Safety
    /// `block` is a block start of the source graph, not yet marked.
    unsafe fn mark(&mut self, block: Word, hd: Header, offset: usize) -> Result<(), NoMemory>;

    /// Puts the source back as it was before the first mark; `queue` lists every block
    /// marked, with its original header.
    ///
    /// # Safety
    /// `queue` is exactly the list of marked blocks.
    unsafe fn restore(&mut self, queue: &Queue);

    /// Bytes of memory the set holds now (the source headers it borrows not counted).
    fn allocated_bytes(&self) -> usize;
}

/// Marks visited blocks in their own headers: `offset << 10 | mark_color << 8 | tag`.
///
/// The mark color must be one that no reachable block of the source can carry: blue on
/// OCaml 4 (the color of free-list blocks).
pub struct HeaderMarks {
    mark: Color,
}

impl HeaderMarks {
    /// Marks with color `mark`, which no reachable source block may have.
    pub fn new(mark: Color) -> HeaderMarks {
        HeaderMarks { mark }
    }
}

// SAFETY: reads and writes only the headers of the blocks it is given, and `restore`
// writes back exactly the headers recorded in the queue.
unsafe impl VisitedSet for HeaderMarks {
    const SOURCE_SHARED: bool = false;

    #[inline(always)]
    unsafe fn lookup(&self, _block: Word, hd: Header) -> Seen {
        if hd.color() == self.mark {
            Seen::At(hd.wosize())
        } else {
            Seen::New(hd)
        }
    }

    #[inline(always)]
    unsafe fn mark(&mut self, block: Word, hd: Header, offset: usize) -> Result<(), NoMemory> {
        debug_assert!(
            offset <= layout::MAX_WOSIZE,
            "offset {offset} overflows a header"
        );
        // SAFETY: the caller passes a block start of the source graph.
        unsafe { layout::write_header(block, Header::new(offset, self.mark, hd.tag())) };
        Ok(())
    }

    unsafe fn restore(&mut self, queue: &Queue) {
        for (k, entry) in queue.iter().enumerate() {
            // Blocks come back in the order they were discovered: on a scattered source
            // each header is a cache miss, so the one some entries on is fetched
            // while this one is written.
            if let Some(ahead) = queue.block_hint(k + RESTORE_AHEAD) {
                super::prefetch(ahead.wrapping_sub(WORD_BYTES));
            }
            // SAFETY: every queued block was marked, so its header is ours to put back.
            unsafe { layout::write_header(entry.block, entry.header) }
        }
    }

    fn allocated_bytes(&self) -> usize {
        0
    }
}

/// How many queue entries ahead [`HeaderMarks::restore`] (and [`MarksOutside`]'s)
/// fetches a header: 64, not 16, puts back the 2M headers of a `Map` of 1M random keys
/// in 8.1-9.0 ms instead of 9.2-10.5 (OCaml 5.3, rounds in turn); 128 no faster.
const RESTORE_AHEAD: usize = 64;

/// Slots of one [`SideTable`] window: the words of a 4 KiB page.
const WINDOW: usize = 4096 / WORD_BYTES;

/// Open addressing with linear probing, keyed by block address.
///
/// Block addresses are word aligned and never zero, so 0 marks an empty slot. The table
/// doubles when it is half full, which keeps probe sequences short; keys and offsets sit
/// side by side so that a hit costs one cache line.
///
/// A new table holds no memory. Its first [`INLINE`] blocks are kept in a small array
/// inside the table, searched in order, and the first insertion past them allocates
/// (like every growth, it may fail with [`NoMemory`]): a copy of a few young blocks on
/// OCaml 5 (the side table of [`MarksOutside`]) allocated and zeroed 1 KiB, and freed
/// it, a quarter of its instructions.
///
/// The hash keeps neighbours together: the blocks of one 4 KiB page of the source land
/// in one window of `WINDOW` slots, in address order, and only the page number is
/// scrambled. A traversal mostly goes from a block to its neighbours, so most lookups
/// hit cache lines that the previous ones brought in, instead of one miss each.
pub struct SideTable {
    /// `(block, offset)` pairs; `block == 0` is an empty slot. Length a power of two,
    /// or 0 before the first insertion.
    slots: ZeroedArray<(Word, usize)>,
    /// Occupied slots; before the first allocation, used entries of `inline`.
    len: usize,
    /// The pairs held before the first allocation: `inline[..len]` while `slots` is
    /// empty, unused after.
    inline: [(Word, usize); INLINE],
    /// Slots of the first allocation.
    first_slots: usize,
}

/// Slots of a table's first allocation, at least.
const FIRST_SLOTS: usize = 64;
/// Pairs a table holds before its first allocation (16: 256 bytes, searched in order;
/// measured on OCaml 5, a copy of 10 young blocks took 8% fewer instructions than with 8).
pub const INLINE: usize = 16;

impl SideTable {
    /// An empty table; allocates nothing.
    pub fn new() -> SideTable {
        SideTable::with_capacity(0)
    }

    /// An empty table whose first allocation (at its first insertion) has room for about
    /// `expected` blocks; allocates nothing now.
    pub fn with_capacity(expected: usize) -> SideTable {
        SideTable {
            slots: ZeroedArray::empty(),
            len: 0,
            inline: [(0, 0); INLINE],
            first_slots: expected
                .saturating_mul(2)
                .checked_next_power_of_two()
                .unwrap_or(FIRST_SLOTS)
                .max(FIRST_SLOTS),
        }
    }

    /// The first slot to probe for `block` in a table of `size` slots (a power of two).
    #[inline(always)]
    fn slot_of(size: usize, block: Word) -> usize {
        let word = block / WORD_BYTES;
        // Fibonacci hashing of the page number: its high bits are the best mixed.
        let page = ((word / WINDOW) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let windows = (size / WINDOW).max(1);
        let window = (page >> (64 - windows.trailing_zeros().max(1))) as usize % windows;
        (window * WINDOW + word % WINDOW) & (size - 1)
    }

    #[inline(always)]
    fn get(&self, block: Word) -> Option<usize> {
        let slots = &self.slots;
        if slots.is_empty() {
            return self.inline[..self.len]
                .iter()
                .find(|&&(key, _)| key == block)
                .map(|&(_, offset)| offset);
        }
        let mask = slots.len() - 1;
        let mut i = Self::slot_of(slots.len(), block);
        loop {
            let (key, offset) = slots[i];
            if key == block {
                return Some(offset);
            }
            if key == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, block: Word, offset: usize) -> Result<(), NoMemory> {
        if self.slots.is_empty() && self.len < INLINE {
            self.inline[self.len] = (block, offset);
            self.len += 1;
            return Ok(());
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow()?;
        }
        Self::put(&mut self.slots, block, offset);
        self.len += 1;
        Ok(())
    }

    /// Stores a pair in `slots`, which has a free slot.
    #[inline(always)]
    fn put(slots: &mut [(Word, usize)], block: Word, offset: usize) {
        let mask = slots.len() - 1;
        let mut i = Self::slot_of(slots.len(), block);
        while slots[i].0 != 0 {
            debug_assert_ne!(slots[i].0, block, "block inserted twice");
            i = (i + 1) & mask;
        }
        slots[i] = (block, offset);
    }

    /// Doubles the table (or makes its first [`FIRST_SLOTS`]); on failure the table is
    /// as it was.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) -> Result<(), NoMemory> {
        let size = (self.slots.len() * 2).max(self.first_slots);
        // SAFETY: zero words are an empty slot.
        let mut doubled = unsafe { ZeroedArray::new(size)? };
        let held = if self.slots.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.slots[..]
        };
        for &(block, offset) in held {
            if block != 0 {
                Self::put(&mut doubled, block, offset);
            }
        }
        self.slots = doubled;
        Ok(())
    }
}

impl Default for SideTable {
    fn default() -> Self {
        SideTable::new()
    }
}

// SAFETY: never writes to the source; reads nothing but the header it is handed.
unsafe impl VisitedSet for SideTable {
    const SOURCE_SHARED: bool = true;

    #[inline(always)]
    unsafe fn lookup(&self, block: Word, hd: Header) -> Seen {
        match self.get(block) {
            Some(offset) => Seen::At(offset),
            None => Seen::New(hd),
        }
    }

    #[inline(always)]
    unsafe fn mark(&mut self, block: Word, _hd: Header, offset: usize) -> Result<(), NoMemory> {
        self.insert(block, offset)
    }

    unsafe fn restore(&mut self, _queue: &Queue) {}

    fn allocated_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<(Word, usize)>()
    }
}

/// Header marks for every block whose header is not [`Color::Unmarkable`]: in the color
/// `mark` outside `young`, in [`Color::Unmarkable`] inside it (where blocks never have
/// that color: OCaml 5's minor heap, whose blocks all have the color 0, which may be the
/// mark color); a side table for blocks outside the GC heap (static data, copies,
/// images: on OCaml 5 their headers are unmarkable, and static data may lie in read-only
/// memory, as the atom table does), of which a copy of static data visits a few.
pub struct MarksOutside {
    marks: HeaderMarks,
    young_marks: HeaderMarks,
    table: SideTable,
    /// `(start, end)`, both exclusive: the blocks marked in [`Color::Unmarkable`].
    young: (Word, Word),
}

impl MarksOutside {
    /// Marks with color `mark` outside `young` (exclusive bounds), with
    /// [`Color::Unmarkable`] inside it, whose blocks must not have that color.
    pub fn new(mark: Color, young: (Word, Word)) -> MarksOutside {
        MarksOutside {
            marks: HeaderMarks::new(mark),
            young_marks: HeaderMarks::new(Color::Unmarkable),
            table: SideTable::new(),
            young,
        }
    }

    /// Whether `block` lies in the young range.
    #[inline(always)]
    fn is_young(&self, block: Word) -> bool {
        block > self.young.0 && block < self.young.1
    }
}

// SAFETY: each block goes to exactly one of the three sets, always the same one: a young
// block (by its address) to `young_marks`, whose marks no young block's own header
// has; another block with an unmarkable header to the side table, which leaves its
// header as it is, so that `lookup` sees it again; any other block to `marks`, whose
// color is not the unmarkable one either. `restore` writes back the queued headers of
// the marked blocks only.
unsafe impl VisitedSet for MarksOutside {
    /// One domain only: header marks are written.
    const SOURCE_SHARED: bool = false;

    #[inline(always)]
    unsafe fn lookup(&self, block: Word, hd: Header) -> Seen {
        // SAFETY: forwarded.
        unsafe {
            if self.is_young(block) {
                self.young_marks.lookup(block, hd)
            } else if hd.color() == Color::Unmarkable {
                self.table.lookup(block, hd)
            } else {
                self.marks.lookup(block, hd)
            }
        }
    }

    #[inline(always)]
    unsafe fn mark(&mut self, block: Word, hd: Header, offset: usize) -> Result<(), NoMemory> {
        // SAFETY: forwarded.
        unsafe {
            if self.is_young(block) {
                self.young_marks.mark(block, hd, offset)
            } else if hd.color() == Color::Unmarkable {
                self.table.mark(block, hd, offset)
            } else {
                self.marks.mark(block, hd, offset)
            }
        }
    }

    unsafe fn restore(&mut self, queue: &Queue) {
        for (k, entry) in queue.iter().enumerate() {
            // As `HeaderMarks::restore`: the header some entries on is fetched now.
            if let Some(ahead) = queue.block_hint(k + RESTORE_AHEAD) {
                super::prefetch(ahead.wrapping_sub(WORD_BYTES));
            }
            if self.is_young(entry.block) || entry.header.color() != Color::Unmarkable {
                // SAFETY: a queued block outside the table was marked: its header is
                // ours to put back.
                unsafe { layout::write_header(entry.block, entry.header) }
            }
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.table.allocated_bytes()
    }
}

/// A visited set that takes at most a given number of blocks: past them, [`mark`] fails
/// as if out of memory (the traversal then restores the source and reports, having
/// written nothing) and `on_exceeded` is called first, so the caller can tell a value
/// too large for this way of copying from one the allocator could not hold, and copy it
/// another way.
///
/// [`mark`]: VisitedSet::mark
pub struct Budgeted<V> {
    inner: V,
    /// Blocks that may still be marked.
    left: usize,
    on_exceeded: fn(),
}

impl<V: VisitedSet> Budgeted<V> {
    /// `inner`, for at most `blocks` blocks.
    pub fn new(inner: V, blocks: usize, on_exceeded: fn()) -> Budgeted<V> {
        Budgeted {
            inner,
            left: blocks,
            on_exceeded,
        }
    }
}

// SAFETY: forwards to `inner`, marking no more than it would.
unsafe impl<V: VisitedSet> VisitedSet for Budgeted<V> {
    const SOURCE_SHARED: bool = V::SOURCE_SHARED;

    #[inline(always)]
    unsafe fn lookup(&self, block: Word, hd: Header) -> Seen {
        // SAFETY: forwarded.
        unsafe { self.inner.lookup(block, hd) }
    }

    #[inline(always)]
    unsafe fn mark(&mut self, block: Word, hd: Header, offset: usize) -> Result<(), NoMemory> {
        if self.left == 0 {
            (self.on_exceeded)();
            return Err(NoMemory(0));
        }
        self.left -= 1;
        // SAFETY: forwarded.
        unsafe { self.inner.mark(block, hd, offset) }
    }

    unsafe fn restore(&mut self, queue: &Queue) {
        // SAFETY: forwarded.
        unsafe { self.inner.restore(queue) }
    }

    fn allocated_bytes(&self) -> usize {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_table_finds_what_it_holds_across_growth() {
        let mut t = SideTable::new();
        assert_eq!(t.get(8), None);
        assert_eq!(t.allocated_bytes(), 0);
        for i in 1..10_000usize {
            // SAFETY: the side table never dereferences the addresses.
            unsafe { t.mark(i * 8, Header(0), i * 3) }.unwrap();
            // The first INLINE pairs live in the table itself.
            assert_eq!(t.allocated_bytes() == 0, i <= INLINE, "{i} pairs");
            assert_eq!(t.get(i * 8), Some(i * 3));
            assert_eq!(t.get(i * 8 + 8), None);
        }
        for i in 1..10_000usize {
            assert_eq!(t.get(i * 8), Some(i * 3));
        }
        assert_eq!(t.get(10_000 * 8), None);
        assert!(t.slots.len() >= 2 * 10_000);
    }
}
