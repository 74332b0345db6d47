//! Images: a deep copy of a value saved to a file, mapped back without deserializing.
//!
//! Three verbs, three passes:
//! - **write** ([`write_with`], [`write_file`]): the traversal copies the value (with
//!   `copy_static`, so the image holds everything its value reaches) straight into a
//!   [`writer::PayloadWriter`], which turns the words into a payload as they come:
//!   pointers made absolute for the address the image is written for, custom operations
//!   replaced by a [`format::CustomKind`], closures and pointers that lead out of the
//!   copy refused, a chunk index with checksums. The file is written through a bounded
//!   buffer to a temporary file renamed over the target ([`file::write_atomically`]).
//! - **check** ([`validate::check`]): before a loaded payload is handed out, its structure
//!   is checked (and its checksum, unless told not to), and its pointers relocated when it
//!   is not at its recorded address.
//! - **fix up** ([`validate::fix_customs`]): the custom blocks get the running program's
//!   operations back.
//!
//! [`load_file`] loads the payload at its recorded address when it is free, and anywhere
//! else otherwise (then relocated): read into private memory by default, so that nothing
//! done to the file afterwards reaches the loaded value, or mapped from the file when
//! asked ([`Options::share`]: pages shared with other processes through the page cache,
//! and the file must then stay as it is). See [`mod@file`].
//! [`load_bytes`] runs the same checks on an image held in memory (tests, fuzzing).
//!
//! Nothing here knows ocaml-rs: the stubs give a [`Process`] (what the running program
//! is) and register the result with the runtime.

/// [`LoadError::Bad`] for the check named by the first argument, its detail formatted
/// from the rest as by `format!`; [`LoadError::OutOfMemory`] when there is no memory for
/// the detail (`format!` would abort).
macro_rules! bad {
    ($check:expr, $($detail:tt)+) => {
        $crate::image::bad_image($check, format_args!($($detail)+))
    };
}

pub mod background;
pub mod file;
pub mod fixups;
pub mod format;
pub mod parallel;
pub mod thread;
pub mod validate;
pub mod writer;
pub mod xxh3;

use std::fmt;
use std::path::Path;

use crate::copy::{Copied, CopyError};
use crate::layout::{self, Word, WORD_BYTES};
use format::HEADER_BYTES;

/// What the running program is, as far as images care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    /// The OCaml major version family: 4 or 5.
    pub ocaml_family: u8,
    /// Whether float arrays are flat.
    pub flat_float_array: bool,
    /// The `struct custom_operations *` of Int32, Int64, Nativeint and Bigarray, in
    /// [`format::CustomKind`] order.
    pub custom_ops: [Word; 4],
}

impl Process {
    fn ocaml5(&self) -> bool {
        self.ocaml_family >= 5
    }
}

/// Why a value could not be written.
#[derive(Debug)]
pub enum WriteError {
    /// The value holds a closure (code pointers belong to one running program).
    Closure,
    /// The value holds a custom block other than Int32, Int64, Nativeint and Bigarray,
    /// whose operations are at this address.
    Custom(Word),
    /// The value holds a pointer outside the OCaml heap (C memory), to this address.
    OutsideHeap(Word),
    /// The key is longer than [`format::MAX_KEY`].
    KeyTooLong(usize),
    /// The file could not be written.
    Io(std::io::Error),
    /// The path is there but is not a regular file (nor a directory).
    NotRegularFile,
    /// No memory for the writer's buffer or the traversal's tables.
    OutOfMemory,
    /// The traversal refused the value (an abstract block, an unforced lazy value, ...).
    NotCopyable(CopyError),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Closure => f.write_str(
                "Offheap.Image.write: closure (functions cannot be saved: their code belongs to the running program)",
            ),
            WriteError::Custom(_) => f.write_str(
                "Offheap.Image.write: custom block (only Int32, Int64, Nativeint and Bigarray custom blocks can be saved)",
            ),
            WriteError::OutsideHeap(v) => write!(
                f,
                "Offheap.Image.write: pointer to {v:#x}, outside the OCaml heap (C memory cannot be saved)"
            ),
            WriteError::KeyTooLong(n) => write!(
                f,
                "Offheap.Image.write: key of {n} bytes (at most {})",
                format::MAX_KEY
            ),
            WriteError::Io(e) => write!(f, "{e}"),
            WriteError::NotRegularFile => write!(f, "{}", file::NotRegularFile),
            WriteError::OutOfMemory => f.write_str("Offheap.Image.write: out of memory"),
            WriteError::NotCopyable(e) => write!(f, "Offheap.Image.write: {}", e.what()),
        }
    }
}

