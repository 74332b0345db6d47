//! The OCaml externals of `lib/region.ml`: regions on the real runtime.
//!
//! A region is the OCaml record `{ cell; alloc; mutable image_owner }` of
//! `lib/region.ml`. `cell` is a custom block holding a pointer to a [`Cell`]: the
//! [`Region`] behind a mutex, so that adds from several domains serialize, and its
//! freed flag. The custom block's finaliser drops the `Cell` once the record is
//! unreachable: a stub working on a region always holds the record, so the `Cell` is
//! alive for the call whatever other domains do (a concurrent `free` only sets the
//! flag and takes the chunks, under the mutex). The finaliser does not free the chunks:
//! values taken from the region may outlive the record (as a copy outlives a lost
//! handle), so an unfreed region's chunks stay allocated.
//!
//! The stubs are plain `extern "C"` functions on raw values (at most five arguments, so
//! the same function serves bytecode): no ocaml-rs glue runs per call. `add` and `mem`
//! allocate nothing on the OCaml heap and are `[@@noalloc]`. Errors of `add` are kept
//! in a thread-local stack that `offheap_region_error` turns into an `Outcome.t`
//! (`src/outcome.rs`): the failed add returns the marker it was given. `free` returns an
//! `Outcome.t` as `offheap_stub_free` does. Each stub's OCaml type is in its
//! `#[ocaml::sig]`, from which `lib/stubs.ml` is generated.

use std::borrow::Cow;
use std::cell::RefCell;
use std::mem::ManuallyDrop;

use ocaml_sys::Value;

use crate::alloc::{CAllocator, NoMemory};
use crate::copy::{Copied, CopyError};
use crate::handle::{self, Owned};
use crate::layout::{is_immediate, val_int, Word};
use crate::outcome::StubOutcome;
use crate::region::{Owner, Region, Registry, DEFAULT_CHUNK_BYTES};
use crate::release::{self, Outcome};
use crate::runtime::{self, StubGuard, StubLock};

/// Fields of the region record.
const CELL: usize = 0;
const ALLOC: usize = 1;
const IMAGE_OWNER: usize = 2;

/// What the mutex guards.
struct Cell {
    /// Set by `free`; an add or adopt then fails, and the chunks are gone.
    freed: bool,
    region: Region,
}

/// Why an add failed, until the OCaml side asks.
enum AddError {
    Freed,
    Copy(CopyError),
    /// OCaml 5, other domains running: the value has more blocks than a side table
    /// takes; [`offheap_region_add_stopped`] adds it with the other domains stopped.
    #[cfg(ocaml5)]
    StopTheWorld,
}

/// How many errors of failed adds a thread keeps (see [`Errors`]).
const KEPT_ERRORS: usize = 8;

/// The errors of a thread's failed adds not yet asked for, the latest on top. A stack,
/// not one slot: a signal handler or finaliser may run (and add to a region, failing)
/// between a failed add and the OCaml side's [`offheap_region_error`]; it takes its own
/// error off the top and leaves the interrupted add's beneath. An error whose add was
/// interrupted by an exception is never asked for: beyond [`KEPT_ERRORS`], the oldest
/// is dropped.
struct Errors {
    slots: [Option<AddError>; KEPT_ERRORS],
    len: usize,
}

impl Errors {
    fn push(&mut self, e: AddError) {
        if self.len == KEPT_ERRORS {
            self.slots[0] = None;
            self.slots.rotate_left(1);
            self.len -= 1;
        }
        self.slots[self.len] = Some(e);
        self.len += 1;
    }

    /// The latest error, taken off the stack when `take(&error)` says so.
    fn pop_if(&mut self, take: impl FnOnce(&AddError) -> bool) -> Option<AddError> {
        let top = self.len.checked_sub(1)?;
        if !self.slots[top].as_ref().is_some_and(take) {
            return None;
        }
        self.len = top;
        self.slots[top].take()
    }
}

thread_local! {
    /// The errors of this thread's failed adds, until the OCaml side asks. Without a
    /// destructor ([`crate::thread_end`]): what is left is dropped when the thread ends.
    static LAST_ERRORS: RefCell<ManuallyDrop<Errors>> = const {
        RefCell::new(ManuallyDrop::new(Errors { slots: [const { None }; KEPT_ERRORS], len: 0 }))
    };
}

/// Drops the errors of the calling thread's failed adds that were never asked for: its
/// thread ends.
pub(crate) fn thread_ends() {
    LAST_ERRORS.with(|errors| {
        if let Ok(mut errors) = errors.try_borrow_mut() {
            while errors.pop_if(|_| true).is_some() {}
        }
    });
}

