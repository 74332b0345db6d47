//! The handle: the OCaml block that owns one off-heap copy (`'a Offheap.t`).
//!
//! Three fields, `root`, `alloc` and `state`, four words with the header, in one of two
//! kinds of block (`lib/offheap.ml`):
//! - a copy made with `Offheap.malloc`'s allocator has an **unscanned** handle, whose
//!   words the GC neither scans nor marks through: the OCaml side allocates a record of
//!   three floats, every word zero ([`FRESH_UNSCANNED_TAG`]), and the copy stub makes
//!   it an abstract block ([`UNSCANNED_TAG`], [`seal_fresh`]) before anything else, so
//!   that, as a record handle, it cannot be marshalled or copied (a duplicate of a live
//!   handle would free its copy twice). Its `alloc` field holds the default allocator's
//!   block outside the heap ([`alloc::default_block`]), which never moves nor dies. A
//!   kept handle then costs the GC what a block of raw words costs: it is promoted
//!   without a scan and marked without reading its fields (on OCaml 5 the marker no
//!   longer reads the copy's header through `root`). Polymorphic hashing gives every
//!   such handle the same hash, and polymorphic comparison raises on them, as on any
//!   abstract block;
//! - any other copy, and every image, has a **record** `{ root : Obj.t; alloc : alloc;
//!   mutable state : int }`, whose `alloc` keeps its allocator block alive (the GC
//!   scans it; `root` is an immediate or lies outside the heap).
//!
//! The stubs tell them apart by the tag and otherwise read and write both the same way:
//! every word a stub stores is one the GC may see in a record (an immediate or a
//! pointer outside the heap), and none needs a write barrier in the unscanned one.
//! The OCaml side allocates the handle, state "fresh", before calling a stub that fills
//! it: the handle exists before the copy does, so no point of `copy` (OCaml side
//! included) can lose a copy to an exception, such as one raised by a signal handler.
//!
//! The copy's size and statistics live off the heap, in a [`Record`]:
//! - for a copy, in the first [`PREFIX_BYTES`] of its allocation, right before the copy
//!   ([`WithRecord`] asks the allocator for that much more); `state` holds the
//!   allocation's start `+ 1` (an OCaml integer, the start being word aligned);
//!   This is for the default allocator only;
//! - for a copy made with another allocator (which is asked for the copy's exact size,
//!   as the original C library asked) and for a loaded image (a file mapping), in a
//!   record allocated apart with `malloc`, which also holds the copy's address; `state`
//!   holds the record's address `+ 3` (bit 1 tells the two apart); freed with the copy
//!   (after the running major cycle on OCaml 5), not at `free`: another domain's stub
//!   may still be reading it then ([`Apart`]);
//! - for a copy that allocated nothing (an immediate or a shared root), nowhere:
//!   `state` is 1 and the statistics are zero.
//!
//! Freeing is one compare-and-swap on `state`, so of several domains or threads freeing
//! one handle at once, exactly one takes the copy. The winner swaps in a negative state,
//! `-2 - transient_bytes`, then stores the byte and block counts in `root` and `alloc`
//! (the memory that held them goes away): statistics stay available after `free`.
//! A fresh handle's state is -1 (nothing owned, statistics zero; an unscanned handle's
//! from its sealing). A [`root_if_live`] reads `root` and then `state`, so it never
//! hands out a cleared root.
//!
//! Bit 2 of a live state ([`EXPOSED`]) says that `get` has handed out the copy's root:
//! from then on a pointer into the copy may lie anywhere the GC looks. Until then only
//! the handle's `root` points into it (the copy's own blocks are never scanned), and
//! [`take`] overwrites that; so a copy never handed out can go back at `free` instead of
//! waiting for the GC (`release::free_never_exposed`). Records are word aligned, which
//! leaves bits 0-2 of their addresses free.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::alloc::{self, Allocator, CAllocator};
use crate::copy::Copied;
use crate::layout::{
    header_addr, is_immediate, val_int, Header, Word, ABSTRACT_TAG, DOUBLE_ARRAY_TAG,
};
use crate::runtime;

