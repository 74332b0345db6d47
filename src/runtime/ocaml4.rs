//! OCaml 4 (4.12 to 4.14, naked pointers allowed): the page table tells heap from not.
//!
//! - Classification: a direct-mapped cache of page answers comes first (a value's blocks
//!   mostly come in runs of a few pages); it belongs to the thread and keeps its answers
//!   from one copy to the next while the heaps keep their pages (`HeapEpoch`). On a miss in a large copy, an address inside one of the major heap's
//!   chunks is copied: the chunks are few and do not change during a copy, so a sorted
//!   list of their ranges is searched. Anything else (and every miss of a small copy)
//!   goes to `caml_page_table_lookup`, which hashes: major or minor heap, static data,
//!   or else a naked pointer or a copy already off the heap, kept as it is.
//! - Visited set: header marks in blue, the color of free-list blocks, which no reachable
//!   block has. The runtime lock keeps every other thread out while headers are marked.
//! - Registration: a copy's pages are registered as static data so that compare, hash
//!   and Marshal treat it as OCaml values: the pages of its blocks, not those of the
//!   Bigarray data after them, which only custom blocks point to (a gigabyte of data
//!   would take a quarter of a million entries, never removed: the table only marks
//!   them as kind 0), and of a copy of few large blocks only the pages where its blocks
//!   start ([`register_copy`]). The table works in whole pages and two copies can share
//!   a page at their ends, so the end pages are reference-counted.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use crate::copy::visited::HeaderMarks;
use crate::copy::Copied;
use crate::copy::Heap;
use crate::layout::{self, Color, Header, Word, WORD_BYTES};

const IN_HEAP: i32 = 1;
const IN_YOUNG: i32 = 2;
const IN_STATIC_DATA: i32 = 4;
/// The page table's granularity (`Page_log` in `address_class.h`).
const PAGE_LOG: u32 = 12;
const PAGE_BYTES: usize = 1 << PAGE_LOG;

/// `heap_chunk_head` (major_gc.h), which sits right before each chunk of the major heap.
#[repr(C)]
struct ChunkHead {
    block: *mut libc::c_void,
    alloc: usize,
    size: usize,
    next: *mut u8,
    redarken_start: *mut Word,
    redarken_end: *mut Word,
}

extern "C" {
    static caml_heap_start: *mut u8;
    fn caml_page_table_lookup(addr: *const libc::c_void) -> i32;
    fn caml_page_table_add(kind: i32, start: *const libc::c_void, end: *const libc::c_void) -> i32;
    fn caml_page_table_remove(
        kind: i32,
        start: *const libc::c_void,
        end: *const libc::c_void,
    ) -> i32;
}

/// Frees may wait: while the major GC marks (see [`free_must_wait`]).
pub const DEFERS_FREE: bool = true;

/// How much [`major_cycles_completed`] grows over one whole major cycle (a marking
/// begins and ends).
pub const COUNTS_PER_CYCLE: usize = 2;

/// Whether the stub that calls this runs alone: yes, the master lock lets one thread at
/// a time run OCaml code or a stub, so what only stubs and OCaml code touch (a handle's
/// fields) needs no atomic read-modify-write.
pub fn stub_runs_alone() -> bool {
    true
}

/// The runtime's action on a root during a scan (`caml/roots.h`: `scanning_action`).
type ScanningAction = unsafe extern "C" fn(v: Word, slot: *mut Word);
/// The runtime's hook for roots of its users (`caml_scan_roots_hook`).
type ScanRootsHook = unsafe extern "C" fn(action: ScanningAction);

extern "C" {
    /// Called by every scan of the roots: minor collections, the start of a major
    /// cycle's marking, compaction (`caml/roots.h`).
    static mut caml_scan_roots_hook: Option<ScanRootsHook>;
}

/// The hook that was installed before ours, called by ours.
static mut PREVIOUS_ROOTS_HOOK: Option<ScanRootsHook> = None;

