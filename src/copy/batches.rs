//! Pass 1 over a scattered source: by batches, every discovery deferred.
//!
//! Depth first by groups ([`super::pending`]) reads a tree built depth first in its
//! allocation order, but on a source whose blocks lie all over the heap (a `Map` or a
//! `Set` of random keys, a hash table's buckets, a graph) each block it meets is a
//! cache miss that the next one waits for: the children of the block being scanned are
//! the next blocks to scan, and their addresses are known only once it is read. Such a
//! walk has one or two misses in flight, where the memory system serves some thirty at
//! once (random reads in 92 MB on the 2-core VM of the benchmarks: 150 ns each when
//! each waits for the one before, 5.5 ns when the addresses are known ahead).
//!
//! So once pass 1 sees that the blocks it discovers lie scattered and that many wait to
//! be scanned (`Traversal::by_batches_from_here`), it goes on by batches: the next
//! [`BATCH`] blocks of the top run are scanned, and the blocks they lead to make one
//! run, scanned next the same way (`Traversal::scan_by_batches`): breadth first
//! within a batch, depth first from batch to batch, so that the blocks waiting stay
//! few (a batch's blocks were discovered by the batch before and are still in the
//! cache). Within a batch the misses overlap:
//! - a pointer to a block is not followed when its field is read: the block's first
//!   lines are fetched and the pointer waits in a [`Deferred`] ring, to be classified
//!   and discovered (given its offset, marked, queued) [`RING`] pointers later, when
//!   they have arrived. Where its translation goes (its field's place in the copy that
//!   pass 1 writes, or in the snapshot) waits with it. The ring is emptied at the end
//!   of each batch, so that the batch's children are all queued before it is pushed;
//! - blocks discovered long before (the runs left on the stack when pass 1 switched, a
//!   hash table's buckets) are fetched [`SCAN_AHEAD`] blocks ahead of their scan.
//!
//! Discoveries keep the order of the fields they come from, every block is still given
//! its offset when it is queued, pass 2 and the restore walk the queue as before, and
//! the errors are the same (a block that cannot be copied is found when its pointer
//! leaves the ring, before pass 1 ends). A value of no more blocks than the path of
//! small values copies never switches ([`SWITCH_FROM`]), so both paths still lay out
//! such values alike. Measured (`benches/bench.exe`, medians of 5, two rounds in turn
//! with depth first by groups alone): on OCaml 5.3 a `Set` of 1M random ints 57-59 ->
//! 34 ms, a `Map` of 1M random strings 92-93 -> 66-67, a `Hashtbl` of 1M strings 75-77
//! -> 68-70; on OCaml 4.13 64 -> 34, 111-118 -> 79-81 and 116-130 -> 79-81.

use super::pending::Pending;
use super::queue::Entry;
use super::visited::VisitedSet;
use super::{prefetch, scanned_fields, CopyError, Heap, Traversal, RELOCATED};
use crate::layout::{self, Word, WORD_BYTES};

/// Pointers waiting in the ring before they are discovered: enough for their headers to
/// arrive (a few hundred nanoseconds of scanning), few enough to stay in the cache.
pub const RING: usize = 32;

/// Queue entries ahead of the block being scanned whose block is fetched.
pub const SCAN_AHEAD: usize = 16;

/// Blocks of a batch: enough that the misses of their children overlap and that
/// emptying the ring at its end costs little, few enough that the blocks discovered
/// stay in the cache until scanned (measured: 64 to 1024 within 5% of one another).
pub const BATCH: usize = 256;

/// Pass 1 decides whether to go on by batches once the queue holds more than this many
/// blocks, then each time it has grown four times: never for a value the path of small
/// values copies ([`super::small::LARGE_MAX_BLOCKS`]).
pub const SWITCH_FROM: usize = super::small::LARGE_MAX_BLOCKS;

/// Blocks waiting to be scanned from which pass 1 may go on by batches: a binary tree
/// 16 levels deep has some 8 on its stack, a list one or two (a list of records a few
/// more).
pub const WIDE: usize = 8;

/// Blocks queued one after the other further apart than this are far apart: the
/// hardware prefetcher, which follows a few streams of nearby lines, cannot fetch them
/// ahead.
const FAR_BYTES: usize = 4096;

/// The blocks queued last that [`Traversal::by_batches_from_here`] looks at.
const SCATTER_SAMPLE: usize = 4096;

/// Where a deferred pointer's translation goes: nowhere (pass 2 translates it), or word
/// `to` of the copy that pass 1 writes, or of the snapshot when the source is shared.
const NOWHERE: usize = usize::MAX;

/// Pointers read from fields and not discovered yet, oldest first.
pub struct Deferred {
    /// `(pointer, where its translation goes)`, at `taken % RING` to `put % RING`.
    slots: [(Word, usize); RING],
    /// Pointers put in since the start.
    put: usize,
    /// Pointers taken out since the start.
    taken: usize,
}

