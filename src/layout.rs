//! The OCaml block layout, in one place.
//!
//! Every fact about how the OCaml runtime lays out a value in memory that offheap relies
//! on is named here, and nothing else in the crate re-derives it. The facts hold for
//! OCaml 4.13 and 5.x on 64-bit targets (see `shared/OCAML-RUNTIME.md`):
//!
//! - A value is a word. Its low bit set means an immediate (an `int`, a constant
//!   constructor); clear means a pointer to the first field of a block.
//! - The word before the first field is the header: `wosize << 10 | color << 8 | tag`.
//! - Blocks with a tag below [`NO_SCAN_TAG`] hold values in every field, except closures,
//!   whose fields before the start of the environment are code pointers, closure-info words
//!   and infix headers. Blocks with a tag at or above [`NO_SCAN_TAG`] hold raw bytes.
//! - An [`INFIX_TAG`] header sits inside a closure block that defines several functions;
//!   its wosize is the distance in words back to the start of the enclosing closure.
//! - A [`CUSTOM_TAG`] block's first field points to its `struct custom_operations`.
//! - Strings pad their last word; its last byte is `bytes_in_word - 1 - padding`.

/// One OCaml word: a value, a header or a raw field.
pub type Word = usize;

/// Bytes in a word. offheap supports 64-bit targets only.
pub const WORD_BYTES: usize = std::mem::size_of::<Word>();

const _: () = assert!(WORD_BYTES == 8, "offheap supports 64-bit targets only");

/// Tags from here up mark blocks whose fields the GC does not scan.
pub const NO_SCAN_TAG: u8 = 251;
/// OCaml 5: a lazy value being forced by some domain.
pub const FORCING_TAG: u8 = 244;
/// OCaml 5: a continuation (effect handlers); owns a fiber stack.
pub const CONT_TAG: u8 = 245;
/// An unforced lazy value: a thunk still to run.
pub const LAZY_TAG: u8 = 246;
/// A closure: code pointers, closure info, then the environment.
pub const CLOSURE_TAG: u8 = 247;
/// An object (field 0 its class, field 1 its id), or an exception constructor.
pub const OBJECT_TAG: u8 = 248;
/// The header of a function inside a closure block with several functions.
pub const INFIX_TAG: u8 = 249;
/// A forced lazy value that the GC has not short-circuited yet.
pub const FORWARD_TAG: u8 = 250;
/// A block the runtime must not look into (C data).
pub const ABSTRACT_TAG: u8 = 251;
/// A string or bytes.
pub const STRING_TAG: u8 = 252;
/// A boxed float.
pub const DOUBLE_TAG: u8 = 253;
/// A flat float array (or a record of floats).
pub const DOUBLE_ARRAY_TAG: u8 = 254;
/// A custom block: field 0 points to its `struct custom_operations`.
pub const CUSTOM_TAG: u8 = 255;

const TAG_MASK: Word = 0xff;
const COLOR_SHIFT: u32 = 8;
const COLOR_MASK: Word = 3 << COLOR_SHIFT;
const WOSIZE_SHIFT: u32 = 10;

/// The largest wosize a header can hold (54 bits).
pub const MAX_WOSIZE: usize = Word::MAX >> WOSIZE_SHIFT;

/// The two color bits of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Color {
    /// 0: white on OCaml 4; on OCaml 5 one of the three rotating GC colors.
    C0 = 0,
    /// 1: gray on OCaml 4; on OCaml 5 one of the three rotating GC colors.
    C1 = 1,
    /// 2: blue (free-list block) on OCaml 4; on OCaml 5 one of the rotating colors.
    C2 = 2,
    /// 3: black on OCaml 4, `NOT_MARKABLE` on OCaml 5. No GC ever marks, scans or
    /// rewrites a block outside the heap with this color; every copy carries it.
    Unmarkable = 3,
}

/// A header word, decoded on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Header(pub Word);

