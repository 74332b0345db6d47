//! The OCaml externals of `lib/offheap.ml`: thin glue between OCaml values and the core.
//!
//! They are `#[ocaml::native_func]`s on raw values. `#[ocaml::func]` would root every
//! argument with boxroot, which the stubs do not need (nothing is allocated on the OCaml
//! heap while a raw value is in use) and which broke copies in bytecode programs linked
//! with systhreads on OCaml 4. No exception is raised across Rust frames: errors come
//! back as values and the OCaml side raises.

use ocaml::{Raw, Value};
use ocaml_sys::{caml_alloc_small, caml_copy_string, caml_modify};

use crate::alloc::{offheap_alloc, offheap_free, Allocator, CAllocator};
use crate::layout::{val_int, Word, ABSTRACT_TAG};
use crate::runtime;

/// Fields of the result array that `offheap_stub_copy` fills.
const RESULT_FIELDS: usize = 5;

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

/// Copies `v` with the allocator block `alloc` (static data too when `copy_static`).
/// On success fills `result` (an array of [`RESULT_FIELDS`] values: root, base address,
/// bytes, blocks, transient bytes) and returns 0; returns 1 when the allocator ran out
/// of memory, or the message of the `Invalid_argument` to raise.
#[ocaml::native_func]
pub fn offheap_stub_copy(alloc: Raw, copy_static: Raw, v: Raw, result: Raw) -> Value {
    copy(alloc, copy_static, v, result)
}

