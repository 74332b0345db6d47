//! The traversal queue: every block the copy will hold, in the order of its offsets.
//!
//! Pass 1 appends each block when it is first seen (and scans the queued blocks in the
//! order of [`super::pending`]), so the queue is the list of the copy's blocks in offset
//! order, which pass 2 (write) and the restore pass walk front to back.
//!
//! Each entry is stored in one word (`Packed`): the block's address and, of its
//! header, the tag, the color and a size below 511 words; the few entries that do not fit
//! (larger blocks, addresses from 2^48 on) are kept whole in a sorted side list. Storage:
//! a vector for the first `CHUNK` (256 Ki) entries, then huge-page chunks of `CHUNK`
//! entries that never move, so a long copy holds at most one partly used chunk beyond 8
//! bytes a block.
//!
//! A queue given a file ([`Queue::keep_in`]: an image's writer gives it an unnamed file
//! beside the image) keeps its chunks in that file's pages instead (shared mappings of
//! space reserved with `fallocate`), and hands back to the kernel every chunk that is
//! neither being pushed to nor read (`MADV_DONTNEED`: the entries stay in the page cache,
//! or go to disk under memory pressure, and come back when read again). The readers say
//! where they read ([`Queue::note_read`]), so the process holds at most the first vector
//! and two or three chunks whatever the number of blocks: writing an image needs no
//! memory that grows with the value.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;

use crate::alloc::{self, NoMemory, HUGE_PAGE};
use crate::layout::{Header, Word};

/// One queued block: where it is and its header as it was before the copy.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The block's first field, in the source.
    pub block: Word,
    /// Its original header (the source header may be overwritten by a mark meanwhile).
    pub header: Header,
}

/// An [`Entry`] in one word: the block's address shifted right by 3 (it is word aligned)
/// in the high 45 bits, then the header's low 10 bits (color and tag), then its size in
/// the low [`SIZE_BITS`] bits. [`Packed::WHOLE`] (a size field of all ones) stands for an
/// entry kept whole in the side list.
#[derive(Clone, Copy, Debug)]
struct Packed(u64);

/// Bits of a packed entry's size field.
const SIZE_BITS: u32 = 9;
/// Bits of the header below its size: color and tag.
const LOW_HEADER_BITS: u32 = 10;

impl Packed {
    /// The size field of an entry kept whole.
    const WHOLE: Packed = Packed((1 << SIZE_BITS) - 1);

    /// `entry` packed, if it fits.
    #[inline(always)]
    fn pack(entry: Entry) -> Option<Packed> {
        let (block, header) = (entry.block as u64, entry.header.0 as u64);
        let size = header >> LOW_HEADER_BITS;
        let packed = Packed(
            (block >> 3) << (LOW_HEADER_BITS + SIZE_BITS)
                | (header & ((1 << LOW_HEADER_BITS) - 1)) << SIZE_BITS
                | size,
        );
        // The address has 48 bits, the low 3 of them zero, and the size fits its field:
        // then the entry unpacks to itself.
        (size < Self::WHOLE.0 && (block >> 48 == 0) & (block & 7 == 0)).then_some(packed)
    }

    /// Whether the entry is kept whole in the side list.
    #[inline(always)]
    fn is_whole(self) -> bool {
        self.0 & Self::WHOLE.0 == Self::WHOLE.0
    }

    /// The block's address (0 for [`Packed::WHOLE`]).
    #[inline(always)]
    fn block(self) -> Word {
        ((self.0 >> (LOW_HEADER_BITS + SIZE_BITS)) << 3) as Word
    }

    /// The entry (not for [`Packed::WHOLE`]).
    #[inline(always)]
    fn unpack(self) -> Entry {
        let w = self.0;
        let size = w & ((1 << SIZE_BITS) - 1);
        let low = (w >> SIZE_BITS) & ((1 << LOW_HEADER_BITS) - 1);
        Entry {
            block: self.block(),
            header: Header((size << LOW_HEADER_BITS | low) as Word),
        }
    }
}