impl std::error::Error for WriteError {}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> WriteError {
        WriteError::Io(e)
    }
}

impl From<file::NotRegularFile> for WriteError {
    fn from(_: file::NotRegularFile) -> WriteError {
        WriteError::NotRegularFile
    }
}

/// Why an image could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file failed a check: which one, and what was found.
    Bad {
        /// The check, as named in the message ("magic", "pointer", ...).
        check: &'static str,
        /// What was found.
        detail: String,
    },
    /// The file could not be read or mapped.
    Io(std::io::Error),
    /// The path is there but is not a regular file.
    NotRegularFile,
    /// No memory for a relocated copy of this many bytes.
    OutOfMemory(usize),
}

impl LoadError {
    /// The check that failed, for a bad image.
    pub fn check(&self) -> Option<&'static str> {
        match self {
            LoadError::Bad { check, .. } => Some(check),
            _ => None,
        }
    }

    /// The kind of check that failed, for a bad image: what the OCaml side's
    /// `Offheap.Image.check` tells programs.
    pub fn check_kind(&self) -> Option<CheckKind> {
        self.check().map(CheckKind::of)
    }
}

/// The kinds of checks an image can fail, in the order of the constructors of
/// `Offheap.Image.check` (`lib/image.mli`), whose doc says what each means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// "magic": not an image at all.
    NotAnImage,
    /// "format version".
    FormatVersion,
    /// "word size".
    WordSize,
    /// "byte order".
    ByteOrder,
    /// "OCaml version": written by the other OCaml family.
    OcamlFamily,
    /// "flat float arrays".
    FlatFloatArrays,
    /// "key": written with another key.
    KeyMismatch,
    /// "file size": the file is shorter or longer than its header says.
    Truncated,
    /// "header checksum", "table checksum": the header page or the tables after the
    /// payload (fix-up table, chunk index) are damaged.
    DamagedHeader,
    /// "header", "root": header fields that contradict each other.
    BadHeader,
    /// "payload checksum".
    DamagedPayload,
    /// Every structural check of the payload ("block header", "pointer", "tag", ...)
    /// and of the chunk index ("chunk index").
    BadStructure,
}

impl CheckKind {
    /// The kind of the check named `check` (as [`LoadError::Bad`] names it).
    pub fn of(check: &str) -> CheckKind {
        match check {
            "magic" => CheckKind::NotAnImage,
            "format version" => CheckKind::FormatVersion,
            "word size" => CheckKind::WordSize,
            "byte order" => CheckKind::ByteOrder,
            "OCaml version" => CheckKind::OcamlFamily,
            "flat float arrays" => CheckKind::FlatFloatArrays,
            "key" => CheckKind::KeyMismatch,
            "file size" => CheckKind::Truncated,
            "header checksum" | "table checksum" => CheckKind::DamagedHeader,
            "header" | "root" => CheckKind::BadHeader,
            "payload checksum" | "padding" => CheckKind::DamagedPayload,
            // "chunk index" and every check of the payload's blocks.
            _ => CheckKind::BadStructure,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Bad { check, detail } => write!(f, "bad image: {check}: {detail}"),
            LoadError::Io(e) => write!(f, "{e}"),
            LoadError::NotRegularFile => write!(f, "{}", file::NotRegularFile),
            LoadError::OutOfMemory(n) => write!(f, "no memory for {n} bytes"),
        }
    }
}

impl std::error::Error for LoadError {}

/// [`LoadError::Bad`] for `check` with `detail` (see the macro `bad!`).
pub fn bad_image(check: &'static str, detail: fmt::Arguments<'_>) -> LoadError {
    match crate::message::try_format(detail) {
        Some(detail) => LoadError::Bad { check, detail },
        None => LoadError::OutOfMemory(0),
    }
}