/// Our hook: the slots of `release::Rooted`, then the previous hook's roots.
unsafe extern "C" fn scan_roots(action: ScanningAction) {
    // SAFETY: the GC's action on a root, given the root's value and its slot, which
    // stays in place for the scan (no stub changes the table while the GC runs).
    crate::release::scan_roots(|slot| unsafe { action(*slot, slot) });
    // SAFETY: written once, before our hook was installed.
    if let Some(previous) = unsafe { PREVIOUS_ROOTS_HOOK } {
        // SAFETY: the runtime's contract for hooks, passed on.
        unsafe { previous(action) };
    }
}

/// Installs the hook that scans the slots of `release::Rooted`, once. Called holding
/// the runtime (no scan runs meanwhile).
pub fn install_roots_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: we hold the runtime, so no GC reads the hook while it changes; the
        // previous hook is kept and called by ours.
        unsafe {
            PREVIOUS_ROOTS_HOOK = caml_scan_roots_hook;
            caml_scan_roots_hook = Some(scan_roots);
        }
    });
}

/// Data that only stubs use, each holding the runtime (a region's state): the master
/// lock lets one of them in at a time already, so the data needs no lock of its own (a
/// `Mutex`'s two locked instructions cost a `Region.add` of a small record a third of
/// the add's own time, `perf`).
pub struct StubLock<T>(std::cell::UnsafeCell<T>);

// SAFETY: the data is reached only through `lock`, whose callers hold the runtime: one
// thread at a time, each done with it before the runtime changes hands.
unsafe impl<T: Send> Sync for StubLock<T> {}

impl<T> StubLock<T> {
    /// `value`, for stubs to share.
    pub const fn new(value: T) -> StubLock<T> {
        StubLock(std::cell::UnsafeCell::new(value))
    }

    /// The data, for the stub that runs.
    ///
    /// # Safety
    /// Called holding the runtime; the guard is dropped before anything releases the
    /// runtime and before this data is locked again.
    pub unsafe fn lock(&self) -> StubGuard<'_, T> {
        // SAFETY: the caller's contract: no other reference to the data lives.
        StubGuard(unsafe { &mut *self.0.get() })
    }
}

/// The data of a [`StubLock`], while a stub uses it.
pub struct StubGuard<'a, T>(&'a mut T);

impl<T> std::ops::Deref for StubGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0
    }
}

impl<T> std::ops::DerefMut for StubGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0
    }
}

/// Whether the free of a slab copy must wait as others do: no. The slab's regions stay
/// registered as static data and never go back to `malloc`, so they never become part
/// of the heap, and the marker skips pointers into them whatever they hold.
pub const SLAB_FREES_WAIT: bool = false;

/// Whether a large copy that waits gives its pages back at its free (`release`): no. A
/// free waits only for the end of the running marking, and already pays for the page
/// table (unregistering the pages of 80 MB takes some 0.3 ms); dropping the pages too
/// took a free of a flat copy from 4% of the copy's time to 9% (`make bench`).
pub const DISCARDS_AT_FREE: bool = false;

/// `caml_gc_phase` while the marker runs (`Phase_mark`, `Phase_clean`: 0 and 1,
/// `caml/major_gc.h`); then come `Phase_sweep` (2) and `Phase_idle` (3).
const LAST_MARKING_PHASE: i32 = 1;
/// `Phase_idle`: no major cycle running.
const PHASE_IDLE: i32 = 3;

extern "C" {
    /// The major GC's phase (`caml/major_gc.h`).
    static caml_gc_phase: i32;
}

fn gc_phase() -> i32 {
    // SAFETY: a word the runtime writes only while it holds the runtime lock, as we do.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(caml_gc_phase)) }
}

