//! The OCaml externals of `lib/offheap.ml`: thin glue between OCaml values and the core.
//!
//! They are `#[ocaml::native_func]`s on raw values. `#[ocaml::func]` would root every
//! argument with boxroot, which the stubs do not need (nothing is allocated on the OCaml
//! heap while a raw value is in use) and which broke copies in bytecode programs linked
//! with systhreads on OCaml 4. The per-call stubs (copy, free, get, drain) are plain
//! `extern "C"` functions instead: `native_func`'s entry reads the environment variable
//! `NO_CAML_STARTUP` at every call, 3% of a small copy's time (measured with `perf`),
//! and sets up a panic guard that `panic = "abort"` makes useless. No exception is raised
//! across Rust frames: errors come back as values and the OCaml side raises.

use ocaml::{Raw, Value};
use ocaml_sys::{caml_alloc_small, caml_copy_string};

use crate::alloc::{offheap_alloc, offheap_free, Allocator, CAllocator};
use crate::copy;
use crate::handle::{self, WithRecord};
use crate::layout::{val_int, Word, ABSTRACT_TAG};
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
/// handle `h` (see `handle.rs`) and makes `h` own the copy. Returns 0; or 1 when the
/// allocator ran out of memory, or the message of the `Invalid_argument` to raise, and
/// `h` stays freed.
#[no_mangle]
pub extern "C" fn offheap_stub_copy(h: RawValue, copy_static: RawValue, v: RawValue) -> RawValue {
    raw(copy(
        h as Word,
        copy_static as Word != val_int(0),
        v as Word,
    ))
}

/// An OCaml value as a stub without `native_func` takes and returns it.
type RawValue = ocaml_sys::Value;

/// The raw word of `v`.
fn raw(v: Value) -> RawValue {
    v.raw().0
}

/// The body of [`offheap_stub_copy`].
fn copy(h: Word, copy_static: bool, v: Word) -> Value {
    // SAFETY: called from a stub, holding the runtime.
    unsafe { release::drain_due() };
    // SAFETY: field 1 of a handle is its allocator block (the OCaml type `alloc` only
    // comes from `malloc` or from C code that builds one), alive for the call.
    let allocator = unsafe { CAllocator::new(*(h as *const Word).add(1)) };
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
                if !runtime::slab::is_slab_copy(&allocator, total)
                    && !runtime::register(start, total)
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
            if !runtime::register(copied.base, copied.bytes) {
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
) -> Value {
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; the allocator's contract forbids calls into OCaml.
    let copied = match unsafe { runtime::copy_value(v, copy_static, &mut allocator) } {
        Ok(copied) => copied,
        Err(e) if e.is_out_of_memory() => return value(val_int(1)),
        // SAFETY: the message is a NUL-free Rust string; one allocation, nothing else
        // held.
        Err(e) => {
            return unsafe {
                value(caml_copy_string(
                    nul_terminated(&e.to_string()).as_ptr() as *const ocaml_sys::Char
                ) as Word)
            }
        }
    };
    if copied.base.is_null() {
        // SAFETY: `h` is the fresh handle of this call; the root is an immediate or
        // shared.
        unsafe { handle::fill(h, &copied) };
    } else if !adopt(&copied) {
        // SAFETY: the copy was just allocated by this allocator and nothing refers to it.
        unsafe { allocator.free(copied.base, copied.bytes) };
        return value(val_int(1));
    }
    value(val_int(0))
}

/// `s` with a NUL at the end, any NUL inside it replaced.
fn nul_terminated(s: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = s.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    bytes.push(0);
    bytes
}

/// Frees the handle `h`. Returns 0 when done; n > 0 when done and the OCaml side should
/// run a major slice of n words (OCaml 5, many bytes waiting: see `release.rs`); -1 when
/// `h` was freed already; -2 when there was no memory to queue the free (`h` is still
/// live).
#[no_mangle]
pub extern "C" fn offheap_stub_free(h: RawValue) -> RawValue {
    // SAFETY: called from a stub holding the runtime; `h` is a handle; nothing is
    // allocated on the OCaml heap here.
    let code = unsafe {
        release::drain_due();
        match release::free(h as Word) {
            Outcome::Done(slice_words) => slice_words as isize,
            Outcome::AlreadyFreed => -1,
            Outcome::OutOfMemory => -2,
        }
    };
    val_int(code) as RawValue
}

/// The root of the handle `h` while it is live, else `freed`. Allocates nothing.
#[no_mangle]
pub extern "C" fn offheap_stub_get(h: RawValue, freed: RawValue) -> RawValue {
    // SAFETY: `h` is a handle; nothing is allocated here.
    unsafe { handle::root_if_live(h as Word, freed as Word) as RawValue }
}

/// Statistic `which` of the handle `h`, live or freed: 0 bytes, 1 blocks, 2 transient
/// bytes. Allocates nothing.
#[no_mangle]
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

/// Releases the freed copies whose major cycle has ended (OCaml 5).
#[no_mangle]
pub extern "C" fn offheap_stub_drain(_unit: RawValue) -> RawValue {
    // SAFETY: called from a stub holding the runtime.
    unsafe { release::drain_due() };
    val_int(0) as RawValue
}

/// Whether `free` waits for the running major cycle to end (OCaml 5).
#[ocaml::native_func]
pub fn offheap_stub_defers_free(_unit: Raw) -> Value {
    value(val_int(runtime::DEFERS_FREE as isize))
}

/// Freed copies waiting for the end of a major cycle.
#[ocaml::native_func]
pub fn offheap_stub_pending_frees(_unit: Raw) -> Value {
    value(val_int(release::pending() as isize))
}

// ---------------------------------------------------------------------------------------
// Images (lib/image.ml). The file work runs with the runtime lock released, so these
// stubs keep no OCaml value across it: arguments are copied into Rust first, results
// are allocated afterwards. A failure returns a string whose first byte says which
// exception to raise (`S` Sys_error, `I` Offheap.Image.Invalid_image, `A`
// Invalid_argument, `M` Out_of_memory) and whose rest is the message.
// ---------------------------------------------------------------------------------------

use crate::image::{self, file, LoadError, WriteError};

/// The bytes of the OCaml string `s`.
fn string_bytes(s: Raw) -> Vec<u8> {
    // SAFETY: `s` is an OCaml string, alive during the call; its length is read from
    // its header and padding, then its bytes copied.
    unsafe {
        let len = ocaml_sys::caml_string_length(s.0);
        std::slice::from_raw_parts(word(s) as *const u8, len).to_vec()
    }
}

fn path_of(bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

/// The message of `Sys_error` for `e` on `path`, as the standard library words it.
fn sys_error(path: &[u8], e: &std::io::Error) -> String {
    let reason = match e.raw_os_error() {
        // SAFETY: strerror returns a NUL-terminated static or thread-local string.
        Some(code) => unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) }
            .to_string_lossy()
            .into_owned(),
        None => e.to_string(),
    };
    format!("{}: {reason}", String::from_utf8_lossy(path))
}

