//! OCaml 5 (no naked pointers, several domains): headers tell heap from not.
//!
//! - Classification: a pointer into the minor heaps is copied; any other block is in the
//!   major heap unless its header has the `NOT_MARKABLE` color, which static data and
//!   copies already off the heap carry. Those are kept as they are (or, with
//!   `copy_static`, copied: static data and earlier copies cannot be told apart).
//! - Visited set: with one domain, header marks in the color the GC calls `GARBAGE` this
//!   cycle: no reachable major block has it (it marks the blocks found dead last cycle).
//!   Young blocks all have color 0 (the runtime's `Alloc_small` and compiled code
//!   allocate them so; nothing recolors them before the minor GC moves them), which may
//!   be that color, so they are marked in the `NOT_MARKABLE` color, which none has.
//!   While other domains run, their collectors read the headers of shared blocks at any
//!   time: a copy that cannot stop them (a region's add, the C API, static data) keeps a
//!   side table and never writes to the source; `Offheap.copy` stops them instead
//!   ([`with_world_stopped`]) and marks headers as if alone.
//! - Registration: none; compare, hash and Marshal accept any well-formed block.
//! - Freeing waits for the major cycle running at `free` time to end: its marker may
//!   still reach the copy through blocks that were alive when the cycle began.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::copy::visited::{Budgeted, MarksOutside, SideTable};
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
    /// Minor collections completed since the program started (`minor_gc.h`; `_Atomic`):
    /// each one a stop-the-world section, counted inside it, once every running domain
    /// has entered it from a safe point.
    static caml_minor_collections_count: std::sync::atomic::AtomicUsize;
    /// The out-of-heap bytes that dead custom blocks may hold before the GC has done a
    /// cycle's work for them (custom.h): the major heap's size times
    /// `custom_major_ratio` (OCAMLRUNPARAM `M`, default 44) / 150. Reads this domain's
    /// state.
    fn caml_custom_get_max_major() -> usize;
    /// `custom_major_ratio` (custom.h).
    static caml_custom_major_ratio: usize;
    /// Adds `res / max` of a cycle to the major GC work this domain has incurred (counted
    /// at its next slice, left for the others to do once it has none of its own) and past
    /// a fifth asks every domain for a slice (memory.c). Sets fields of this domain's
    /// state and requests an interrupt: runs no GC and no OCaml code, allocates nothing.
    fn caml_adjust_gc_speed(res: usize, max: usize);
    /// Runs `handler` on every domain in a stop-the-world section (domain.h): returns 0,
    /// having run nothing of ours, when another domain leads a section (this domain has
    /// then taken part in that one, which may have run a minor collection).
    fn caml_try_run_on_all_domains(
        handler: StwHandler,
        data: *mut libc::c_void,
        leader_setup: Option<unsafe extern "C" fn(*mut libc::c_void)>,
    ) -> libc::c_int;
}

/// A stop-the-world callback: `(domain state, data, participants, their states)`.
type StwHandler =
    unsafe extern "C" fn(*mut libc::c_void, *mut libc::c_void, libc::c_int, *mut *mut libc::c_void);

/// Frees wait for the running major cycle.
pub const DEFERS_FREE: bool = true;

/// How much [`major_cycles_completed`] grows over one whole major cycle.
pub const COUNTS_PER_CYCLE: usize = 1;

/// Whether the stub that calls this (holding its domain's lock) runs alone: when no
/// other domain runs, since a domain starts only from OCaml code (`Domain.spawn`), which
/// no other domain runs meanwhile; else other domains run OCaml code and stubs.
pub fn stub_runs_alone() -> bool {
    !others_running()
}

