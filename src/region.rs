//! Regions: one off-heap area that values are added to, in chunks that never move.
//!
//! A [`Region`] owns chunks of memory taken from an allocator (the C allocator block of
//! `Offheap.Region.create`) and bump-allocates the copies of added values inside them.
//! An add is an ordinary copy ([`crate::copy::copy`]) whose allocator is a [`Bump`]
//! over the region: blocks already in the region are outside the GC heap, so the
//! traversal shares them instead of copying them, and only what is new costs.
//!
//! Placement of one add of `n` bytes (the traversal asks for all of them at once, after
//! measuring):
//! - it fits in what is left of the current chunk: bumped there;
//! - `n` is more than [`Region::own_chunk_threshold`] (a 32nd of the chunk size): a chunk
//!   of exactly `n` bytes (plus a tail word) of its own, and the current chunk stays
//!   current. So a chunk shared by small adds loses less than a 32nd of itself to the
//!   add that did not fit, and large adds lose nothing;
//! - else a new chunk becomes the current one: of the chunk size, or from the second on
//!   of the size of later chunks when the region has one ([`Region::new`]).
//!
//! The last word of every chunk is never handed out: a block of no fields at a chunk's
//! very end would have its pointer one past the chunk, in memory the region does not own.
//!
//! **Failure atomicity**: the traversal allocates once, after measuring, and may still
//! fail after that (memory that is not word aligned, which it frees at once). An add
//! that fails leaves the bump range and the chunk list as they were before it, and gives
//! back a chunk taken during it. The chunk list reserves room for one more chunk before
//! the copy starts, so committing a new chunk cannot fail after the copy is made.
//!
//! The region knows nothing of the OCaml runtime: a [`Registry`] makes chunks known to
//! it (OCaml 4's page table) and the allocator frees them.

use crate::alloc::{Allocator, NoMemory};
use crate::copy::{Copied, CopyError};
use crate::layout::WORD_BYTES;

/// Makes a chunk known to the runtime while it holds values, and forgets it.
pub trait Registry {
    /// Registers `[base, base + bytes)`; false when the runtime has no memory for it.
    fn register(&mut self, base: *mut u8, bytes: usize) -> bool;
    /// Registers the first `blocks` bytes of `[base, base + bytes)`, an add's own chunk
    /// holding `copied` at its start: its blocks, not the Bigarray data after them, and
    /// of few large blocks the pages where they start (see `runtime::register_copy`);
    /// [`Registry::unregister`] of the chunk removes what was registered.
    fn register_copy(
        &mut self,
        base: *mut u8,
        bytes: usize,
        blocks: usize,
        copied: &Copied,
    ) -> bool;
    /// Unregisters `[base, base + bytes)`, registered before.
    fn unregister(&mut self, base: *mut u8, bytes: usize);
    /// Called after the allocator freed `[base, base + bytes)`: registers again what
    /// other memory still needs (see `runtime::reregister_shared`).
    fn after_free(&mut self, base: *mut u8, bytes: usize);
}

/// A registry that records nothing (the fake heap of the tests; OCaml 5).
pub struct NoRegistry;

impl Registry for NoRegistry {
    fn register(&mut self, _base: *mut u8, _bytes: usize) -> bool {
        true
    }
    fn register_copy(&mut self, _: *mut u8, _: usize, _: usize, _: &Copied) -> bool {
        true
    }
    fn unregister(&mut self, _base: *mut u8, _bytes: usize) {}
    fn after_free(&mut self, _base: *mut u8, _bytes: usize) {}
}

/// Who gives a chunk's memory back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The region's allocator.
    Region,
    /// The loaded image the region was made from (its payload's owner unmaps it).
    Image,
}

/// One chunk of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Start of the memory.
    pub base: *mut u8,
    /// Its size in bytes, as given to the allocator.
    pub bytes: usize,
    /// Who frees it.
    pub owner: Owner,
}

impl Chunk {
    fn end(&self) -> usize {
        self.base as usize + self.bytes
    }
}

