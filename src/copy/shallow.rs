//! The shallowest values: a raw block (a string, a float, a float array, a boxed
//! integer), or a block of at most [`MAX_FIELDS`] fields whose pointers to copy all lead
//! to raw blocks: a record of a string, a float and integers, a pair of strings, a
//! `Some` of a string. Most entries that a cache copies one at a time, and most region
//! adds, have this shape.
//!
//! Their copy needs none of the walk's machinery ([`super::small`]): the root's fields
//! are read once into an array on the stack, the header of each block they lead to once,
//! and the copy is written straight to the [`Output`], laid out as the walk and the
//! general traversal lay it out (the root, then the blocks its fields lead to in the
//! order of the fields, each once). A field that leads to a scannable block, or to a
//! block the walk would not take (an abstract or foreign custom block, an infix
//! pointer), ends the attempt having written nothing: the walk then copies the value
//! from its root, and the attempt cost the reading of a few fields (a list cell: its
//! tail's header).
//!
//! Each field and header is read once, as the walk reads them, so the copy is well formed
//! even when other domains write to the source. A copy made here leaves the walk's counts
//! of copies (where the thread's next copies start) as they are.

use std::mem::MaybeUninit;

use super::small::{self, Found};
use super::{read_field, Heap, Measured, Output, Written};
use crate::copy::CopyError;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

/// The most fields of a root this path copies.
pub const MAX_FIELDS: usize = 8;
/// A field's mark, between the two steps of [`Shape::discover`], that it leads to a block
/// to copy.
const LAY_OUT: u8 = u8::MAX;
/// The most words (headers included) of a copy this path makes: the stack's limit of
/// the walk ([`small::MAX_WORDS`]), so that both take the same values.
const MAX_WORDS: usize = small::MAX_WORDS;

/// Copies `root`, a pointer to a block that `heap` says to copy, into `out` when the
/// value has the shape of this path; `None` when it does not (then nothing was written
/// to `out` or to the source).
///
/// # Errors
/// [`Output::begin`]'s; nothing was written then.
///
/// # Safety
/// As [`super::copy_into`]: `root` and the blocks it reaches are well formed; others may
/// write to fields of its scannable blocks only as `read_field` (in `copy`) allows.
#[inline(always)]
pub unsafe fn copy_into<H: Heap, O: Output>(
    root: Word,
    heap: &mut H,
    out: &mut O,
) -> Option<Result<Written, CopyError>> {
    let mut slot = MaybeUninit::uninit();
    let shape = Shape::in_place(&mut slot);
    // SAFETY: forwarded.
    if !unsafe { shape.discover(root, heap) } {
        return None;
    }
    crate::fault::point("measure");
    // SAFETY: the raw blocks of `shape` are blocks of the source, read once here.
    Some(unsafe { shape.write(out) })
}

/// What a copy of `root` takes when the value has the shape of this path (as
/// [`super::measure`] answers); `None` when it does not.
///
/// # Safety
/// As [`copy_into`].
pub unsafe fn measure<H: Heap>(root: Word, heap: &mut H) -> Option<Measured> {
    let mut slot = MaybeUninit::uninit();
    let shape = Shape::in_place(&mut slot);
    // SAFETY: forwarded.
    if !unsafe { shape.discover(root, heap) } {
        return None;
    }
    Some(Measured {
        bytes: shape.len * WORD_BYTES,
        blocks: shape.count,
        transient_bytes: 0,
    })
}

/// A value of this path's shape, as read: its blocks and the root's fields. Every array
/// is uninitialised beyond what was read, so that a value this path does not take costs
/// only what it read (a list: its first cell's fields and its tail's header).
struct Shape {
    /// The root, at offset 0, then the blocks its fields lead to; `found[..count]` are
    /// initialised.
    found: [MaybeUninit<Found>; MAX_FIELDS + 1],
    count: usize,
    /// The root's fields as read, each with the index (plus one) of the found block it
    /// leads to, or 0 (`LAY_OUT` while [`Shape::discover`] runs); `fields[..n]` are
    /// initialised.
    fields: [MaybeUninit<(Word, u8)>; MAX_FIELDS],
    n: usize,
    /// Words of the copy, headers included.
    len: usize,
}

impl Shape {
    /// A shape with nothing read yet, made in `slot`: only its counts are written, its
    /// arrays stay uninitialised and it is never moved (returned by value, it cost a
    /// `memcpy` of its 400 bytes; made from a constant, a `memset`).
    #[inline(always)]
    fn in_place(slot: &mut MaybeUninit<Shape>) -> &mut Shape {
        let p = slot.as_mut_ptr();
        // SAFETY: `p` is valid for writes; the counts are written here and the arrays
        // hold `MaybeUninit` elements, valid uninitialised: the shape is then
        // initialised.
        unsafe {
            std::ptr::addr_of_mut!((*p).count).write(0);
            std::ptr::addr_of_mut!((*p).n).write(0);
            std::ptr::addr_of_mut!((*p).len).write(0);
            slot.assume_init_mut()
        }
    }