/// The runtime's action on a root during a scan (`caml/roots.h`: `scanning_action`).
type ScanningAction = unsafe extern "C" fn(data: *mut libc::c_void, v: Word, slot: *mut Word);
/// The runtime's hook for roots of its users (`caml_scan_roots_hook`): the action, its
/// flags and data, the domain whose roots are scanned.
type ScanRootsHook = unsafe extern "C" fn(
    action: ScanningAction,
    flags: libc::c_int,
    data: *mut libc::c_void,
    domain: *mut libc::c_void,
);

extern "C" {
    /// Called by every domain's scan of its roots: its part of a minor collection, the
    /// start of a major cycle's marking, compaction (`caml/roots.h`; `_Atomic`).
    static caml_scan_roots_hook: std::sync::atomic::AtomicPtr<libc::c_void>;
}

/// The hook that was installed before ours, called by ours (null for none).
static PREVIOUS_ROOTS_HOOK: std::sync::atomic::AtomicPtr<libc::c_void> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Our hook: the slots of `release::Rooted`, then the previous hook's roots. Every domain
/// scans them (a domain that would be the only one could end): the table's lock makes
/// the scans take turns, and the second scan of a slot finds what the first left (a
/// promoted block, a marked one, a compacted one's new place), on which the action does
/// nothing.
unsafe extern "C" fn scan_roots(
    action: ScanningAction,
    flags: libc::c_int,
    data: *mut libc::c_void,
    domain: *mut libc::c_void,
) {
    // SAFETY: the GC's action on a root, given its data, the root's value and its slot,
    // which stays in place for the scan (no stub changes the table while the GC runs).
    crate::release::scan_roots(|slot| unsafe { action(data, *slot, slot) });
    let previous = PREVIOUS_ROOTS_HOOK.load(Ordering::Acquire);
    if !previous.is_null() {
        // SAFETY: the hook that was installed, with the runtime's arguments.
        unsafe {
            std::mem::transmute::<*mut libc::c_void, ScanRootsHook>(previous)(
                action, flags, data, domain,
            )
        };
    }
}

/// Installs the hook that scans the slots of `release::Rooted`, once, keeping the one
/// installed before (the threads library's) to call it.
pub fn install_roots_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the runtime's atomic hook; ours calls the previous one, stored before
        // ours can run.
        unsafe {
            let ours = scan_roots as ScanRootsHook as *mut libc::c_void;
            let mut previous = caml_scan_roots_hook.load(Ordering::Acquire);
            loop {
                PREVIOUS_ROOTS_HOOK.store(previous, Ordering::Release);
                match caml_scan_roots_hook.compare_exchange(
                    previous,
                    ours,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => previous = now,
                }
            }
        }
    });
}

/// Data that only stubs use (a region's state): other domains' stubs run meanwhile, so
/// behind a mutex.
pub struct StubLock<T>(std::sync::Mutex<T>);

/// The data of a [`StubLock`], while a stub uses it.
pub type StubGuard<'a, T> = std::sync::MutexGuard<'a, T>;

impl<T> StubLock<T> {
    /// `value`, for stubs to share.
    pub const fn new(value: T) -> StubLock<T> {
        StubLock(std::sync::Mutex::new(value))
    }