/// A failure string: `code` then `message`.
fn image_failure(code: u8, message: &str) -> Value {
    let mut s = vec![code];
    s.extend_from_slice(message.as_bytes());
    let s = nul_terminated(&String::from_utf8_lossy(&s));
    // SAFETY: one allocation of a fresh string; no other OCaml value is held.
    unsafe { value(caml_copy_string(s.as_ptr() as *const ocaml_sys::Char) as Word) }
}

fn image_process(flat_float_array: bool) -> image::Process {
    image::Process {
        ocaml_family: if cfg!(ocaml5) { 5 } else { 4 },
        flat_float_array,
        custom_ops: runtime::image_custom_ops(),
    }
}

extern "C" {
    /// `caml_enter_blocking_section` without running pending signal handlers and
    /// actions first (OCaml 4.13 and 5.3, `caml/signals.h`): they run in OCaml once the
    /// stub has returned, instead of raising through Rust frames.
    fn caml_enter_blocking_section_no_pending();
}

/// Runs `f` with the runtime lock released. No signal handler runs on the way in (see
/// [`caml_enter_blocking_section_no_pending`]), nor on the way out
/// (`caml_leave_blocking_section` only records pending signals).
fn unlocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the callers hold no OCaml value across `f`, and `f` touches none.
    unsafe { caml_enter_blocking_section_no_pending() };
    let r = f();
    // SAFETY: pairs with the enter above.
    unsafe { ocaml_sys::caml_leave_blocking_section() };
    r
}

/// `Image.write`: copies `v` (static data too) and writes its image to `path` with `key`.
/// Returns unit, or a failure string.
#[ocaml::native_func]
pub fn offheap_stub_image_write(path: Raw, key: Raw, flat_float_array: Raw, v: Raw) -> Value {
    image_write(path, key, flat_float_array, v)
}