impl Header {
    /// The header of a block of `wosize` fields with this `color` and `tag`.
    #[inline(always)]
    pub const fn new(wosize: usize, color: Color, tag: u8) -> Header {
        Header((wosize << WOSIZE_SHIFT) | ((color as Word) << COLOR_SHIFT) | tag as Word)
    }

    /// Number of fields (words) after the header.
    #[inline(always)]
    pub const fn wosize(self) -> usize {
        self.0 >> WOSIZE_SHIFT
    }

    /// Size of the block in words, header included.
    #[inline(always)]
    pub const fn whsize(self) -> usize {
        self.wosize() + 1
    }

    /// The tag.
    #[inline(always)]
    pub const fn tag(self) -> u8 {
        (self.0 & TAG_MASK) as u8
    }

    /// The color bits.
    #[inline(always)]
    pub const fn color(self) -> Color {
        match (self.0 & COLOR_MASK) >> COLOR_SHIFT {
            0 => Color::C0,
            1 => Color::C1,
            2 => Color::C2,
            _ => Color::Unmarkable,
        }
    }

    /// The same header with another color.
    #[inline(always)]
    pub const fn with_color(self, color: Color) -> Header {
        Header((self.0 & !COLOR_MASK) | ((color as Word) << COLOR_SHIFT))
    }

    /// The same header with another tag.
    #[inline(always)]
    pub const fn with_tag(self, tag: u8) -> Header {
        Header((self.0 & !TAG_MASK) | tag as Word)
    }

    /// Whether the fields hold OCaml values (tag below [`NO_SCAN_TAG`]).
    #[inline(always)]
    pub const fn is_scannable(self) -> bool {
        self.tag() < NO_SCAN_TAG
    }
}

/// The bytes of `words`, in memory order (what a file of them holds).
pub fn words_as_bytes(words: &[Word]) -> &[u8] {
    // SAFETY: the same memory, read as bytes: any byte pattern is a valid u8, and u8's
    // alignment is 1.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, std::mem::size_of_val(words)) }
}

/// Whether `v` is an immediate (low bit set) rather than a pointer.
#[inline(always)]
pub const fn is_immediate(v: Word) -> bool {
    v & 1 == 1
}

/// The OCaml value of the integer `n`.
#[inline(always)]
pub const fn val_int(n: isize) -> Word {
    ((n << 1) | 1) as Word
}

/// Address of the header of the block whose first field is at `v`.
#[inline(always)]
pub const fn header_addr(v: Word) -> *mut Word {
    (v - WORD_BYTES) as *mut Word
}

/// Reads the header of block `v`.
///
/// # Safety
/// `v` must point to the first field of a readable block.
#[inline(always)]
pub unsafe fn read_header(v: Word) -> Header {
    // SAFETY: the caller guarantees a header word precedes `v`.
    Header(unsafe { header_addr(v).read() })
}

/// Reads the header of the block that `v` points into: the header in front of `v`, or,
/// when that is an infix header (`v` is a function of a closure block that defines
/// several), the enclosing closure's. A block's color is in its own header only: an
/// infix header's color bits are whatever the compiler wrote (not `3` in OCaml 5's
/// static closures, nor in copies of closures).
///
/// # Safety
/// `v` must point to the first field of a readable block, or be an infix pointer into
/// one.
#[inline(always)]
pub unsafe fn read_enclosing_header(v: Word) -> Header {
    // SAFETY: the caller guarantees a header word precedes `v`.
    let hd = unsafe { read_header(v) };
    if hd.tag() == INFIX_TAG {
        // SAFETY: an infix header's wosize leads back to its closure's first field,
        // whose header precedes it.
        unsafe { read_header(v - infix_offset_bytes(hd)) }
    } else {
        hd
    }
}

/// Overwrites the header of block `v`.
///
/// # Safety
/// `v` must point to the first field of a writable block.
#[inline(always)]
pub unsafe fn write_header(v: Word, hd: Header) {
    // SAFETY: the caller guarantees a writable header word precedes `v`.
    unsafe { header_addr(v).write(hd.0) }
}