/// Field of the copy's root (an immediate, a shared pointer, or a pointer into the copy);
/// the copy's size in bytes once freed.
const ROOT: usize = 0;
/// Field of the allocator block; the number of blocks copied once freed.
const ALLOC: usize = 1;
/// Field of the state (see the module's documentation).
const STATE: usize = 2;

/// The tag of an unscanned handle (see the module's documentation).
const UNSCANNED_TAG: u8 = ABSTRACT_TAG;
/// The tag of a fresh unscanned handle, a float record, until [`seal_fresh`].
const FRESH_UNSCANNED_TAG: u8 = DOUBLE_ARRAY_TAG;

/// The state of a fresh handle, which never owned anything.
const FRESH: Word = val_int(-1);
/// Bit 1 of a live state: the record is apart from the allocation (an image).
const APART: Word = 2;
/// Bit 2 of a live state: the root was handed out (see the module's documentation).
const EXPOSED: Word = 4;

/// Whether the live state `state` owns a copy (it allocated something) whose root was
/// never handed out.
fn owns_unexposed(state: Word) -> bool {
    state & EXPOSED == 0 && state != 1
}

/// The address a live state holds (its record), without the tag and the flags.
fn address_of(state: Word) -> Word {
    state & !(EXPOSED | APART | 1)
}

/// What a copy cost, kept off the heap while it is live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Record {
    /// Size of the copy in bytes (the record not included).
    pub bytes: usize,
    /// Blocks copied.
    pub blocks: usize,
    /// Peak memory the traversal held besides the copy.
    pub transient_bytes: usize,
}

/// Bytes in front of every copy's allocation: its [`Record`].
pub const PREFIX_BYTES: usize = std::mem::size_of::<Record>();

/// The record of an image, allocated apart from its payload.
#[repr(C)]
struct ApartRecord {
    record: Record,
    /// The payload.
    base: *mut u8,
}

/// The memory a live handle owned, taken from it by [`take`].
#[derive(Clone, Copy, Debug)]
pub struct Owned {
    /// Start of the allocation (the record, for a copy), or null when nothing was
    /// allocated.
    pub base: *mut u8,
    /// Its size in bytes.
    pub bytes: usize,
    /// The allocator block it came from.
    pub alloc: Word,
}

/// The record allocated apart of a handle, taken with its copy by [`take`] (none for a
/// copy with its record in front, or nothing allocated). It is freed once the copy is
/// released ([`Apart::free`]), not when the handle is freed: a stub of another domain
/// that read the handle's state just before [`take`] swapped it may still read the
/// record ([`record`], [`take`]) until that stub returns. On OCaml 5 the copy waits for
/// the end of a major cycle, which cannot come while a stub runs; on OCaml 4 no other
/// stub runs meanwhile. (Freed at [`take`], a concurrent `stats` read it freed: another
/// copy's counts, or malloc's words.)
#[must_use = "a record apart is freed with its copy"]
pub struct Apart(*mut ApartRecord);

impl Apart {
    /// No record apart.
    pub const fn none() -> Apart {
        Apart(std::ptr::null_mut())
    }

    /// Whether there is no record.
    pub fn is_none(&self) -> bool {
        self.0.is_null()
    }

    /// Frees the record, if any.
    ///
    /// # Safety
    /// No stub that read the handle's live state still runs: the copy is released now,
    /// or the handle was never seen by another thread.
    pub unsafe fn free(self) {
        if !self.0.is_null() {
            // SAFETY: allocated with malloc by `fill_apart`, taken once by `take`, freed
            // once here (`self` is consumed); the caller's contract.
            unsafe { libc::free(self.0 as *mut libc::c_void) };
        }
    }
}

/// An allocator that puts a [`Record`] in front of each allocation: the traversal sees
/// only the memory after it.
pub struct WithRecord<A>(pub A);