impl Deferred {
    /// An empty ring.
    pub fn new() -> Deferred {
        Deferred {
            slots: [(0, NOWHERE); RING],
            put: 0,
            taken: 0,
        }
    }

    /// Whether no pointer waits.
    fn is_empty(&self) -> bool {
        self.put == self.taken
    }

    /// Whether [`RING`] pointers wait.
    fn is_full(&self) -> bool {
        self.put - self.taken == RING
    }

    /// Adds a pointer; the ring is not full.
    #[inline(always)]
    fn push(&mut self, v: Word, to: usize) {
        debug_assert!(!self.is_full());
        self.slots[self.put % RING] = (v, to);
        self.put += 1;
    }

    /// Takes the oldest pointer; the ring is not empty.
    #[inline(always)]
    fn pop(&mut self) -> (Word, usize) {
        debug_assert!(!self.is_empty());
        let slot = self.slots[self.taken % RING];
        self.taken += 1;
        slot
    }
}

impl Default for Deferred {
    fn default() -> Self {
        Deferred::new()
    }
}

impl<H: Heap, V: VisitedSet> Traversal<'_, H, V> {
    /// Whether pass 1 should go on by batches: at least [`WIDE`] blocks wait to be
    /// scanned (not a list, whose blocks come one at a time whatever the order), and
    /// the last blocks it queued lie scattered over the heap: more than a third of the
    /// last [`SCATTER_SAMPLE`] lie more than [`FAR_BYTES`] from the one queued before.
    ///
    /// A third, not a half: on OCaml 5.3 the nodes of an AST built depth first lie in
    /// the pools of their sizes, 46-48% of them far from the one before, and batches
    /// copy it 10% faster (84-86 -> 74-78 ms); on OCaml 4.13 the same AST has 1%.
    /// Sources laid out in the order of the walk (lists, arrays of records) have none.
    pub(super) fn by_batches_from_here(&self, pending: &Pending) -> bool {
        if pending.waiting(WIDE) < WIDE {
            return false;
        }
        let to = self.queue.len();
        let from = to.saturating_sub(SCATTER_SAMPLE);
        let block = |i| self.queue.get(i).map_or(0, |e: Entry| e.block);
        let mut last = block(from);
        let mut far = 0;
        for i in from + 1..to {
            let next = block(i);
            far += usize::from(next.abs_diff(last) > FAR_BYTES);
            last = next;
        }
        far * 3 > to - from
    }

    /// Pass 1 from here to its end, by batches: the next [`BATCH`] blocks of the top run
    /// of `pending` are scanned, their pointers deferred ([`Deferred`]), and the blocks
    /// they lead to make one run, pushed on top, scanned the same way before the rest.
    /// A batch's blocks were discovered by the batch before (still in the cache), or
    /// are fetched [`SCAN_AHEAD`] blocks ahead.
    ///
    /// # Safety
    /// As [`Traversal::scan_pending`]: the runs of `pending` hold queued blocks.
    pub(super) unsafe fn scan_by_batches<const IN_FILE: bool>(
        &mut self,
        pending: &mut Pending,
    ) -> Result<(), CopyError> {
        self.by_batches = true;
        let mut ring = Deferred::new();
        while let Some(run) = pending.top() {
            let children = self.queue.len();
            let children_at = self.children_at();
            let mut at = run.at;
            for k in run.next..(run.next + BATCH).min(run.end) {
                // SAFETY: nothing is pushed until the batch ends: `run`, advanced, is
                // still the top run, and `k` its next block.
                let entry = unsafe { self.take_next::<IN_FILE>(pending, k) };
                if k + SCAN_AHEAD < run.end {
                    if let Some(ahead) = self.queue.get(k + SCAN_AHEAD) {
                        prefetch_block(ahead);
                    }
                }
                if entry.header.is_scannable() {
                    // SAFETY: a queued scannable block, at `at`.
                    unsafe { self.scan_deferring(entry, at, &mut ring)? };
                }
                at += self.run_words(entry);
            }
            while !ring.is_empty() {
                // SAFETY: the ring holds what `scan_deferring` put there.
                unsafe { self.resolve_oldest(&mut ring)? };
            }
            self.push_run(pending, children, children_at)?;
        }
        Ok(())
    }

    /// Pass 1 for one queued scannable block, which starts at `at` ([`super::Run::at`]):
    /// puts the pointers to blocks to copy in its fields in `ring` (discovering those
    /// that leave it), with where their translations go, and writes its other fields
    /// where pass 1 writes the block.
    ///
    /// # Safety
    /// `entry` is a queued scannable block of the source, at `at`.
    #[inline(always)]
    unsafe fn scan_deferring(
        &mut self,
        entry: Entry,
        at: usize,
        ring: &mut Deferred,
    ) -> Result<(), CopyError> {
        let block = entry.block as *const Word;
        let scanned = if V::SOURCE_SHARED {
            // The fields pass 1 read when it queued the block.
            let n = entry.header.wosize();
            super::first_value_of(entry.header, &self.snapshot[at..at + n])..n
        } else {
            // SAFETY: queued entries are blocks of the source.
            unsafe { scanned_fields(entry) }
        };
        if !V::SOURCE_SHARED && at >= self.direct_from {
            // SAFETY: a closure's words before its environment are copied as they are,
            // into the block's place, committed when it was discovered.
            unsafe { super::copy_words(block, self.direct_place(at), scanned.start) };
        }
        for i in scanned {
            let field = if V::SOURCE_SHARED {
                // Read by index: discoveries may move the snapshot.
                self.snapshot[at + i]
            } else {
                // SAFETY: `i` is below the block's wosize.
                unsafe { *block.add(i) }
            };
            if !layout::is_immediate(field) {
                // Its header, and the line of its fifth field, when the block is that
                // long (small blocks are read whole at their discovery, or later).
                prefetch(field.wrapping_sub(WORD_BYTES));
                prefetch(field.wrapping_add(4 * WORD_BYTES));
                if ring.is_full() {
                    // SAFETY: the ring holds what this function put there.
                    unsafe { self.resolve_oldest(ring)? };
                }
                // Its field's word in the snapshot, or in the block's place in the copy
                // (after its header), or nowhere: pass 2 writes the block.
                let to = if V::SOURCE_SHARED {
                    at + i
                } else if at >= self.direct_from {
                    at + 1 + i
                } else {
                    NOWHERE
                };
                ring.push(field, to);
            } else if !V::SOURCE_SHARED && at >= self.direct_from {
                // SAFETY: `i` is below the block's wosize, inside its committed place
                // (pass 1 still writes: `direct_from` is reset when it stops).
                unsafe { self.direct_place(at).add(i).write(field) };
            }
        }
        Ok(())
    }

    /// Discovers the deferred pointer `v` if it leads to a block to copy, and stores
    /// what stands for it in the copy where it goes: word `to` of the snapshot, or of
    /// the copy while pass 1 still writes it. Whether to copy is asked here, not when
    /// the field is read: on OCaml 5 the answer is in the target's header.
    ///
    /// # Safety
    /// `v` was read from a field of a block of the source graph; `to` is [`NOWHERE`] or
    /// where [`Self::scan_deferring`] said that field goes.
    #[inline(always)]
    unsafe fn resolve(&mut self, v: Word, to: usize) -> Result<(), CopyError> {
        // The bytes from the copy's start to `v`'s copy, when `v` is copied.
        let relative = if self.heap.should_copy(v) {
            // SAFETY: forwarded; a pointer to a block to copy.
            let (offset, in_block) = unsafe { self.discover(v)? };
            Some((offset + 1) * WORD_BYTES + in_block)
        } else {
            None
        };
        if to == NOWHERE {
            return Ok(());
        }
        if V::SOURCE_SHARED {
            // A pointer not copied: the snapshot holds it already.
            if let Some(relative) = relative {
                self.snapshot[to] = relative | RELOCATED;
            }
        } else if let Some(reservation) = self.reservation.as_ref() {
            let base = reservation.base() as Word;
            // SAFETY: word `to` of the copy is a field of a block at or beyond
            // `direct_from`, whose place was committed when it was discovered; the
            // reservation is still there, so nothing was given back.
            unsafe {
                (base as *mut Word)
                    .add(to)
                    .write(relative.map_or(v, |r| base + r))
            };
        }
        Ok(())
    }

    /// [`Self::resolve`] for the oldest pointer of `ring`, which is not empty.
    ///
    /// # Safety
    /// The pointers of `ring` were put there by [`Self::scan_deferring`].
    #[inline(always)]
    unsafe fn resolve_oldest(&mut self, ring: &mut Deferred) -> Result<(), CopyError> {
        let (v, to) = ring.pop();
        // SAFETY: a pointer read from a field of a block of the source graph.
        unsafe { self.resolve(v, to) }
    }

    /// The first field of the place in the reservation of the block at offset `at`.
    ///
    /// # Safety
    /// `at` is at or beyond `direct_from`: pass 1 writes the block, and holds its
    /// reservation.
    #[inline(always)]
    unsafe fn direct_place(&self, at: usize) -> *mut Word {
        // SAFETY: pass 1 holds its reservation while `direct_from` is not `usize::MAX`.
        let base = unsafe { self.reservation.as_ref().unwrap_unchecked() }.base();
        base.wrapping_add((at + 1) * WORD_BYTES) as *mut Word
    }
}

/// Hints the CPU to fetch the block of `entry`: the line of its header and, when its
/// fields reach the next line, the line of its last field that pass 1 reads (of the
/// first [`super::PREFETCH_FIELDS`]). A scannable block is read whole; others only by
/// their header.
#[inline(always)]
fn prefetch_block(entry: Entry) {
    prefetch(entry.block.wrapping_sub(WORD_BYTES));
    if entry.header.is_scannable() {
        let last = entry
            .header
            .wosize()
            .min(super::PREFETCH_FIELDS)
            .saturating_sub(1);
        prefetch(entry.block.wrapping_add(last * WORD_BYTES));
    }
}
