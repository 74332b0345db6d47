//! The data of the Bigarrays a copy holds: a side table from source data ranges to
//! places in the copy.
//!
//! Pass 1 notes each Bigarray it queues: the offset of its custom block in the copy and
//! the byte range `[data, data + bytes)` of its data in the source ([`DataTable::note`]).
//! When the measure is done, [`DataTable::lay_out`] sorts the ranges by their start and
//! merges every range that overlaps or touches the one before into one region: a
//! sub-array or slice inside its parent, two views of one mapping, identical ranges, and
//! chains of partial overlaps all end in one region, copied once. Each region becomes a
//! data block after all the other blocks of the copy: a header of tag `Abstract_tag`
//! (nothing points to it, no GC ever sees it, and it keeps the copy tiled by blocks, as
//! images need) whose fields hold [`SLACK_BYTES`] of room and the region's bytes, which
//! start at the first 64-byte boundary of the address the copy is made for. Pass 2
//! hands the copy to an [`Output`] front to back, so nothing is patched afterwards: each
//! copied Bigarray is pointed at its own place in its region as its block goes by
//! ([`DataTable::patch`]), and the data blocks follow the other blocks
//! ([`DataTable::write`]). Bigarrays that shared data in the source share it in the
//! copy, at the same distances. For an image, the address is the payload's recorded,
//! page-aligned address: the data is 64-byte aligned from the payload's start too.
//!
//! Regions go after the blocks because a region is known only once every range that
//! overlaps it has been seen.

use crate::bigarray;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

use super::{CopyError, Output, MAX_RUN};

/// Data in a copy starts at a multiple of this many bytes (vector loads).
pub const DATA_ALIGN: usize = 64;
/// Room a data block keeps before its bytes, so that they can start on a
/// [`DATA_ALIGN`] boundary whatever the (word-aligned) address of the copy.
pub const SLACK_BYTES: usize = DATA_ALIGN - WORD_BYTES;

/// One Bigarray queued by pass 1.
#[derive(Clone, Copy, Debug)]
struct Noted {
    /// Offset in words of its custom block's header in the copy.
    block: usize,
    /// Its data in the source.
    start: Word,
    /// Bytes of data.
    bytes: usize,
    /// The flags its copy gets.
    flags: Word,
    /// The operations its copy gets.
    ops: Word,
    /// Its region, once laid out.
    region: usize,
}

/// A run of source bytes copied once.
#[derive(Clone, Copy, Debug)]
struct Region {
    start: Word,
    end: Word,
    /// Offset in words of its data block's header in the copy.
    block: usize,
}

/// The Bigarrays of one copy and their data.
#[derive(Default)]
pub struct DataTable {
    noted: Vec<Noted>,
    regions: Vec<Region>,
    /// Noted Bigarrays that pass 2 has pointed at their data.
    patched: usize,
}

impl DataTable {
    /// An empty table; allocates nothing until the first Bigarray.
    pub fn new() -> DataTable {
        DataTable::default()
    }

    /// Bytes the table holds.
    pub fn allocated_bytes(&self) -> usize {
        self.noted.capacity() * std::mem::size_of::<Noted>()
            + self.regions.capacity() * std::mem::size_of::<Region>()
    }

    /// Notes a Bigarray whose custom block is at word `block` of the copy, whose data
    /// is `data` and whose copy gets the operations `ops`.
    ///
    /// # Errors
    /// [`CopyError::OutOfMemory`] when the table cannot grow.
    pub fn note(&mut self, block: usize, data: bigarray::Data, ops: Word) -> Result<(), CopyError> {
        if self.noted.len() == self.noted.capacity() {
            let more = self.noted.capacity().max(8);
            self.noted
                .try_reserve(more)
                .map_err(|_| CopyError::OutOfMemory(more * std::mem::size_of::<Noted>()))?;
        }
        self.noted.push(Noted {
            block,
            start: data.start,
            bytes: data.bytes,
            flags: bigarray::copy_flags(data.flags),
            ops,
            region: 0,
        });
        Ok(())
    }

    /// Merges the noted ranges into regions and gives each a data block, one after the
    /// other from word `first` of the copy on. Returns the words they take.
    ///
    /// # Errors
    /// [`CopyError::OutOfMemory`] when the table cannot get memory for the regions.
    #[inline(always)]
    pub fn lay_out(&mut self, first: usize) -> Result<usize, CopyError> {
        if self.noted.is_empty() {
            return Ok(0);
        }
        self.lay_out_noted(first)
    }

