//! The OCaml externals of `lib/offheap.ml` and `lib/image.ml`: thin glue between OCaml
//! values and the core.
//!
//! They are `#[ocaml::native_func]`s on raw values. `#[ocaml::func]` would root every
//! argument with boxroot, which the stubs do not need (nothing is allocated on the OCaml
//! heap while a raw value is in use) and which broke copies in bytecode programs linked
//! with systhreads on OCaml 4. The per-call stubs (copy, free, get, stat, drain) are
//! plain `extern "C"` functions instead: `native_func`'s entry reads the environment
//! variable `NO_CAML_STARTUP` at every call, 3% of a small copy's time (measured with
//! `perf`), and sets up a panic guard that `panic = "abort"` makes useless.
//!
//! **Declarations.** Each stub carries its OCaml type in `#[ocaml::sig("...")]` (trailing
//! attributes such as `[@@noalloc]` included). `lib/stubs.ml`, which declares every
//! `external`, is generated from these by `tests/externals.rs`, which fails when the
//! checked-in file differs (`OFFHEAP_BLESS=1 cargo test --test externals` rewrites it):
//! names and arities cannot drift. Types: `'a handle` and `alloc` (the functor
//! parameters of `lib/stubs.ml`), `Outcome.t`, and the standard ones.
//!
//! **Errors.** No exception is raised across Rust frames. Every stub that can fail
//! returns an `Outcome.t` built by [`StubOutcome::into_value`] (`src/outcome.rs`): the
//! immediate `Done` on success (its results written into values OCaml allocated before
//! the call: a handle, an info buffer), or an error, which one OCaml function
//! (`Outcome.fail`) raises as its exception. Success and `No_memory` allocate nothing on
//! the OCaml heap, and the OCaml code between a successful stub and the return of the
//! handle makes no call and no allocation (bytecode checks signals at calls).

use std::borrow::Cow;

use ocaml::{Raw, Value};
use ocaml_sys::caml_alloc_small;

use crate::alloc::{offheap_alloc, offheap_free, Allocator};
use crate::copy;
use crate::handle::{self, WithRecord};
use crate::layout::{val_int, Word, ABSTRACT_TAG};
use crate::outcome::{Reason, StubOutcome};
use crate::release::{self, Outcome};
use crate::runtime;

fn word(v: Raw) -> Word {
    v.0 as Word
}

/// An OCaml value from a word the GC may see: an immediate, or a block it leaves alone.
fn value(w: Word) -> Value {
    // SAFETY: callers pass immediates, fresh blocks or blocks outside the heap; none
    // needs a root here.
    unsafe { Raw(w as isize).as_value() }
}

/// The default allocator block: `Abstract_tag`, field 0 `offheap_alloc`, field 1
/// `offheap_free`.
#[ocaml::native_func]
#[ocaml::sig("unit -> alloc")]
pub fn offheap_stub_malloc(_unit: Raw) -> Value {
    // SAFETY: a fresh abstract block of two fields; the GC never scans its fields, so
    // raw words are stored with plain writes.
    unsafe {
        let block = caml_alloc_small(2, ABSTRACT_TAG);
        let fields = block as *mut Word;
        *fields = offheap_alloc as *const () as usize;
        *fields.add(1) = offheap_free as *const () as usize;
        value(block as Word)
    }
}

/// Copies `v` (static data too when `copy_static`) with the allocator block of the fresh
/// handle `h` (see `handle.rs`) and makes `h` own the copy. Returns `Done`, or an error
/// and `h` stays freed.
#[no_mangle]
#[ocaml::sig("'a handle -> bool -> 'a -> Outcome.t")]
pub extern "C" fn offheap_stub_copy(h: RawValue, copy_static: RawValue, v: RawValue) -> RawValue {
    copy(h as Word, copy_static as Word != val_int(0), v as Word).into_value() as RawValue
}

/// An OCaml value as a stub without `native_func` takes and returns it.
type RawValue = ocaml_sys::Value;