/// The runtime's registry: OCaml 4's page table, nothing on OCaml 5.
struct RuntimeRegistry;

impl Registry for RuntimeRegistry {
    fn register(&mut self, base: *mut u8, bytes: usize) -> bool {
        runtime::register(base, bytes)
    }
    fn register_copy(
        &mut self,
        base: *mut u8,
        bytes: usize,
        blocks: usize,
        copied: &Copied,
    ) -> bool {
        runtime::register_copy(base, bytes, blocks, copied)
    }
    fn unregister(&mut self, base: *mut u8, bytes: usize) {
        runtime::unregister(base, bytes)
    }
    fn after_free(&mut self, base: *mut u8, bytes: usize) {
        runtime::reregister_shared(base, bytes)
    }
}

fn field(block: Value, i: usize) -> Word {
    // SAFETY: callers pass the region record (three fields) or a handle, alive for the
    // stub; nothing allocates on the OCaml heap while the word is used.
    unsafe { *(block as *const Word).add(i) }
}

/// The `Cell` pointer inside the custom block `cell` (null when creating it failed).
fn cell_ptr(cell: Word) -> *mut StubLock<Cell> {
    // SAFETY: a custom block of ours: field 0 the operations, field 1 the pointer.
    unsafe { *(cell as *const *mut StubLock<Cell>).add(1) }
}

/// The locked cell of the region record `r`; `None` for a record whose creation ran
/// out of memory (never handed out by `create`).
///
/// While the guard lives, nothing may allocate on the OCaml heap, call into OCaml or
/// otherwise reach a safepoint (OCaml 5): a domain blocked on this lock inside a stub
/// does not answer the runtime's stop-the-world requests, so a holder that joins one
/// (an allocation that starts a minor collection) waits for it forever. Stubs therefore
/// drop the guard before building their OCaml result.
fn lock<'a>(r: Value) -> Option<StubGuard<'a, Cell>> {
    let ptr = cell_ptr(field(r, CELL));
    // SAFETY: the cell lives until the custom block is finalised, which cannot happen
    // while `r` (which points to it) is an argument of the running stub.
    let cell = unsafe { ptr.as_ref()? };
    // SAFETY: only stubs call this, holding the runtime, and each drops the guard before
    // it allocates on the OCaml heap or releases the runtime (see above), never locking
    // a region twice.
    Some(unsafe { cell.lock() })
}