    /// Reads the value at `root` into this empty shape: whether it has this path's
    /// shape. Each field of the root and each header is read once.
    ///
    /// # Safety
    /// As [`copy_into`].
    #[inline(always)]
    unsafe fn discover<H: Heap>(&mut self, root: Word, heap: &mut H) -> bool {
        // SAFETY: `root` points to a block of the source.
        let hd = unsafe { layout::read_header(root) };
        let n = hd.wosize();
        let shape = self;
        shape.count = 1;
        shape.len = 1 + n;
        shape.found[0].write(Found {
            block: root,
            header: hd,
            at: 0,
        });
        if !hd.is_scannable() {
            // A raw root, copied as it is.
            // SAFETY: forwarded.
            return n < MAX_WORDS && unsafe { takes_raw(heap, root, hd) };
        }
        if n > MAX_FIELDS || hd.tag() >= layout::FORCING_TAG {
            // Closures, lazy values, objects, forwarded blocks: the walk's.
            return false;
        }
        // First each field, and the header of each block it leads to, the last field
        // first: a value this path does not take (a field that leads to a scannable
        // block) is told before any layout work, and mostly at once (lists, options and
        // nested records tend to come after a record's names and numbers), so that the
        // walk, which then starts over, is not paid twice for it (a record of 7 strings
        // and a list cost 28% more than the walk alone when each string was laid out
        // before the list was found).
        let mut heads = [const { MaybeUninit::<Header>::uninit() }; MAX_FIELDS];
        for i in (0..n).rev() {
            // SAFETY: `i < n`, a field of the root.
            let v = unsafe { read_field((root as *const Word).add(i)) };
            let mut copied = false;
            if !layout::is_immediate(v) && heap.should_copy(v) {
                copied = true;
                if v != root {
                    // SAFETY: a pointer read from a block of the source graph.
                    let child = unsafe { layout::read_header(v) };
                    // SAFETY: `v` points to a block with header `child`.
                    if child.is_scannable() || !unsafe { takes_raw(heap, v, child) } {
                        return false;
                    }
                    heads[i].write(child);
                }
            }
            // `LAY_OUT` for a field to lay out below, 0 for one kept as read.
            shape.fields[i].write((v, if copied { LAY_OUT } else { 0 }));
        }
        // Then the layout: each block once, in the order of the fields that lead to it.
        for (slot, head) in shape.fields.iter_mut().zip(&heads).take(n) {
            // SAFETY: `fields[..n]` were written above.
            let (v, leads_to) = unsafe { slot.assume_init_mut() };
            if *leads_to == 0 {
                continue;
            }
            let found = &mut shape.found;
            // SAFETY: `found[..count]` are initialised.
            let seen =
                (0..shape.count).position(|j| unsafe { found[j].assume_init_ref() }.block == *v);
            let j = match seen {
                Some(j) => j,
                None => {
                    // SAFETY: every field that leads to a block other than the root (found
                    // first) had its header read above.
                    let child = unsafe { head.assume_init() };
                    let m = child.wosize();
                    if m >= MAX_WORDS - shape.len {
                        return false;
                    }
                    found[shape.count].write(Found {
                        block: *v,
                        header: child,
                        at: shape.len,
                    });
                    shape.count += 1;
                    shape.len += 1 + m;
                    shape.count - 1
                }
            };
            // At most `MAX_FIELDS + 1` blocks: fits a `u8`.
            *leads_to = j as u8 + 1;
        }
        shape.n = n;
        true
    }

    /// Writes the copy to `out`: the found blocks' headers, the root's fields (pointers
    /// to found blocks translated), the raw blocks' fields read from the source now.
    ///
    /// # Errors
    /// [`Output::begin`]'s; nothing was written then.
    ///
    /// # Safety
    /// The raw blocks found are blocks of the source, readable for their size.
    #[inline(always)]
    unsafe fn write<O: Output>(&self, out: &mut O) -> Result<Written, CopyError> {
        // SAFETY: `found[..count]` and `fields[..n]` are initialised (`discover`).
        let (found, fields) = unsafe {
            (
                std::slice::from_raw_parts(self.found.as_ptr().cast::<Found>(), self.count),
                std::slice::from_raw_parts(self.fields.as_ptr().cast::<(Word, u8)>(), self.n),
            )
        };
        let bytes = self.len * WORD_BYTES;
        let base = out.begin(bytes)?;
        crate::fault::point("write");
        let dst = out.next(self.len);
        for (i, &(v, leads_to)) in fields.iter().enumerate() {
            let word = match leads_to {
                0 => v,
                j => base + (found[j as usize - 1].at + 1) * WORD_BYTES,
            };
            // SAFETY: field `i` of the root, word `1 + i < len` of the run.
            unsafe { dst.add(1 + i).write(word) };
        }
        for f in found {
            // SAFETY: the block's header and fields lie within the `len` words of the run.
            unsafe {
                dst.add(f.at)
                    .write(f.header.with_color(Color::Unmarkable).0)
            };
            if !f.header.is_scannable() {
                // SAFETY: a raw block of the source has `wosize` readable words, none a
                // pointer, read here once; its fields are words `at + 1..` of the copy.
                unsafe {
                    small::copy_short(f.block as *const Word, dst.add(f.at + 1), f.header.wosize())
                };
            }
        }
        Ok(Written {
            root: base + WORD_BYTES,
            bytes,
            blocks: self.count,
            data_bytes: 0,
            transient_bytes: 0,
        })
    }
}

/// Whether this path copies the raw block `v` (header `hd`) as it is: a string, a float,
/// a float array, or a custom block that `heap` says holds plain bytes. Abstract blocks
/// and other custom blocks are for the general traversal (which copies Bigarrays or says
/// why it cannot copy).
///
/// # Safety
/// `v` points to a raw block with header `hd`.
#[inline(always)]
unsafe fn takes_raw<H: Heap>(heap: &H, v: Word, hd: Header) -> bool {
    match hd.tag() {
        layout::ABSTRACT_TAG => false,
        // SAFETY: field 0 of a custom block is its operations pointer.
        layout::CUSTOM_TAG => heap.is_copyable_custom(unsafe { *(v as *const Word) }),
        _ => true,
    }
}