/// What a region holds, for `Offheap.Region.stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the blocks copied into the region (headers included).
    pub bytes: usize,
    /// Bytes of its chunks.
    pub reserved: usize,
    /// Blocks copied into the region.
    pub blocks: usize,
    /// Chunks.
    pub chunks: usize,
    /// Successful adds.
    pub values: usize,
}

/// The bump range of the current chunk: `cursor <= limit`, both inside one chunk.
#[derive(Clone, Copy, Debug)]
struct Range {
    /// Next free byte (word aligned when the chunk is).
    cursor: usize,
    /// The end of what may be handed out (the chunk's end less its tail word).
    limit: usize,
}

/// A region: its chunks and the bump range of the current one.
pub struct Region {
    /// Size of the first chunk taken for small adds; at least [`MIN_CHUNK_BYTES`].
    chunk_bytes: usize,
    /// Size of the chunks taken for small adds after the first.
    later_chunk_bytes: usize,
    /// Every chunk, sorted by `base` (for [`Region::contains`]).
    chunks: Vec<Chunk>,
    /// Where small adds go; empty (`cursor == limit == 0`) before the first.
    range: Range,
    /// Sizes and counts of what was added.
    stats: Stats,
}

/// The smallest chunk size: below it, the own-chunk threshold would be a few words.
pub const MIN_CHUNK_BYTES: usize = 4096;

/// The largest chunk size: the largest OCaml integer that is a whole number of words
/// (`Region.chunk_bytes` reports it as an OCaml integer). No allocator gives as much.
pub const MAX_CHUNK_BYTES: usize = (isize::MAX as usize >> 1) & !(WORD_BYTES - 1);

/// The chunk size when the caller gives none: 1 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

impl Region {
    /// An empty region whose small adds go into chunks of `chunk_bytes`, and from the
    /// second on of `later_chunk_bytes` (each raised to [`MIN_CHUNK_BYTES`], rounded up
    /// to a word, at most [`MAX_CHUNK_BYTES`]); it holds no memory yet.
    pub fn new(chunk_bytes: usize, later_chunk_bytes: usize) -> Region {
        let size = |bytes: usize| {
            bytes
                .clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
                .next_multiple_of(WORD_BYTES)
        };
        Region {
            chunk_bytes: size(chunk_bytes),
            later_chunk_bytes: size(later_chunk_bytes),
            chunks: Vec::new(),
            range: Range {
                cursor: 0,
                limit: 0,
            },
            stats: Stats::default(),
        }
    }

    /// Adds larger than this get a chunk of their own: a 32nd of the next chunk's size.
    pub fn own_chunk_threshold(&self) -> usize {
        self.next_chunk_bytes() / 32
    }

    /// The size of the first chunk of small adds.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// The size of the chunk the next small add that does not fit will take.
    fn next_chunk_bytes(&self) -> usize {
        // The bump range is empty until the first chunk of small adds is taken.
        if self.range.limit == 0 {
            self.chunk_bytes
        } else {
            self.later_chunk_bytes
        }
    }

    /// What the region holds.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether `addr` lies inside one of the chunks.
    pub fn contains(&self, addr: usize) -> bool {
        let i = self.chunks.partition_point(|c| c.base as usize <= addr);
        i.checked_sub(1)
            .is_some_and(|i| addr < self.chunks[i].end())
    }

