//! The traversal queue: every block the copy will hold, in the order of its offsets.
//!
//! Pass 1 appends each block when it is first seen (and scans the queued blocks in the
//! order of [`super::pending`]), so the queue is the list of the copy's blocks in offset
//! order, which pass 2 (write) and the restore pass walk front to back. Storage: a vector for the first `CHUNK` (128 Ki) entries,
//! then huge-page chunks of `CHUNK` entries that never move, so a long copy holds at most
//! one partly used chunk beyond 16 bytes a block.

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

const FIRST_CHUNK: usize = 64;
/// Entries per chunk: 128 Ki entries, 2 MiB, one huge page.
const CHUNK: usize = HUGE_PAGE / std::mem::size_of::<Entry>();

/// Storage for [`CHUNK`] entries in a huge-page mapping: a long copy touches fresh
/// memory at every entry, and one page fault per 2 MiB instead of per 4 KiB is most of
/// the queue's cost.
struct Chunk {
    /// Start of the mapping; `len <= CHUNK` entries are initialised.
    ptr: *mut Entry,
    len: usize,
}

impl Chunk {
    fn new() -> Result<Chunk, NoMemory> {
        let bytes = CHUNK * std::mem::size_of::<Entry>();
        let ptr = alloc::map_huge(bytes) as *mut Entry;
        if ptr.is_null() {
            return Err(NoMemory(bytes));
        }
        Ok(Chunk { ptr, len: 0 })
    }

    fn entries(&self) -> &[Entry] {
        // SAFETY: entries below `len` are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this size, and dies with the chunk.
        unsafe { alloc::unmap_huge(self.ptr as *mut u8, CHUNK * std::mem::size_of::<Entry>()) }
    }
}

/// An append-only list of [`Entry`], indexed from its front.
pub struct Queue {
    /// Entries `0..CHUNK`: a vector that doubles from [`FIRST_CHUNK`] (small copies stay
    /// small), up to exactly [`CHUNK`].
    first: Vec<Entry>,
    /// Entries from `CHUNK` on, `CHUNK` a chunk; all full but the last.
    chunks: Vec<Chunk>,
    /// Entries pushed so far.
    len: usize,
}

impl Queue {
    /// An empty queue; allocates nothing until the first [`Queue::push`].
    pub fn new() -> Queue {
        Queue {
            first: Vec::new(),
            chunks: Vec::new(),
            len: 0,
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
            .map_err(|_| NoMemory(more * std::mem::size_of::<Entry>()))
    }

    /// Maps one more chunk and makes room for its descriptor.
    #[cold]
    #[inline(never)]
    fn add_chunk(&mut self) -> Result<(), NoMemory> {
        self.chunks
            .try_reserve(1)
            .map_err(|_| NoMemory(std::mem::size_of::<Chunk>() * (self.chunks.len() + 1)))?;
        let chunk = Chunk::new()?;
        self.chunks.push(chunk);
        Ok(())
    }

    /// Entry `i` from the front, if pushed.
    #[inline(always)]
    pub fn get(&self, i: usize) -> Option<Entry> {
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

    /// Every entry, front to back.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.first
            .iter()
            .chain(self.chunks.iter().flat_map(Chunk::entries))
    }

    /// Bytes of memory the queue holds now.
    pub fn allocated_bytes(&self) -> usize {
        let entries = self.first.capacity() + self.chunks.len() * CHUNK;
        entries * std::mem::size_of::<Entry>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
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
    /// The thread's spare first vector: empty, of capacity [`FIRST_CHUNK`], or no memory.
    ///
    /// A queue takes it at its first push and gives it back when it is dropped, so a
    /// copy of a few blocks allocates nothing for its queue (a `malloc` and a `free` were
    /// an eighth of a small copy's instructions). Taking leaves nothing behind: a queue
    /// made while another one of the thread holds the spare (a copy nested in a copy)
    /// allocates its own, fallibly, as every queue did before; an OCaml 5 domain is a
    /// thread of its own. Only a vector of exactly [`FIRST_CHUNK`] entries is kept, so a
    /// thread holds at most [`SPARE_BYTES`] and a copy reports the same transient memory
    /// whatever ran before it; the spare is freed when its thread ends.
    static SPARE: std::cell::Cell<Vec<Entry>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Bytes of the spare first vector a thread may keep between copies.
pub const SPARE_BYTES: usize = FIRST_CHUNK * std::mem::size_of::<Entry>();

/// The thread's spare first vector, if it has one.
fn take_spare() -> Option<Vec<Entry>> {
    // Fails only while the thread is being torn down: then there is no spare.
    let spare = SPARE.try_with(std::cell::Cell::take).ok()?;
    (spare.capacity() != 0).then_some(spare)
}

/// Keeps `first`, emptied, as the thread's spare if it has the spare's size; frees it
/// otherwise (and frees the spare it replaces, if a nested queue gave one back
/// meanwhile).
fn give_spare(mut first: Vec<Entry>) {
    if first.capacity() != FIRST_CHUNK {
        return;
    }
    first.clear();
    // While the thread is being torn down the vector is freed instead.
    let _ = SPARE.try_with(|spare| spare.replace(first));
}

/// Bytes the calling thread's spare first vector holds now: 0 or [`SPARE_BYTES`].
pub fn thread_spare_bytes() -> usize {
    SPARE
        .try_with(|spare| {
            let v = spare.take();
            let bytes = v.capacity() * std::mem::size_of::<Entry>();
            spare.set(v);
            bytes
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            block: i * 8,
            header: Header(i),
        }
    }

    #[test]
    fn fifo_across_chunks_while_pushing() {
        let mut q = Queue::new();
        q.push(entry(0)).unwrap();
        let mut seen = Vec::new();
        let mut pushed = 1;
        let mut next = 0;
        while let Some(e) = q.get(next) {
            next += 1;
            seen.push(e.block / 8);
            // every entry read pushes two more until 400_000 were pushed
            for _ in 0..2 {
                if pushed < 400_000 {
                    q.push(entry(pushed)).unwrap();
                    pushed += 1;
                }
            }
        }
        assert_eq!(seen, (0..400_000).collect::<Vec<_>>());
        assert_eq!(q.len(), 400_000);
        assert!(q.iter().map(|e| e.block / 8).eq(0..400_000));
    }

    #[test]
    fn memory_is_16_bytes_per_entry_plus_one_chunk() {
        let mut q = Queue::new();
        for i in 0..1_000_000 {
            q.push(entry(i)).unwrap();
        }
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        assert!(q.allocated_bytes() <= 1_000_000 * 16 + CHUNK * 16 + 4096);
    }
}
