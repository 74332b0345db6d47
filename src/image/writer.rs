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

use super::format::{Chunk, CustomKind, NO_BLOCK};
use super::{file, WriteError};
use crate::copy::{CopyError, Output, MAX_RUN};
use crate::layout::{self, Header, Word, WORD_BYTES};

/// Words of the buffer: 8 MiB.
pub const BUFFER_WORDS: usize = 1 << 20;

/// What a finished payload needs in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The address the payload is made for.
    pub address: Word,
    /// Payload bytes written.
    pub bytes: u64,
    /// Blocks in it.
    pub blocks: u64,
    /// The fix-up table.
    pub customs: Vec<u64>,
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
    custom_ops: &'a [Word; 3],
    chunk_words: usize,
    hasher: Xxh3,
    /// Words hashed into the current chunk.
    hashed: usize,
    /// Chunks whose checksum is recorded.
    closed: usize,
    payload: Payload,
    error: Option<WriteError>,
}

impl<'a, W: Write> PayloadWriter<'a, W> {
    /// A writer of a payload for `address` (chosen by [`super::choose_address`] when
    /// `None`) to `out`, custom blocks recognised by `custom_ops` (Int32, Int64,
    /// Nativeint), chunks of `chunk_bytes`.
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when the buffer cannot be had.
    pub fn new(
        out: W,
        address: Option<Word>,
        custom_ops: &'a [Word; 3],
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
            chunk_words: chunk_bytes as usize / WORD_BYTES,
            hasher: Xxh3::new(),
            hashed: 0,
            closed: 0,
            payload: Payload {
                address: 0,
                bytes: 0,
                blocks: 0,
                customs: Vec::new(),
                chunks: Vec::new(),
            },
            error: None,
        })
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

    /// Feeds a copy already made: the `words` of a copy at `words.as_ptr()`.
    pub fn feed(&mut self, words: &[Word]) {
        self.settle(words.len() * WORD_BYTES);
        self.source = words.as_ptr() as Word;
        for run in words.chunks(MAX_RUN) {
            let dst = self.next(run.len());
            // SAFETY: `next` gave room for `run.len()` words.
            unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), dst, run.len()) };
        }
    }

    /// Processes and writes out what the buffer holds.
    fn flush(&mut self) {
        let filled = std::mem::take(&mut self.filled);
        if self.error.is_some() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        if let Err(e) = self.process(&mut buf[..filled]) {
            self.error = Some(e);
        } else {
            self.hash(&buf[..filled]);
            // SAFETY: the buffer's words, read as bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(buf.as_ptr() as *const u8, filled * WORD_BYTES)
            };
            if let Err(e) = self.out.write_all(bytes) {
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
                while self.payload.chunks.len() <= chunk {
                    self.payload.chunks.push(Chunk {
                        first: NO_BLOCK,
                        checksum: 0,
                    });
                }
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
                self.payload
                    .customs
                    .push(((self.done + i) * WORD_BYTES) as u64);
            }
            let run = self.remaining.min(words.len() - i);
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
    fn hash(&mut self, mut words: &[Word]) {
        while !words.is_empty() {
            let take = (self.chunk_words - self.hashed).min(words.len());
            // SAFETY: the words, read as bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(words.as_ptr() as *const u8, take * WORD_BYTES)
            };
            self.hasher.update(bytes);
            self.hashed += take;
            words = &words[take..];
            if self.hashed == self.chunk_words {
                self.close_chunk();
            }
        }
    }

    /// Records the current chunk's checksum.
    fn close_chunk(&mut self) {
        let k = self.closed;
        while self.payload.chunks.len() <= k {
            self.payload.chunks.push(Chunk {
                first: NO_BLOCK,
                checksum: 0,
            });
        }
        self.payload.chunks[k].checksum = self.hasher.digest();
        self.hasher.reset();
        self.hashed = 0;
        self.closed += 1;
    }

    /// Writes out what is left and returns the payload's description and the output.
    ///
    /// # Errors
    /// The first error met: [`WriteError::Closure`], [`WriteError::Custom`] or
    /// [`WriteError::OutsideHeap`] for what an image cannot hold,
    /// [`WriteError::Io`] for the output's.
    pub fn finish(mut self) -> Result<(Payload, W), WriteError> {
        self.flush();
        if self.address == 0 {
            // Nothing was written (an immediate root): an address all the same.
            self.settle(0);
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.hashed > 0 {
            self.close_chunk();
        }
        debug_assert_eq!(self.done * WORD_BYTES, self.bytes, "the copy's size");
        debug_assert_eq!(self.remaining, 0, "a block cut short");
        self.payload.bytes = (self.done * WORD_BYTES) as u64;
        self.payload.address = self.address;
        Ok((self.payload, self.out))
    }
}

impl<W: Write> Output for PayloadWriter<'_, W> {
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