/// Closure-info word (field 1 of every function in a closure block): the index of the
/// first environment field. Fields before it are code pointers, closure-info words and
/// infix headers; fields from it on are OCaml values.
///
/// `closinfo = arity << 56 | start_env << 1 | 1` (OCaml 4.12 and later).
#[inline(always)]
pub const fn start_env(closinfo: Word) -> usize {
    (closinfo << 8) >> 9
}

/// The closure-info word for a function of `arity` whose environment starts at field
/// `start_env`.
pub const fn make_closinfo(arity: u8, start_env: usize) -> Word {
    ((arity as Word) << 56) | (start_env << 1) | 1
}

/// For an infix header: the distance in bytes from the enclosing closure's first field
/// to the infix pointer.
#[inline(always)]
pub const fn infix_offset_bytes(hd: Header) -> usize {
    hd.wosize() * WORD_BYTES
}

/// The length in bytes of a string block with header `hd` whose last byte is `last_byte`.
pub const fn string_length(hd: Header, last_byte: u8) -> usize {
    hd.wosize() * WORD_BYTES - 1 - last_byte as usize
}

/// The fewest fields a block of `tag` has for the runtime to stay inside it when it reads
/// the block's contents (`None`: any size, the runtime reads `Wosize` fields). What reads
/// fields by tag (OCaml 4.13 and 5.3, `runtime/compare.c` `do_compare_val`,
/// `runtime/hash.c` `caml_hash`, `runtime/extern.c` `extern_rec`):
/// - [`OBJECT_TAG`]: compare and hash read the object id `Oid_val(v)`, field 1: 2 fields;
/// - [`FORWARD_TAG`]: compare, hash and Marshal follow `Forward_val(v)`, field 0: 1 field;
/// - [`DOUBLE_TAG`]: `Double_val(v)`, one word: 1 field (and no more);
/// - [`STRING_TAG`]: `caml_string_length` reads the last byte of the last field: 1 field;
/// - [`CLOSURE_TAG`]: a code pointer and `Closinfo_val(v)`, field 1: 2 fields;
/// - [`LAZY_TAG`]: the thunk: 1 field;
/// - [`CUSTOM_TAG`]: `Custom_ops_val(v)`, field 0, then the payload the operations read
///   (8 bytes for `Int32`, `Int64` and `Nativeint` on 64-bit targets): 2 fields.
pub const fn min_wosize(tag: u8) -> Option<usize> {
    match tag {
        OBJECT_TAG | CLOSURE_TAG | CUSTOM_TAG => Some(2),
        FORWARD_TAG | DOUBLE_TAG | STRING_TAG | LAZY_TAG => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_fields() {
        let hd = Header::new(300, Color::C1, CLOSURE_TAG);
        assert_eq!(hd.wosize(), 300);
        assert_eq!(hd.whsize(), 301);
        assert_eq!(hd.tag(), CLOSURE_TAG);
        assert_eq!(hd.color(), Color::C1);
        assert_eq!(hd.with_color(Color::Unmarkable).color(), Color::Unmarkable);
        assert_eq!(hd.with_color(Color::Unmarkable).wosize(), 300);
        assert_eq!(Header::new(MAX_WOSIZE, Color::C0, 0).wosize(), MAX_WOSIZE);
    }

    #[test]
    fn closinfo_start_env() {
        assert_eq!(start_env(make_closinfo(3, 2)), 2);
        assert_eq!(start_env(make_closinfo(0, 5)), 5);
        assert_eq!(start_env(make_closinfo(255, 1 << 40)), 1 << 40);
    }

    #[test]
    fn string_length_from_padding() {
        // "abc": one word, padding bytes 0,0,0,0 then last byte 4.
        assert_eq!(string_length(Header::new(1, Color::C0, STRING_TAG), 4), 3);
        // 8 bytes: two words, the second all padding, last byte 7.
        assert_eq!(string_length(Header::new(2, Color::C0, STRING_TAG), 7), 8);
    }
}
