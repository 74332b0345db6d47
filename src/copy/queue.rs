//! The traversal queue: every block the copy will hold, in the order of its offsets.
//!
//! Pass 1 appends each block when it is first seen and reads the queue from the front
//! (breadth first), so the queue doubles as the list that pass 2 (write) and the restore
//! pass walk again, front to back. Storage is a list of chunks that grow geometrically up
//! to [`MAX_CHUNK`] entries, so a long copy never reallocates or moves what it holds and
//! never holds more than one partly used chunk beyond 16 bytes per block.

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
/// The largest chunk: 64 Ki entries, 1 MiB.
const MAX_CHUNK: usize = 1 << 16;

/// A FIFO of [`Entry`] that can be walked again after it was drained.
pub struct Queue {
    /// Full chunks, then the chunk being written (the last one).
    chunks: Vec<Vec<Entry>>,
    /// Entries pushed so far.
    len: usize,
}

impl Queue {
    /// An empty queue; the first chunk is allocated on the first push.
    pub fn new() -> Queue {
        Queue { chunks: Vec::new(), len: 0 }
    }

    /// Number of entries pushed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends an entry.
    #[inline(always)]
    pub fn push(&mut self, entry: Entry) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < last.capacity() => last.push(entry),
            _ => self.push_to_new_chunk(entry),
        }
        self.len += 1;
    }

    #[cold]
    #[inline(never)]
    fn push_to_new_chunk(&mut self, entry: Entry) {
        let size = match self.chunks.last() {
            Some(last) => (last.capacity() * 2).min(MAX_CHUNK),
            None => FIRST_CHUNK,
        };
        let mut chunk = Vec::with_capacity(size);
        chunk.push(entry);
        self.chunks.push(chunk);
    }

    /// A cursor at the front of the queue.
    pub fn cursor(&self) -> Cursor {
        Cursor { chunk: 0, index: 0 }
    }

    /// The entry under `cursor` and moves it one step, or `None` at the end.
    #[inline(always)]
    pub fn next(&self, cursor: &mut Cursor) -> Option<Entry> {
        let chunk = self.chunks.get(cursor.chunk)?;
        if let Some(&entry) = chunk.get(cursor.index) {
            cursor.index += 1;
            return Some(entry);
        }
        if chunk.len() < chunk.capacity() {
            return None; // at the end of the chunk being written
        }
        cursor.chunk += 1;
        cursor.index = 0;
        let &entry = self.chunks.get(cursor.chunk)?.first()?;
        cursor.index = 1;
        Some(entry)
    }

    /// Every entry, front to back.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.chunks.iter().flatten()
    }

    /// Bytes of memory the queue holds now.
    pub fn allocated_bytes(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(Vec::capacity).sum();
        chunks * std::mem::size_of::<Entry>() + self.chunks.capacity() * std::mem::size_of::<Vec<Entry>>()
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue::new()
    }
}

/// A read position in a [`Queue`].
#[derive(Clone, Copy, Debug)]
pub struct Cursor {
    chunk: usize,
    index: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry { block: i * 8, header: Header(i) }
    }

    #[test]
    fn fifo_across_chunks_while_pushing() {
        let mut q = Queue::new();
        let mut cursor = q.cursor();
        q.push(entry(0));
        let mut seen = Vec::new();
        let mut pushed = 1;
        while let Some(e) = q.next(&mut cursor) {
            seen.push(e.block / 8);
            // every entry read pushes two more until 200_000 were pushed
            for _ in 0..2 {
                if pushed < 200_000 {
                    q.push(entry(pushed));
                    pushed += 1;
                }
            }
        }
        assert_eq!(seen, (0..200_000).collect::<Vec<_>>());
        assert_eq!(q.len(), 200_000);
        assert!(q.iter().map(|e| e.block / 8).eq(0..200_000));
    }

    #[test]
    fn memory_is_16_bytes_per_entry_plus_one_chunk() {
        let mut q = Queue::new();
        for i in 0..1_000_000 {
            q.push(entry(i));
        }
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        assert!(q.allocated_bytes() <= 1_000_000 * 16 + MAX_CHUNK * 16 + 4096);
    }
}
