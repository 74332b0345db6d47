//! The image file format: one header page, the payload, the fix-up table, the chunk
//! index.
//!
//! ```text
//! offset 0              the header page (HEADER_BYTES): fields below, then the key,
//!                       then zeros
//! offset header_bytes   the payload (payload_bytes): blocks laid out as OCaml lays them
//!                       out, headers of color 3, every pointer absolute for a payload
//!                       mapped at `address`; at PAYLOAD_AT (2 MiB, after zeros) in the
//!                       files written now from ALIGNED_FROM (32 MiB) of payload, so that
//!                       it is mapped straight from the page cache with huge pages where
//!                       the file system keeps them; else at HEADER_BYTES
//! after the payload     the fix-up table: `customs` little-endian words, the byte offset
//!                       in the payload of the first field of each custom block, in
//!                       increasing order
//! after the table       the chunk index: `chunks` entries of two little-endian words,
//!                       one per `chunk_bytes` of payload (the last chunk may be
//!                       shorter): the byte offset in the payload of the first block
//!                       header inside the chunk ([`NO_BLOCK`] when a block that starts
//!                       in an earlier chunk covers all of it), and the xxh3-64 checksum
//!                       of the chunk's bytes
//! ```
//!
//! The chunk index lets every chunk be checked on its own, in parallel: its checksum,
//! the blocks whose headers lie in it (walked from the first), the pointers in its
//! words; a damaged chunk is named. The index itself is checked: its checksum (with the
//! fix-up table's, in the header) and its consistency (each chunk's first block is where
//! the blocks of the chunks before it end).
//!
//! Custom blocks (only Int32, Int64, Nativeint and Bigarray are allowed) store a
//! [`CustomKind`] identifier where the running program stores its
//! `struct custom_operations *`; the loader puts the current process's pointers back,
//! using the table to find them without walking the payload.
//!
//! A Bigarray's custom block (`5 + num_dims` fields, see [`crate::bigarray`]) has flags
//! `CAML_BA_EXTERNAL`, no proxy, and a data pointer, absolute like every pointer, into a
//! data block: a block of tag `Abstract_tag` that nothing points to, after the other
//! blocks, holding the bytes of one or more Bigarrays (those that share data), starting
//! 64 bytes aligned ([`crate::copy::data`]). Abstract blocks appear in images only as
//! data blocks.
//!
//! Header fields, little-endian, at fixed offsets (the magic and version never move):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `OFFHEAP\x1a` |
//! | 8 | 4 | format version ([`VERSION`]) |
//! | 12 | 1 | word size in bytes (8) |
//! | 13 | 1 | byte order of the payload: 1 little-endian, 2 big-endian |
//! | 14 | 1 | OCaml major version family (4 or 5) |
//! | 15 | 1 | flat float arrays (1) or not (0) |
//! | 16 | 8 | header bytes: where the payload starts in the file ([`PAYLOAD_AT`] or [`HEADER_BYTES`]) |
//! | 24 | 8 | the address the payload was written for (page aligned) |
//! | 32 | 8 | payload bytes (a multiple of 8) |
//! | 40 | 8 | the root: an immediate (odd), or the byte offset in the payload of the root block's first field (even) |
//! | 48 | 8 | blocks in the payload |
//! | 56 | 8 | custom blocks (entries of the fix-up table) |
//! | 64 | 8 | checksum (xxh3-64) of the fix-up table followed by the chunk index |
//! | 72 | 8 | key length |
//! | 80 | 8 | checksum (xxh3-64) of the header page with this field zeroed |
//! | 88 | 8 | chunk bytes (a power of two, [`MIN_CHUNK`] to [`MAX_CHUNK`]) |
//! | 96 | 8 | chunks (entries of the chunk index) |
//! | 104 | key length | the user key (bytes) |
//!
//! Version history: 1 had one checksum of the payload and table and no chunk index;
//! version 1 images are refused ("format version"), naming both versions.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::LoadError;

