//! Image files on disk and payloads in memory: atomic writes, mappings, unmapping.
//!
//! A payload is held one of two ways ([`Mapping`]):
//! - **at its recorded address**: a private, writable mapping of the file
//!   (`MAP_FIXED_NOREPLACE`, so nothing already mapped there is replaced). Pages are read
//!   from the page cache on first touch and shared with every other process that maps
//!   the file, until one is written (custom blocks' fix-ups write a few);
//! - **elsewhere**, when that address is taken: a private, writable mapping of the file
//!   at an address the kernel chooses, relocated in place. Only the pages holding
//!   pointers are written, hence copied; the others (strings, floats) stay shared with
//!   the page cache.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::format::HEADER_BYTES;
use super::LoadError;
use crate::layout::Word;

/// How a loaded payload is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing: the payload is empty.
    None = 0,
    /// A private mapping of the file at the recorded address.
    File = 1,
    /// A private mapping of the file elsewhere, relocated.
    Relocated = 2,
}

/// Reads exactly `buf.len()` bytes at `offset`.
///
/// # Errors
/// The read's error; `UnexpectedEof` when the file is shorter.
pub fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, offset)
}

/// A temporary name beside `path`, unique to this process and call.
fn temporary_name(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `parts` one after the other to `path`: to a temporary file in the same
/// directory, renamed to `path` when complete. On any error the temporary file is removed
/// and `path` is as it was.
///
/// # Errors
/// The first I/O error.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let tmp = temporary_name(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Maps the payload of `f` (`bytes` bytes after the header page): at `address` unless
/// `relocate` or the address is taken, else where the kernel finds room.
///
/// # Errors
/// [`LoadError::OutOfMemory`] when there is no room for the mapping; [`LoadError::Io`]
/// when the file cannot be mapped.
pub fn map_payload(
    f: &File,
    bytes: usize,
    address: Word,
    relocate: bool,
) -> Result<(*mut u8, Mapping), LoadError> {
    if !relocate {
        // SAFETY: a new private mapping of the file; MAP_FIXED_NOREPLACE never replaces
        // an existing mapping (it fails with EEXIST instead).
        let p = unsafe {
            libc::mmap(
                address as *mut libc::c_void,
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE,
                f.as_raw_fd(),
                HEADER_BYTES as libc::off_t,
            )
        };
        if p != libc::MAP_FAILED {
            if p as Word == address {
                return Ok((p as *mut u8, Mapping::File));
            }
            // Kernels before 4.17 take the flag as a hint and map elsewhere.
            // SAFETY: the mapping just made, unused.
            unsafe { libc::munmap(p, bytes) };
        }
    }
    // SAFETY: a new private mapping of the file where the kernel finds room.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            HEADER_BYTES as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOMEM) {
            return Err(LoadError::OutOfMemory(bytes));
        }
        return Err(LoadError::Io(e));
    }
    Ok((p as *mut u8, Mapping::Relocated))
}

/// Releases a payload.
///
/// # Safety
/// `base`, `bytes` and `mapping` describe a payload from [`map_payload`] (or an empty
/// one) that nothing uses any more.
pub unsafe fn unmap(base: *mut u8, bytes: usize, mapping: Mapping) {
    match mapping {
        Mapping::None => {}
        // SAFETY: the caller's contract: a whole mapping of `bytes` bytes.
        Mapping::File | Mapping::Relocated => unsafe {
            libc::munmap(base as *mut libc::c_void, bytes);
        },
    }
}

/// Field 0 of the allocator blocks that own loaded payloads: they never allocate.
///
/// # Safety
/// Callable from C with any arguments.
pub unsafe extern "C" fn offheap_image_no_alloc(_allocator: Word, _size: usize) -> *mut u8 {
    std::ptr::null_mut()
}

/// Field 1 of the allocator block that owns payloads mapped from their file.
///
/// # Safety
/// `ptr` and `size` are a payload mapped at its recorded address that nothing uses.
pub unsafe extern "C" fn offheap_image_unmap_file(_allocator: Word, ptr: *mut u8, size: usize) {
    // SAFETY: forwarded.
    unsafe { unmap(ptr, size, Mapping::File) }
}

/// Field 1 of the allocator block that owns relocated payloads.
///
/// # Safety
/// `ptr` and `size` are a relocated payload that nothing uses.
pub unsafe extern "C" fn offheap_image_unmap_relocated(
    _allocator: Word,
    ptr: *mut u8,
    size: usize,
) {
    // SAFETY: forwarded.
    unsafe { unmap(ptr, size, Mapping::Relocated) }
}

/// The type of field 1 of an allocator block (see [`crate::alloc::FreeFn`]).
pub type FreeFn = crate::alloc::FreeFn;