    /// The data, for the stub that runs, once other holders are done.
    ///
    /// # Safety
    /// Called holding the runtime; the guard is dropped before anything that may wait
    /// for the other domains (an allocation on the OCaml heap, a safepoint): a domain
    /// waiting for this lock inside a stub does not answer them.
    pub unsafe fn lock(&self) -> StubGuard<'_, T> {
        // Panics abort, so a poisoned mutex still guards consistent data.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether the free of a slab copy must wait as others do: yes, a stale pointer into a
/// slot that a later copy took may point inside one of its blocks, where the marker
/// would read a field as a header.
pub const SLAB_FREES_WAIT: bool = true;

/// Whether a large copy that waits gives its pages back at its free (`release`): yes. A
/// free waits for the end of a whole major cycle, which may be long in coming (a program
/// that allocates little, a domain that promotes nothing); dropping the pages costs a
/// free of a flat copy 3-4% of the copy's time (`make bench-ocaml5`), and spares the GC
/// work the waiting memory would owe.
pub const DISCARDS_AT_FREE: bool = true;

/// Whether a free must wait: always (its marker reads the headers of blocks that
/// reachable blocks point to, whatever the memory).
pub fn free_must_wait() -> bool {
    true
}

/// Minor collections completed since the program started. Once it has grown by 2 past
/// a value read by a stub, every domain running at that stub's time has been at a safe
/// point since: whatever C code of the runtime (a marking slice) was running then, on
/// any domain, has returned.
pub fn minor_collections() -> usize {
    // SAFETY: an atomic counter of the runtime, which only grows.
    unsafe { caml_minor_collections_count.load(Ordering::Acquire) }
}

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

/// Tells the runtime of `bytes` freed, `per_cycle` of which are worth a major cycle's
/// work, for every domain to share, when other domains run: returns whether it did. A
/// domain that promotes nothing marks only with the budget of work incurred by others,
/// which explicit slices (`Gc.major_slice`) never incur (`release::PENDING_LIMIT`).
///
/// # Safety
/// Called holding the runtime.
pub unsafe fn share_gc_work(bytes: usize, per_cycle: usize) -> bool {
    if !others_running() {
        return false;
    }
    // SAFETY: the caller holds the runtime; the call only sets this domain's state.
    unsafe { caml_adjust_gc_speed(bytes, per_cycle.max(1)) };
    true
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
        // a header, or is an infix pointer into one (whose own color is then the
        // enclosing closure's).
        let hd = unsafe { layout::read_enclosing_header(v) };
        self.copy_static || hd.color() != Color::Unmarkable
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
        true
    }
}

/// How this copy remembers what it has seen.
pub enum Visited {
    /// One domain, or the others stopped: header marks (static data in a side table).
    Marks(MarksOutside),
    /// Several domains: a side table; the source is never written.
    Table(SideTable),
    /// Several domains, for a copy that may stop them: a side table for at most
    /// [`STOP_BEYOND_BLOCKS`] blocks ([`try_without_stopping`]).
    Budgeted(Budgeted<SideTable>),
}

/// The most blocks a copy that may stop the other domains copies with a side table: a
/// stop-the-world section costs some tens of microseconds (the other domains must reach
/// a safe point and wake up again), which is what the side table's hash lookups cost on
/// about a thousand blocks; beyond, header marks with the world stopped win, and the
/// side table's work thrown away is bounded by this.
pub const STOP_BEYOND_BLOCKS: usize = 1024;

thread_local! {
    /// Whether this thread's copy now may stop the other domains (its visited set is then
    /// a [`Budgeted`] side table), and whether that budget was exceeded.
    static BUDGET: Cell<(bool, bool)> = const { Cell::new((false, false)) };
}

/// The [`Budgeted`] side table's note that the value is larger than its budget.
fn note_exceeded() {
    BUDGET.with(|b| b.set((b.get().0, true)));
}

/// Runs `copy` (a copy through this backend's [`visited_set`]) in the way of a copy that
/// may stop the other domains: with a side table for at most [`STOP_BEYOND_BLOCKS`]
/// blocks. Returns `None` when the value has more: the copy then failed having allocated
/// and changed nothing, and is to be made with the world stopped ([`with_world_stopped`]).
pub fn try_without_stopping<R>(copy: impl FnOnce() -> R) -> Option<R> {
    BUDGET.with(|b| b.set((true, false)));
    let counts = crate::copy::small::counts();
    let r = copy();
    let (_, exceeded) = BUDGET.with(|b| b.replace((false, false)));
    if exceeded {
        // Made again with the world stopped: the copy counts once among the thread's
        // copies that skip the walk of small values.
        crate::copy::small::restore_counts(counts);
    }
    (!exceeded).then_some(r)
}