/// The body of [`offheap_stub_copy`]. On OCaml 5, while other domains run, a value of
/// more than `STOP_BEYOND_BLOCKS` blocks is copied with them stopped
/// ([`runtime::among_domains`]).
fn copy(h: Word, copy_static: bool, v: Word) -> StubOutcome {
    // SAFETY: called from a stub, holding the runtime; `h` is the fresh handle of this
    // call.
    unsafe {
        handle::seal_fresh(h);
        release::drain_due();
    }
    // SAFETY: no Rust lock is held here; the copy neither allocates on the OCaml heap nor
    // calls into OCaml (the allocator's contract).
    unsafe { runtime::among_domains([h, v], |&[h, v]| copy_now(h, copy_static, v)) }
        // None: no memory to keep `h` and `v` while the other domains stop.
        .unwrap_or(StubOutcome::NoMemory)
}

/// [`copy`] once the way of copying is settled.
fn copy_now(h: Word, copy_static: bool, v: Word) -> StubOutcome {
    // SAFETY: `h` is the fresh handle of this call.
    let allocator = unsafe { handle::fresh_allocator(h) };
    if allocator.is_default() {
        // The handle's record goes in front of the copy; small copies come from the
        // slab, registered already.
        copy_into(
            h,
            v,
            copy_static,
            WithRecord(runtime::slab::DefaultAllocator),
            |copied| {
                let (start, total) = WithRecord::<()>::allocation(copied);
                // The record and the blocks: not the Bigarray data.
                let blocks = total - copied.bytes + copied.blocks_bytes();
                if !runtime::slab::is_slab_copy(&allocator, total)
                    && !runtime::register_copy(start, total, blocks, copied)
                {
                    return false;
                }
                // SAFETY: `h` is the fresh handle of this call; the root is an immediate or
                // outside the heap; the copy was made through `WithRecord`.
                unsafe { handle::fill(h, copied) };
                true
            },
        )
    } else {
        // Another allocator is asked for the copy's exact size; the record is apart.
        copy_into(h, v, copy_static, allocator, |copied| {
            let blocks = copied.blocks_bytes();
            if !runtime::register_copy(copied.base, copied.bytes, blocks, copied) {
                return false;
            }
            // SAFETY: as above.
            if unsafe { handle::fill_apart(h, copied) } {
                return true;
            }
            runtime::unregister(copied.base, copied.bytes);
            false
        })
    }
}

/// Copies `v` with `allocator` and hands a copy that allocated something to `adopt`,
/// which registers it and fills the handle `h`, or returns false (out of memory) having
/// undone what it did; the copy is then freed. A copy that allocated nothing fills `h`
/// at once.
fn copy_into<A: Allocator>(
    h: Word,
    v: Word,
    copy_static: bool,
    mut allocator: A,
    adopt: impl FnOnce(&copy::Copied) -> bool,
) -> StubOutcome {
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; the allocator's contract forbids calls into OCaml.
    let copied = match unsafe { runtime::copy_value(v, copy_static, &mut allocator) } {
        Ok(copied) => copied,
        Err(e) => return e.into(),
    };
    if copied.base.is_null() {
        // SAFETY: `h` is the fresh handle of this call; the root is an immediate or
        // shared.
        unsafe { handle::fill(h, &copied) };
    } else if !adopt(&copied) {
        // SAFETY: the copy was just allocated by this allocator and nothing refers to it.
        unsafe { allocator.free(copied.base, copied.bytes) };
        return StubOutcome::NoMemory;
    }
    StubOutcome::Done
}

/// What a copy of `v` would take, without making it: writes its bytes, blocks and
/// transient bytes into the int array `stats` (3 fields). Returns `Done` or the error
/// `copy` would give.
#[ocaml::native_func]
#[ocaml::sig("'a -> int array -> Outcome.t")]
pub fn offheap_stub_measure(v: Raw, stats: Raw) -> Value {
    value(measure(word(v), word(stats)).into_value())
}