/// The magic at the start of every image.
pub const MAGIC: [u8; 8] = *b"OFFHEAP\x1a";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// The header page; the payload of an image made in memory, or written before
/// [`PAYLOAD_AT`], starts at this offset.
pub const HEADER_BYTES: usize = 4096;
/// Where the payload starts in the files written now: 2 MiB, so that a payload mapped
/// at its (2 MiB aligned) address from a file system that caches files in huge pages
/// is mapped with them. Populating the mapping of a 919 MB payload then takes a few
/// hundred page-table entries instead of 235 000, and reading it misses the TLB 512
/// times less. The bytes between the header page and the payload are zeros.
pub const PAYLOAD_AT: u64 = 2 << 20;
/// Payloads of at least this size start at [`PAYLOAD_AT`] in the files written now, the
/// smaller ones at [`HEADER_BYTES`] (the 2 MiB of zeros before a payload, checked when
/// it is verified, are then at most a sixteenth of the file).
pub const ALIGNED_FROM: u64 = 32 << 20;
/// Where the key starts in the header.
const KEY_AT: usize = 104;
/// The chunk size the writer uses.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// The smallest chunk a loader accepts (a multiple of 64 words, so that the bitmaps of
/// chunks checked in parallel never share a word).
pub const MIN_CHUNK: u64 = 4096;
/// The largest chunk a loader accepts.
pub const MAX_CHUNK: u64 = 1 << 30;
/// A chunk-index entry's first-block offset when no block header lies in the chunk.
pub const NO_BLOCK: u64 = u64::MAX;
/// The longest key.
pub const MAX_KEY: usize = HEADER_BYTES - KEY_AT;
/// Byte order codes.
pub const LITTLE_ENDIAN: u8 = 1;
/// Byte order code of big-endian payloads.
pub const BIG_ENDIAN: u8 = 2;
/// The byte order of this machine.
pub const NATIVE_ENDIAN: u8 = if cfg!(target_endian = "little") {
    LITTLE_ENDIAN
} else {
    BIG_ENDIAN
};
/// The range the writer picks payload addresses in ([`super::choose_address`]) and the
/// only one the loader accepts: a payload lies in `[ADDRESS_RANGE.start,
/// ADDRESS_RANGE.end)`, 16 to 80 TiB. Linux leaves it alone unless asked: above the
/// program, its heap and its libraries' usual places, below the default mmap area and the
/// stack (an address near the stack would map the payload into the stack's growth area).
pub const ADDRESS_RANGE: std::ops::Range<u64> = 0x1000_0000_0000..0x5000_0000_0000;
/// Payload addresses are aligned to this.
pub const PAGE_BYTES: u64 = 4096;

/// The custom blocks an image may hold, by the identifier stored in field 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CustomKind {
    /// `Int32`.
    Int32 = 1,
    /// `Int64`.
    Int64 = 2,
    /// `Nativeint`.
    Nativeint = 3,
    /// A Bigarray (`caml_ba_ops`).
    Bigarray = 4,
}

impl CustomKind {
    /// Every kind, in identifier order.
    pub const ALL: [CustomKind; 4] = [
        CustomKind::Int32,
        CustomKind::Int64,
        CustomKind::Nativeint,
        CustomKind::Bigarray,
    ];

    /// The kind stored as `id`.
    pub fn from_id(id: u64) -> Option<CustomKind> {
        CustomKind::ALL.into_iter().find(|k| *k as u64 == id)
    }
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Word size in bytes.
    pub word_bytes: u8,
    /// Byte order code.
    pub endian: u8,
    /// OCaml major version family: 4 or 5.
    pub ocaml_family: u8,
    /// Whether the writer had flat float arrays.
    pub flat_float_array: bool,
    /// Where the payload starts in the file.
    pub header_bytes: u64,
    /// The address the payload was written for.
    pub address: u64,
    /// Payload size in bytes.
    pub payload_bytes: u64,
    /// The root: an immediate (odd) or the payload offset of the root's first field.
    pub root: u64,
    /// Blocks in the payload.
    pub blocks: u64,
    /// Custom blocks (fix-up table entries).
    pub customs: u64,
    /// Checksum of the fix-up table and the chunk index.
    pub checksum: u64,
    /// Payload bytes per chunk.
    pub chunk_bytes: u64,
    /// Chunk-index entries.
    pub chunks: u64,
    /// The user key.
    pub key: Vec<u8>,
}

fn u64_at(page: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"))
}