/// Whether a free must wait: while the major GC marks. The marker reads the fields of a
/// block when it scans it, which may be long after it reached the block: a block
/// reachable then and dead since may point into a copy freed meanwhile. The page table
/// makes it skip such pointers only as long as the memory is not part of the heap, and
/// memory handed back to `malloc` may become a heap chunk before the scan (observed: the
/// marker blackened "headers" inside a live array the heap had grown into). Once the
/// marking has ended (sweep, idle), no block reached before the free is scanned again.
pub fn free_must_wait() -> bool {
    gc_phase() <= LAST_MARKING_PHASE
}

/// A counter that grows whenever a marking ends: twice the cycles begun, less one while
/// the marker runs (idle after cycle `c`: `2c`; marking cycle `c + 1`: `2c + 1`;
/// sweeping it: `2c + 2`). A free that waits, made at `m`, is due once it exceeds `m`.
pub fn major_cycles_completed() -> usize {
    // SAFETY: `Caml_state` points to the runtime's state, valid while the runtime is
    // held (stubs hold it), and this is a word-sized field of it.
    let completed = unsafe { *Caml_state.add(state_fields::STAT_MAJOR_COLLECTIONS) };
    let phase = gc_phase();
    let begun = completed + usize::from(phase != PHASE_IDLE);
    2 * begun - usize::from(phase <= LAST_MARKING_PHASE)
}

extern "C" {
    /// `custom_major_ratio` (OCAMLRUNPARAM `M`, default 44; `caml/custom.h`).
    static caml_custom_major_ratio: usize;
}

/// The out-of-heap bytes that may wait for the GC before it has done a cycle's work for
/// them, and the words of work that cycle costs, as the runtime reckons both for custom
/// blocks (`caml_alloc_custom_mem`): `custom_major_ratio`% of two thirds of the major
/// heap's size, and twice the heap's words (a cycle marks at most the heap and sweeps
/// it). Frees that wait for a marking to end pay for it at this rate (`release`), as on
/// OCaml 5: a loop that copies and frees large values and allocates little on the heap
/// would otherwise see the marking, driven by allocation alone, hardly move.
///
/// # Safety
/// Called holding the runtime (it reads the runtime's heap statistics).
pub unsafe fn gc_allowance() -> (usize, usize) {
    // SAFETY: the caller holds the runtime; a word-sized field of `Caml_state` and a
    // global set at startup (or by `Gc.set`, which holds the runtime too).
    let (heap_words, ratio) = unsafe {
        (
            *Caml_state.add(state_fields::STAT_HEAP_WSZ),
            std::ptr::read_volatile(std::ptr::addr_of!(caml_custom_major_ratio)),
        )
    };
    let heap_bytes = heap_words.saturating_mul(WORD_BYTES);
    (heap_bytes / 150 * ratio, 2 * heap_words)
}

/// Whether the runtime shared `bytes` freed among domains for GC work: never, OCaml 4 has
/// one domain, whose slices end its cycles (`release::PENDING_LIMIT`).
///
/// # Safety
/// Called holding the runtime (as on OCaml 5).
pub unsafe fn share_gc_work(_bytes: usize, _per_cycle: usize) -> bool {
    false
}

/// Cache slots; a power of two.
const CACHE_SLOTS: usize = 1024;

/// Cache misses in one copy after which the chunk list is built: below it, a miss asks
/// the page table (a hash lookup), which costs a small copy less than walking and
/// sorting the chunk list.
const MISSES_BEFORE_CHUNKS: usize = 32;

/// One cache slot: the page it answers for, the copy that filled it and the answer.
#[derive(Clone, Copy)]
struct Slot {
    page: usize,
    /// `generation << 1 | copied`.
    tag: u64,
}

/// The page cache of one thread, reused by every copy it makes. A slot answers only for
/// the generation it carries: a new generation empties the cache without clearing 16
/// KiB (measured: clearing it and building the chunk list were a third of a small copy's
/// time). Copies that do not copy static data share a generation for as long as the
/// [`HeapEpoch`] stays the same (their answers, heap or not, cannot change meanwhile);
/// every other copy takes a new one.
struct PageCache {
    slots: [Slot; CACHE_SLOTS],
    /// The generation of the last copy that took this cache.
    generation: u64,
    /// The heap's layout when that generation began, if it was a shared one.
    epoch: Option<HeapEpoch>,
}