/// The body of [`offheap_stub_measure`]: as [`copy`], on OCaml 5 beside other domains, a
/// value of more than `STOP_BEYOND_BLOCKS` blocks is measured with them stopped.
fn measure(v: Word, stats: Word) -> StubOutcome {
    // SAFETY: as in `copy`: no Rust lock is held, the traversal neither allocates on the
    // OCaml heap nor calls into OCaml.
    unsafe { runtime::among_domains([v, stats], |&[v, stats]| measure_now(v, stats)) }
        .unwrap_or(StubOutcome::NoMemory)
}

/// [`measure`] once the way of measuring is settled.
fn measure_now(v: Word, stats: Word) -> StubOutcome {
    // SAFETY: called from a stub holding the runtime; nothing is allocated on the OCaml
    // heap until the traversal returns.
    match unsafe { runtime::measure_value(v, false) } {
        Ok(m) => {
            let fields = stats as *mut Word;
            // SAFETY: `stats` is an int array of 3 fields; immediates need no barrier.
            unsafe {
                *fields = val_int(m.bytes as isize);
                *fields.add(1) = val_int(m.blocks as isize);
                *fields.add(2) = val_int(m.transient_bytes as isize);
            }
            StubOutcome::Done
        }
        Err(e) => e.into(),
    }
}

/// Whether `v` is a block outside the GC heap. Allocates nothing.
#[ocaml::native_func]
#[ocaml::sig("'a -> bool [@@noalloc]")]
pub fn offheap_stub_is_offheap(v: Raw) -> Value {
    // SAFETY: `v` is a value; we hold the runtime.
    value(val_int(isize::from(unsafe {
        runtime::is_offheap(word(v))
    })))
}

/// Frees the handle `h`. Returns `Done`; `Done_slice n` when done and the OCaml side
/// should run a major slice of n words (OCaml 5, many bytes waiting: see `release.rs`);
/// the misuse error when `h` was freed already; `No_memory` when there was no memory to
/// queue the free (`h` is still live).
#[no_mangle]
#[ocaml::sig("'a handle -> Outcome.t")]
pub extern "C" fn offheap_stub_free(h: RawValue) -> RawValue {
    // SAFETY: called from a stub holding the runtime; `h` is a handle; nothing is
    // allocated on the OCaml heap until the outcome is built.
    let outcome = unsafe {
        release::drain_due();
        match release::free(h as Word) {
            Outcome::Done(0) => StubOutcome::Done,
            Outcome::Done(slice_words) => StubOutcome::DoneSlice(slice_words),
            Outcome::AlreadyFreed => StubOutcome::Misuse(Cow::Borrowed("Offheap.free: deleted")),
            Outcome::OutOfMemory => StubOutcome::NoMemory,
        }
    };
    outcome.into_value() as RawValue
}

/// The root of the handle `h` while it is live, else `freed`. Allocates nothing.
#[no_mangle]
#[ocaml::sig("'a handle -> Obj.t -> Obj.t [@@noalloc]")]
pub extern "C" fn offheap_stub_get(h: RawValue, freed: RawValue) -> RawValue {
    // SAFETY: `h` is a handle; nothing is allocated here.
    unsafe { handle::root_if_live(h as Word, freed as Word) as RawValue }
}

/// Statistic `which` of the handle `h`, live or freed: 0 bytes, 1 blocks, 2 transient
/// bytes. Allocates nothing.
#[no_mangle]
#[ocaml::sig("'a handle -> int -> int [@@noalloc]")]
pub extern "C" fn offheap_stub_stat(h: RawValue, which: RawValue) -> RawValue {
    // SAFETY: `h` is a handle; nothing is allocated here.
    let record = unsafe { handle::record(h as Word) };
    let n = match which as Word {
        w if w == val_int(0) => record.bytes,
        w if w == val_int(1) => record.blocks,
        _ => record.transient_bytes,
    };
    val_int(n as isize) as RawValue
}