impl<A: Allocator> Allocator for WithRecord<A> {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        let Some(total) = bytes.checked_add(PREFIX_BYTES) else {
            return std::ptr::null_mut();
        };
        let p = self.0.alloc(total);
        if p.is_null() {
            return p;
        }
        p.wrapping_add(PREFIX_BYTES)
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: `ptr` came from `alloc(bytes)` above.
        unsafe {
            self.0
                .free(ptr.wrapping_sub(PREFIX_BYTES), bytes + PREFIX_BYTES)
        }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        self.0.huge_mapping_prefix()?.checked_add(PREFIX_BYTES)
    }
}

impl<A> WithRecord<A> {
    /// The allocation (start and size) behind a copy made through this allocator.
    pub fn allocation(copied: &Copied) -> (*mut u8, usize) {
        (
            copied.base.wrapping_sub(PREFIX_BYTES),
            copied.bytes + PREFIX_BYTES,
        )
    }
}

/// The field `i` of the handle `h`, as an atomic word.
///
/// # Safety
/// `h` is a handle block (three fields) that does not move while the reference is used:
/// the caller allocates nothing on the OCaml heap meanwhile.
unsafe fn field<'a>(h: Word, i: usize) -> &'a AtomicUsize {
    // SAFETY: `h` has three word-sized, word-aligned fields (the caller's contract);
    // AtomicUsize has the layout of a word.
    unsafe { &*(h as *const AtomicUsize).add(i) }
}

/// Makes the fresh handle `h` own the copy `copied`, made through a [`WithRecord`]
/// allocator.
///
/// # Safety
/// `h` is a handle in state [`FRESH`] that no other thread or domain sees yet, and
/// `copied.root` is an immediate or lies outside the OCaml heap (the GC needs no barrier
/// for it).
pub unsafe fn fill(h: Word, copied: &Copied) {
    let state = if copied.base.is_null() {
        1
    } else {
        let (start, _) = WithRecord::<()>::allocation(copied);
        // SAFETY: `WithRecord` reserved `PREFIX_BYTES`, word aligned, before the copy.
        unsafe {
            (start as *mut Record).write(Record {
                bytes: copied.bytes,
                blocks: copied.blocks,
                transient_bytes: copied.transient_bytes,
            })
        };
        start as Word + 1
    };
    // SAFETY: the caller's contract; the handle is ours alone.
    unsafe {
        field(h, ROOT).store(copied.root, Ordering::Relaxed);
        field(h, STATE).store(state, Ordering::Release);
    }
}

/// Makes the fresh handle `h` own the copy or image payload `copied` (`base` not null),
/// with a record allocated apart. False, and `h` left fresh, when there was no memory for
/// the record.
///
/// # Safety
/// As for [`fill`].
pub unsafe fn fill_apart(h: Word, copied: &Copied) -> bool {
    // SAFETY: plain malloc.
    let record = unsafe { libc::malloc(std::mem::size_of::<ApartRecord>()) } as *mut ApartRecord;
    if record.is_null() {
        return false;
    }
    // SAFETY: fresh memory of the right size (malloc aligns for any type); the handle is
    // ours alone.
    unsafe {
        record.write(ApartRecord {
            record: Record {
                bytes: copied.bytes,
                blocks: copied.blocks,
                transient_bytes: copied.transient_bytes,
            },
            base: copied.base,
        });
        field(h, ROOT).store(copied.root, Ordering::Relaxed);
        field(h, STATE).store(record as Word + 1 + APART, Ordering::Release);
    }
    true
}

/// Sets the allocator block of the fresh handle `h` to `alloc`.
///
/// # Safety
/// `h` is a record handle (not unscanned) that no other thread or domain sees yet and
/// `alloc` an allocator block; called holding the runtime.
pub unsafe fn set_alloc(h: Word, alloc: Word) {
    // SAFETY: a field of a live block, written with the runtime's write barrier.
    unsafe {
        ocaml_sys::caml_modify(
            (h as *mut ocaml_sys::Value).add(ALLOC),
            alloc as ocaml_sys::Value,
        )
    };
}

/// Whether `state` is a live handle's.
fn is_live(state: Word) -> bool {
    (state as isize) > 0
}