/// The checksum of a header page (its own checksum field read as zero).
fn header_checksum(page: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&page[..80]);
    h.update(&[0; 8]);
    h.update(&page[88..HEADER_BYTES]);
    h.digest()
}

/// Recomputes the checksum of a header page (at least [`HEADER_BYTES`] bytes) after its
/// fields were changed: forged headers for the tests of the later checks.
pub fn reseal(page: &mut [u8]) {
    let sum = header_checksum(page);
    page[80..88].copy_from_slice(&sum.to_le_bytes());
}

impl Header {
    /// The header page.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        assert!(self.key.len() <= MAX_KEY, "key longer than MAX_KEY");
        let mut page = [0u8; HEADER_BYTES];
        page[0..8].copy_from_slice(&MAGIC);
        page[8..12].copy_from_slice(&self.version.to_le_bytes());
        page[12] = self.word_bytes;
        page[13] = self.endian;
        page[14] = self.ocaml_family;
        page[15] = u8::from(self.flat_float_array);
        let words = [
            self.header_bytes,
            self.address,
            self.payload_bytes,
            self.root,
            self.blocks,
            self.customs,
            self.checksum,
            self.key.len() as u64,
        ];
        page[88..96].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        page[96..104].copy_from_slice(&self.chunks.to_le_bytes());
        for (i, w) in words.into_iter().enumerate() {
            page[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        page[KEY_AT..KEY_AT + self.key.len()].copy_from_slice(&self.key);
        let sum = header_checksum(&page);
        page[80..88].copy_from_slice(&sum.to_le_bytes());
        page
    }

    /// Decodes and checks a header page on its own: magic, version, word size, byte
    /// order, header checksum, sizes and address. What depends on the loading process
    /// (OCaml family, float arrays, key) and the file size is checked by the caller.
    ///
    /// # Errors
    /// [`LoadError::Bad`] naming the first check that failed.
    pub fn decode(page: &[u8]) -> Result<Header, LoadError> {
        if page.len() < HEADER_BYTES {
            return Err(bad!(
                "file size",
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                page.len()
            ));
        }
        if page[0..8] != MAGIC {
            return Err(bad!("magic", "not an offheap image"));
        }
        let version = u32::from_le_bytes(page[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad!("format version", "version {version}, this library reads version {VERSION} only (write the image again)"));
        }
        let word_bytes = page[12];
        if word_bytes as usize != crate::layout::WORD_BYTES {
            return Err(bad!(
                "word size",
                "written with {word_bytes}-byte words, this program has {}-byte words",
                crate::layout::WORD_BYTES
            ));
        }
        let endian = page[13];
        if endian != NATIVE_ENDIAN {
            return Err(bad!(
                "byte order",
                "byte order code {endian}, this machine's is {NATIVE_ENDIAN}"
            ));
        }
        let stored = u64_at(page, 80);
        if stored != header_checksum(page) {
            return Err(bad!("header checksum", "the header is damaged"));
        }
        let key_len = u64_at(page, 72);
        if key_len > MAX_KEY as u64 {
            return Err(bad!("header", "key length {key_len}"));
        }
        let h = Header {
            version,
            word_bytes,
            endian,
            ocaml_family: page[14],
            flat_float_array: page[15] != 0,
            header_bytes: u64_at(page, 16),
            address: u64_at(page, 24),
            payload_bytes: u64_at(page, 32),
            root: u64_at(page, 40),
            blocks: u64_at(page, 48),
            customs: u64_at(page, 56),
            checksum: u64_at(page, 64),
            chunk_bytes: u64_at(page, 88),
            chunks: u64_at(page, 96),
            key: crate::alloc::try_copy(&page[KEY_AT..KEY_AT + key_len as usize])
                .ok_or(LoadError::OutOfMemory(key_len as usize))?,
        };
        h.check_sizes()?;
        Ok(h)
    }

    /// The sizes and the address are consistent with each other.
    fn check_sizes(&self) -> Result<(), LoadError> {
        if self.header_bytes != HEADER_BYTES as u64 && self.header_bytes != PAYLOAD_AT {
            return Err(bad!("header", "payload offset {}", self.header_bytes));
        }
        let most = ADDRESS_RANGE.end - ADDRESS_RANGE.start;
        if !self.payload_bytes.is_multiple_of(8) || self.payload_bytes >= most {
            return Err(bad!("header", "payload size {}", self.payload_bytes));
        }
        let address_ok = self.address >= ADDRESS_RANGE.start
            && self.address.is_multiple_of(PAGE_BYTES)
            && self
                .address
                .checked_add(self.payload_bytes)
                .is_some_and(|end| end <= ADDRESS_RANGE.end);
        if !address_ok {
            return Err(bad!(
                "header",
                "address {:#x} for {} bytes",
                self.address,
                self.payload_bytes
            ));
        }
        // A block has a header and at least no field; a custom block has three words.
        if self.blocks > self.payload_bytes / 8 || self.customs > self.payload_bytes / 24 {
            return Err(bad!(
                "header",
                "{} blocks and {} custom blocks in {} bytes",
                self.blocks,
                self.customs,
                self.payload_bytes
            ));
        }
        let chunk_ok = self.chunk_bytes.is_power_of_two()
            && (MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_bytes)
            && self.chunks == self.payload_bytes.div_ceil(self.chunk_bytes);
        if !chunk_ok {
            return Err(bad!(
                "header",
                "{} chunks of {} bytes for {} bytes",
                self.chunks,
                self.chunk_bytes,
                self.payload_bytes
            ));
        }
        let root_ok = self.root % 2 == 1
            || (self.root >= 8 && self.root <= self.payload_bytes && self.root.is_multiple_of(8));
        if !root_ok {
            return Err(bad!("root", "root {:#x}", self.root));
        }
        Ok(())
    }

    /// The size of the whole file this header describes.
    pub fn file_bytes(&self) -> u64 {
        self.header_bytes + self.payload_bytes + self.tables_bytes()
    }

    /// The size of the fix-up table and the chunk index.
    pub fn tables_bytes(&self) -> u64 {
        8 * self.customs + CHUNK_ENTRY_BYTES * self.chunks
    }
}

/// Bytes of one chunk-index entry.
pub const CHUNK_ENTRY_BYTES: u64 = 16;

/// One chunk-index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Byte offset in the payload of the first block header in the chunk, or
    /// [`NO_BLOCK`].
    pub first: u64,
    /// xxh3-64 of the chunk's bytes.
    pub checksum: u64,
}