/// Releases the freed copies whose major cycle (OCaml 4: marking) has ended.
#[no_mangle]
#[ocaml::sig("unit -> unit")]
pub extern "C" fn offheap_stub_drain(_unit: RawValue) -> RawValue {
    // SAFETY: called from a stub holding the runtime.
    unsafe { release::drain_due() };
    val_int(0) as RawValue
}

/// Whether frees may wait (both runtimes: OCaml 5 for the running major cycle, OCaml 4
/// for the running marking).
#[ocaml::native_func]
#[ocaml::sig("unit -> bool")]
pub fn offheap_stub_defers_free(_unit: Raw) -> Value {
    value(val_int(runtime::DEFERS_FREE as isize))
}

/// Called once by a bytecode program: freed copies wait one major cycle more there
/// (`release::hold_longer_in_bytecode`).
#[ocaml::native_func]
#[ocaml::sig("unit -> unit")]
pub fn offheap_stub_bytecode(_unit: Raw) -> Value {
    release::hold_longer_in_bytecode();
    value(val_int(0))
}

/// Freed copies waiting for the end of a major cycle.
#[ocaml::native_func]
#[ocaml::sig("unit -> int")]
pub fn offheap_stub_pending_frees(_unit: Raw) -> Value {
    value(val_int(release::pending() as isize))
}

// ---------------------------------------------------------------------------------------
// Images (lib/image.ml). The file work runs with the runtime lock released, so these
// stubs keep no OCaml value across it: arguments are copied into Rust first, results
// are written or allocated afterwards.
// ---------------------------------------------------------------------------------------

use crate::image::{self, file, CheckKind, LoadError, WriteError};
use crate::message::{try_format, Lossy};

/// The bytes of the OCaml string `s`; `None` when there is no memory for them.
fn string_bytes(s: Raw) -> Option<Vec<u8>> {
    // SAFETY: `s` is an OCaml string, alive during the call; its length is read from
    // its header and padding, then its bytes copied.
    let bytes = unsafe {
        let len = ocaml_sys::caml_string_length(s.0);
        std::slice::from_raw_parts(word(s) as *const u8, len)
    };
    crate::alloc::try_copy(bytes)
}

fn path_of(bytes: &[u8]) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// The outcome of the system error `e` on `path`: `Sys_error` with the path and the
/// system's reason, or `No_memory` for a lack of memory (and when there is no memory
/// for the message).
fn sys_error(path: &[u8], e: &std::io::Error) -> StubOutcome {
    if e.raw_os_error() == Some(libc::ENOMEM) || e.kind() == std::io::ErrorKind::OutOfMemory {
        return StubOutcome::NoMemory;
    }
    let message = match e.raw_os_error() {
        Some(code) => {
            // SAFETY: strerror returns a NUL-terminated static or thread-local string.
            let reason = unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) };
            try_format(format_args!(
                "{}: {}",
                Lossy(path),
                Lossy(reason.to_bytes())
            ))
        }
        None => try_format(format_args!("{}: {e}", Lossy(path))),
    };
    message.map_or(StubOutcome::NoMemory, StubOutcome::System)
}

/// The `Sys_error` for a `path` that is not a regular file.
fn not_a_regular_file(path: &[u8]) -> StubOutcome {
    try_format(format_args!("{}: {}", Lossy(path), file::NotRegularFile))
        .map_or(StubOutcome::NoMemory, StubOutcome::System)
}

/// The outcome of a failed load of `path` (`op`: "load" or "info").
fn load_failure(op: &str, path: &[u8], e: LoadError) -> StubOutcome {
    match e {
        LoadError::Io(e) => sys_error(path, &e),
        LoadError::NotRegularFile => not_a_regular_file(path),
        LoadError::OutOfMemory(_) => StubOutcome::NoMemory,
        e => {
            let kind = e.check_kind().unwrap_or(CheckKind::BadStructure);
            try_format(format_args!("Offheap.Image.{op}: {}: {e}", Lossy(path)))
                .map_or(StubOutcome::NoMemory, |m| StubOutcome::BadImage(kind, m))
        }
    }
}