/// Whether another domain runs now (the runtime's own test, `caml_domain_alone`, negated).
pub fn others_running() -> bool {
    // SAFETY: an atomic counter of the runtime.
    unsafe { caml_num_domains_running.load(Ordering::Acquire) != 1 }
}

thread_local! {
    /// Whether this thread runs a task of [`with_world_stopped`] now.
    static WORLD_STOPPED: Cell<bool> = const { Cell::new(false) };
}

/// One stop-the-world section of [`with_world_stopped`], shared with the other domains'
/// handlers through the section's data pointer.
struct Section<'a> {
    /// The thread that leads it (the one calling [`with_world_stopped`]).
    leader: libc::pthread_t,
    /// The work, run by the leader while the others wait; taken when it runs.
    task: Cell<Option<&'a mut dyn FnMut()>>,
    /// Set by the leader when the task is over.
    done: Mutex<bool>,
    finished: Condvar,
    /// The other participants that have stopped using the section: the leader waits for
    /// all of them before the section (on its stack) goes away.
    left: AtomicUsize,
}

/// The stop-the-world callback of [`with_world_stopped`]: the leader runs the task, the
/// others wait for it to end. Every participant runs it after the runtime's entry
/// barrier, so while the task runs no other domain runs OCaml code or GC work (a domain
/// in a blocking section takes part through its backup thread, which waits here too).
unsafe extern "C" fn run_section(
    _domain: *mut libc::c_void,
    data: *mut libc::c_void,
    participants: libc::c_int,
    _states: *mut *mut libc::c_void,
) {
    // SAFETY: `data` is the `Section` of `with_world_stopped`, which lives until every
    // other participant has counted itself in `left` (below).
    let section = unsafe { &*(data as *const Section) };
    // SAFETY: plain thread identity queries.
    if unsafe { libc::pthread_equal(libc::pthread_self(), section.leader) } != 0 {
        if let Some(task) = section.task.take() {
            WORLD_STOPPED.with(|stopped| stopped.set(true));
            task();
            WORLD_STOPPED.with(|stopped| stopped.set(false));
        }
        *section.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        section.finished.notify_all();
        let others = (participants.max(1) - 1) as usize;
        while section.left.load(Ordering::Acquire) < others {
            std::hint::spin_loop();
        }
    } else {
        let mut done = section.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = section
                .finished
                .wait(done)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(done);
        // The last use of the section.
        section.left.fetch_add(1, Ordering::Release);
    }
}

/// Runs `task` while every other domain waits in a stop-the-world section, so that it
/// may mark headers as if this domain were alone ([`visited_set`] then chooses header
/// marks). `roots` are OCaml values the task needs: getting the section may first take
/// part in another domain's section, which may move young blocks, so they are kept in
/// slots that the GC scans (`release::Rooted`) for the call and the task reads them
/// afresh (`task(roots)`). While other domains' sections keep it from starting its own,
/// it waits with the runtime released ([`back_off`]): other threads of this domain may
/// run OCaml code meanwhile.
///
/// The other domains wait for the whole task, as they would for a minor collection
/// requested during it (a copy reaches no safe point). Returns the task's result; `None`
/// when there was no memory for the slots (the task did not run), or if the runtime ran
/// a section without calling its callback on this thread, which it never does.
///
/// # Safety
/// Called from a stub holding the domain lock, with no Rust lock held that another
/// domain may be waiting for outside a safe point; `task` must not allocate on the OCaml
/// heap or call into OCaml.
pub unsafe fn with_world_stopped<const N: usize, R>(
    roots: &mut [Word; N],
    task: impl FnOnce(&[Word; N]) -> R,
) -> Option<R> {
    // SAFETY: we hold the domain lock.
    let kept = unsafe { crate::release::Kept::new(roots) }?;
    let mut task = Some(task);
    let mut result = None;
    let mut run = || {
        if let Some(task) = task.take() {
            // Where the values are now that no collection can run.
            kept.read_back(roots);
            result = Some(task(roots));
        }
    };
    let section = Section {
        // SAFETY: a plain thread identity query.
        leader: unsafe { libc::pthread_self() },
        task: Cell::new(Some(&mut run)),
        done: Mutex::new(false),
        finished: Condvar::new(),
        left: AtomicUsize::new(0),
    };
    let mut failed: u32 = 0;
    // SAFETY: `run_section` is a stop-the-world callback that takes `section` as its
    // data; a failed try took part in another section and is tried again.
    while unsafe {
        caml_try_run_on_all_domains(run_section, &section as *const Section as *mut _, None)
    } == 0
    {
        failed = failed.saturating_add(1);
        // SAFETY: the caller's contract; the task's values are kept in `kept`.
        unsafe { back_off(failed) };
    }
    result
}