thread_local! {
    static PAGE_CACHE: std::cell::UnsafeCell<PageCache> = const {
        std::cell::UnsafeCell::new(PageCache {
            slots: [Slot { page: 0, tag: 0 }; CACHE_SLOTS],
            generation: 0,
            epoch: None,
        })
    };
}

/// Word indices of `Caml_state`'s fields, from the runtime's `domain_state.tbl` (build.rs).
mod state_fields {
    include!(concat!(env!("OUT_DIR"), "/domain_state.rs"));
}

extern "C" {
    /// The runtime's state (`caml/domain_state.h`): one word per field, in the order of
    /// `domain_state.tbl`.
    static Caml_state: *const Word;
}

/// What the page table says of the heaps: it changes whenever a page enters or leaves the
/// major or the minor heap. The major heap gains pages only in `caml_add_to_heap`, which
/// counts the chunk and its words, and loses them only in `caml_shrink_heap`, which only
/// compaction calls, and compaction is counted; the minor heap is one range, moved only
/// by `caml_set_minor_heap_size`. Static data can be added at any time (natdynlink,
/// other libraries), so copies of static data never share a generation.
#[derive(Clone, Copy, Eq)]
struct HeapEpoch([Word; 5]);

impl PartialEq for HeapEpoch {
    /// Inline (the derived comparison of five words calls `bcmp`, once per copy).
    #[inline(always)]
    fn eq(&self, other: &HeapEpoch) -> bool {
        let differ = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0, |acc, (a, b)| acc | (a ^ b));
        differ == 0
    }
}

impl HeapEpoch {
    /// The epoch now.
    fn now() -> HeapEpoch {
        use state_fields::*;
        // SAFETY: `Caml_state` points to the runtime's state, valid while the runtime is
        // held (a copy runs holding it), and these are word-sized fields of it.
        let field = |i: usize| unsafe { *Caml_state.add(i) };
        HeapEpoch([
            field(YOUNG_START),
            field(YOUNG_END),
            field(STAT_HEAP_WSZ),
            field(STAT_COMPACTIONS),
            field(STAT_HEAP_CHUNKS),
        ])
    }
}

/// The classifier: the page table behind a per-thread cache, and for large copies the
/// major heap's chunk ranges.
pub struct RuntimeHeap {
    /// `(start, end)` of every major heap chunk, sorted by start; built after
    /// [`MISSES_BEFORE_CHUNKS`] misses (empty before, or when memory ran out for it).
    chunks: Vec<(Word, Word)>,
    /// Cache misses so far.
    misses: usize,
    /// Page-table kinds whose blocks are copied.
    copied_kinds: i32,
    /// This thread's cache slots (see [`PageCache`]).
    slots: *mut Slot,
    /// This copy's generation, shifted left by one.
    generation: u64,
}

/// The ranges of the major heap's chunks, sorted; `None` when there was no memory.
fn heap_chunks() -> Option<Vec<(Word, Word)>> {
    let mut chunks = Vec::new();
    // SAFETY: the runtime's list of chunks, walked while we hold the runtime lock (no
    // chunk is added or freed meanwhile); each chunk is preceded by its head.
    unsafe {
        let mut chunk = caml_heap_start;
        while !chunk.is_null() {
            let head = &*(chunk as *const ChunkHead).sub(1);
            chunks.try_reserve(1).ok()?;
            chunks.push((chunk as Word, chunk as Word + head.size));
            chunk = head.next;
        }
    }
    chunks.sort_unstable();
    Some(chunks)
}