fn image_process(flat_float_array: bool) -> image::Process {
    image::Process {
        ocaml_family: if cfg!(ocaml5) { 5 } else { 4 },
        flat_float_array,
        custom_ops: runtime::image_custom_ops(),
    }
}

/// Runs `f` with the runtime lock released, `roots` kept alive meanwhile; `None`, `f`
/// not run, when there is no memory to keep them.
///
/// While `f` runs, other threads (and on OCaml 5 other domains) run OCaml and collect:
/// a young value held across the call in a local variable would be moved and the stub
/// would write to its old place. The values a stub needs afterwards are therefore put in
/// `roots`, kept in slots that the GC scans and updates (`release::Rooted`: the
/// runtime's global roots allocate when registered and raise `Out_of_memory` when they
/// cannot), and read back from there once `f` has returned. No signal handler runs
/// ([`runtime::released`]).
fn unlocked<const N: usize, T>(roots: &mut [Word; N], f: impl FnOnce() -> T) -> Option<T> {
    // SAFETY: we hold the runtime.
    let kept = unsafe { release::Kept::new(roots) }?;
    // SAFETY: every OCaml value the caller uses after `f` is in `roots`; `f` touches none.
    let r = unsafe { runtime::released(f) };
    kept.read_back(roots);
    Some(r)
}

/// `Image.write`: copies `v` (static data too) and writes its image to `path` with `key`.
/// Returns `Done` or an error.
#[ocaml::native_func]
#[ocaml::sig("string -> string -> bool -> 'a -> Outcome.t")]
pub fn offheap_stub_image_write(path: Raw, key: Raw, flat_float_array: Raw, v: Raw) -> Value {
    value(image_write(path, key, flat_float_array, v).into_value())
}

/// The body of [`offheap_stub_image_write`]: the value is copied straight into the file
/// (the traversal's write pass feeds the image writer), with the runtime held: the
/// traversal reads the heap.
fn image_write(path: Raw, key: Raw, flat_float_array: Raw, v: Raw) -> StubOutcome {
    let (Some(path), Some(key)) = (string_bytes(path), string_bytes(key)) else {
        return StubOutcome::NoMemory;
    };
    let process = image_process(word(flat_float_array) != val_int(0));
    crate::fault::point("image-write");
    let write = |v: Word| {
        image::write_with(path_of(&path), &key, &process, |out| {
            // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until
            // the copy returns; the writer does not call into OCaml.
            match unsafe { runtime::copy_value_into(v, true, out) } {
                Ok(written) => Ok(written.root),
                Err(e) => Err(WriteError::NotCopyable(e)),
            }
        })
    };
    // As [`copy`]: on OCaml 5 beside other domains, a value of more than
    // `STOP_BEYOND_BLOCKS` blocks is written with them stopped, which then wait for the
    // whole write, the file's included.
    // SAFETY: as in `copy`: no Rust lock is held; the write neither allocates on the
    // OCaml heap nor calls into OCaml.
    let Some(written) = (unsafe { runtime::among_domains([word(v)], |&[v]| write(v)) }) else {
        return StubOutcome::NoMemory;
    };
    match written {
        Ok(()) => StubOutcome::Done,
        Err(WriteError::Io(e)) => sys_error(&path, &e),
        Err(WriteError::NotRegularFile) => not_a_regular_file(&path),
        Err(WriteError::OutOfMemory) => StubOutcome::NoMemory,
        Err(WriteError::NotCopyable(e)) => e.into(),
        Err(WriteError::Closure) => StubOutcome::CannotCopy(Reason::Closure),
        Err(WriteError::OutsideHeap(_)) => StubOutcome::CannotCopy(Reason::OutsideHeap),
        Err(WriteError::Custom(ops)) => match runtime::custom_identifier(ops) {
            Ok(name) => StubOutcome::CannotCopy(Reason::Custom(name)),
            Err(_) => StubOutcome::NoMemory,
        },
        Err(e @ WriteError::KeyTooLong(_)) => StubOutcome::misuse(format_args!("{e}")),
    }
}

