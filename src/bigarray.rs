//! Bigarrays: what offheap knows of the runtime's `struct caml_ba_array`.
//!
//! Facts checked against `caml/bigarray.h` and `runtime/bigarray.c` of OCaml 4.13.1
//! (Debian bookworm, `/usr/lib/ocaml/caml/bigarray.h`) and 5.3.0 (the trixie chroot,
//! `/usr/lib/x86_64-linux-gnu/ocaml/5.3.0/caml/bigarray.h`), and ocaml/ocaml's
//! `runtime/bigarray.c` and `otherlibs/unix/mmap_ba.c`:
//! - A Bigarray is a custom block; field 0 is its operations, then
//!   `struct caml_ba_array { void *data; intnat num_dims; intnat flags;
//!   struct caml_ba_proxy *proxy; intnat dim[]; }`, so fields 1..=4 and the dimensions
//!   from field 5 on. `caml_ba_alloc` allocates it with `caml_alloc_custom_mem(&caml_ba_ops,
//!   SIZEOF_BA_ARRAY + num_dims * sizeof(intnat), ...)`: exactly `5 + num_dims` fields.
//!   `caml_ba_serialize` asserts `SIZEOF_BA_ARRAY == 4 * sizeof(value)` on both.
//! - `num_dims <= CAML_BA_MAX_NUM_DIMS` (16); dimensions are never negative
//!   (`caml_ba_create`, `caml_ba_reshape` refuse them).
//! - `flags` = kind (`CAML_BA_KIND_MASK` 0xFF) | layout (`CAML_BA_FORTRAN_LAYOUT` 0x100) |
//!   managed (`CAML_BA_EXTERNAL` 0, `CAML_BA_MANAGED` 0x200, `CAML_BA_MAPPED_FILE` 0x400;
//!   mask 0x600; both bits in a view of a mapped array with NULL data, see [`read`]) |
//!   on 5.x `CAML_BA_SUBARRAY` 0x800 (set by `sub` and `slice`).
//! - Kinds 0..=12 on 4.13 (`FLOAT32` .. `CHAR`), 0..=13 on 5.3 (`FLOAT16` = 13, added in
//!   5.2); element sizes `caml_ba_element_size[]`: 4 8 1 1 2 2 4 8 word word 8 16 1 (2).
//! - `data` points to the first element of this array (a sub-array's own start, inside
//!   its parent's data); the array's bytes are the product of the dimensions times the
//!   element size (`caml_ba_byte_size`). `proxy` only counts references for the
//!   finaliser; `caml_ba_update_proxy` does nothing for an `EXTERNAL` array, so `sub`,
//!   `slice`, `reshape` and `change_layout` of an external array share its data with no
//!   proxy, and `caml_ba_finalize` does nothing for one.
//! - `caml_ba_ops` (identifier `"_bigarr02"`) is exported by both runtimes. Mapped files
//!   (`Unix.map_file`) use a `static` table of the unix library (identifier
//!   `"_bigarray"`) that differs only in its finaliser; `sub` and `slice` copy the
//!   operations of their source (PR#8568). So a Bigarray is recognised by its
//!   comparison, hash and serialisation functions (`caml_ba_compare`, `caml_ba_hash`,
//!   `caml_ba_serialize`, all exported): what the finaliser does with the source's data
//!   does not matter, since the copy has data of its own.

use crate::layout::{Word, WORD_BYTES};

/// `CAML_BA_MAX_NUM_DIMS`.
pub const MAX_NUM_DIMS: usize = 16;
/// `CAML_BA_KIND_MASK`.
pub const KIND_MASK: Word = 0xFF;
/// `CAML_BA_LAYOUT_MASK` (`CAML_BA_FORTRAN_LAYOUT`).
pub const LAYOUT_MASK: Word = 0x100;
/// `CAML_BA_MANAGED_MASK`; `CAML_BA_EXTERNAL` is 0 in it.
pub const MANAGED_MASK: Word = 0x600;
/// `CAML_BA_MANAGED`.
pub const MANAGED: Word = 0x200;
/// `CAML_BA_MAPPED_FILE`.
pub const MAPPED_FILE: Word = 0x400;
/// `CAML_BA_SUBARRAY` (OCaml 5 only).
pub const SUBARRAY: Word = 0x800;

/// Field of the custom block holding `data` (field 0 is the operations).
pub const DATA_FIELD: usize = 1;
/// Field holding `num_dims`.
pub const NUM_DIMS_FIELD: usize = 2;
/// Field holding `flags`.
pub const FLAGS_FIELD: usize = 3;
/// Field holding `proxy`.
pub const PROXY_FIELD: usize = 4;
/// Field of the first dimension.
pub const DIM_FIELD: usize = 5;

/// Element sizes by kind (`caml_ba_element_size[]`); OCaml 4 knows the first 13.
const ELEMENT_BYTES: [usize; 14] = [4, 8, 1, 1, 2, 2, 4, 8, WORD_BYTES, WORD_BYTES, 8, 16, 1, 2];

/// The bytes of one element of `kind`, if the runtime family knows that kind.
pub fn element_bytes(kind: Word, ocaml5: bool) -> Option<usize> {
    let known = if ocaml5 { 14 } else { 13 };
    (kind < known).then(|| ELEMENT_BYTES[kind])
}