impl RuntimeHeap {
    /// Copies heap and young blocks, and static data when `copy_static`.
    pub fn new(copy_static: bool) -> RuntimeHeap {
        let statics = if copy_static { IN_STATIC_DATA } else { 0 };
        let (slots, generation) = PAGE_CACHE.with(|cache| {
            let cache = cache.get();
            // SAFETY: this thread's cache; the reference lives for these lines only.
            // A copy nested in this one (none exists: allocators may not call OCaml)
            // would at worst take a new generation and turn the outer one's hits into
            // misses.
            unsafe {
                let epoch = (!copy_static).then(HeapEpoch::now);
                if epoch.is_none() || (*cache).epoch != epoch {
                    (*cache).generation += 1;
                    (*cache).epoch = epoch;
                }
                (
                    std::ptr::addr_of_mut!((*cache).slots) as *mut Slot,
                    (*cache).generation << 1,
                )
            }
        });
        RuntimeHeap {
            chunks: Vec::new(),
            misses: 0,
            copied_kinds: IN_HEAP | IN_YOUNG | statics,
            slots,
            generation,
        }
    }

    /// Whether `v` is inside a major heap chunk.
    fn in_major_heap(&self, v: Word) -> bool {
        // The last chunk starting at or before `v`, if `v` is inside it.
        let i = self.chunks.partition_point(|&(start, _)| start <= v);
        i.checked_sub(1).is_some_and(|i| v < self.chunks[i].1)
    }

    /// The cache slot of `page`.
    fn slot(&self, page: usize) -> *mut Slot {
        // SAFETY: `page % CACHE_SLOTS` is inside the thread's array, which lives as long
        // as the thread, longer than this copy.
        unsafe { self.slots.add(page % CACHE_SLOTS) }
    }

    /// [`Heap::should_copy`] past the cache; fills the cache.
    #[inline(never)]
    fn classify(&mut self, v: Word) -> bool {
        self.misses += 1;
        if self.misses == MISSES_BEFORE_CHUNKS {
            self.chunks = heap_chunks().unwrap_or_default();
        }
        let copied = self.in_major_heap(v) || {
            // SAFETY: the page table only hashes the address; it reads no memory there.
            let kind = unsafe { caml_page_table_lookup(v as *const libc::c_void) };
            kind & self.copied_kinds != 0
        };
        let page = v >> PAGE_LOG;
        // SAFETY: see `slot`; slots are plain data, written through the raw pointer.
        unsafe {
            *self.slot(page) = Slot {
                page,
                tag: self.generation | copied as u64,
            }
        };
        copied
    }
}

impl Heap for RuntimeHeap {
    #[inline(always)]
    fn should_copy(&mut self, v: Word) -> bool {
        let page = v >> PAGE_LOG;
        // SAFETY: see `slot`.
        let slot = unsafe { *self.slot(page) };
        if slot.page == page && slot.tag >> 1 == self.generation >> 1 {
            slot.tag & 1 != 0
        } else {
            self.classify(v)
        }
    }

    fn is_copyable_custom(&self, ops: Word) -> bool {
        super::is_boxed_integer(ops)
    }

    fn custom_name(&self, ops: Word) -> Result<String, crate::alloc::NoMemory> {
        super::custom_identifier(ops)
    }

    fn bigarray_ops(&self, ops: Word) -> Option<Word> {
        super::copy_ops_of_bigarray(ops)
    }

    fn has_ocaml5_tags(&self) -> bool {
        false
    }
}

/// How this copy remembers what it has seen.
pub enum Visited {
    /// Header marks in blue; the only choice on OCaml 4.
    Marks(HeaderMarks),
}

/// Header marks in blue, static data included (it is writable on OCaml 4).
///
/// # Safety
/// Always safe on OCaml 4; `unsafe` for the same interface as OCaml 5's.
pub unsafe fn visited_set() -> Visited {
    Visited::Marks(HeaderMarks::new(Color::C2))
}