/// `Image.load`: loads and checks the image at `path`. `flags`: 1 verify, 2 trusted, 4
/// never at the recorded address, 8 flat float arrays, 16 map the file (shared); the
/// bits from 5 up: the threads the checks may use (0: one per core). On
/// success the fresh handle `h` (allocator: the owner of payloads at their recorded
/// address) owns the payload and the word past it, registered with the runtime; its
/// allocator becomes `relocated_owner` when the payload was relocated; returns `Done`.
/// Else returns an error and `h` stays freed.
#[ocaml::native_func]
#[ocaml::sig("'a handle -> alloc -> string -> string -> int -> Outcome.t")]
pub fn offheap_stub_image_load(
    h: Raw,
    relocated_owner: Raw,
    path: Raw,
    key: Raw,
    flags: Raw,
) -> Value {
    value(image_load(h, relocated_owner, path, key, flags).into_value())
}

/// The body of [`offheap_stub_image_load`].
fn image_load(h: Raw, relocated_owner: Raw, path: Raw, key: Raw, flags: Raw) -> StubOutcome {
    let (Some(path), Some(key)) = (string_bytes(path), string_bytes(key)) else {
        return StubOutcome::NoMemory;
    };
    let flags = word(flags) as isize >> 1;
    let opts = image::Options {
        key,
        verify: flags & 1 != 0,
        trusted: flags & 2 != 0,
        relocate: flags & 4 != 0,
        share: flags & 16 != 0,
        threads: (flags >> 5) as usize,
    };
    let process = image_process(flags & 8 != 0);
    let mut roots = [word(h), word(relocated_owner)];
    let Some(loaded) = unlocked(&mut roots, || {
        crate::fault::point("image-load");
        image::load_file(path_of(&path), &opts, &process)
    }) else {
        return StubOutcome::NoMemory;
    };
    // Where the handle and the allocator block are now.
    let [h, relocated_owner] = roots;
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return load_failure("load", &path, e),
    };
    // The payload and the word past it (a pointer to a last block of no fields lies in
    // registered memory too), or its blocks only when Bigarray data follows them; of a
    // payload of few large blocks, the pages where they start (`register_copy`).
    let payload = copy::Copied {
        root: loaded.root,
        base: loaded.base,
        bytes: loaded.bytes,
        blocks: loaded.blocks,
        data_bytes: loaded.bytes.saturating_sub(loaded.blocks_bytes),
        transient_bytes: 0,
    };
    if !loaded.base.is_null()
        && !runtime::register_copy(loaded.base, loaded.held(), loaded.blocks_bytes, &payload)
    {
        // SAFETY: just loaded; nothing refers to it.
        unsafe { file::unmap(loaded.base, loaded.held(), loaded.mapping) };
        return StubOutcome::NoMemory;
    }
    // SAFETY: `h` is the fresh handle of this call, `relocated_owner` an allocator
    // block; the root lies outside the heap (registered on OCaml 4, NOT_MARKABLE
    // headers on OCaml 5).
    unsafe {
        if loaded.mapping == file::Mapping::Relocated {
            handle::set_alloc(h, relocated_owner);
        }
        let copied = copy::Copied {
            root: loaded.root,
            base: loaded.base,
            bytes: loaded.held(),
            blocks: loaded.blocks,
            // Registered above already; the handle keeps no more than the size.
            data_bytes: 0,
            transient_bytes: 0,
        };
        if loaded.base.is_null() {
            handle::fill(h, &copied);
        } else if !handle::fill_apart(h, &copied) {
            runtime::unregister(loaded.base, loaded.held());
            // SAFETY: just loaded; nothing refers to it.
            file::unmap(loaded.base, loaded.held(), loaded.mapping);
            return StubOutcome::NoMemory;
        }
    }
    StubOutcome::Done
}