/// How a key mismatch names a key: quoted, its first [`KEY_SHOWN`] bytes when it is
/// longer (keys go up to 3992 bytes: two whole keys would make a message of pages).
struct KeyShown<'a>(&'a [u8]);

impl fmt::Display for KeyShown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(KEY_SHOWN)];
        f.write_str("\"")?;
        for chunk in shown.utf8_chunks() {
            write!(f, "{}", chunk.valid().escape_debug())?;
            if !chunk.invalid().is_empty() {
                f.write_str("\u{FFFD}")?;
            }
        }
        f.write_str("\"")?;
        if self.0.len() > KEY_SHOWN {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// The bytes of a long key that a message shows.
const KEY_SHOWN: usize = 64;

/// An address for a payload of `bytes` bytes, 2 MiB aligned, at random in
/// [`format::ADDRESS_RANGE`] (the payload ends in it too).
pub fn choose_address(bytes: usize) -> Word {
    const LOW: u64 = format::ADDRESS_RANGE.start;
    const HIGH: u64 = format::ADDRESS_RANGE.end;
    const ALIGN: u64 = 2 << 20;
    let span = (HIGH - LOW).saturating_sub(bytes as u64 + ALIGN) / ALIGN;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 32);
    // splitmix64: enough to spread images of one machine over the range.
    seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (LOW + (z % span.max(1)) * ALIGN) as Word
}

/// The header page of a written payload.
fn header(
    payload: &writer::Payload,
    root: u64,
    address: Word,
    tables_checksum: u64,
    key: &[u8],
    process: &Process,
    chunk_bytes: u64,
) -> Result<[u8; HEADER_BYTES], WriteError> {
    Ok(format::Header {
        version: format::VERSION,
        word_bytes: WORD_BYTES as u8,
        endian: format::NATIVE_ENDIAN,
        ocaml_family: process.ocaml_family,
        flat_float_array: process.flat_float_array,
        header_bytes: payload.payload_at,
        address: address as u64,
        payload_bytes: payload.bytes,
        root,
        blocks: payload.blocks,
        customs: payload.customs.len(),
        checksum: tables_checksum,
        chunk_bytes,
        chunks: payload.chunks.len() as u64,
        key: crate::alloc::try_copy(key).ok_or(WriteError::OutOfMemory)?,
    }
    .encode())
}

/// The root as the header stores it: an immediate, or the offset of a pointer into a
/// payload of `bytes` bytes that is (or will be) at `address`.
fn stored_root(root: Word, address: Word, bytes: u64) -> Result<u64, WriteError> {
    if layout::is_immediate(root) {
        return Ok(root as u64);
    }
    let off = root.wrapping_sub(address) as u64;
    if off == 0 || off > bytes || !off.is_multiple_of(WORD_BYTES as u64) {
        return Err(WriteError::OutsideHeap(root));
    }
    Ok(off)
}

/// Checks the key's length.
fn check_key(key: &[u8]) -> Result<(), WriteError> {
    if key.len() > format::MAX_KEY {
        return Err(WriteError::KeyTooLong(key.len()));
    }
    Ok(())
}