/// What is registered beyond the page table's own records.
struct Registrations {
    /// Live registrations per page, for the pages a registration covers only partly
    /// (its first and last): the only ones another registration can occupy too.
    shared: HashMap<usize, usize, ByAddress>,
    /// Allocations registered only in part, by their start.
    partial: HashMap<usize, Partial, ByAddress>,
}

/// What was registered of an allocation registered only in part.
struct Partial {
    /// The bytes of its blocks (the Bigarray data after them is not registered, see
    /// [`register_blocks`]).
    blocks: usize,
    /// The runs of pages of the blocks registered, in order, when not all of them (of
    /// a copy of large blocks, the pages where blocks start, see [`register_copy`]);
    /// empty when all of them are.
    runs: Vec<PageRun>,
}

impl Registrations {
    fn new() -> Registrations {
        Registrations {
            shared: HashMap::default(),
            partial: HashMap::default(),
        }
    }
}

/// Pages `.0..=.1`.
type PageRun = (usize, usize);

/// The hasher of the maps of [`Registrations`], keyed by page numbers and addresses that
/// no one else chooses: one multiplication (Fibonacci hashing), where the standard
/// library's SipHash, made to resist keys chosen by an attacker, cost some hundred
/// instructions a lookup, at every copy and free beyond the slab.
type ByAddress = BuildHasherDefault<AddressHasher>;

/// See [`ByAddress`].
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        // The high bits are the best mixed: hashbrown takes its buckets from the low bits
        // and its tags from the top 7, so the product is rotated to bring them down too.
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }
}

static REGISTRATIONS: Mutex<Option<Registrations>> = Mutex::new(None);

/// The pages of `[base, base + bytes)`, first and last.
fn page_span(base: *mut u8, bytes: usize) -> (usize, usize) {
    let base = base as usize;
    (base >> PAGE_LOG, (base + bytes - 1) >> PAGE_LOG)
}

/// The pages that `[base, base + bytes)` covers only partly: the only ones another copy
/// can occupy too. At most two: the first and the last.
fn end_pages(base: *mut u8, bytes: usize) -> impl Iterator<Item = usize> {
    let (first, last) = page_span(base, bytes);
    let first_partly = !(base as usize).is_multiple_of(PAGE_BYTES);
    let end_aligned = (base as usize + bytes).is_multiple_of(PAGE_BYTES);
    // The last page once only, when it is the first one too.
    let last_partly = !(end_aligned || first_partly && first == last);
    let first = first_partly.then_some(first);
    let last = last_partly.then_some(last);
    first.into_iter().chain(last)
}

/// Adds (`add`) or removes the pages `from..=to` as static data. False when the page
/// table could not grow.
fn set_pages(add: bool, from: usize, to: usize) -> bool {
    if from > to {
        return true;
    }
    let start = (from << PAGE_LOG) as *const libc::c_void;
    let end = ((to + 1) << PAGE_LOG) as *const libc::c_void;
    // SAFETY: the page table only records the range; it reads no memory in it. Called
    // with the runtime lock held (from a stub).
    unsafe {
        if add {
            caml_page_table_add(IN_STATIC_DATA, start, end) == 0
        } else {
            caml_page_table_remove(IN_STATIC_DATA, start, end) == 0
        }
    }
}

fn registrations() -> std::sync::MutexGuard<'static, Option<Registrations>> {
    REGISTRATIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers the copy `[base, base + bytes)` as static data. False when the page table
/// could not grow.
pub fn register(base: *mut u8, bytes: usize) -> bool {
    register_blocks(base, bytes, bytes)
}

/// Registers the first `blocks` bytes of the allocation `[base, base + bytes)` as static
/// data: its blocks, not the Bigarray data after them. Nothing in the runtime looks up an
/// address in the data (only a Bigarray's data pointer, in a custom block that no GC
/// scans, points there), and the page table takes one entry per page: registering a
/// gigabyte of data costs a quarter of a million entries. [`unregister`] of the
/// allocation removes what was registered. False when the page table could not grow or
/// there was no memory to remember the registration.
fn register_blocks(base: *mut u8, bytes: usize, blocks: usize) -> bool {
    register_runs(base, bytes, blocks, None)
}