    /// [`DataTable::lay_out`] when some Bigarray was noted (a call of its own, so that a
    /// copy without Bigarrays pays one test).
    #[inline(never)]
    fn lay_out_noted(&mut self, first: usize) -> Result<usize, CopyError> {
        let oom = |n: usize| CopyError::OutOfMemory(n);
        let mut order: Vec<usize> = Vec::new();
        order
            .try_reserve_exact(self.noted.len())
            .map_err(|_| oom(self.noted.len() * WORD_BYTES))?;
        order.extend(0..self.noted.len());
        order.sort_unstable_by_key(|&k| self.noted[k].start);
        let mut regions: Vec<Region> = Vec::new();
        for k in order {
            let n = self.noted[k];
            let end = n.start + n.bytes;
            match regions.last_mut() {
                Some(r) if n.start <= r.end => r.end = r.end.max(end),
                _ => {
                    regions
                        .try_reserve(1)
                        .map_err(|_| oom(std::mem::size_of::<Region>()))?;
                    regions.push(Region {
                        start: n.start,
                        end,
                        block: 0,
                    });
                }
            }
            self.noted[k].region = regions.len() - 1;
        }
        let mut words = first;
        for r in &mut regions {
            r.block = words;
            words += 1 + data_wosize(r.end - r.start);
        }
        self.regions = regions;
        Ok(words - first)
    }

    /// The data blocks laid out.
    pub fn blocks(&self) -> usize {
        self.regions.len()
    }

    /// Whether no Bigarray was noted.
    pub fn is_empty(&self) -> bool {
        self.noted.is_empty()
    }

    /// Pass 2, for the block at word `block` of the copy whose first run of fields is
    /// `fields`: when it is the next noted Bigarray (blocks come in offset order, as they
    /// were noted), points it at its data in the copy made for `base`, with its copy's
    /// operations and flags and no proxy. Other blocks are left as they are.
    ///
    /// # Safety
    /// `fields` holds the block's first run, at least [`bigarray::DIM_FIELD`] words when
    /// it is a noted Bigarray (`bigarray::read` checked its size, and it is one run).
    #[inline]
    pub unsafe fn patch(&mut self, block: usize, fields: *mut Word, base: Word) {
        let Some(n) = self.noted.get(self.patched) else {
            return;
        };
        if n.block != block {
            return;
        }
        self.patched += 1;
        let r = &self.regions[n.region];
        let data = region_data(base, r) + (n.start - r.start);
        // SAFETY: the caller's: the run holds the block's first `DIM_FIELD` fields.
        unsafe {
            fields.write(n.ops);
            fields.add(bigarray::DATA_FIELD).write(data);
            fields.add(bigarray::FLAGS_FIELD).write(n.flags);
            fields.add(bigarray::PROXY_FIELD).write(0);
        }
    }

    /// Pass 2, after the blocks: hands the data blocks to `out`, each a header, zeros up
    /// to the first [`DATA_ALIGN`] boundary of the copy made for `base`, the region's
    /// bytes, zeros to the block's end; in runs of at most [`MAX_RUN`] words.
    ///
    /// # Safety
    /// `base` is what `out.begin` returned; every noted source range is readable.
    pub unsafe fn write<O: Output>(&self, base: Word, out: &mut O) {
        debug_assert_eq!(
            self.patched,
            self.noted.len(),
            "a noted Bigarray not written"
        );
        for r in &self.regions {
            let bytes = r.end - r.start;
            let wosize = data_wosize(bytes);
            let header = Header::new(wosize, Color::Unmarkable, layout::ABSTRACT_TAG).0;
            // SAFETY: room for one word, the header.
            unsafe { out.next(1).write(header) };
            // Byte offsets in the block's fields of its data.
            let before = region_data(base, r) - (base + (r.block + 1) * WORD_BYTES);
            let data = before..before + bytes;
            let mut start = 0;
            while start < wosize {
                let len = (wosize - start).min(MAX_RUN);
                let run = start * WORD_BYTES..(start + len) * WORD_BYTES;
                let dst = out.next(len) as *mut u8;
                let copy = run.start.max(data.start)..run.end.min(data.end);
                // SAFETY: `dst` has room for `len` words, the run's bytes; `copy` lies in
                // both the run and the region's data, which the source holds.
                unsafe {
                    if copy.start < copy.end {
                        std::ptr::write_bytes(dst, 0, copy.start - run.start);
                        crate::memcopy::copy_nonoverlapping(
                            (r.start + (copy.start - data.start)) as *const u8,
                            dst.add(copy.start - run.start),
                            copy.end - copy.start,
                        );
                        std::ptr::write_bytes(dst.add(copy.end - run.start), 0, run.end - copy.end);
                    } else {
                        std::ptr::write_bytes(dst, 0, run.end - run.start);
                    }
                }
                start += len;
            }
        }
    }
}

/// The wosize of a data block holding `bytes` bytes of data.
pub fn data_wosize(bytes: usize) -> usize {
    (SLACK_BYTES + bytes).div_ceil(WORD_BYTES)
}

/// Where the data of region `r` starts in the copy made for `base`: the first
/// [`DATA_ALIGN`] boundary in its data block's fields, at most [`SLACK_BYTES`] past
/// their start, so inside the block.
fn region_data(base: Word, r: &Region) -> Word {
    (base + (r.block + 1) * WORD_BYTES).next_multiple_of(DATA_ALIGN)
}
