//! The payload writer: the words of a copy, arriving in order, turned into an image's
//! payload, fix-up table and chunk index, and written out through a bounded buffer.
//!
//! It is an [`Output`] of the traversal ([`crate::copy::copy_into`]): pass 2 hands it
//! the copy run by run, and it writes each full buffer out, so that writing a value
//! never needs a copy of it in memory. It also takes a copy already made
//! ([`PayloadWriter::feed`]), for [`super::encode`] and the tests.
//!
//! As the words go by, a small state machine follows the blocks (the header of each,
//! then its fields): pointer fields are made absolute for the image's address, and
//! refused when they lead out of the copy; the operations of custom blocks are replaced
//! by their [`CustomKind`] and listed in the fix-up table; closures are refused; the
//! first header of every chunk and every chunk's checksum go to the chunk index. Raw
//! blocks are skipped whole.

use std::io::Write;

use xxhash_rust::xxh3::Xxh3;

use super::background::Background;
use super::fixups::FixUps;
use super::format::{Chunk, CustomKind, ALIGNED_FROM, HEADER_BYTES, NO_BLOCK, PAYLOAD_AT};
use super::{file, WriteError};
use crate::bigarray;
use crate::copy::{data, CopyError, Output, MAX_RUN};
use crate::layout::{self, Header, Word, WORD_BYTES};

/// Words of the buffer: 8 MiB.
pub const BUFFER_WORDS: usize = 1 << 20;

/// What a finished payload needs in its header.
#[derive(Debug)]
pub struct Payload {
    /// The address the payload is made for.
    pub address: Word,
    /// Where the payload starts in the file: [`HEADER_BYTES`], or [`PAYLOAD_AT`] when
    /// the writer put zeros before it ([`PayloadWriter::writes_a_file`]).
    pub payload_at: u64,
    /// Payload bytes written.
    pub bytes: u64,
    /// Blocks in it.
    pub blocks: u64,
    /// The fix-up table.
    pub customs: FixUps,
    /// The chunk index.
    pub chunks: Vec<Chunk>,
}

/// See the module's documentation.
pub struct PayloadWriter<'a, W> {
    out: W,
    buf: Vec<Word>,
    /// Words of `buf` handed out.
    filled: usize,
    /// The address the image is made for; 0 until chosen.
    address: Word,
    /// The address range kept free while the image is written (see [`Self::settle`]).
    reservation: Option<file::Reservation>,
    /// Where the words' pointers point now: the copy's base (the address itself when
    /// the traversal makes the copy for it).
    source: Word,
    /// Payload bytes expected.
    bytes: usize,
    /// Payload words processed (the index of `buf[0]`).
    done: usize,
    /// Fields left in the current block.
    remaining: usize,
    /// The current block's header.
    header: Header,
    /// The current block's header word.
    header_at: usize,
    custom_ops: &'a [Word; 4],
    /// The payload word of the data pointer of the Bigarray being walked, until it is
    /// made absolute.
    bigarray_data: Option<usize>,
    /// [`PayloadWriter::feed`]: the data blocks whose data moves to stay 64-byte aligned
    /// at the image's address, as (byte range of their fields in the copy, shift).
    moved: Vec<(std::ops::Range<usize>, isize)>,
    chunk_words: usize,
    hasher: Xxh3,
    /// Words hashed into the current chunk.
    hashed: usize,
    /// Chunks whose checksum is recorded.
    closed: usize,
    /// The directory where the traversal's queue and the fix-up table go to files of
    /// their own ([`Output::queue_file`], [`FixUps`]), when the writer writes a file
    /// ([`PayloadWriter::writes_a_file`]); `None`: memory.
    scratch_dir: Option<std::path::PathBuf>,
    /// The thread that writes full buffers, when there is one
    /// ([`PayloadWriter::writes_in_background`]).
    background: Option<Background>,
    payload: Payload,
    error: Option<WriteError>,
}