    /// Adds one value: `copy` runs the traversal with the [`Bump`] it is given. On
    /// success the copy's blocks belong to the region; on failure the region is as it
    /// was and the error is `copy`'s (or [`CopyError::OutOfMemory`] when the chunk list
    /// cannot grow).
    pub fn add<A: Allocator, R: Registry>(
        &mut self,
        alloc: &mut A,
        registry: &mut R,
        copy: impl FnOnce(&mut Bump<'_, A, R>) -> Result<Copied, CopyError>,
    ) -> Result<Copied, CopyError> {
        self.chunks
            .try_reserve(1)
            .map_err(|_| CopyError::OutOfMemory(std::mem::size_of::<Chunk>()))?;
        let saved = self.range;
        let mut bump = Bump {
            chunk_bytes: self.next_chunk_bytes(),
            own_threshold: self.own_chunk_threshold(),
            range: &mut self.range,
            alloc,
            registry,
            taken: None,
            own: false,
        };
        let outcome = copy(&mut bump);
        let (taken, own) = (bump.taken, bump.own);
        match outcome {
            Ok(copied) => {
                if let Some(chunk) = taken {
                    // An own chunk holds this copy alone (at its start): registered now,
                    // its blocks only.
                    let blocks = if copied.data_bytes == 0 {
                        chunk.bytes
                    } else {
                        copied.blocks_bytes()
                    };
                    if own && !registry.register_copy(chunk.base, chunk.bytes, blocks, &copied) {
                        // SAFETY: taken during this add; the copy in it is dropped here.
                        unsafe { alloc.free(chunk.base, chunk.bytes) };
                        self.range = saved;
                        return Err(CopyError::OutOfMemory(chunk.bytes));
                    }
                    let i = self.chunks.partition_point(|c| c.base < chunk.base);
                    self.chunks.insert(i, chunk); // room reserved above
                    self.stats.reserved += chunk.bytes;
                    self.stats.chunks += 1;
                }
                self.stats.bytes += copied.bytes;
                self.stats.blocks += copied.blocks;
                self.stats.values += 1;
                Ok(copied)
            }
            Err(e) => {
                if let Some(chunk) = taken {
                    // SAFETY: taken during this add, never handed out: the traversal
                    // failed before returning anything that points into it.
                    unsafe { release_taken(alloc, registry, chunk, own) };
                }
                self.range = saved;
                Err(e)
            }
        }
    }

    /// Makes room in the chunk list for one more chunk, so that the next [`Region::adopt`]
    /// cannot fail.
    ///
    /// # Errors
    /// [`NoMemory`] when the list cannot grow; the region is then unchanged.
    pub fn reserve_chunk(&mut self) -> Result<(), NoMemory> {
        self.chunks
            .try_reserve(1)
            .map_err(|_| NoMemory(std::mem::size_of::<Chunk>()))
    }

    /// Adopts `[base, base + bytes)`, a loaded image's payload (registered with the
    /// runtime already), as a full chunk owned by the image. Its blocks are counted by
    /// [`Region::count_loaded`].
    ///
    /// # Errors
    /// [`NoMemory`] when the chunk list cannot grow (never right after a successful
    /// [`Region::reserve_chunk`]); the region is then unchanged.
    pub fn adopt(&mut self, base: *mut u8, bytes: usize) -> Result<(), NoMemory> {
        self.reserve_chunk()?;
        let chunk = Chunk {
            base,
            bytes,
            owner: Owner::Image,
        };
        let i = self.chunks.partition_point(|c| c.base < base);
        self.chunks.insert(i, chunk);
        self.stats.bytes += bytes;
        self.stats.reserved += bytes;
        self.stats.chunks += 1;
        Ok(())
    }

    /// Counts `blocks` blocks of an adopted image in the stats.
    pub fn count_loaded(&mut self, blocks: usize) {
        self.stats.blocks += blocks;
    }

    /// The chunks, for freeing them all; the region is left empty (its stats kept).
    pub fn take_chunks(&mut self) -> Vec<Chunk> {
        self.range = Range {
            cursor: 0,
            limit: 0,
        };
        std::mem::take(&mut self.chunks)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

/// Gives a chunk back: unregister, free, let the registry fix what it shares.
///
/// # Safety
/// `chunk` came from `alloc` and `registry` (registered), and nothing uses it.
unsafe fn release_chunk<A: Allocator, R: Registry>(alloc: &mut A, registry: &mut R, chunk: Chunk) {
    registry.unregister(chunk.base, chunk.bytes);
    // SAFETY: the caller's contract.
    unsafe { alloc.free(chunk.base, chunk.bytes) };
    registry.after_free(chunk.base, chunk.bytes);
}

/// Gives back a chunk taken by an add: as [`release_chunk`] when `own` is false, else
/// (an own chunk, registered only once the add succeeds) to the allocator alone.
///
/// # Safety
/// As [`release_chunk`].
unsafe fn release_taken<A: Allocator, R: Registry>(
    alloc: &mut A,
    registry: &mut R,
    chunk: Chunk,
    own: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        if own {
            alloc.free(chunk.base, chunk.bytes);
        } else {
            release_chunk(alloc, registry, chunk);
        }
    }
}

/// The allocator of one add: bumps inside the region's current chunk, or takes a chunk.
pub struct Bump<'a, A, R> {
    chunk_bytes: usize,
    own_threshold: usize,
    /// The region's bump range, moved forward by [`Allocator::alloc`].
    range: &'a mut Range,
    alloc: &'a mut A,
    registry: &'a mut R,
    /// A chunk taken during this add (at most one: the traversal allocates once).
    taken: Option<Chunk>,
    /// Whether `taken` is the add's own chunk, registered by [`Region::add`] once the
    /// copy is made (only its blocks then), not when taken.
    own: bool,
}

impl<A: Allocator, R: Registry> Bump<'_, A, R> {
    /// A fresh chunk of `bytes` bytes, remembered as taken, registered unless `own`;
    /// null when the allocator or the registry has no memory.
    #[cold]
    #[inline(never)]
    fn take_chunk(&mut self, bytes: usize, own: bool) -> *mut u8 {
        debug_assert!(self.taken.is_none(), "one allocation per add");
        let base = self.alloc.alloc(bytes);
        if base.is_null() {
            return base;
        }
        if !own && !self.registry.register(base, bytes) {
            // SAFETY: just allocated with this size; nothing refers to it.
            unsafe { self.alloc.free(base, bytes) };
            return std::ptr::null_mut();
        }
        self.taken = Some(Chunk {
            base,
            bytes,
            owner: Owner::Region,
        });
        self.own = own;
        base
    }
}