/// The finaliser of the custom block: drops the cell (chunks of an unfreed region leak).
unsafe extern "C" fn finalize(cell: Value) {
    let ptr = cell_ptr(cell as Word);
    if !ptr.is_null() {
        // SAFETY: made by `Box::into_raw` in `offheap_region_cell`, dropped once here.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// Custom operations, shareable between threads.
struct Ops(ocaml_sys::custom_operations);

// SAFETY: never written; its pointers lead to static data and functions.
unsafe impl Sync for Ops {}

/// The custom operations of cells: finalised, not comparable, hashable, nor
/// serializable (the defaults).
static CELL_OPS: Ops = Ops(ocaml_sys::custom_operations {
    identifier: c"offheap.region".as_ptr(),
    finalize: Some(finalize),
    compare: None,
    hash: None,
    serialize: None,
    deserialize: None,
    compare_ext: None,
    fixed_length: std::ptr::null(),
});

/// The size of a region's chunks after the first when neither the allocator nor the
/// chunk size was chosen: one huge page, which the default allocator maps as such
/// (`alloc::maps_huge`): a growing region takes its memory a huge page at a time (a page
/// fault per 2 MiB instead of one per 4 KiB), while a small region holds no more than
/// its first chunk of 1 MiB.
const LATER_CHUNK_BYTES: usize = crate::alloc::HUGE_PAGE;

/// A new cell for a region whose small adds take chunks of `chunk_bytes` from `alloc`
/// (0: the default size, and with the default allocator, whole huge pages after the
/// first chunk: see [`LATER_CHUNK_BYTES`]). Returns the custom block, or the integer 1
/// when out of memory.
#[no_mangle]
#[ocaml::sig("int -> alloc -> region_cell")]
pub extern "C" fn offheap_region_cell(chunk_bytes: Value, alloc: Value) -> Value {
    // SAFETY: called from OCaml holding the runtime.
    unsafe { release::drain_due() };
    // SAFETY: `alloc` is an allocator block (the OCaml side's type); only its function
    // fields are compared.
    let default_alloc = unsafe { CAllocator::new(alloc as Word) }.is_default();
    let (chunk_bytes, later_chunk_bytes) = match chunk_bytes >> 1 {
        n if n <= 0 && default_alloc => (DEFAULT_CHUNK_BYTES, LATER_CHUNK_BYTES),
        n if n <= 0 => (DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES),
        n => (n as usize, n as usize),
    };
    // SAFETY: a custom block with one word of data, zeroed below before anything else
    // can see it; allocating it may run a minor GC, which holds no pointer of ours.
    let block =
        unsafe { ocaml_sys::caml_alloc_custom(&CELL_OPS.0, std::mem::size_of::<Word>(), 0, 1) };
    // SAFETY: field 1 of the fresh custom block is its data word.
    unsafe { *(block as *mut *mut StubLock<Cell>).add(1) = std::ptr::null_mut() };
    let cell = StubLock::new(Cell {
        freed: false,
        region: Region::new(chunk_bytes, later_chunk_bytes),
    });
    let layout = std::alloc::Layout::new::<StubLock<Cell>>();
    // SAFETY: a non-zero-sized layout.
    let ptr = unsafe { std::alloc::alloc(layout) } as *mut StubLock<Cell>;
    if ptr.is_null() {
        return val_int(1) as Value;
    }
    // SAFETY: fresh memory of the right layout, then handed to the block, which
    // frees it with `Box::from_raw` (the global allocator, this layout).
    unsafe {
        ptr.write(cell);
        *(block as *mut *mut StubLock<Cell>).add(1) = ptr;
    }
    block
}

/// Adds `v` to the region `r` (copying blocks outside the heap too when `deep`):
/// returns its copy (or `v` itself when nothing was copied), or `failed` and keeps the
/// error for [`offheap_region_error`]. Allocates nothing on the OCaml heap.
///
/// On OCaml 5 beside other domains, a value of more than `STOP_BEYOND_BLOCKS` blocks
/// fails here having changed nothing (the error [`AddError::StopTheWorld`]): this
/// external may not wait for the other domains (it is `noalloc`, and it holds the
/// region's lock while it copies), so the OCaml side calls
/// [`offheap_region_add_stopped`], which adds it with them stopped.
#[no_mangle]
#[ocaml::sig("region -> 'a -> Obj.t -> bool -> Obj.t [@@noalloc]")]
pub extern "C" fn offheap_region_add(r: Value, v: Value, failed: Value, deep: Value) -> Value {
    #[cfg(ocaml5)]
    if runtime::may_stop_world() {
        return runtime::try_without_stopping(|| add(r, v, failed, deep))
            .unwrap_or_else(|| failure(AddError::StopTheWorld, failed));
    }
    add(r, v, failed, deep)
}

/// After [`offheap_region_add`] returned `failed`: when its error is
/// [`AddError::StopTheWorld`], adds `v` to `r` with the other domains stopped (as
/// `Offheap.copy` copies a large value beside them: header marks, 8 bytes a block, where
/// a side table and its snapshot take some 100) and returns what that add returns; else
/// returns `failed`, the error kept. The region's lock is taken inside the section:
/// other domains hold it only inside region stubs, which have no safe point, so none
/// holds it while stopped.
#[no_mangle]
#[ocaml::sig("region -> 'a -> Obj.t -> bool -> Obj.t")]
#[cfg_attr(not(ocaml5), allow(unused_variables))]
pub extern "C" fn offheap_region_add_stopped(
    r: Value,
    v: Value,
    failed: Value,
    deep: Value,
) -> Value {
    #[cfg(ocaml5)]
    {
        let stop = LAST_ERRORS.with(|errors| {
            errors
                .borrow_mut()
                .pop_if(|e| matches!(e, AddError::StopTheWorld))
                .is_some()
        });
        if stop {
            let mut roots = [r as Word, v as Word, failed as Word];
            // SAFETY: no Rust lock is held here (the region's was released by the
            // failed add); the add neither allocates on the OCaml heap nor calls into
            // OCaml. `r`, `v` and `failed` are rooted for the wait and read afresh.
            let added = unsafe {
                runtime::with_world_stopped(&mut roots, |&[r, v, failed]| {
                    add(r as Value, v as Value, failed as Value, deep)
                })
            };
            return added.unwrap_or_else(|| {
                failure(AddError::Copy(CopyError::OutOfMemory(0)), roots[2] as Value)
            });
        }
    }
    failed
}

/// [`offheap_region_add`] once the way of copying is settled.
fn add(r: Value, v: Value, failed: Value, deep: Value) -> Value {
    let Some(mut cell) = lock(r) else {
        return failure(AddError::Freed, failed);
    };
    if cell.freed {
        return failure(AddError::Freed, failed);
    }
    // SAFETY: field 1 of the record is its allocator block, alive (the record holds it).
    let mut alloc = unsafe { CAllocator::new(field(r, ALLOC)) };
    let added = cell.region.add(&mut alloc, &mut RuntimeRegistry, |bump| {
        // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the
        // copy returns; the allocator's contract forbids calls into OCaml.
        unsafe { runtime::copy_value(v as Word, deep as Word != val_int(0), bump) }
    });
    match added {
        Ok(copied) => copied.root as Value,
        Err(e) => failure(AddError::Copy(e), failed),
    }
}

#[cold]
fn failure(e: AddError, failed: Value) -> Value {
    // Errors never asked for are dropped at the thread's end, once it is watched (else,
    // with no memory for that, they stay: at most `KEPT_ERRORS`).
    crate::thread_end::watched();
    LAST_ERRORS.with(|errors| errors.borrow_mut().push(e));
    failed
}

/// The error of this thread's last failed add, as an `Outcome.t`: the misuse error
/// when the region was freed, `No_memory`, `Cannot_copy` with the reason, or the misuse
/// error of a misaligned allocator.
#[no_mangle]
#[ocaml::sig("unit -> Outcome.t")]
pub extern "C" fn offheap_region_error(_unit: Value) -> Value {
    let e = LAST_ERRORS.with(|errors| errors.borrow_mut().pop_if(|_| true));
    let outcome = match e {
        None | Some(AddError::Freed) => {
            StubOutcome::Misuse(Cow::Borrowed("Offheap.Region.add: freed"))
        }
        #[cfg(ocaml5)]
        Some(AddError::StopTheWorld) => StubOutcome::Misuse(Cow::Borrowed(
            "Offheap.Region.add: no stop-the-world section",
        )),
        Some(AddError::Copy(e)) => StubOutcome::of_copy_error(e, "Offheap.Region.add"),
    };
    outcome.into_value() as Value
}

/// Whether `v` is a block inside one of the chunks of `r` (false once freed).
#[no_mangle]
#[ocaml::sig("region -> 'a -> bool [@@noalloc]")]
pub extern "C" fn offheap_region_mem(r: Value, v: Value) -> Value {
    let inside = !is_immediate(v as Word)
        && lock(r).is_some_and(|cell| !cell.freed && cell.region.contains(v as Word));
    val_int(inside as isize) as Value
}

/// Fact `i` of `r` that [`offheap_region_stats`] does not give: 0 its chunk size, 1
/// whether it was freed.
#[no_mangle]
#[ocaml::sig("region -> int -> int [@@noalloc]")]
pub extern "C" fn offheap_region_stat(r: Value, i: Value) -> Value {
    let Some(cell) = lock(r) else {
        return val_int(0) as Value;
    };
    let n = match i >> 1 {
        0 => cell.region.chunk_bytes(),
        _ => cell.freed as usize,
    };
    val_int(n as isize) as Value
}

/// Writes the stats of `r` into `fields` (an OCaml array of 5 ints): bytes, reserved,
/// blocks, chunks (now), values, all read under one lock, so that they describe one
/// moment even while other domains add (zeros for a record whose creation failed).
#[no_mangle]
#[ocaml::sig("region -> int array -> unit [@@noalloc]")]
pub extern "C" fn offheap_region_stats(r: Value, fields: Value) -> Value {
    let (s, chunks) = match lock(r) {
        Some(cell) => (cell.region.stats(), cell.region.chunk_count()),
        None => (Default::default(), 0),
    };
    for (i, n) in [s.bytes, s.reserved, s.blocks, chunks, s.values]
        .into_iter()
        .enumerate()
    {
        // SAFETY: `fields` is an array of 5 ints allocated by the caller, alive for the
        // call; an immediate needs no write barrier.
        unsafe { *(fields as *mut Word).add(i) = val_int(n as isize) };
    }
    val_int(0) as Value
}

/// Frees every chunk of `r`. Returns, as `offheap_stub_free`: `Done`; `Done_slice n`
/// when the OCaml side should run a major slice of n words (OCaml 5, much waiting); the
/// misuse error when freed already; `No_memory` (nothing changed).
#[no_mangle]
#[ocaml::sig("region -> Outcome.t")]
pub extern "C" fn offheap_region_free(r: Value) -> Value {
    // SAFETY: called from OCaml holding the runtime.
    unsafe { release::drain_due() };
    // The outcome is built on the OCaml heap once the lock is released (see `lock`).
    freed(free_chunks(r)).into_value() as Value
}

/// Frees every chunk of `r` under its lock, allocating nothing on the OCaml heap.
fn free_chunks(r: Value) -> Outcome {
    let (alloc, image_owner) = (field(r, ALLOC), field(r, IMAGE_OWNER));
    // The root that keeps the allocator block alive while the chunks wait, made before
    // the region's lock is taken (see `release::Rooted`).
    // SAFETY: `alloc` is the region's allocator block; called from a stub holding the
    // runtime, with no lock held and nothing to drop yet.
    let Some(root) = (unsafe { release::Rooted::new(alloc) }) else {
        return Outcome::OutOfMemory;
    };
    let Some(mut cell) = lock(r) else {
        return Outcome::AlreadyFreed;
    };
    if cell.freed {
        return Outcome::AlreadyFreed;
    }
    let count = cell.region.chunk_count();
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap; the chunks'
    // allocator blocks are fields of `r`, alive for the call.
    unsafe {
        release::free_all(count, (alloc, root), || {
            cell.freed = true;
            let chunks = cell.region.take_chunks().into_iter().map(|c| Owned {
                base: c.base,
                bytes: c.bytes,
                alloc: match c.owner {
                    Owner::Region => alloc,
                    Owner::Image => image_owner,
                },
            });
            // Collected in place, into the vector of the chunks taken: no allocation
            // that could fail during a free (tests/faults/test_free_oom; see the
            // assertion below).
            Some(chunks.collect())
        })
    }
}

// The standard library collects a mapped `vec::IntoIter` in place when the items have the
// same size and alignment: `free_chunks` relies on it to allocate nothing.
const _: () = assert!(
    std::mem::size_of::<Owned>() == std::mem::size_of::<crate::region::Chunk>()
        && std::mem::align_of::<Owned>() == std::mem::align_of::<crate::region::Chunk>()
);

/// The `Outcome.t` of a region's free, as `offheap_stub_free` reports a handle's.
fn freed(outcome: Outcome) -> StubOutcome {
    match outcome {
        Outcome::Done(0) => StubOutcome::Done,
        Outcome::Done(slice_words) => StubOutcome::DoneSlice(slice_words),
        Outcome::AlreadyFreed => already_freed(),
        Outcome::OutOfMemory => StubOutcome::NoMemory,
    }
}

/// The error of freeing a region twice.
fn already_freed() -> StubOutcome {
    StubOutcome::Misuse(Cow::Borrowed("Offheap.Region.free: freed"))
}

/// Moves the payload of the freshly loaded image handle `h` into the empty region `r`
/// as its first chunk, owned by the image (`r.image_owner` becomes the handle's
/// allocator block). Returns the payload's root, or `failed` when out of memory (then
/// `h` still owns the payload). The payload's blocks are counted by
/// [`offheap_region_count_loaded`].
#[no_mangle]
#[ocaml::sig("region -> 'a handle -> Obj.t -> Obj.t")]
pub extern "C" fn offheap_region_adopt(r: Value, h: Value, failed: Value) -> Value {
    let (root, owned) = {
        let Some(mut cell) = lock(r) else {
            return failed;
        };
        if cell.freed || cell.region.reserve_chunk().is_err() {
            return failed;
        }
        // SAFETY: `h` is a handle, `failed` never a root; nothing allocates meanwhile.
        let root = unsafe { handle::root_if_live(h as Word, failed as Word) };
        // SAFETY: as above.
        let Some((owned, apart)) = (unsafe { handle::take(h as Word) }) else {
            return failed;
        };
        // SAFETY: the handle is the fresh one of `load_image`, which no other thread or
        // domain has seen: no other stub reads its record.
        unsafe { apart.free() };
        let adopted: Result<(), NoMemory> = if owned.base.is_null() {
            Ok(())
        } else {
            cell.region.adopt(owned.base, owned.bytes)
        };
        debug_assert!(adopted.is_ok(), "room reserved above");
        (root, owned)
    };
    // The lock is released before the write barrier runs (see `lock`).
    // SAFETY: a field of the live record, written with the runtime's write barrier.
    unsafe { ocaml_sys::caml_modify((r as *mut Value).add(IMAGE_OWNER), owned.alloc as Value) };
    root as Value
}

/// Counts `blocks` loaded blocks (those of the image adopted by `r`) in its stats.
#[no_mangle]
#[ocaml::sig("region -> int -> unit [@@noalloc]")]
pub extern "C" fn offheap_region_count_loaded(r: Value, blocks: Value) -> Value {
    if let Some(mut cell) = lock(r) {
        cell.region.count_loaded(blocks as usize >> 1);
    }
    val_int(0) as Value
}