/// The body of [`offheap_stub_image_write`]: the value is copied straight into the file
/// (the traversal's write pass feeds the image writer), with the runtime held: the
/// traversal reads the heap.
fn image_write(path: Raw, key: Raw, flat_float_array: Raw, v: Raw) -> Value {
    let path = string_bytes(path);
    let key = string_bytes(key);
    let process = image_process(word(flat_float_array) != val_int(0));
    crate::fault::point("image-write");
    let written = image::write_with(&path_of(&path), &key, &process, |out| {
        // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the
        // copy returns; the writer does not call into OCaml.
        match unsafe { runtime::copy_value_into(word(v), true, out) } {
            Ok(written) => Ok(written.root),
            Err(e) if e.is_out_of_memory() => Err(WriteError::OutOfMemory),
            Err(e) => {
                let what = e.to_string();
                let what = what.strip_prefix("Offheap.copy: ").unwrap_or(&what);
                Err(WriteError::Unsupported(what.to_string()))
            }
        }
    });
    match written {
        Ok(()) => value(val_int(0)),
        Err(WriteError::Io(e)) => image_failure(b'S', &sys_error(&path, &e)),
        Err(WriteError::OutOfMemory) => image_failure(b'M', ""),
        Err(e) => image_failure(b'A', &e.to_string()),
    }
}

/// `Image.load`: loads and checks the image at `path`. `flags`: 1 verify, 2 trusted, 4
/// never at the recorded address, 8 flat float arrays, 16 map the file (shared); the
/// bits from 5 up: the threads the checks may use (0: one per core). On
/// success the fresh handle `h` (allocator: the owner of payloads at their recorded
/// address) owns the payload and the word past it, registered with the runtime; its
/// allocator becomes `relocated_owner` when the payload was relocated; returns 0.
/// Else returns a failure string and `h` stays freed.
#[ocaml::native_func]
pub fn offheap_stub_image_load(
    h: Raw,
    relocated_owner: Raw,
    path: Raw,
    key: Raw,
    flags: Raw,
) -> Value {
    image_load(h, relocated_owner, path, key, flags)
}

/// The body of [`offheap_stub_image_load`].
fn image_load(h: Raw, relocated_owner: Raw, path: Raw, key: Raw, flags: Raw) -> Value {
    let path = string_bytes(path);
    let flags = word(flags) as isize >> 1;
    let opts = image::Options {
        key: string_bytes(key),
        verify: flags & 1 != 0,
        trusted: flags & 2 != 0,
        relocate: flags & 4 != 0,
        share: flags & 16 != 0,
        threads: (flags >> 5) as usize,
    };
    let process = image_process(flags & 8 != 0);
    let loaded = match unlocked(|| {
        crate::fault::point("image-load");
        image::load_file(&path_of(&path), &opts, &process)
    }) {
        Ok(loaded) => loaded,
        Err(LoadError::Io(e)) => return image_failure(b'S', &sys_error(&path, &e)),
        Err(LoadError::OutOfMemory(_)) => return image_failure(b'M', ""),
        Err(e) => {
            let message = format!(
                "Offheap.Image.load: {}: {e}",
                String::from_utf8_lossy(&path)
            );
            return image_failure(b'I', &message);
        }
    };
    // The payload and the word past it: a pointer to a last block of no fields lies in
    // registered memory too.
    if !loaded.base.is_null() && !runtime::register(loaded.base, loaded.held()) {
        // SAFETY: just loaded; nothing refers to it.
        unsafe { file::unmap(loaded.base, loaded.held(), loaded.mapping) };
        return image_failure(b'M', "");
    }
    // SAFETY: `h` is the fresh handle of this call, `relocated_owner` an allocator
    // block; the root lies outside the heap (registered on OCaml 4, NOT_MARKABLE
    // headers on OCaml 5).
    unsafe {
        if loaded.mapping == file::Mapping::Relocated {
            handle::set_alloc(word(h), word(relocated_owner));
        }
        let copied = copy::Copied {
            root: loaded.root,
            base: loaded.base,
            bytes: loaded.held(),
            blocks: loaded.blocks,
            transient_bytes: 0,
        };
        if loaded.base.is_null() {
            handle::fill(word(h), &copied);
        } else if !handle::fill_apart(word(h), &copied) {
            runtime::unregister(loaded.base, loaded.held());
            // SAFETY: just loaded; nothing refers to it.
            file::unmap(loaded.base, loaded.held(), loaded.mapping);
            return image_failure(b'M', "");
        }
    }
    value(val_int(0))
}

/// The allocator block that owns loaded payloads of mapping `kind` (1 at the recorded
/// address, 2 relocated): it never allocates, and its free unmaps.
#[ocaml::native_func]
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