/// Failed tries to start a section after which [`back_off`] sleeps rather than yields.
const YIELDS: u32 = 4;
/// The longest sleep of [`back_off`], as a power of two of microseconds (1 ms).
const MAX_SLEEP_LOG2_US: u32 = 10;

/// Waits after the `failed`-th failed try of [`with_world_stopped`] to start its section.
/// A try fails at once while another domain's section runs or ends, and domains that
/// tried again at once took the processors from those that must still leave that
/// section before the next can start: with more domains than cores, each copying values
/// that stop the others, 8, 16 and 40 domains on 2 cores took 4.8, 13 and 31 times as
/// long as the same domains running `Gc.minor` (a section of the runtime's own) instead
/// (`make bench-many-domains`). So the first retries yield the processor, and the next
/// sleep, from 2 us doubling up to 1 ms, with the runtime released: this domain's
/// backup thread takes part in other domains' sections for it meanwhile, and its other
/// threads run.
///
/// # Safety
/// As [`with_world_stopped`]; the caller's OCaml values are kept where the GC updates
/// them.
unsafe fn back_off(failed: u32) {
    if failed <= YIELDS {
        std::thread::yield_now();
        return;
    }
    let micros = 1i64 << (failed - YIELDS).min(MAX_SLEEP_LOG2_US);
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: micros * 1000,
    };
    // SAFETY: the caller's contract; the sleep touches no OCaml value.
    unsafe {
        super::released(|| libc::nanosleep(&pause, std::ptr::null_mut()));
    }
}

/// Chooses the visited set for a copy starting now: header marks when this domain is
/// alone (or the world is stopped), in the `NOT_MARKABLE` color for young blocks,
/// except for blocks outside the GC heap, some of which are read-only (the atom table):
/// those go to a side table ([`MarksOutside`]). With other domains running, a side
/// table for everything.
///
/// # Safety
/// Called holding the domain lock, which is kept until the copy ends.
pub unsafe fn visited_set() -> Visited {
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
        let alone = !others_running() || WORLD_STOPPED.with(Cell::get);
        if !alone && BUDGET.with(Cell::get).0 {
            let table = SideTable::new();
            return Visited::Budgeted(Budgeted::new(table, STOP_BEYOND_BLOCKS, note_exceeded));
        }
        if !alone {
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
pub fn register_copy(
    _start: *mut u8,
    _total: usize,
    _blocks: usize,
    _copied: &crate::copy::Copied,
) -> bool {
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
/// `v` points to a block or is an infix pointer into one (OCaml 5 has no naked
/// pointers); called holding the domain lock.
pub unsafe fn outside_gc_heap(v: Word) -> bool {
    // SAFETY: set when the runtime reserves the minor heaps; stable while we run.
    let young = unsafe { (caml_minor_heaps_start, caml_minor_heaps_end) };
    if v > young.0 && v < young.1 {
        return false;
    }
    // SAFETY: every pointer in a value leads to a block with a header, or is an infix
    // pointer into one: the color is that of the enclosing closure.
    unsafe { layout::read_enclosing_header(v) }.color() == Color::Unmarkable
}