/// The body of [`offheap_stub_copy`].
fn copy(alloc: Raw, copy_static: Raw, v: Raw, result: Raw) -> Value {
    // SAFETY: `alloc` is an allocator block (the OCaml type `alloc` only comes from
    // `malloc` or from C code that builds one), alive for the call.
    let mut allocator = unsafe { CAllocator::new(word(alloc)) };
    let copy_static = word(copy_static) != val_int(0);
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; the allocator's contract forbids calls into OCaml.
    let copied = match unsafe { runtime::copy_value(word(v), copy_static, &mut allocator) } {
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
    if !copied.base.is_null() && !runtime::register(copied.base, copied.bytes) {
        // SAFETY: the copy was just allocated by this allocator and nothing refers to it.
        unsafe { allocator.free(copied.base, copied.bytes) };
        return value(val_int(1));
    }
    let fields = [
        copied.root,
        val_int(copied.base as isize),
        val_int(copied.bytes as isize),
        val_int(copied.blocks as isize),
        val_int(copied.transient_bytes as isize),
    ];
    let out = word(result) as *mut ocaml_sys::Value;
    for (i, field) in fields.into_iter().enumerate().take(RESULT_FIELDS) {
        // SAFETY: `result` is an array of RESULT_FIELDS values (offheap.ml makes it);
        // the stored words are immediates or the copy's root, which the GC leaves alone.
        unsafe { caml_modify(out.add(i), field as ocaml_sys::Value) };
    }
    value(val_int(0))
}

/// `s` with a NUL at the end, any NUL inside it replaced.
fn nul_terminated(s: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = s.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    bytes.push(0);
    bytes
}

/// Gives the copy `[base, base + bytes)` back to the allocator block `alloc`, now.
#[ocaml::native_func]
pub fn offheap_stub_release(alloc: Raw, base: Raw, bytes: Raw) -> Value {
    let base = (word(base) as isize >> 1) as *mut u8;
    let bytes = (word(bytes) as isize >> 1) as usize;
    runtime::unregister(base, bytes);
    // SAFETY: `alloc` is the block the copy was made with, and the OCaml side calls this
    // once per copy, after its handle was marked freed.
    unsafe { CAllocator::new(word(alloc)).free(base, bytes) };
    runtime::reregister_shared(base, bytes);
    value(val_int(0))
}

/// Whether `free` must wait for the running major cycle to end (OCaml 5).
#[ocaml::native_func]
pub fn offheap_stub_defers_free(_unit: Raw) -> Value {
    value(val_int(runtime::DEFERS_FREE as isize))
}

/// Major cycles completed so far (OCaml 5; 0 on OCaml 4).
#[ocaml::native_func]
pub fn offheap_stub_major_cycles(_unit: Raw) -> Value {
    value(val_int(runtime::major_cycles_completed() as isize))
}

// ---------------------------------------------------------------------------------------
// Images (lib/image.ml). The file work runs with the runtime lock released, so these
// stubs keep no OCaml value across it: arguments are copied into Rust first, results
// are allocated afterwards. A failure returns a string whose first byte says which
// exception to raise (`S` Sys_error, `I` Offheap.Image.Invalid_image, `A`
// Invalid_argument, `M` Out_of_memory) and whose rest is the message.
// ---------------------------------------------------------------------------------------

use crate::alloc::Malloc;
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
        custom_ops: runtime::boxed_integer_ops(),
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

/// The body of [`offheap_stub_image_write`].
fn image_write(path: Raw, key: Raw, flat_float_array: Raw, v: Raw) -> Value {
    let path = string_bytes(path);
    let key = string_bytes(key);
    let process = image_process(word(flat_float_array) != val_int(0));
    // SAFETY: we hold the runtime and allocate nothing on the OCaml heap until the copy
    // returns; Malloc does not call into OCaml.
    let copied = match unsafe { runtime::copy_value(word(v), true, &mut Malloc) } {
        Ok(copied) => copied,
        Err(e) if e.is_out_of_memory() => return image_failure(b'M', ""),
        Err(e) => {
            let what = e.to_string();
            let what = what.strip_prefix("Offheap.copy: ").unwrap_or(&what);
            return image_failure(b'A', &format!("Offheap.Image.write: {what}"));
        }
    };
    let written = unlocked(|| {
        crate::fault::point("image-write");
        // SAFETY: the copy just made, ours alone; freed right after.
        let r = unsafe { image::write_file(&path_of(&path), &copied, &key, &process) };
        if !copied.base.is_null() {
            // SAFETY: from Malloc with this size, no longer used.
            unsafe { Malloc.free(copied.base, copied.bytes) };
        }
        r
    });
    match written {
        Ok(()) => value(val_int(0)),
        Err(WriteError::Io(e)) => image_failure(b'S', &sys_error(&path, &e)),
        Err(e) => image_failure(b'A', &e.to_string()),
    }
}

/// `Image.load`: loads and checks the image at `path`. `flags`: 1 verify, 2 trusted, 4
/// never at the recorded address, 8 flat float arrays, 16 map the file (shared). Returns
/// `(root, base, bytes, blocks, mapping)` (bytes: held at `base`, the payload and one
/// word; mapping: 0 none, 1 at its recorded address, 2 relocated), registered with the
/// runtime, or a failure string.
#[ocaml::native_func]
pub fn offheap_stub_image_load(path: Raw, key: Raw, flags: Raw) -> Value {
    image_load(path, key, flags)
}

/// The body of [`offheap_stub_image_load`].
fn image_load(path: Raw, key: Raw, flags: Raw) -> Value {
    let path = string_bytes(path);
    let flags = word(flags) as isize >> 1;
    let opts = image::Options {
        key: string_bytes(key),
        verify: flags & 1 != 0,
        trusted: flags & 2 != 0,
        relocate: flags & 4 != 0,
        share: flags & 16 != 0,
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
    let fields = [
        loaded.root,
        val_int(loaded.base as isize),
        val_int(loaded.held() as isize),
        val_int(loaded.blocks as isize),
        val_int(loaded.mapping as isize),
    ];
    // SAFETY: a fresh young block, filled before any other allocation with immediates
    // and the root, which lies outside the heap (registered on OCaml 4, NOT_MARKABLE
    // headers on OCaml 5).
    unsafe {
        let block = caml_alloc_small(fields.len(), 0);
        let out = block as *mut Word;
        for (i, f) in fields.into_iter().enumerate() {
            *out.add(i) = f;
        }
        value(block as Word)
    }
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