/// The whole image of a copy, in memory (tests and fuzzing), for `address`, with chunks
/// of `chunk_bytes`. The copy is left as it is.
///
/// # Errors
/// [`WriteError::Closure`], [`WriteError::Custom`] (a custom block other than the three
/// boxed integers and Bigarrays) or [`WriteError::OutsideHeap`] (a pointer that leads out
/// of the copy: memory outside the OCaml heap); [`WriteError::KeyTooLong`];
/// [`WriteError::OutOfMemory`].
///
/// # Safety
/// `copied` describes a finished copy whose buffer stays alive during the call.
pub unsafe fn encode_chunked(
    copied: &Copied,
    key: &[u8],
    address: Word,
    chunk_bytes: u64,
    process: &Process,
) -> Result<Vec<u8>, WriteError> {
    check_key(key)?;
    // SAFETY: forwarded.
    let words = unsafe { copy_words(copied) };
    let mut image = vec![0u8; HEADER_BYTES];
    let mut w =
        writer::PayloadWriter::new(&mut image, Some(address), &process.custom_ops, chunk_bytes)?;
    w.feed(words)?;
    let (mut payload, _) = w.finish()?;
    let root = if layout::is_immediate(copied.root) || copied.base.is_null() {
        stored_root(copied.root, address, payload.bytes)?
    } else {
        stored_root(
            copied.root.wrapping_sub(copied.base as Word) + address,
            address,
            payload.bytes,
        )?
    };
    let tables = format::encode_tables(&payload.customs.to_vec()?, &payload.chunks)
        .ok_or(WriteError::OutOfMemory)?;
    let checksum = format::tables_checksum(&tables);
    let head = header(&payload, root, address, checksum, key, process, chunk_bytes)?;
    image[..HEADER_BYTES].copy_from_slice(&head);
    image.extend_from_slice(&tables);
    Ok(image)
}

/// [`encode_chunked`] with the writer's chunk size ([`format::CHUNK_BYTES`]).
///
/// # Errors
/// As [`encode_chunked`].
///
/// # Safety
/// As [`encode_chunked`].
pub unsafe fn encode(
    copied: &Copied,
    key: &[u8],
    address: Word,
    process: &Process,
) -> Result<Vec<u8>, WriteError> {
    // SAFETY: forwarded.
    unsafe { encode_chunked(copied, key, address, format::CHUNK_BYTES, process) }
}

/// The words of a copy.
///
/// # Safety
/// `copied` describes a finished copy whose buffer stays alive while the slice is used.
unsafe fn copy_words(copied: &Copied) -> &[Word] {
    if copied.base.is_null() {
        &[]
    } else {
        // SAFETY: the copy's buffer: `bytes` bytes, word aligned.
        unsafe { std::slice::from_raw_parts(copied.base as *const Word, copied.bytes / WORD_BYTES) }
    }
}

/// Writes an image to `path` (its target when it is a symbolic link) whose payload
/// `fill` hands to the [`writer::PayloadWriter`] it is given (the traversal, as an
/// [`crate::copy::Output`], or [`writer::PayloadWriter::feed`]), returning the root as
/// a value for the payload at the writer's address. The file is written as the payload
/// comes, to a temporary file in the same directory, renamed over `path` once complete
/// ([`file::write_atomically`]); a failure leaves no file behind.
///
/// # Errors
/// `fill`'s error; [`WriteError::Closure`], [`WriteError::Custom`] or
/// [`WriteError::OutsideHeap`] for what an image cannot hold;
/// [`WriteError::KeyTooLong`]; [`WriteError::Io`] when the file cannot be written.
pub fn write_with(
    path: &Path,
    key: &[u8],
    process: &Process,
    fill: impl FnOnce(&mut writer::PayloadWriter<&mut std::fs::File>) -> Result<Word, WriteError>,
) -> Result<(), WriteError> {
    check_key(key)?;
    let mut dir = Some(file::temporary_directory(path)?);
    let mut fill = Some(fill);
    file::write_atomically(path, file::Temporary::Unnamed, |f: &mut std::fs::File| {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::FileExt;
        let fill = fill.take().expect("the file is filled once");
        f.seek(SeekFrom::Start(HEADER_BYTES as u64))
            .map_err(WriteError::Io)?;
        let mut w =
            writer::PayloadWriter::new(&mut *f, None, &process.custom_ops, format::CHUNK_BYTES)?;
        w.writes_a_file(dir.take().expect("the file is filled once"));
        w.writes_in_background();
        let root = fill(&mut w)?;
        let (mut payload, _) = w.finish()?;
        let address = payload.address;
        let root = stored_root(root, address, payload.bytes)?;
        // The tables, after the payload, read back from the writer's scratch files.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut put = |bytes: &[u8]| {
            hasher.update(bytes);
            f.write_all(bytes).map_err(WriteError::Io)
        };
        payload.customs.each_piece(&mut put)?;
        put(&format::encode_chunk_index(&payload.chunks).ok_or(WriteError::OutOfMemory)?)?;
        let head = header(
            &payload,
            root,
            address,
            hasher.digest(),
            key,
            process,
            format::CHUNK_BYTES,
        )?;
        f.write_all_at(&head, 0).map_err(WriteError::Io)
    })
}

