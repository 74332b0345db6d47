//! OCaml 5 (no naked pointers, several domains): headers tell heap from not.
//!
//! - Classification: a pointer into the minor heaps is copied; any other block is in the
//!   major heap unless its header has the `NOT_MARKABLE` color, which static data and
//!   copies already off the heap carry. Those are kept as they are (or, with
//!   `copy_static`, copied: static data and earlier copies cannot be told apart).
//! - Visited set: while other domains run, a side table: their collectors read the
//!   headers of shared blocks at any time, so the copy never writes to the source. With
//!   one domain, header marks in the color the GC calls `GARBAGE` this cycle: no
//!   reachable major block has it (it marks the blocks found dead last cycle). Young
//!   blocks all have color 0, which may be that color, so they go to a side table.
//! - Registration: none; compare, hash and Marshal accept any well-formed block.
//! - Freeing waits for the major cycle running at `free` time to end: its marker may
//!   still reach the copy through blocks that were alive when the cycle began.

use crate::copy::visited::{MarksOutside, SideTable};
use crate::copy::Heap;
use crate::layout::{self, Color, Word};

/// `struct global_heap_state` (shared_heap.h): the three rotating colors, shifted.
#[repr(C)]
struct GlobalHeapState {
    marked: Word,
    unmarked: Word,
    garbage: Word,
}

extern "C" {
    static caml_global_heap_state: GlobalHeapState;
    /// Domains running now (domain.h); `caml_domain_alone` is this being 1.
    static caml_num_domains_running: std::sync::atomic::AtomicUsize;
    static caml_minor_heaps_start: Word;
    static caml_minor_heaps_end: Word;
    static caml_major_cycles_completed: Word;
    /// The out-of-heap bytes that dead custom blocks may hold before the GC has done a
    /// cycle's work for them (custom.h): the major heap's size times
    /// `custom_major_ratio` (OCAMLRUNPARAM `M`, default 44) / 150. Reads this domain's
    /// state.
    fn caml_custom_get_max_major() -> usize;
    /// `custom_major_ratio` (custom.h).
    static caml_custom_major_ratio: usize;
}

/// Frees wait for the running major cycle.
pub const DEFERS_FREE: bool = true;

/// Major cycles completed since the program started.
pub fn major_cycles_completed() -> usize {
    // SAFETY: a word-sized counter the runtime only ever increments; a stale read only
    // delays a free.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(caml_major_cycles_completed)) }
}

/// The out-of-heap bytes that may wait for the GC before it has done a cycle's work for
/// them, and the words of work that cycle costs, as the runtime reckons both for custom
/// blocks (`caml_adjust_gc_speed`): `custom_major_ratio`% of two thirds of the major
/// heap's size, and twice the heap's words (a cycle marks at most the heap and sweeps it).
///
/// # Safety
/// Called holding the runtime (it reads this domain's state).
pub unsafe fn gc_allowance() -> (usize, usize) {
    // SAFETY: the caller holds the runtime; both only read the domain's heap statistics
    // and a global set at startup.
    let (allowance, ratio) = unsafe { (caml_custom_get_max_major(), caml_custom_major_ratio) };
    let heap_bytes = allowance / ratio.max(1) * 150;
    (allowance, 2 * heap_bytes / layout::WORD_BYTES)
}

/// The header classifier.
pub struct RuntimeHeap {
    /// Bounds of all domains' minor heaps (exclusive, as `Is_young`).
    young: (Word, Word),
    copy_static: bool,
}

impl RuntimeHeap {
    /// Copies young and major-heap blocks, and `NOT_MARKABLE` ones when `copy_static`.
    pub fn new(copy_static: bool) -> RuntimeHeap {
        // SAFETY: set when the runtime reserves the minor heaps; stable while this domain
        // runs OCaml-side code without reaching a safe point.
        let young = unsafe { (caml_minor_heaps_start, caml_minor_heaps_end) };
        RuntimeHeap { young, copy_static }
    }
}

impl Heap for RuntimeHeap {
    #[inline(always)]
    fn should_copy(&mut self, v: Word) -> bool {
        if v > self.young.0 && v < self.young.1 {
            return true;
        }
        // SAFETY: without naked pointers every pointer in a value leads to a block with
        // a header.
        let hd = unsafe { layout::read_header(v) };
        self.copy_static || hd.color() != Color::Unmarkable
    }

    fn is_copyable_custom(&self, ops: Word) -> bool {
        super::is_boxed_integer(ops)
    }

    fn custom_name(&self, ops: Word) -> String {
        super::custom_identifier(ops)
    }

    fn bigarray_ops(&self, ops: Word) -> Option<Word> {
        super::copy_ops_of_bigarray(ops)
    }

    fn has_ocaml5_tags(&self) -> bool {
        true
    }
}

/// How this copy remembers what it has seen.
pub enum Visited {
    /// One domain: header marks, young blocks in a side table.
    Marks(MarksOutside),
    /// Several domains: a side table; the source is never written.
    Table(SideTable),
}

/// Chooses the visited set for a copy starting now. Copying static data means visiting
/// blocks some of which are read-only (the atom table), so that takes the side table too.
///
/// # Safety
/// Called holding the domain lock, which is kept until the copy ends.
pub unsafe fn visited_set(copy_static: bool) -> Visited {
    // SAFETY: plain runtime queries. While this domain holds its lock and is the only
    // one, no other domain can start, so the choice holds for the whole copy.
    //
    // Alone is the runtime's own test (`caml_domain_alone`, which its shared heap's
    // lock-free fast paths rely on: a domain counts itself before it first touches the
    // heap, and uncounts itself as the very last thing it does when it terminates), not
    // `caml_domain_is_multicore`: that one also says yes once this domain's backup
    // thread runs, which the first `Domain.spawn` starts for good, so every copy after
    // any domain had ever run would take the side table. The backup thread only acts
    // for this domain while it is in a blocking section, never during a copy.
    unsafe {
        let alone = caml_num_domains_running.load(std::sync::atomic::Ordering::Acquire) == 1;
        if copy_static || !alone {
            return Visited::Table(SideTable::new());
        }
        let garbage = std::ptr::read_volatile(std::ptr::addr_of!(caml_global_heap_state.garbage));
        let young = (caml_minor_heaps_start, caml_minor_heaps_end);
        Visited::Marks(MarksOutside::new(layout::Header(garbage).color(), young))
    }
}

/// Nothing to register: OCaml 5 has no page table.
pub fn register(_base: *mut u8, _bytes: usize) -> bool {
    true
}

/// Nothing to register: OCaml 5 has no page table.
pub fn register_blocks(_base: *mut u8, _bytes: usize, _blocks: usize) -> bool {
    true
}

/// Nothing to unregister.
pub fn unregister(_base: *mut u8, _bytes: usize) {}

/// Nothing to register again.
pub fn reregister_shared(_base: *mut u8, _bytes: usize) {}

/// Whether the block `v` lies outside the GC heap: not young, header `NOT_MARKABLE`
/// (static data, copies and loaded images alike).
///
/// # Safety
/// `v` points to a block (OCaml 5 has no naked pointers); called holding the domain lock.
pub unsafe fn outside_gc_heap(v: Word) -> bool {
    // SAFETY: set when the runtime reserves the minor heaps; stable while we run.
    let young = unsafe { (caml_minor_heaps_start, caml_minor_heaps_end) };
    if v > young.0 && v < young.1 {
        return false;
    }
    // SAFETY: every pointer in a value leads to a block with a header.
    unsafe { layout::read_header(v) }.color() == Color::Unmarkable
}