impl<A: Allocator, R: Registry> Allocator for Bump<'_, A, R> {
    #[inline]
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        if bytes <= self.range.limit - self.range.cursor {
            let p = self.range.cursor;
            self.range.cursor += bytes;
            return p as *mut u8;
        }
        let Some(with_tail) = bytes.checked_add(WORD_BYTES) else {
            return std::ptr::null_mut();
        };
        if bytes > self.own_threshold {
            return self.take_chunk(with_tail, true);
        }
        let base = self.take_chunk(self.chunk_bytes, false);
        if !base.is_null() {
            *self.range = Range {
                cursor: base as usize + bytes,
                limit: base as usize + self.chunk_bytes - WORD_BYTES,
            };
        }
        base
    }

    /// Gives back the add's only allocation (the traversal does so when it fails after
    /// allocating): a chunk taken for it is released now; memory bumped in the current
    /// chunk is reclaimed by [`Region::add`], which restores the range on failure.
    unsafe fn free(&mut self, ptr: *mut u8, _bytes: usize) {
        if let Some(chunk) = self.taken.filter(|c| c.base == ptr) {
            self.taken = None;
            // SAFETY: the chunk taken by this add, whose only allocation is given back.
            unsafe { release_taken(self.alloc, self.registry, chunk, self.own) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::Malloc;

    /// A stand-in for the traversal: allocates `bytes`, fails after when `fail`.
    fn fake_copy<A: Allocator>(
        bytes: usize,
        fail: bool,
    ) -> impl FnOnce(&mut A) -> Result<Copied, CopyError> {
        move |alloc: &mut A| {
            let base = alloc.alloc(bytes);
            if base.is_null() {
                return Err(CopyError::OutOfMemory(bytes));
            }
            if fail {
                // SAFETY: just allocated.
                unsafe { alloc.free(base, bytes) };
                return Err(CopyError::Misaligned);
            }
            Ok(Copied {
                root: base as usize + WORD_BYTES,
                base,
                bytes,
                blocks: 1,
                data_bytes: 0,
                transient_bytes: 0,
            })
        }
    }

    /// A registry that records its calls and refuses `register_copy` when `refuse`.
    #[derive(Default)]
    struct Recording {
        calls: Vec<(&'static str, usize, usize)>,
        refuse: bool,
    }

    impl Registry for Recording {
        fn register(&mut self, base: *mut u8, bytes: usize) -> bool {
            self.calls.push(("register", base as usize, bytes));
            true
        }
        fn register_copy(
            &mut self,
            base: *mut u8,
            bytes: usize,
            blocks: usize,
            _: &Copied,
        ) -> bool {
            self.calls.push(("register_copy", base as usize, blocks));
            assert!(blocks <= bytes);
            !self.refuse
        }
        fn unregister(&mut self, base: *mut u8, bytes: usize) {
            self.calls.push(("unregister", base as usize, bytes));
        }
        fn after_free(&mut self, _base: *mut u8, _bytes: usize) {}
    }

    /// [`fake_copy`] of `bytes` whose last `data_bytes` are Bigarray data.
    fn fake_copy_with_data<A: Allocator>(
        bytes: usize,
        data_bytes: usize,
    ) -> impl FnOnce(&mut A) -> Result<Copied, CopyError> {
        move |alloc: &mut A| fake_copy(bytes, false)(alloc).map(|c| Copied { data_bytes, ..c })
    }

    #[test]
    fn an_own_chunk_is_registered_after_the_copy_its_blocks_only() {
        let mut r = Region::new(4096, 4096);
        let mut reg = Recording::default();
        let small = r
            .add(&mut Malloc, &mut reg, |b| fake_copy(64, false)(b))
            .unwrap();
        assert_eq!(reg.calls, [("register", small.base as usize, 4096)]);
        reg.calls.clear();
        // 10 000 bytes: 3000 of blocks (and the data block's header word), then data.
        let big = r
            .add(&mut Malloc, &mut reg, |b| {
                fake_copy_with_data(10_000, 7000)(b)
            })
            .unwrap();
        assert_eq!(
            reg.calls,
            [("register_copy", big.base as usize, 3000 + WORD_BYTES)]
        );
        reg.calls.clear();
        // Without data: the whole chunk, its tail word included.
        let plain = r
            .add(&mut Malloc, &mut reg, |b| fake_copy(10_000, false)(b))
            .unwrap();
        assert_eq!(
            reg.calls,
            [("register_copy", plain.base as usize, 10_000 + WORD_BYTES)]
        );
        // A refused registration: the add fails, nothing unregistered, region unchanged.
        let before = (r.stats(), r.range.cursor, r.range.limit, r.chunks.clone());
        reg.calls.clear();
        reg.refuse = true;
        let e = r.add(&mut Malloc, &mut reg, |b| {
            fake_copy_with_data(10_000, 7000)(b)
        });
        assert!(matches!(e, Err(CopyError::OutOfMemory(_))), "{e:?}");
        assert_eq!(reg.calls.len(), 1, "{:?}", reg.calls);
        assert_eq!(reg.calls[0].0, "register_copy");
        assert_eq!(
            (r.stats(), r.range.cursor, r.range.limit, r.chunks.clone()),
            before
        );
        // A copy that fails after taking its own chunk: freed, never unregistered.
        reg.calls.clear();
        let e = r.add(&mut Malloc, &mut reg, |b| fake_copy(10_000, true)(b));
        assert_eq!(e, Err(CopyError::Misaligned));
        assert!(reg.calls.is_empty(), "{:?}", reg.calls);
        release_all(&mut r);
    }

    fn release_all(r: &mut Region) {
        for c in r.take_chunks() {
            // SAFETY: chunks of Malloc, unused.
            unsafe { Malloc.free(c.base, c.bytes) };
        }
    }

    #[test]
    fn small_adds_bump_in_one_chunk() {
        let mut r = Region::new(4096, 4096);
        let a = r
            .add(&mut Malloc, &mut NoRegistry, |b| fake_copy(24, false)(b))
            .unwrap();
        let b = r
            .add(&mut Malloc, &mut NoRegistry, |b| fake_copy(32, false)(b))
            .unwrap();
        assert_eq!(b.base as usize, a.base as usize + 24);
        assert!(r.contains(a.root) && r.contains(b.root));
        assert_eq!(r.stats().chunks, 1);
        assert_eq!(r.stats().bytes, 56);
        release_all(&mut r);
    }

    #[test]
    fn a_full_chunk_takes_a_new_one_and_large_adds_their_own() {
        let mut r = Region::new(4096, 4096);
        let small = r.own_chunk_threshold();
        let mut bases = Vec::new();
        for _ in 0..40 {
            let c = r
                .add(&mut Malloc, &mut NoRegistry, |b| fake_copy(small, false)(b))
                .unwrap();
            bases.push(c.base as usize);
        }
        // 4096 - 8 bytes hold 31 adds of 128 bytes.
        assert_eq!(r.stats().chunks, 2);
        let big = r
            .add(&mut Malloc, &mut NoRegistry, |b| {
                fake_copy(10_000, false)(b)
            })
            .unwrap();
        assert_eq!(r.stats().chunks, 3);
        assert_eq!(r.stats().reserved, 2 * 4096 + 10_008);
        // The current chunk is still the second one.
        let next = r
            .add(&mut Malloc, &mut NoRegistry, |b| fake_copy(8, false)(b))
            .unwrap();
        assert_eq!(next.base as usize, bases[39] + small);
        assert!(r.contains(big.base as usize) && !r.contains(big.base as usize + 10_008));
        release_all(&mut r);
    }

    #[test]
    fn chunks_after_the_first_have_the_later_size() {
        let mut r = Region::new(4096, 16384);
        assert_eq!(r.own_chunk_threshold(), 4096 / 32);
        let first = r
            .add(&mut Malloc, &mut NoRegistry, |b| fake_copy(64, false)(b))
            .unwrap();
        assert_eq!(r.stats().reserved, 4096);
        // From now on the threshold follows the later chunks: 400 bytes, more than a
        // 32nd of the first chunk, share chunks.
        assert_eq!(r.own_chunk_threshold(), 16384 / 32);
        // The first chunk's 4096 - 8 - 64 bytes hold 10 adds of 400; the second chunk's
        // 16384 - 8, 40 more.
        let adds: Vec<Copied> = (0..51)
            .map(|_| {
                r.add(&mut Malloc, &mut NoRegistry, |b| fake_copy(400, false)(b))
                    .unwrap()
            })
            .collect();
        assert_eq!(adds[9].base as usize, first.base as usize + 64 + 9 * 400);
        assert_eq!(adds[49].base as usize, adds[10].base as usize + 39 * 400);
        assert_eq!(r.stats().chunks, 3);
        assert_eq!(r.stats().reserved, 4096 + 2 * 16384);
        assert!(adds.iter().all(|c| r.contains(c.root)));
        release_all(&mut r);
    }

    #[test]
    fn a_failed_add_leaves_the_region_as_it_was() {
        let mut r = Region::new(4096, 4096);
        r.add(&mut Malloc, &mut NoRegistry, |b| fake_copy(4000, false)(b))
            .unwrap();
        let before = (r.stats(), r.range.cursor, r.range.limit, r.chunks.clone());
        for bytes in [16, 200, 5000] {
            let e = r.add(&mut Malloc, &mut NoRegistry, |b| fake_copy(bytes, true)(b));
            assert_eq!(e, Err(CopyError::Misaligned));
            assert_eq!(
                (r.stats(), r.range.cursor, r.range.limit, r.chunks.clone()),
                before
            );
        }
        release_all(&mut r);
    }
}