/// Writes the image of a copy already made to `path`, as [`write_with`] does. The copy
/// is left as it is.
///
/// # Errors
/// As [`write_with`].
///
/// # Safety
/// `copied` describes a finished copy whose buffer stays alive during the call.
pub unsafe fn write_file(
    path: &Path,
    copied: &Copied,
    key: &[u8],
    process: &Process,
) -> Result<(), WriteError> {
    // SAFETY: forwarded.
    let words = unsafe { copy_words(copied) };
    write_with(path, key, process, |w| {
        w.feed(words)?;
        Ok(
            if layout::is_immediate(copied.root) || copied.base.is_null() {
                copied.root
            } else {
                copied.root.wrapping_sub(copied.base as Word) + w.address()
            },
        )
    })
}

/// How to load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// The key the image must have been written with (empty: no key).
    pub key: Vec<u8>,
    /// Verify the payload's checksum.
    pub verify: bool,
    /// Skip the structural checks when the payload is mapped at its recorded address.
    pub trusted: bool,
    /// Never load at the recorded address (tests and benchmarks of relocation).
    pub relocate: bool,
    /// Map the file instead of reading it (see [`mod@file`]): pages shared with other
    /// processes, and the file must not change while the payload is loaded.
    pub share: bool,
    /// Threads the checks may use: 0 for one per processor the process may run on
    /// ([`thread::available`]).
    pub threads: usize,
}

impl Options {
    /// The threads to use: [`Options::threads`], or one per core.
    fn threads(&self) -> usize {
        match self.threads {
            0 => thread::available(),
            n => n,
        }
    }
}

/// The checks of a decoded header against the process, the options and the file size.
fn check_header(
    h: &format::Header,
    file_bytes: u64,
    opts: &Options,
    process: &Process,
) -> Result<(), LoadError> {
    if h.ocaml_family != process.ocaml_family {
        return Err(bad!(
            "OCaml version",
            "written by OCaml {}, this program runs OCaml {}",
            h.ocaml_family,
            process.ocaml_family
        ));
    }
    if h.flat_float_array != process.flat_float_array {
        return Err(bad!(
            "flat float arrays",
            "written {} flat float arrays, this program has them {}",
            if h.flat_float_array {
                "with"
            } else {
                "without"
            },
            if process.flat_float_array {
                "on"
            } else {
                "off"
            }
        ));
    }
    if h.key != opts.key {
        return Err(bad!(
            "key",
            "the image was written with key {}, the program expects {}",
            KeyShown(&h.key),
            KeyShown(&opts.key)
        ));
    }
    if file_bytes != h.file_bytes() {
        return Err(bad!(
            "file size",
            "{file_bytes} bytes, the header describes {} (truncated or extended file)",
            h.file_bytes()
        ));
    }
    Ok(())
}

/// The fix-up table and the chunk index from their bytes, checked against the header's
/// checksum when `verify`.
fn decode_tables(
    h: &format::Header,
    bytes: &[u8],
    verify: bool,
) -> Result<(Vec<u64>, Vec<format::Chunk>), LoadError> {
    if verify && format::tables_checksum(bytes) != h.checksum {
        return Err(bad!(
            "table checksum",
            "the fix-up table or the chunk index is damaged"
        ));
    }
    format::decode_tables(h, bytes).ok_or(LoadError::OutOfMemory(2 * bytes.len()))
}

/// What [`finish`] found: the root, the offset of the payload's first Bigarray data (see
/// [`validate::fix_customs`]), and the chunks the load left as they are in the file
/// (when asked: see [`validate::Checked::unwritten`]).
struct Finished {
    root: Word,
    data_at: usize,
    unwritten: Vec<bool>,
}