/// Copies whose blocks span this many pages each on average, or more, are walked by
/// [`register_copy`]: reading a header costs less than registering a page.
const WALK_FROM_PAGES_PER_BLOCK: usize = 2;

/// Registers the first `blocks` bytes of the allocation `[start, start + total)`, which
/// hold the copy `copied` (after the handle's record, followed by the rest of a region's
/// chunk, or a loaded image's payload), as [`register_blocks`] does; but of a copy of few large blocks (a big
/// string, a float array, an array of a few large strings) only the pages that hold a
/// block's header or its first field, and every page of a closure. The runtime looks up
/// the address of a value only, which is a block's first field, or for an infix pointer
/// a place inside a closure; so the other pages of a block need no entry, and each entry
/// costs the copy and its free a hash-table update (some 0.3 ms each for the 25 600
/// pages of a 100 MB string) and stays in the table for good. False as for
/// [`register_blocks`].
pub fn register_copy(start: *mut u8, total: usize, blocks: usize, copied: &Copied) -> bool {
    let blocks = blocks.min(total);
    if copied.bytes == 0 || blocks == 0 {
        return register_blocks(start, total, blocks);
    }
    let (first, last) = page_span(start, blocks);
    let pages = last - first + 1;
    if copied.blocks.saturating_mul(WALK_FROM_PAGES_PER_BLOCK) > pages {
        return register_blocks(start, total, blocks);
    }
    let mut runs = Vec::new();
    if runs.try_reserve_exact(copied.blocks + 1).is_err() {
        return register_blocks(start, total, blocks);
    }
    // The blocks end before the Bigarray data, if any.
    let blocks_end = copied.base as usize + copied.bytes - copied.data_bytes;
    let mut from = first;
    let mut hd_at = copied.base as usize;
    for _ in 0..copied.blocks {
        if hd_at >= blocks_end {
            break;
        }
        // SAFETY: `hd_at` is the header of a block of the copy just made, inside the
        // allocation: the copy is its blocks one after the other from `copied.base`.
        let hd = Header(unsafe { *(hd_at as *const Word) });
        // Saturating: the payload of a trusted image load is not checked.
        let next = hd_at.saturating_add(hd.whsize().saturating_mul(WORD_BYTES));
        let field_page = (hd_at + WORD_BYTES) >> PAGE_LOG;
        let next_page = (next >> PAGE_LOG).min(last + 1);
        if hd.tag() != layout::CLOSURE_TAG && next_page > field_page + 1 {
            runs.push((from, field_page));
            from = next_page;
        }
        hd_at = next;
    }
    if from <= last {
        runs.push((from, last));
    }
    register_runs(start, total, blocks, Some(runs))
}

/// Registers `runs` (all the pages of the first `blocks` bytes when `None`) of the
/// allocation `[base, base + bytes)`, and remembers what [`unregister`] is to remove.
fn register_runs(base: *mut u8, bytes: usize, blocks: usize, runs: Option<Vec<PageRun>>) -> bool {
    let blocks = blocks.min(bytes);
    if bytes == 0 {
        // An empty buffer (`offheap_copy`'s `{ NULL, 0 }` when nothing was copied):
        // nothing to register. Its page span would be the page before `base`, or for
        // NULL every page of the address space.
        return true;
    }
    let span = page_span(base, blocks);
    let runs = runs.filter(|runs| runs[..] != [span]).unwrap_or_default();
    let partial = blocks < bytes || !runs.is_empty();
    let mut guard = registrations();
    let regs = guard.get_or_insert_with(Registrations::new);
    if partial && regs.partial.try_reserve(1).is_err() {
        return false;
    }
    if regs.shared.try_reserve(2).is_err() {
        return false;
    }
    let to_add = if runs.is_empty() { &[span][..] } else { &runs };
    for (k, &(from, to)) in to_add.iter().enumerate() {
        if !set_pages(true, from, to) {
            // Undo: the runs before and this one, but the end pages that another live
            // registration occupies. A page of this run that the table could not add
            // gets an entry of kind 0, which classifies nothing (not static data).
            let (keep_first, keep_last) = shared_ends(regs, span, end_pages(base, blocks));
            remove_runs(&to_add[..=k], span, keep_first, keep_last);
            return false;
        }
    }
    for page in end_pages(base, blocks) {
        *regs.shared.entry(page).or_insert(0) += 1;
    }
    if partial {
        regs.partial.insert(base as usize, Partial { blocks, runs });
    }
    true
}