impl<'a, W: Write> PayloadWriter<'a, W> {
    /// A writer of a payload for `address` (chosen by [`super::choose_address`] when
    /// `None`) to `out`, custom blocks recognised by `custom_ops` (Int32, Int64,
    /// Nativeint, Bigarray), chunks of `chunk_bytes`.
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the buffer cannot be had.
    pub fn new(
        out: W,
        address: Option<Word>,
        custom_ops: &'a [Word; 4],
        chunk_bytes: u64,
    ) -> Result<Self, WriteError> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(BUFFER_WORDS)
            .map_err(|_| WriteError::OutOfMemory)?;
        buf.resize(BUFFER_WORDS, 0);
        Ok(PayloadWriter {
            out,
            buf,
            filled: 0,
            address: address.unwrap_or(0),
            reservation: None,
            source: 0,
            bytes: 0,
            done: 0,
            remaining: 0,
            header: Header(0),
            header_at: 0,
            custom_ops,
            bigarray_data: None,
            moved: Vec::new(),
            chunk_words: chunk_bytes as usize / WORD_BYTES,
            hasher: Xxh3::new(),
            hashed: 0,
            closed: 0,
            scratch_dir: None,
            background: None,
            payload: Payload {
                address: 0,
                payload_at: HEADER_BYTES as u64,
                bytes: 0,
                blocks: 0,
                customs: FixUps::new(),
                chunks: Vec::new(),
            },
            error: None,
        })
    }

    /// Says that the writer writes a file in `dir`, the payload from [`HEADER_BYTES`]:
    /// a payload of [`ALIGNED_FROM`] bytes or more is then moved to [`PAYLOAD_AT`], zeros
    /// written before it, and the traversal's queue and the fix-up table go to files
    /// of their own in `dir`, in the page cache, instead of memory (the file system has
    /// room for the image, and the process then needs no memory that grows with the
    /// value).
    pub fn writes_a_file(&mut self, dir: std::path::PathBuf) {
        self.scratch_dir = Some(dir);
    }

    /// The address the image is made for (chosen once the size is known).
    pub fn address(&self) -> Word {
        self.address
    }

    /// Takes the size of the payload and chooses its address when none was given: one
    /// where nothing of this process lies, kept so while the image is written (a
    /// `PROT_NONE` reservation), so that no pointer the copy keeps to memory outside it
    /// (C memory) can pass for one into it.
    fn settle(&mut self, bytes: usize) {
        self.bytes = bytes;
        if self.scratch_dir.is_some() && bytes as u64 >= ALIGNED_FROM {
            self.pad_payload();
        }
        if self.address != 0 {
            return;
        }
        for _ in 0..16 {
            let address = super::choose_address(bytes);
            if let Some(r) = file::Reservation::at(address, bytes + file::TAIL_BYTES) {
                self.address = address;
                self.reservation = Some(r);
                return;
            }
        }
        // Nothing free after 16 tries (or no MAP_FIXED_NOREPLACE): an address all the
        // same; a pointer to C memory inside it would then be taken for one into the
        // copy, as unlikely as the 16 failures.
        self.address = super::choose_address(bytes);
    }

    /// Writes the zeros that put the payload at [`PAYLOAD_AT`] instead of
    /// [`HEADER_BYTES`], through the buffer, still empty.
    fn pad_payload(&mut self) {
        let words = (PAYLOAD_AT as usize - HEADER_BYTES) / WORD_BYTES;
        self.buf[..words].fill(0);
        match self
            .out
            .write_all(layout::words_as_bytes(&self.buf[..words]))
        {
            Ok(()) => self.payload.payload_at = PAYLOAD_AT,
            Err(e) => self.error = Some(WriteError::Io(e)),
        }
    }

    /// Feeds a copy already made: the `words` of a copy at `words.as_ptr()`. The data of
    /// its Bigarrays, 64-byte aligned at the copy's address, is moved within its data
    /// block to be so at the image's address (the Bigarrays' pointers with it).
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the table of moved data blocks cannot be had.
    pub fn feed(&mut self, words: &[Word]) -> Result<(), WriteError> {
        self.settle(words.len() * WORD_BYTES);
        self.source = words.as_ptr() as Word;
        self.moved = data_moves(words, self.source, self.address)?;
        let mut at = 0;
        for k in 0..self.moved.len() {
            let (fields, shift) = self.moved[k].clone();
            let (first, end) = (fields.start / WORD_BYTES, fields.end / WORD_BYTES);
            self.feed_words(&words[at..first]);
            let bytes = layout::words_as_bytes(&words[first..end]);
            // The data's first possible byte: the end of the slack, wherever it starts.
            let old = (self.source + fields.start).next_multiple_of(data::DATA_ALIGN)
                - self.source
                - fields.start;
            let new = old.wrapping_add_signed(shift);
            let len = fields.len() - data::SLACK_BYTES;
            let mut start = first;
            while start < end {
                let n = (end - start).min(MAX_RUN);
                let run = (start - first) * WORD_BYTES..(start - first + n) * WORD_BYTES;
                let dst = self.next(n) as *mut u8;
                let copy = run.start.max(new)..run.end.min(new + len);
                // SAFETY: `dst` has room for the run's bytes; `copy` lies in the run and,
                // shifted back, in the block's fields.
                unsafe {
                    std::ptr::write_bytes(dst, 0, run.len());
                    if copy.start < copy.end {
                        crate::memcopy::copy_nonoverlapping(
                            bytes[copy.start - new + old..].as_ptr(),
                            dst.add(copy.start - run.start),
                            copy.len(),
                        );
                    }
                }
                start += n;
            }
            at = end;
        }
        self.feed_words(&words[at..]);
        Ok(())
    }

    /// Hands `words` on as they are.
    fn feed_words(&mut self, words: &[Word]) {
        for run in words.chunks(MAX_RUN) {
            let dst = self.next(run.len());
            // SAFETY: `next` gave room for `run.len()` words.
            unsafe {
                crate::memcopy::copy_nonoverlapping(
                    run.as_ptr().cast(),
                    dst.cast(),
                    run.len() * WORD_BYTES,
                )
            };
        }
    }

    /// The payload address of the Bigarray data pointer `v` of a copy at `self.source`.
    fn data_pointer(&self, v: Word, source_end: Word) -> Result<Word, WriteError> {
        if v < self.source || v > source_end {
            return Err(WriteError::OutsideHeap(v));
        }
        let off = v - self.source;
        let k = self.moved.partition_point(|(r, _)| r.start <= off);
        let shift = match k.checked_sub(1).map(|k| &self.moved[k]) {
            Some((r, shift)) if off <= r.end => *shift,
            _ => 0,
        };
        Ok(off.wrapping_add_signed(shift) + self.address)
    }

    /// Processes and writes out what the buffer holds.
    fn flush(&mut self) {
        let filled = std::mem::take(&mut self.filled);
        if self.error.is_some() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        if let Err(e) = self
            .process(&mut buf[..filled])
            .and_then(|()| self.hash(&buf[..filled]))
        {
            self.error = Some(e);
        } else {
            let written = match &mut self.background {
                Some(background) => background.write(&mut buf, filled),
                None => self.out.write_all(layout::words_as_bytes(&buf[..filled])),
            };
            if let Err(e) = written {
                self.error = Some(WriteError::Io(e));
            }
        }
        self.buf = buf;
        self.done += filled;
    }

    /// Follows the blocks through `words` (payload words `done..`), rewriting pointers
    /// and custom operations.
    fn process(&mut self, words: &mut [Word]) -> Result<(), WriteError> {
        let source_end = self.source + self.bytes;
        let mut i = 0;
        while i < words.len() {
            if self.remaining == 0 {
                let at = self.done + i;
                let hd = Header(words[i]);
                if hd.tag() == layout::CLOSURE_TAG {
                    return Err(WriteError::Closure);
                }
                let chunk = at / self.chunk_words;
                self.chunks_to(chunk)?;
                if self.payload.chunks[chunk].first == NO_BLOCK {
                    self.payload.chunks[chunk].first = (at * WORD_BYTES) as u64;
                }
                self.payload.blocks += 1;
                self.header = hd;
                self.header_at = at;
                self.remaining = hd.wosize();
                i += 1;
                continue;
            }
            let tag = self.header.tag();
            if tag == layout::CUSTOM_TAG && self.done + i == self.header_at + 1 {
                let ops = words[i];
                let Some(k) = self.custom_ops.iter().position(|&o| o == ops) else {
                    return Err(WriteError::Custom(ops));
                };
                words[i] = CustomKind::ALL[k] as Word;
                let offset = ((self.done + i) * WORD_BYTES) as u64;
                self.payload
                    .customs
                    .push(offset, self.scratch_dir.as_deref())?;
                if CustomKind::ALL[k] == CustomKind::Bigarray {
                    // `bigarray::read` checked, when it was copied, that it has the field.
                    self.bigarray_data = Some(self.header_at + 1 + bigarray::DATA_FIELD);
                }
            }
            let run = self.remaining.min(words.len() - i);
            if let Some(at) = self.bigarray_data {
                if at < self.done + i + run {
                    let slot = &mut words[at - self.done];
                    *slot = self.data_pointer(*slot, source_end)?;
                    self.bigarray_data = None;
                }
            }
            if tag < layout::NO_SCAN_TAG {
                for field in &mut words[i..i + run] {
                    let v = *field;
                    if layout::is_immediate(v) {
                        continue;
                    }
                    let inside = v > self.source
                        && v <= source_end
                        && (v - self.source).is_multiple_of(WORD_BYTES);
                    if !inside {
                        return Err(WriteError::OutsideHeap(v));
                    }
                    *field = v - self.source + self.address;
                }
            }
            self.remaining -= run;
            i += run;
        }
        Ok(())
    }

    /// Adds `words` (processed) to the chunk checksums.
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the chunk index cannot grow.
    fn hash(&mut self, mut words: &[Word]) -> Result<(), WriteError> {
        while !words.is_empty() {
            let take = (self.chunk_words - self.hashed).min(words.len());
            self.hasher.update(layout::words_as_bytes(&words[..take]));
            self.hashed += take;
            words = &words[take..];
            if self.hashed == self.chunk_words {
                self.close_chunk()?;
            }
        }
        Ok(())
    }

    /// Makes the chunk index reach chunk `k`.
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the index cannot grow.
    fn chunks_to(&mut self, k: usize) -> Result<(), WriteError> {
        let chunks = &mut self.payload.chunks;
        if chunks.len() <= k {
            chunks
                .try_reserve(k + 1 - chunks.len())
                .map_err(|_| WriteError::OutOfMemory)?;
            chunks.resize(
                k + 1,
                Chunk {
                    first: NO_BLOCK,
                    checksum: 0,
                },
            );
        }
        Ok(())
    }

    /// Records the current chunk's checksum.
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the chunk index cannot grow.
    fn close_chunk(&mut self) -> Result<(), WriteError> {
        let k = self.closed;
        self.chunks_to(k)?;
        self.payload.chunks[k].checksum = self.hasher.digest();
        self.hasher.reset();
        self.hashed = 0;
        self.closed += 1;
        Ok(())
    }

    /// Writes out what is left and returns the payload's description and the output.
    ///
    /// # Errors
    /// The first error met: [`WriteError::Closure`], [`WriteError::Custom`] or
    /// [`WriteError::OutsideHeap`] for what an image cannot hold,
    /// [`WriteError::Io`] for the output's.
    pub fn finish(mut self) -> Result<(Payload, W), WriteError> {
        self.flush();
        if let Some(background) = self.background.take() {
            if let Err(e) = background.finish() {
                self.error.get_or_insert(WriteError::Io(e));
            }
        }
        if self.address == 0 {
            // Nothing was written (an immediate root): an address all the same.
            self.settle(0);
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.hashed > 0 {
            self.close_chunk()?;
        }
        debug_assert_eq!(self.done * WORD_BYTES, self.bytes, "the copy's size");
        debug_assert_eq!(self.remaining, 0, "a block cut short");
        self.payload.bytes = (self.done * WORD_BYTES) as u64;
        self.payload.address = self.address;
        Ok((self.payload, self.out))
    }
}