/// The checks and fix-ups of a payload now at `payload.as_ptr()`. `mapped`: the payload
/// is the file mapped (its relocation then writes on one thread); `find_unwritten`: say
/// which chunks stay as in the file.
fn finish(
    payload: &mut [Word],
    h: &format::Header,
    (customs, chunks): &(Vec<u64>, Vec<format::Chunk>),
    at_recorded: bool,
    (mapped, find_unwritten): (bool, bool),
    opts: &Options,
    process: &Process,
) -> Result<Finished, LoadError> {
    let trusted = opts.trusted && at_recorded;
    let threads = if trusted && !opts.verify {
        1
    } else {
        opts.threads()
    };
    let expected = validate::Expected {
        address: h.address as Word,
        root: h.root,
        customs,
        chunks,
        chunk_bytes: h.chunk_bytes as usize,
        blocks: h.blocks,
        ocaml5: process.ocaml5(),
        verify: opts.verify,
        // Asking the system for its cores costs system calls: not for a trusted load.
        threads,
        // Relocating a mapped file copies each page holding pointers at its first
        // write, and the faults of several threads on one mapping contend: one thread
        // relocated a 919 MB image in 0.46 s where two took 0.84 (`make bench-image`).
        pointer_threads: if mapped && !at_recorded { 1 } else { threads },
        find_unwritten,
    };
    let (root, unwritten) = if trusted {
        if opts.verify {
            validate::verify_chunks(payload, &expected)?;
        }
        (validate::trusted_root(payload, h.root)?, Vec::new())
    } else {
        let checked = validate::check(payload, &expected)?;
        (checked.root, checked.unwritten)
    };
    let data_at = validate::fix_customs(payload, customs, &process.custom_ops)?;
    Ok(Finished {
        root,
        data_at,
        unwritten,
    })
}

/// An image checked and relocated in memory of its own.
#[derive(Debug)]
pub struct Decoded {
    /// The payload, relocated to where it is.
    pub words: Vec<Word>,
    /// The root value.
    pub root: Word,
}

/// Checks the image `bytes` as [`load_file`] does (always relocated: `opts.relocate` and
/// `opts.trusted` are ignored) into memory of its own.
///
/// # Errors
/// [`LoadError::Bad`] naming the first check that failed.
pub fn load_bytes(bytes: &[u8], opts: &Options, process: &Process) -> Result<Decoded, LoadError> {
    let h = format::Header::decode(bytes)?;
    check_header(&h, bytes.len() as u64, opts, process)?;
    let payload_at = h.header_bytes as usize;
    if opts.verify {
        check_padding(&bytes[HEADER_BYTES..payload_at], HEADER_BYTES)?;
    }
    let payload_end = payload_at + h.payload_bytes as usize;
    let mut words: Vec<Word> = bytes[payload_at..payload_end]
        .chunks_exact(WORD_BYTES)
        .map(|c| Word::from_ne_bytes(c.try_into().expect("one word")))
        .collect();
    let tables = decode_tables(&h, &bytes[payload_end..], opts.verify)?;
    if words.is_empty() {
        return Ok(Decoded {
            words,
            root: empty_root(&h)?,
        });
    }
    let opts = Options {
        trusted: false,
        ..opts.clone()
    };
    let root = finish(
        &mut words,
        &h,
        &tables,
        false,
        (false, false),
        &opts,
        process,
    )?
    .root;
    Ok(Decoded { words, root })
}

/// Checks that the bytes between the header page and the payload are zeros: damage there
/// changes nothing loaded, but a verified load reports every damaged byte of the file.
/// `padding` starts at byte `at` of the file.
fn check_padding(padding: &[u8], at: usize) -> Result<(), LoadError> {
    // Pieces or'ed together first (vectorised), byte by byte only in a damaged one.
    const PIECE: usize = 4096;
    let damaged = padding
        .chunks(PIECE)
        .position(|piece| piece.iter().fold(0, |or, &b| or | b) != 0);
    let first = damaged.and_then(|k| {
        let from = k * PIECE;
        Some(from + padding[from..].iter().position(|&b| b != 0)?)
    });
    match first {
        None => Ok(()),
        Some(k) => Err(bad!(
            "padding",
            "byte {} (between the header and the payload) is not zero",
            at + k
        )),
    }
}

/// Bytes of the padding [`check_file_padding`] reads at a time.
const PADDING_PIECE: usize = 64 << 10;