const FIRST_CHUNK: usize = 64;
/// Entries per chunk: 256 Ki entries, 2 MiB, one huge page.
const CHUNK: usize = HUGE_PAGE / std::mem::size_of::<Packed>();
/// `log2(CHUNK)`.
const CHUNK_SHIFT: u32 = CHUNK.trailing_zeros();

/// Bytes of a chunk.
const CHUNK_BYTES: usize = CHUNK * std::mem::size_of::<Packed>();

/// Storage for [`CHUNK`] entries: a huge-page mapping (a long copy touches fresh memory
/// at every entry, and one page fault per 2 MiB instead of per 4 KiB is most of the
/// queue's cost), or a shared mapping of a file's pages. Two words, so that finding
/// entry `i` takes a shift (what the file needs is in [`Pages`], apart).
struct Chunk {
    /// Start of the mapping; `len <= CHUNK` entries are initialised.
    ptr: *mut Packed,
    len: usize,
}

/// Where a chunk's entries are, for [`Queue::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pages {
    /// Anonymous memory: never handed back (that would lose the entries).
    Memory,
    /// A file's pages, which the process may hold (pushed to or read since released).
    FileHeld,
    /// A file's pages, handed back to the kernel.
    FileReleased,
}

impl Chunk {
    /// A chunk of anonymous memory.
    fn new() -> Result<Chunk, NoMemory> {
        let ptr = alloc::map_huge(CHUNK_BYTES) as *mut Packed;
        if ptr.is_null() {
            return Err(NoMemory(CHUNK_BYTES));
        }
        Ok(Chunk { ptr, len: 0 })
    }