/// The record behind the live state `state`, or `None` when nothing was allocated.
///
/// # Safety
/// `state` was read from a live handle during this stub: its memory is not released
/// before the stub returns (OCaml 4: the runtime lock; OCaml 5: a freed copy waits for
/// the end of a major cycle, or, never read and freed beside other domains, for two
/// minor collections, neither of which can end while this domain is in a stub). Its
/// words may have been written over since by such a free: see [`record`].
unsafe fn record_of(state: Word) -> Option<Record> {
    if state == 1 {
        return None;
    }
    let at = address_of(state) as *const Record;
    // SAFETY: the caller's contract; both kinds of record start with a `Record`. A
    // volatile read: a concurrent `free` may be writing these words (see [`record`]).
    Some(unsafe { at.read_volatile() })
}

/// The allocator block of the handle `h` while it is live, `None` once freed.
///
/// # Safety
/// `h` is a handle; called holding the runtime.
pub unsafe fn alloc_if_live(h: Word) -> Option<Word> {
    // The block first, then the state: a concurrent `take` makes the state freed before
    // it overwrites the block with an integer (a release fence between), so a block
    // read from a handle still live afterwards is the allocator block. An integer says
    // freed whatever the order.
    // SAFETY: the caller's contract.
    let alloc = unsafe { field(h, ALLOC) }.load(Ordering::Relaxed);
    std::sync::atomic::fence(Ordering::Acquire);
    // SAFETY: as above.
    let state = unsafe { field(h, STATE) }.load(Ordering::Relaxed);
    (is_live(state) && !is_immediate(alloc)).then_some(alloc)
}

/// Whether the handle `h` is unscanned (see the module's documentation).
///
/// # Safety
/// `h` is a handle, sealed by [`seal_fresh`] if it was a float record (every stub but
/// the copy stub's start sees only such handles).
pub unsafe fn is_unscanned(h: Word) -> bool {
    // SAFETY: a handle is a block; of its header only the color bits (another domain's
    // marker) and, in [`seal_fresh`] before any other stub sees it, the tag change.
    let header = unsafe { header(h) }.load(Ordering::Relaxed);
    Header(header).tag() == UNSCANNED_TAG
}

/// The header of the handle `h`, as an atomic word.
///
/// # Safety
/// As for [`field`].
unsafe fn header<'a>(h: Word) -> &'a AtomicUsize {
    // SAFETY: a block's header is the word-aligned word before its first field.
    unsafe { &*(header_addr(h) as *const AtomicUsize) }
}

