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
//! start at the first 64-byte boundary in it. Pass 2 ([`DataTable::write`]) copies each
//! region and points each copied Bigarray at its own place in its region: Bigarrays
//! that shared data in the source share it in the copy, at the same distances.
//!
//! Regions go after the blocks because a region is known only once every range that
//! overlaps it has been seen.

use crate::bigarray;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

use super::CopyError;

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
    pub fn lay_out(&mut self, first: usize) -> Result<usize, CopyError> {
        if self.noted.is_empty() {
            return Ok(0);
        }
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

    /// Pass 2: writes the data blocks into the copy at `base` and points the copied
    /// Bigarrays at their data, with their copy's flags and operations and no proxy.
    ///
    /// # Safety
    /// `base` is the copy laid out by [`DataTable::lay_out`], its other blocks written;
    /// every noted source range is readable.
    pub unsafe fn write(&self, base: *mut Word) {
        for r in &self.regions {
            let bytes = r.end - r.start;
            let wosize = data_wosize(bytes);
            // SAFETY: `lay_out` gave the region `1 + wosize` words at `r.block`.
            unsafe {
                let header = base.add(r.block);
                header.write(Header::new(wosize, Color::Unmarkable, layout::ABSTRACT_TAG).0);
                let fields = header.add(1) as *mut u8;
                let data = region_data(base, r);
                let before = data as usize - fields as usize;
                std::ptr::write_bytes(fields, 0, before);
                std::ptr::copy_nonoverlapping(r.start as *const u8, data, bytes);
                let after = wosize * WORD_BYTES - before - bytes;
                std::ptr::write_bytes(data.add(bytes), 0, after);
            }
        }
        for n in &self.noted {
            let r = &self.regions[n.region];
            // SAFETY: the custom block was written at `n.block` with at least
            // `bigarray::DIM_FIELD` fields (`bigarray::read` checked them); its data
            // lies in its region at the same distance from the region's start.
            unsafe {
                let fields = base.add(n.block + 1);
                fields.write(n.ops);
                let data = region_data(base, r).add(n.start - r.start);
                fields.add(bigarray::DATA_FIELD).write(data as Word);
                fields.add(bigarray::FLAGS_FIELD).write(n.flags);
                fields.add(bigarray::PROXY_FIELD).write(0);
            }
        }
    }
}

/// The wosize of a data block holding `bytes` bytes of data.
pub fn data_wosize(bytes: usize) -> usize {
    (SLACK_BYTES + bytes).div_ceil(WORD_BYTES)
}

/// Where the data of region `r` starts in the copy at `base`.
///
/// # Safety
/// `base` is the copy that `r` was laid out in.
unsafe fn region_data(base: *mut Word, r: &Region) -> *mut u8 {
    // SAFETY: the first field of the data block, inside the copy.
    let fields = unsafe { base.add(r.block + 1) } as usize;
    let aligned = fields.next_multiple_of(DATA_ALIGN);
    // The result is at most SLACK_BYTES past the first field: inside the block.
    aligned as *mut u8
}