    /// A chunk in the pages of `file` from byte `index * CHUNK_BYTES`, whose disk space
    /// is allocated first, so that writing to the pages cannot fail (`SIGBUS`) when the
    /// file system is full; `None` when the space or the mapping cannot be had.
    fn in_file(file: &File, index: usize) -> Option<Chunk> {
        let offset = libc::off_t::try_from(index.checked_mul(CHUNK_BYTES)?).ok()?;
        let fd = file.as_raw_fd();
        // SAFETY: a plain system call on a descriptor we own.
        if unsafe { libc::fallocate(fd, 0, offset, CHUNK_BYTES as libc::off_t) } != 0 {
            return None;
        }
        // SAFETY: a shared mapping of a range of `file` that `fallocate` just gave disk
        // space; no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Chunk {
            ptr: ptr as *mut Packed,
            len: 0,
        })
    }

    fn entries(&self) -> &[Packed] {
        // SAFETY: entries below `len` are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Hands the chunk's pages back to the kernel if they are a file's (`pages`) and the
    /// process may hold some.
    fn release(&self, pages: &Cell<Pages>) {
        if pages.get() == Pages::FileHeld {
            pages.set(Pages::FileReleased);
            // SAFETY: the chunk's own mapping, of a file's pages (`Pages::FileHeld`). On
            // a shared file mapping `MADV_DONTNEED` only drops the process's pages: the
            // entries stay in the file and read the same when next touched.
            unsafe {
                libc::madvise(
                    self.ptr as *mut libc::c_void,
                    CHUNK_BYTES,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` or `in_file` with this size, and dies
        // with the chunk.
        unsafe { alloc::unmap_huge(self.ptr as *mut u8, CHUNK_BYTES) }
    }
}

/// An append-only list of [`Entry`], indexed from its front.
pub struct Queue {
    /// Entries `0..CHUNK`: a vector that doubles from [`FIRST_CHUNK`] (small copies stay
    /// small), up to exactly [`CHUNK`].
    first: Vec<Packed>,
    /// Entries from `CHUNK` on, `CHUNK` a chunk; all full but the last.
    chunks: Vec<Chunk>,
    /// The entries that do not pack, whole, with their indices, in index order.
    whole: Vec<(usize, Entry)>,
    /// Entries pushed so far.
    len: usize,
    /// The file that chunks are made in from now on, if any ([`Queue::keep_in`]).
    file: Option<File>,
    /// Where the entries of each chunk are (the chunk of the same index).
    pages: Vec<Cell<Pages>>,
    /// The chunk kept for its reader: `k >> CHUNK_SHIFT` of the last [`Queue::note_read`]
    /// outside the last chunk (0 for the first vector, `j + 1` for chunk `j`).
    reading: Cell<usize>,
    /// `k >> CHUNK_SHIFT` of the last [`Queue::note_read`].
    seen: Cell<usize>,
}

impl Queue {
    /// An empty queue; allocates nothing until the first [`Queue::push`].
    pub fn new() -> Queue {
        Queue {
            first: Vec::new(),
            chunks: Vec::new(),
            whole: Vec::new(),
            len: 0,
            file: None,
            pages: Vec::new(),
            reading: Cell::new(0),
            seen: Cell::new(0),
        }
    }

    /// Makes the chunks of the queue from now on in the pages of `file` (an empty file
    /// of the queue's own), handed back to the kernel while nobody reads them. Chunks
    /// for which the file's space or mapping cannot be had are anonymous memory.
    pub fn keep_in(&mut self, file: File) {
        self.file = Some(file);
    }

    /// Whether the queue was given a file ([`Queue::keep_in`]).
    pub fn is_in_file(&self) -> bool {
        self.file.is_some()
    }

    /// Says that entry `k` is being read (by pass 1's scan, pass 2 or the restore), for a
    /// queue in a file (nothing otherwise): when `k` enters a chunk other than the one
    /// read before and the last (which pushes fill, and which is never handed back),
    /// that chunk becomes the one read and the other chunks of the file are handed back.
    /// Pass 1's scan reads its pending runs, old and new, in turn: a run in an older
    /// chunk, and the blocks just pushed to the last one after each of its blocks.
    #[inline(always)]
    pub fn note_read(&self, k: usize) {
        if self.file.is_some() && k >> CHUNK_SHIFT != self.seen.get() {
            self.read_from(k >> CHUNK_SHIFT);
        }
    }

    /// [`Queue::note_read`] entering chunk `seen - 1` (the first vector if 0).
    #[cold]
    #[inline(never)]
    fn read_from(&self, seen: usize) {
        self.seen.set(seen);
        if seen == self.chunks.len() {
            return; // the last chunk
        }
        self.reading.set(seen);
        // Chunk `seen - 1` is read, and the next one may be by a reader looking ahead.
        for pages in self
            .pages
            .iter()
            .take(seen + 1)
            .skip(seen.saturating_sub(1))
        {
            if pages.get() == Pages::FileReleased {
                pages.set(Pages::FileHeld);
            }
        }
        self.release();
    }

    /// Hands back the file's chunks other than the one read and the last (pushed to).
    fn release(&self) {
        if self.file.is_none() {
            return;
        }
        let read = self.reading.get().wrapping_sub(1);
        let last = self.chunks.len().wrapping_sub(1);
        for (j, (chunk, pages)) in self.chunks.iter().zip(&self.pages).enumerate() {
            if j != read && j != last {
                chunk.release(pages);
            }
        }
    }

    /// Number of entries pushed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends an entry; [`NoMemory`] (and the queue unchanged) when it needs memory
    /// that cannot be had.
    #[inline(always)]
    pub fn push(&mut self, entry: Entry) -> Result<(), NoMemory> {
        let packed = match Packed::pack(entry) {
            Some(packed) => packed,
            None => self.keep_whole(entry)?,
        };
        if let Err(e) = self.push_packed(packed) {
            if packed.is_whole() {
                self.whole.pop();
            }
            return Err(e);
        }
        Ok(())
    }

    /// Keeps `entry`, which does not pack, in the side list; its stand-in.
    #[cold]
    #[inline(never)]
    fn keep_whole(&mut self, entry: Entry) -> Result<Packed, NoMemory> {
        self.whole.try_reserve(1).map_err(|_| {
            NoMemory(std::mem::size_of::<(usize, Entry)>() * (self.whole.len() + 1))
        })?;
        self.whole.push((self.len, entry));
        Ok(Packed::WHOLE)
    }

    /// Appends a packed entry.
    #[inline(always)]
    fn push_packed(&mut self, entry: Packed) -> Result<(), NoMemory> {
        if self.len < CHUNK {
            if self.first.len() == self.first.capacity() {
                self.grow_first()?;
            }
            // SAFETY: there is room for one more entry (ensured just above), so the
            // vector does not reallocate.
            unsafe {
                self.first.as_mut_ptr().add(self.len).write(entry);
                self.first.set_len(self.len + 1);
            }
        } else {
            let i = (self.len - CHUNK) % CHUNK;
            if i == 0 {
                self.add_chunk()?;
            }
            // SAFETY: a chunk exists: `add_chunk` made one for entry `CHUNK` and every
            // `CHUNK` entries after it.
            let last = unsafe { self.chunks.last_mut().unwrap_unchecked() };
            // SAFETY: `i < CHUNK`, inside the mapping.
            unsafe { last.ptr.add(i).write(entry) };
            last.len = i + 1;
        }
        self.len += 1;
        Ok(())
    }

    /// Doubles the first vector (from [`FIRST_CHUNK`] entries, up to [`CHUNK`]); its
    /// first storage is the thread's spare when there is one.
    #[cold]
    #[inline(never)]
    fn grow_first(&mut self) -> Result<(), NoMemory> {
        if self.first.capacity() == 0 {
            if let Some(spare) = take_spare() {
                self.first = spare;
                return Ok(());
            }
        }
        let more = self
            .first
            .capacity()
            .clamp(FIRST_CHUNK, CHUNK - self.first.capacity());
        self.first
            .try_reserve_exact(more)
            .map_err(|_| NoMemory(more * std::mem::size_of::<Packed>()))
    }

    /// Maps one more chunk and makes room for its descriptor.
    #[cold]
    #[inline(never)]
    fn add_chunk(&mut self) -> Result<(), NoMemory> {
        self.chunks
            .try_reserve(1)
            .map_err(|_| NoMemory(std::mem::size_of::<Chunk>() * (self.chunks.len() + 1)))?;
        self.pages
            .try_reserve(1)
            .map_err(|_| NoMemory(std::mem::size_of::<Cell<Pages>>() * (self.pages.len() + 1)))?;
        let in_file = self
            .file
            .as_ref()
            .and_then(|f| Chunk::in_file(f, self.chunks.len()));
        let (chunk, pages) = match in_file {
            Some(chunk) => (chunk, Pages::FileHeld),
            None => (Chunk::new()?, Pages::Memory),
        };
        self.chunks.push(chunk);
        self.pages.push(Cell::new(pages));
        self.release();
        Ok(())
    }

    /// Entry `i` from the front, if pushed.
    #[inline(always)]
    pub fn get(&self, i: usize) -> Option<Entry> {
        self.packed(i).map(|packed| self.entry(i, packed))
    }

    /// The block of entry `i`, if pushed, for a prefetch: 0 for an entry kept whole.
    #[inline(always)]
    pub fn block_hint(&self, i: usize) -> Option<Word> {
        self.packed(i).map(Packed::block)
    }

    /// Entry `i` as stored, if pushed.
    #[inline(always)]
    fn packed(&self, i: usize) -> Option<Packed> {
        if i >= self.len {
            return None;
        }
        if i < CHUNK {
            return Some(self.first[i]);
        }
        let j = i - CHUNK;
        // SAFETY: `i < len`, so chunk `j / CHUNK` exists and holds entry `j % CHUNK`.
        Some(unsafe { *self.chunks.get_unchecked(j / CHUNK).ptr.add(j % CHUNK) })
    }

    /// The entry that `packed` stores at index `i`.
    #[inline(always)]
    fn entry(&self, i: usize, packed: Packed) -> Entry {
        if packed.is_whole() {
            return self.whole_entry(i);
        }
        packed.unpack()
    }

    /// Entry `i`, kept whole.
    #[cold]
    #[inline(never)]
    fn whole_entry(&self, i: usize) -> Entry {
        let k = self.whole.partition_point(|&(j, _)| j < i);
        self.whole[k].1
    }

    /// Every entry, front to back.
    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        let chunks = self.chunks.iter().enumerate().flat_map(|(j, chunk)| {
            self.note_read((j + 1) * CHUNK); // once a chunk, as it begins
            chunk.entries()
        });
        self.first
            .iter()
            .chain(chunks)
            .enumerate()
            .map(|(i, &packed)| self.entry(i, packed))
    }

    /// Bytes of memory the queue holds now (of the chunks in a file, the two it may
    /// hold at a time).
    pub fn allocated_bytes(&self) -> usize {
        let in_memory = self
            .pages
            .iter()
            .filter(|p| p.get() == Pages::Memory)
            .count();
        let in_file = (self.chunks.len() - in_memory).min(2);
        let entries = self.first.capacity() + (in_memory + in_file) * CHUNK;
        entries * std::mem::size_of::<Packed>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.pages.capacity() * std::mem::size_of::<Cell<Pages>>()
            + self.whole.capacity() * std::mem::size_of::<(usize, Entry)>()
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue::new()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        give_spare(std::mem::take(&mut self.first));
    }
}

thread_local! {
    /// The thread's spare first vector: the storage of an empty vector of capacity
    /// [`FIRST_CHUNK`], or null.
    ///
    /// A queue takes it at its first push and gives it back when it is dropped, so a
    /// copy of a few blocks allocates nothing for its queue (a `malloc` and a `free` were
    /// an eighth of a small copy's instructions). Taking leaves nothing behind: a queue
    /// made while another one of the thread holds the spare (a copy nested in a copy)
    /// allocates its own, fallibly, as every queue did before; an OCaml 5 domain is a
    /// thread of its own. Only a vector of exactly [`FIRST_CHUNK`] entries is kept, so a
    /// thread holds at most [`SPARE_BYTES`] and a copy reports the same transient memory
    /// whatever ran before it; the spare is freed when its thread ends
    /// ([`crate::thread_end`]), and a thread whose end cannot be watched keeps none.
    static SPARE: Cell<*mut Packed> = const { Cell::new(std::ptr::null_mut()) };
}

/// Bytes of the spare first vector a thread may keep between copies.
pub const SPARE_BYTES: usize = FIRST_CHUNK * std::mem::size_of::<Packed>();

/// The thread's spare first vector, if it has one.
fn take_spare() -> Option<Vec<Packed>> {
    let p = SPARE.replace(std::ptr::null_mut());
    // SAFETY: a non-null spare is the storage of a vector of capacity `FIRST_CHUNK`,
    // given up by `give_spare` and owned by nothing else since.
    (!p.is_null()).then(|| unsafe { Vec::from_raw_parts(p, 0, FIRST_CHUNK) })
}

/// Keeps `first`, emptied, as the thread's spare if it has the spare's size and the
/// thread's end is watched; frees it otherwise (and frees the spare it replaces, if a
/// nested queue gave one back meanwhile).
fn give_spare(first: Vec<Packed>) {
    if first.capacity() != FIRST_CHUNK || !crate::thread_end::watched() {
        return;
    }
    let mut first = std::mem::ManuallyDrop::new(first);
    drop(take_spare());
    SPARE.set(first.as_mut_ptr());
}

/// Frees the thread's spare: its thread ends.
pub(crate) fn thread_ends() {
    drop(take_spare());
}

/// Bytes the calling thread's spare first vector holds now: 0 or [`SPARE_BYTES`].
pub fn thread_spare_bytes() -> usize {
    if SPARE.get().is_null() {
        0
    } else {
        SPARE_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Color;

    /// Entry `i`: mostly small blocks of every tag and color, and now and then one that
    /// does not pack (a large block, an address from 2^48 on).
    fn entry(i: usize) -> Entry {
        let colors = [Color::C0, Color::C1, Color::C2, Color::Unmarkable];
        let wosize = match i % 1000 {
            7 => 511,
            8 => 510,
            9 => (1 << 40) + i,
            k => k % 300,
        };
        let block = if i % 5000 == 11 {
            (1 << 48) + i * 8
        } else {
            (i + 1) * 8
        };
        Entry {
            block,
            header: Header::new(wosize, colors[i % 4], (i % 256) as u8),
        }
    }

    fn same(a: Entry, b: Entry) -> bool {
        a.block == b.block && a.header == b.header
    }

    #[test]
    fn fifo_across_chunks_while_pushing() {
        let n = 600_000;
        let mut q = Queue::new();
        q.push(entry(0)).unwrap();
        let mut seen = 0;
        let mut pushed = 1;
        let mut next = 0;
        while let Some(e) = q.get(next) {
            assert!(same(e, entry(next)), "entry {next}: {e:?}");
            next += 1;
            seen += 1;
            // every entry read pushes two more until n were pushed
            for _ in 0..2 {
                if pushed < n {
                    q.push(entry(pushed)).unwrap();
                    pushed += 1;
                }
            }
        }
        assert_eq!(seen, n);
        assert_eq!(q.len(), n);
        assert!(q.iter().enumerate().all(|(i, e)| same(e, entry(i))));
        assert_eq!(q.whole.len(), n / 1000 * 2 + n / 5000);
    }

    #[test]
    fn memory_is_8_bytes_per_entry_plus_one_chunk() {
        let mut q = Queue::new();
        for i in 1..1_000_000 {
            q.push(Entry {
                block: i * 24,
                header: Header::new(2, Color::C0, 0),
            })
            .unwrap();
        }
        assert_eq!(std::mem::size_of::<Packed>(), 8);
        assert!(q.allocated_bytes() <= 1_000_000 * 8 + CHUNK * 8 + 4096);
    }

    /// Bytes of file pages mapped in the process (`RssFile` and `RssShmem`, for a temp
    /// directory on tmpfs).
    fn file_pages_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .filter(|l| l.starts_with("RssFile:") || l.starts_with("RssShmem:"))
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
                    * 1024
            })
            .sum()
    }

    #[test]
    fn in_a_file_reads_back_every_entry_and_holds_few_chunks() {
        let Some(file) = crate::image::file::scratch_file(&std::env::temp_dir()) else {
            panic!("no O_TMPFILE in the temp directory");
        };
        let n = 24 * CHUNK; // 23 chunks beyond the first vector: 46 MiB
        let mut q = Queue::new();
        q.keep_in(file);
        let before = file_pages_bytes();
        let mut peak = 0;
        // Pushes read as pass 1 reads: each entry read pushes two until n are queued,
        // then pass 2 and the restore read front to back.
        q.push(entry(0)).unwrap();
        let (mut pushed, mut next) = (1, 0);
        while let Some(e) = q.get(next) {
            q.note_read(next);
            assert!(same(e, entry(next)), "entry {next}: {e:?}");
            next += 1;
            for _ in 0..2 {
                if pushed < n {
                    q.push(entry(pushed)).unwrap();
                    pushed += 1;
                }
            }
            if next % 4096 == 0 {
                peak = peak.max(file_pages_bytes().saturating_sub(before));
            }
        }
        assert_eq!(next, n);
        for pass in 0..2 {
            for (k, e) in q.iter().enumerate() {
                assert!(same(e, entry(k)), "pass {pass}, entry {k}: {e:?}");
                if k % 4096 == 0 {
                    peak = peak.max(file_pages_bytes().saturating_sub(before));
                }
            }
        }
        assert!(q.pages.iter().all(|p| p.get() != Pages::Memory));
        // The chunk read, the next one looked at, the last: 3 chunks; 2 of slack for
        // pages another test maps meanwhile.
        assert!(peak <= 5 * CHUNK_BYTES, "{peak} bytes of file pages held");
        assert!(q.allocated_bytes() <= CHUNK_BYTES * 3 + 4096 + q.whole.capacity() * 24);
    }
}