/// Makes the fresh handle `h`, when a float record, an abstract block: see the module's
/// documentation. Both tags are beyond `No_scan_tag` and the size stays, so the GC
/// treats the block the same before and after. Its words become values first (an
/// immediate root, the default allocator's block, the fresh state): OCaml 5's
/// `Weak.get_copy` darkens the words of an abstract block it copies, and a raw zero
/// crashed it (a helper's find).
///
/// # Safety
/// `h` is a fresh handle that no other stub sees yet; called holding the runtime.
pub unsafe fn seal_fresh(h: Word) {
    // SAFETY: the caller's contract.
    let header = unsafe { header(h) };
    let mut current = header.load(Ordering::Relaxed);
    if Header(current).tag() != FRESH_UNSCANNED_TAG {
        return;
    }
    // SAFETY: the caller's contract: the handle is ours alone, and the GC reads no word
    // of a float record.
    unsafe {
        field(h, ROOT).store(val_int(0), Ordering::Relaxed);
        field(h, ALLOC).store(alloc::default_block(), Ordering::Relaxed);
        field(h, STATE).store(FRESH, Ordering::Relaxed);
    }
    while Header(current).tag() == FRESH_UNSCANNED_TAG {
        let sealed = Header(current).with_tag(UNSCANNED_TAG).0;
        // A compare-and-swap: on OCaml 5 another domain's marker may set the color bits
        // of a handle already promoted at the same time.
        match header.compare_exchange_weak(current, sealed, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

/// The allocator block of the fresh handle `h` (sealed, if unscanned), alive and in place
/// for the stub's call.
///
/// # Safety
/// `h` is a fresh handle, sealed by [`seal_fresh`] if it is a float record.
pub unsafe fn fresh_allocator(h: Word) -> CAllocator {
    // SAFETY: the caller's contract; field `ALLOC` of a fresh handle holds its allocator
    // block (the OCaml type `alloc` only comes from `malloc` or from C code that builds
    // one; an unscanned handle's is the default one), alive while the handle is.
    unsafe { CAllocator::new(field(h, ALLOC).load(Ordering::Relaxed)) }
}

/// Takes the copy from the live handle `h`, leaving it freed with its statistics, and its
/// record apart, to free once the copy is released; `None` when it was freed already (by
/// this thread or a concurrent one).
///
/// # Safety
/// `h` is a handle; called holding the runtime, allocating nothing on the OCaml heap
/// until this returns.
pub unsafe fn take(h: Word) -> Option<(Owned, Apart)> {
    // SAFETY: the caller's contract.
    unsafe { take_if(h, |_| true) }
}

/// [`take`] when the live handle `h` owns a copy (it allocated something) whose root was
/// never handed out by [`root_if_live`], decided atomically with the taking (a
/// concurrent `get` either sets [`EXPOSED`] first, or finds the handle freed and hands
/// out nothing); `None`, having done nothing, otherwise.
///
/// # Safety
/// As for [`take`].
pub unsafe fn take_never_exposed(h: Word) -> Option<(Owned, Apart)> {
    // SAFETY: the caller's contract.
    unsafe { take_if(h, owns_unexposed) }
}

/// [`take`] if `accept` holds of the live state taken.
///
/// # Safety
/// As for [`take`].
unsafe fn take_if(h: Word, accept: impl Fn(Word) -> bool) -> Option<(Owned, Apart)> {
    // SAFETY: the caller's contract.
    let state = unsafe { field(h, STATE) };
    let mut current = state.load(Ordering::Acquire);
    let record = loop {
        if !is_live(current) || !accept(current) {
            return None;
        }
        // SAFETY: read from a live state, in this stub.
        let record = unsafe { record_of(current) }.unwrap_or_default();
        let freed = val_int(-2 - record.transient_bytes as isize);
        if runtime::stub_runs_alone() {
            // No other thread reads or writes the handle while this stub runs (a locked
            // compare-and-swap cost a free of a small copy a tenth of its time).
            state.store(freed, Ordering::Relaxed);
            break record;
        }
        match state.compare_exchange_weak(current, freed, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break record,
            Err(seen) => current = seen,
        }
    };
    // SAFETY: as above; the old root is an immediate or lies outside the heap, so
    // overwriting it needs no write barrier; in a record `alloc` is overwritten with
    // the barrier, its old block kept alive by the caller until it is done with it (no
    // OCaml allocation meanwhile); the GC reads no field of an unscanned handle.
    unsafe {
        field(h, ROOT).store(val_int(record.bytes as isize), Ordering::Release);
        let alloc = field(h, ALLOC).load(Ordering::Relaxed);
        // `record` reads the block count, then the byte count.
        std::sync::atomic::fence(Ordering::Release);
        let blocks = val_int(record.blocks as isize);
        if is_unscanned(h) {
            field(h, ALLOC).store(blocks, Ordering::Relaxed);
        } else {
            ocaml_sys::caml_modify(
                (h as *mut ocaml_sys::Value).add(ALLOC),
                blocks as ocaml_sys::Value,
            );
        }
        let taken = if current == 1 {
            let owned = Owned {
                base: std::ptr::null_mut(),
                bytes: 0,
                alloc,
            };
            (owned, Apart::none())
        } else if current & APART != 0 {
            // The record is not freed here: see `Apart`.
            let apart = address_of(current) as *mut ApartRecord;
            let owned = Owned {
                base: (*apart).base,
                bytes: record.bytes,
                alloc,
            };
            (owned, Apart(apart))
        } else {
            let owned = Owned {
                base: address_of(current) as *mut u8,
                bytes: record.bytes + PREFIX_BYTES,
                alloc,
            };
            (owned, Apart::none())
        };
        Some(taken)
    }
}

/// The statistics of the handle `h`, live or freed.
///
/// # Safety
/// `h` is a handle; called holding the runtime, allocating nothing on the OCaml heap.
pub unsafe fn record(h: Word) -> Record {
    loop {
        // SAFETY: the caller's contract.
        let state = unsafe { field(h, STATE) }.load(Ordering::Acquire);
        if is_live(state) {
            // SAFETY: read from a live state, in this stub.
            let record = unsafe { record_of(state) }.unwrap_or_default();
            // A `free` of another domain may have taken the copy since the state was
            // read (it swaps the state first) and written over the record: a copy never
            // read goes back at once, or is held with links in its first words
            // (`release::free_never_exposed`). The words read are the record only if
            // the handle still owns that allocation after them; else the freed
            // statistics are read (a freed handle never becomes live again).
            std::sync::atomic::fence(Ordering::Acquire);
            // SAFETY: as above.
            let again = unsafe { field(h, STATE) }.load(Ordering::Relaxed);
            if is_live(again) && address_of(again) == address_of(state) {
                return record;
            }
            continue;
        }
        if state == FRESH {
            return Record::default();
        }
        // Freed: the freer stores the byte count, then the block count. Until then
        // (another domain, between its swap and its stores, without a safe point) the
        // fields still hold the root and the allocator, which is never an immediate.
        // SAFETY: as above.
        let blocks = unsafe { field(h, ALLOC) }.load(Ordering::Acquire);
        if is_immediate(blocks) {
            // SAFETY: as above.
            let bytes = unsafe { field(h, ROOT) }.load(Ordering::Acquire);
            return Record {
                bytes: (bytes as isize >> 1) as usize,
                blocks: (blocks as isize >> 1) as usize,
                transient_bytes: (-2 - (state as isize >> 1)) as usize,
            };
        }
        std::hint::spin_loop();
    }
}

/// The copy's root while `h` is live, else `freed`.
///
/// # Safety
/// `h` is a handle; the caller allocates nothing on the OCaml heap until this returns.
pub unsafe fn root_if_live(h: Word, freed: Word) -> Word {
    // SAFETY: the caller's contract. `root` is read before `state`: a concurrent `take`
    // overwrites `root` only after it set `state`, so a cleared root is never returned.
    let (root, state) = unsafe {
        (
            field(h, ROOT).load(Ordering::Acquire),
            field(h, STATE).load(Ordering::Acquire),
        )
    };
    if !is_live(state) {
        return freed;
    }
    // SAFETY: the caller's contract.
    if owns_unexposed(state) && !unsafe { mark_exposed(h, state) } {
        return freed;
    }
    root
}

/// Sets [`EXPOSED`] in the live state `state` of `h`, read just before; false when a
/// concurrent `take` freed the handle meanwhile (the root must not be handed out then:
/// that free saw it never handed out).
///
/// # Safety
/// As for [`root_if_live`].
unsafe fn mark_exposed(h: Word, state: Word) -> bool {
    // SAFETY: the caller's contract.
    let field = unsafe { field(h, STATE) };
    if runtime::stub_runs_alone() {
        field.store(state | EXPOSED, Ordering::Relaxed);
        return true;
    }
    match field.compare_exchange(state, state | EXPOSED, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        // Another domain set the bit, or freed the handle.
        Err(seen) => is_live(seen),
    }
}

/// The allocation (its size, the record included) and the allocator block of the live
/// handle `h` when its copy has its record in front and its root was never handed out
/// by [`root_if_live`] so far; `None` otherwise.
///
/// # Safety
/// `h` is a handle; called holding the runtime, allocating nothing on the OCaml heap.
pub unsafe fn never_exposed(h: Word) -> Option<(usize, Word)> {
    // SAFETY: the caller's contract.
    let alloc = unsafe { alloc_if_live(h) }?;
    // SAFETY: as above.
    let state = unsafe { field(h, STATE) }.load(Ordering::Acquire);
    if !is_live(state) || !owns_unexposed(state) || state & APART != 0 {
        return None;
    }
    // SAFETY: read from a live state, in this stub.
    let record = unsafe { record_of(state) }?;
    Some((record.bytes + PREFIX_BYTES, alloc))
}