/// The fix-up table and the chunk index as stored after the payload; `None` when there
/// is no memory for them.
pub fn encode_tables(customs: &[u64], chunks: &[Chunk]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(8 * customs.len() + CHUNK_ENTRY_BYTES as usize * chunks.len())
        .ok()?;
    for c in customs {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&encode_chunk_index(chunks)?);
    Some(out)
}

/// The chunk index as the tables store it, after the fix-up table; `None` when there is
/// no memory for it.
pub fn encode_chunk_index(chunks: &[Chunk]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(CHUNK_ENTRY_BYTES as usize * chunks.len())
        .ok()?;
    for c in chunks {
        out.extend_from_slice(&c.first.to_le_bytes());
        out.extend_from_slice(&c.checksum.to_le_bytes());
    }
    Some(out)
}

/// The fix-up table and the chunk index from `bytes` (exactly [`Header::tables_bytes`]);
/// `None` when the memory for them cannot be had.
pub fn decode_tables(h: &Header, bytes: &[u8]) -> Option<(Vec<u64>, Vec<Chunk>)> {
    let (table, index) = bytes.split_at(8 * h.customs as usize);
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    let mut customs = Vec::new();
    customs.try_reserve_exact(table.len() / 8).ok()?;
    customs.extend(table.chunks_exact(8).map(word));
    let mut chunks = Vec::new();
    chunks.try_reserve_exact(index.len() / 16).ok()?;
    chunks.extend(index.chunks_exact(16).map(|e| Chunk {
        first: word(&e[..8]),
        checksum: word(&e[8..]),
    }));
    Some((customs, chunks))
}

/// The checksum of the tables after the payload (as [`encode_tables`] stores them).
pub fn tables_checksum(tables: &[u8]) -> u64 {
    xxh3_64(tables)
}

/// The checksum of one chunk of payload: XXH3-64 ([`super::xxh3`]).
pub fn chunk_checksum(chunk: &[u8]) -> u64 {
    super::xxh3::hash64(chunk)
}