/// `Image.info`: the header of the image at `path`, decoded and checked on its own.
/// Writes into the int array `fields` (10 fields): format version, OCaml family, flat
/// float arrays (0 or 1), word bytes, recorded address, payload bytes, blocks, custom
/// blocks, key length, file bytes; and the key into `key` (at least
/// [`offheap_stub_image_max_key`] bytes). Returns `Done` or an error.
#[ocaml::native_func]
#[ocaml::sig("string -> int array -> bytes -> Outcome.t")]
pub fn offheap_stub_image_info(path: Raw, fields: Raw, key: Raw) -> Value {
    value(image_info(path, fields, key).into_value())
}

/// The body of [`offheap_stub_image_info`].
fn image_info(path: Raw, fields: Raw, key: Raw) -> StubOutcome {
    let Some(path) = string_bytes(path) else {
        return StubOutcome::NoMemory;
    };
    let mut roots = [word(fields), word(key)];
    let header = unlocked(&mut roots, || image::read_header(path_of(&path)));
    // Where the int array and the key buffer are now.
    let [fields, key] = roots;
    match header {
        None => StubOutcome::NoMemory,
        Some(Ok(h)) => {
            let ints = [
                h.version as usize,
                h.ocaml_family as usize,
                usize::from(h.flat_float_array),
                h.word_bytes as usize,
                h.address as usize,
                h.payload_bytes as usize,
                h.blocks as usize,
                h.customs as usize,
                h.key.len(),
                h.file_bytes() as usize,
            ];
            // SAFETY: `fields` is an int array of 10 fields and `key` a byte sequence of
            // at least `format::MAX_KEY` bytes (lib/image.ml); both are only written
            // with immediates and bytes, which need no barrier.
            unsafe {
                let out = fields as *mut Word;
                for (i, n) in ints.into_iter().enumerate() {
                    *out.add(i) = val_int(n as isize);
                }
                std::ptr::copy_nonoverlapping(h.key.as_ptr(), key as *mut u8, h.key.len());
            }
            StubOutcome::Done
        }
        Some(Err(e)) => load_failure("info", &path, e),
    }
}

/// The longest key an image can have (`format::MAX_KEY`): the size of the key buffer
/// of `Image.info`.
#[ocaml::native_func]
#[ocaml::sig("unit -> int")]
pub fn offheap_stub_image_max_key(_unit: Raw) -> Value {
    value(val_int(image::format::MAX_KEY as isize))
}

/// The allocator block that owns loaded payloads of mapping `kind` (1 at the recorded
/// address, 2 relocated): it never allocates, and its free unmaps.
#[ocaml::native_func]
#[ocaml::sig("int -> alloc")]
pub fn offheap_stub_image_owner(kind: Raw) -> Value {
    let unmap: file::FreeFn = if word(kind) == val_int(1) {
        file::offheap_image_unmap_recorded
    } else {
        file::offheap_image_unmap_relocated
    };
    // SAFETY: as in `offheap_stub_malloc`: a fresh abstract block of two raw words.
    unsafe {
        let block = caml_alloc_small(2, ABSTRACT_TAG);
        let fields = block as *mut Word;
        *fields = file::offheap_image_no_alloc as *const () as usize;
        *fields.add(1) = unmap as *const () as usize;
        value(block as Word)
    }
}

/// Recomputes the header checksum of the image held in `image` (at least a header page;
/// shorter: nothing done). For tests that forge headers.
#[ocaml::native_func]
#[ocaml::sig("bytes -> unit")]
pub fn offheap_stub_image_reseal(image: Raw) -> Value {
    // SAFETY: `image` is an OCaml byte sequence, alive and not moved during the call
    // (nothing is allocated); its length comes from its header.
    unsafe {
        let len = ocaml_sys::caml_string_length(image.0);
        if len >= image::format::HEADER_BYTES {
            image::format::reseal(std::slice::from_raw_parts_mut(word(image) as *mut u8, len));
        }
    }
    value(val_int(0))
}