impl PayloadWriter<'_, &mut std::fs::File> {
    /// Says that full buffers go to the file on a thread of their own ([`Background`]),
    /// while the traversal fills the next; where there is no thread or memory for a
    /// second buffer, they are written here as before.
    pub fn writes_in_background(&mut self) {
        self.background = Background::start(self.out, BUFFER_WORDS);
    }
}

impl<W: Write> Output for PayloadWriter<'_, W> {
    fn queue_file(&mut self) -> Option<std::fs::File> {
        file::scratch_file(self.scratch_dir.as_deref()?)
    }

    fn begin(&mut self, bytes: usize) -> Result<Word, CopyError> {
        self.settle(bytes);
        self.source = self.address;
        Ok(self.address)
    }

    fn next(&mut self, words: usize) -> *mut Word {
        if self.filled + words > self.buf.len() {
            self.flush();
        }
        let run = self.buf[self.filled..self.filled + words].as_mut_ptr();
        self.filled += words;
        run
    }
}

/// The data blocks of the copy `words` at `source` whose data must move within the block
/// to start 64-byte aligned at `address` rather than at `source`: the byte ranges of
/// their fields in the copy and the shift, in increasing order. Empty when both
/// addresses agree modulo [`data::DATA_ALIGN`] (the blocks are then not walked).
///
/// # Errors
/// [`WriteError::OutOfMemory`] when the table cannot grow.
fn data_moves(
    words: &[Word],
    source: Word,
    address: Word,
) -> Result<Vec<(std::ops::Range<usize>, isize)>, WriteError> {
    let mut moved = Vec::new();
    if source
        .wrapping_sub(address)
        .is_multiple_of(data::DATA_ALIGN)
    {
        return Ok(moved);
    }
    let mut i = 0;
    while i < words.len() {
        let hd = Header(words[i]);
        let end = (i + 1 + hd.wosize()).min(words.len());
        if hd.tag() == layout::ABSTRACT_TAG && end - i > data::data_wosize(0) {
            let fields = (i + 1) * WORD_BYTES;
            let old = (source + fields).next_multiple_of(data::DATA_ALIGN) - source;
            let new = (address + fields).next_multiple_of(data::DATA_ALIGN) - address;
            moved.try_reserve(1).map_err(|_| WriteError::OutOfMemory)?;
            moved.push((fields..end * WORD_BYTES, new as isize - old as isize));
        }
        i = end;
    }
    Ok(moved)
}