/// [`check_padding`] on the bytes of `f` between the header page and `payload_at`, read
/// a piece at a time into one small buffer: reading the 2 MiB at once into a buffer of
/// their size and checking them byte by byte took 2.5-3 ms of a verified load (the
/// kernel's faults on the buffer's fresh pages, and the loop), 0.45 ms this way.
///
/// # Errors
/// As [`check_padding`]; [`LoadError::OutOfMemory`] without memory for the buffer; the
/// file's read errors.
fn check_file_padding(f: &std::fs::File, payload_at: u64) -> Result<(), LoadError> {
    let n = payload_at.saturating_sub(HEADER_BYTES as u64) as usize;
    if n == 0 {
        return Ok(());
    }
    let mut piece = Vec::new();
    let len = n.min(PADDING_PIECE);
    piece
        .try_reserve_exact(len)
        .map_err(|_| LoadError::OutOfMemory(len))?;
    piece.resize(len, 0);
    let mut at = HEADER_BYTES;
    while at < HEADER_BYTES + n {
        let piece = &mut piece[..len.min(HEADER_BYTES + n - at)];
        file::read_exact_at(f, piece, at as u64).map_err(file::load_read_error)?;
        check_padding(piece, at)?;
        at += piece.len();
    }
    Ok(())
}

/// The root of an image with an empty payload: an immediate.
fn empty_root(h: &format::Header) -> Result<Word, LoadError> {
    if !layout::is_immediate(h.root as Word) {
        return Err(bad!("root", "a pointer into an empty payload"));
    }
    Ok(h.root as Word)
}

/// The header of the image at `path`, decoded and checked on its own
/// ([`format::Header::decode`]); nothing past the header page is read, and nothing is
/// mapped.
///
/// # Errors
/// [`LoadError::Io`] when the file cannot be opened or read,
/// [`LoadError::NotRegularFile`], [`LoadError::Bad`] naming the first check that failed.
pub fn read_header(path: &Path) -> Result<format::Header, LoadError> {
    let f = file::open_image(path)?;
    let file_bytes = f.metadata().map_err(LoadError::Io)?.len();
    let mut page = [0u8; HEADER_BYTES];
    let page = &mut page[..HEADER_BYTES.min(file_bytes as usize)];
    file::read_exact_at(&f, page, 0).map_err(file::load_read_error)?;
    format::Header::decode(page)
}

/// A loaded image.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The root value.
    pub root: Word,
    /// Start of the payload in memory; null when the payload is empty.
    pub base: *mut u8,
    /// Payload bytes.
    pub bytes: usize,
    /// Blocks in the payload.
    pub blocks: usize,
    /// Bytes from `base` that the runtime registers (OCaml 4's page table): the payload
    /// up to its first Bigarray data, or all [`Loaded::held`] when it holds none.
    pub blocks_bytes: usize,
    /// How the payload is held; release it with [`file::unmap`] and [`Loaded::held`].
    pub mapping: file::Mapping,
}

impl Loaded {
    /// The bytes held at `base`: the payload and [`file::TAIL_BYTES`] (0 when empty).
    /// What the runtime registers, and what [`file::unmap`] releases.
    pub fn held(&self) -> usize {
        if self.base.is_null() {
            0
        } else {
            self.bytes + file::TAIL_BYTES
        }
    }
}