/// The wosize of the custom block of a Bigarray of `num_dims` dimensions.
pub fn wosize(num_dims: usize) -> usize {
    DIM_FIELD + num_dims
}

/// What a Bigarray's custom block says about its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    /// The `data` pointer.
    pub start: Word,
    /// The array's bytes: product of the dimensions times the element size.
    pub bytes: usize,
    /// The `flags` word.
    pub flags: Word,
}

/// What is wrong with a custom block that has a Bigarray's operations but that the
/// runtime could not have made. Formatted only when shown, so that reporting it never
/// allocates (it may be reported when memory has run out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadBigarray {
    /// Fewer fields than the fixed part of `struct caml_ba_array`.
    TooFewFields(usize),
    /// More dimensions than `CAML_BA_MAX_NUM_DIMS`.
    TooManyDims(usize),
    /// A block whose size is not that of its number of dimensions.
    BlockSize {
        /// The number of dimensions.
        num_dims: usize,
        /// The fields of the block.
        fields: usize,
    },
    /// Flags outside the kind, layout, managed (and on OCaml 5 sub-array) bits.
    Flags(Word),
    /// A kind the runtime family does not know.
    Kind(Word),
    /// A negative dimension.
    Dimension(isize),
    /// More bytes than the address space holds.
    TooLarge,
    /// Data that runs past the end of the address space.
    WrapsAround,
}

impl std::fmt::Display for BadBigarray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            BadBigarray::TooFewFields(n) => write!(f, "a Bigarray block of {n} fields"),
            BadBigarray::TooManyDims(n) => write!(f, "a Bigarray of {n} dimensions"),
            BadBigarray::BlockSize { num_dims, fields } => write!(
                f,
                "a Bigarray of {num_dims} dimensions in a block of {fields} fields"
            ),
            BadBigarray::Flags(flags) => write!(f, "a Bigarray with flags {flags:#x}"),
            BadBigarray::Kind(kind) => write!(f, "a Bigarray of kind {kind}"),
            BadBigarray::Dimension(dim) => write!(f, "a Bigarray dimension of {dim}"),
            BadBigarray::TooLarge => f.write_str("a Bigarray larger than the address space"),
            BadBigarray::WrapsAround => {
                f.write_str("a Bigarray whose data wraps around the address space")
            }
        }
    }
}

/// Reads the Bigarray whose custom block has the fields `fields` (operations first):
/// checks the block's size, the number of dimensions, the flags and the dimensions, and
/// gives the data's extent.
///
/// # Errors
/// What is wrong.
pub fn read(fields: &[Word], ocaml5: bool) -> Result<Data, BadBigarray> {
    if fields.len() < DIM_FIELD {
        return Err(BadBigarray::TooFewFields(fields.len()));
    }
    let num_dims = fields[NUM_DIMS_FIELD];
    if num_dims > MAX_NUM_DIMS {
        return Err(BadBigarray::TooManyDims(num_dims));
    }
    if fields.len() != wosize(num_dims) {
        return Err(BadBigarray::BlockSize {
            num_dims,
            fields: fields.len(),
        });
    }
    let flags = fields[FLAGS_FIELD];
    let extra = if ocaml5 { SUBARRAY } else { 0 };
    // Both managed bits together are not refused: the runtime makes them. A view
    // (`sub`, `slice`) of an array whose data pointer is NULL (a file mapped with no
    // data: `Unix.map_file` of an empty file) gives `caml_ba_alloc` NULL data, which it
    // takes for "allocate a buffer": it mallocs 0 bytes and adds `CAML_BA_MANAGED` to the
    // source's `CAML_BA_MAPPED_FILE` (4.13 and 5.3). The copy's data is external anyway.
    if flags & !(KIND_MASK | LAYOUT_MASK | MANAGED_MASK | extra) != 0 {
        return Err(BadBigarray::Flags(flags));
    }
    let Some(mut bytes) = element_bytes(flags & KIND_MASK, ocaml5) else {
        return Err(BadBigarray::Kind(flags & KIND_MASK));
    };
    let dims = &fields[DIM_FIELD..];
    if let Some(&dim) = dims.iter().find(|&&dim| (dim as isize) < 0) {
        return Err(BadBigarray::Dimension(dim as isize));
    }
    // A dimension of 0 makes an empty array whatever the others are (the runtime makes
    // `[|1 lsl 60; 0|]`): the product is taken only when none is 0.
    if dims.contains(&0) {
        bytes = 0;
    }
    for &dim in dims {
        bytes = bytes
            .checked_mul(dim)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or(BadBigarray::TooLarge)?;
    }
    if fields[DATA_FIELD].checked_add(bytes).is_none() {
        return Err(BadBigarray::WrapsAround);
    }
    Ok(Data {
        start: fields[DATA_FIELD],
        bytes,
        flags,
    })
}

/// The flags of a copy: the same kind, layout and sub-array bit, data `EXTERNAL`, so that
/// nothing but the copy's owner ever frees it (`caml_ba_finalize` and
/// `caml_ba_update_proxy` do nothing for an external array).
pub fn copy_flags(flags: Word) -> Word {
    flags & !MANAGED_MASK
}