/// Whether the first and the last page of `span` are occupied by another live
/// registration, among its end pages `ends`.
fn shared_ends(
    regs: &Registrations,
    span: PageRun,
    ends: impl Iterator<Item = usize>,
) -> (bool, bool) {
    let (mut keep_first, mut keep_last) = (false, false);
    for page in ends {
        if regs.shared.get(&page).is_some_and(|&count| count > 0) {
            keep_first |= page == span.0;
            keep_last |= page == span.1;
        }
    }
    (keep_first, keep_last)
}

/// Removes the pages of `runs`, which lie in `span`, but its first page when
/// `keep_first` and its last when `keep_last`.
fn remove_runs(runs: &[PageRun], span: PageRun, keep_first: bool, keep_last: bool) {
    for &(mut from, mut to) in runs {
        if keep_first && from == span.0 {
            from += 1;
        }
        if keep_last && to == span.1 {
            to = to.wrapping_sub(1);
        }
        if from <= to && to != usize::MAX {
            set_pages(false, from, to);
        }
    }
}

/// Unregisters the allocation `[base, base + bytes)` (what [`register`],
/// [`register_blocks`] or [`register_copy`] registered of it), keeping the end pages
/// that another live registration still occupies. Never removes a page it did not
/// register: OCaml 4's `caml_page_table_remove` inserts an entry for a page it does not
/// know.
pub fn unregister(base: *mut u8, bytes: usize) {
    if bytes == 0 {
        return; // an empty buffer: `register_blocks` registered nothing
    }
    let mut guard = registrations();
    let regs = guard.get_or_insert_with(Registrations::new);
    let partial = if regs.partial.is_empty() {
        None
    } else {
        regs.partial.remove(&(base as usize))
    };
    let (blocks, runs) = partial.map_or((bytes, Vec::new()), |p| (p.blocks, p.runs));
    let span = page_span(base, blocks);
    for page in end_pages(base, blocks) {
        let count = regs.shared.entry(page).or_insert(1);
        *count -= 1;
        if *count == 0 {
            regs.shared.remove(&page);
        }
    }
    let (keep_first, keep_last) = shared_ends(regs, span, end_pages(base, blocks));
    let removed = if runs.is_empty() { &[span][..] } else { &runs };
    remove_runs(removed, span, keep_first, keep_last);
}

/// After a custom allocator's `free`: registers again the end pages of
/// `[base, base + bytes)` that other live copies occupy, in case the allocator removed
/// them itself (allocators written for the original C library do).
pub fn reregister_shared(base: *mut u8, bytes: usize) {
    let guard = registrations();
    if let Some(regs) = guard.as_ref() {
        for page in end_pages(base, bytes) {
            if regs.shared.contains_key(&page) {
                set_pages(true, page, page);
            }
        }
    }
}

/// Whether the block `v` lies outside the major and minor heaps, by the page table:
/// static data, copies (registered as static data) and naked pointers.
///
/// # Safety
/// Called holding the runtime lock.
pub unsafe fn outside_gc_heap(v: Word) -> bool {
    // SAFETY: the page table only hashes the address; it reads no memory there.
    let kind = unsafe { caml_page_table_lookup(v as *const libc::c_void) };
    kind & (IN_HEAP | IN_YOUNG) == 0
}