/// Loads the image at `path` (read, or mapped with `opts.share`) and checks it.
///
/// # Errors
/// [`LoadError::Io`] when the file cannot be read or mapped,
/// [`LoadError::NotRegularFile`] ([`file::open_image`]), [`LoadError::Bad`] naming the
/// first check that failed, [`LoadError::OutOfMemory`]. Nothing stays mapped.
pub fn load_file(path: &Path, opts: &Options, process: &Process) -> Result<Loaded, LoadError> {
    let f = file::open_image(path)?;
    let file_bytes = f.metadata().map_err(LoadError::Io)?.len();
    let mut page = [0u8; HEADER_BYTES];
    let page = &mut page[..HEADER_BYTES.min(file_bytes as usize)];
    file::read_exact_at(&f, page, 0).map_err(file::load_read_error)?;
    let h = format::Header::decode(page)?;
    check_header(&h, file_bytes, opts, process)?;
    let mut tables_raw = Vec::new();
    tables_raw
        .try_reserve_exact(h.tables_bytes() as usize)
        .map_err(|_| LoadError::OutOfMemory(h.tables_bytes() as usize))?;
    tables_raw.resize(h.tables_bytes() as usize, 0);
    file::read_exact_at(&f, &mut tables_raw, h.header_bytes + h.payload_bytes)
        .map_err(file::load_read_error)?;
    let tables = decode_tables(&h, &tables_raw, opts.verify)?;
    if opts.verify {
        check_file_padding(&f, h.header_bytes)?;
    }
    let bytes = h.payload_bytes as usize;
    if bytes == 0 {
        return Ok(Loaded {
            root: empty_root(&h)?,
            base: std::ptr::null_mut(),
            bytes: 0,
            blocks: 0,
            blocks_bytes: 0,
            mapping: file::Mapping::None,
        });
    }
    let reads_all = opts.verify || !opts.trusted;
    let (base, mapping, mapped) = file::load_payload(
        &f,
        bytes,
        h.address as Word,
        &file::How {
            payload_at: h.header_bytes,
            relocate: opts.relocate,
            share: opts.share,
            read_if_relocated: holds_pointers_everywhere(&h),
            reads_all,
            // Asking the system for its cores costs system calls: not for a trusted
            // shared load, which maps the file without reading it.
            threads: if opts.share && !reads_all {
                1
            } else {
                opts.threads()
            },
        },
    )?;
    let at_recorded = mapping == file::Mapping::Recorded;
    // A shared load that read its payload: what it did not write is mapped back.
    let share_back = opts.share && !mapped;
    // SAFETY: `load_payload` gave `bytes` bytes at `base`, word aligned, readable and
    // writable, private to this process, not yet shared with anything.
    let payload = unsafe { std::slice::from_raw_parts_mut(base as *mut Word, bytes / WORD_BYTES) };
    let finished = finish(
        payload,
        &h,
        &tables,
        at_recorded,
        (mapped, share_back),
        opts,
        process,
    )
    .and_then(|done| {
        if share_back {
            // SAFETY: the payload just loaded from `f`, checked, used by nothing yet.
            unsafe {
                file::map_unwritten(
                    &f,
                    h.header_bytes,
                    base,
                    bytes,
                    h.chunk_bytes as usize,
                    &done.unwritten,
                )
            }
            .map_err(LoadError::Io)?;
        }
        Ok(done)
    });
    match finished {
        Ok(Finished { root, data_at, .. }) => Ok(Loaded {
            root,
            base,
            bytes,
            blocks: h.blocks as usize,
            blocks_bytes: if data_at < bytes {
                data_at
            } else {
                bytes + file::TAIL_BYTES
            },
            mapping,
        }),
        Err(e) => {
            // SAFETY: the payload just loaded; nothing refers to it.
            unsafe { file::unmap(base, bytes + file::TAIL_BYTES, mapping) };
            Err(e)
        }
    }
}

/// The average block, in bytes, below which a payload is taken to hold pointers on
/// nearly every page (the value of `make bench-image`: 75 bytes; a Bigarray's image
/// with its index: some 9 KiB). A copy-on-write fault costs some 150 ns a KiB of the
/// pages holding pointers, a read some 120 ns a KiB of the whole payload: reading pays
/// only when nearly all pages hold pointers, which an average of a few words a block
/// says (half the bytes in large raw blocks doubles the average).
const DENSE_BLOCK_BYTES: u64 = 128;

/// Whether the payload of `h` holds pointers on nearly every page, as far as its size
/// and block count tell: then relocating it in a mapping would copy nearly every page
/// one copy-on-write fault at a time (0.21 s for the 919 MB value of `make
/// bench-image`), where reading it into huge pages and mapping back the chunks that
/// hold only raw blocks costs about what a read load does (0.11 s).
fn holds_pointers_everywhere(h: &format::Header) -> bool {
    h.blocks > 0 && h.payload_bytes / h.blocks < DENSE_BLOCK_BYTES
}
