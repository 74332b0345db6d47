//! Image files on disk and payloads in memory: atomic writes, loads, unmapping.
//!
//! A payload is loaded into a reservation of its own (anonymous memory, at the recorded
//! address when that is free, `MAP_FIXED_NOREPLACE`, else where the kernel finds room),
//! one of two ways:
//! - **private** (the default): the payload is read into the reservation. Nothing refers
//!   to the file afterwards: rewriting, truncating or replacing it changes nothing.
//! - **shared**: the file is mapped (private, writable, `MAP_FIXED`) over the
//!   reservation. Pages are read from the page cache on first touch and shared with every
//!   other process that maps the file, until one is written (relocation and the custom
//!   blocks' fix-ups write some). Pages not yet copied still read the file: writing it in
//!   place changes them, truncating it makes them fault.
//!
//! The reservation ends one word past the payload ([`TAIL_BYTES`]): a pointer to a last
//! block of no fields is the payload's end, and it must lie in memory registered for the
//! image too (OCaml 4's page table, for compare, hash and Marshal).
//!
//! Writes go to a temporary file in the target's directory, renamed over the target when
//! complete: an unnamed `O_TMPFILE` where the file system has them (nothing left behind
//! whatever happens), else a random name created with `O_EXCL` and removed on failure.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::LoadError;
use crate::layout::{Word, WORD_BYTES};

/// How a loaded payload is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing: the payload is empty.
    None = 0,
    /// At its recorded address.
    Recorded = 1,
    /// Elsewhere, relocated.
    Relocated = 2,
}

/// Memory held past the payload's end: one word (see the module's documentation).
pub const TAIL_BYTES: usize = WORD_BYTES;

/// Reads exactly `buf.len()` bytes at `offset`.
///
/// # Errors
/// The read's error; `UnexpectedEof` when the file is shorter.
pub fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, offset)
}

/// The error of a load for a failed [`read_exact_at`]: a file that ends before the
/// bytes its size promised when the load began was made shorter meanwhile (rewritten in
/// place): it fails the file size check, as a file truncated before the load does.
/// Other errors are the system's.
pub fn load_read_error(e: std::io::Error) -> LoadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad!(
            "file size",
            "the file became shorter while it was read (modified in place during the load)"
        )
    } else {
        LoadError::Io(e)
    }
}

/// A path that is there but is not a regular file (a directory, a FIFO, a socket, a
/// device): never loaded, nor replaced by a write. An error of its own rather than an
/// `io::Error`, whose making with a message allocates (and aborts the process when
/// memory has run out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRegularFile;

impl std::fmt::Display for NotRegularFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a regular file")
    }
}

/// Opens the image at `path` for reading. The open does not block (`O_NONBLOCK`, cleared
/// afterwards), so a FIFO or a device cannot hang it.
///
/// # Errors
/// [`LoadError::Io`] for the open's error, [`LoadError::NotRegularFile`] for anything but
/// a regular file.
pub fn open_image(path: &Path) -> Result<File, LoadError> {
    let f = open_path(path, libc::O_RDONLY | libc::O_NONBLOCK, 0).map_err(LoadError::Io)?;
    if !f.metadata().map_err(LoadError::Io)?.file_type().is_file() {
        return Err(LoadError::NotRegularFile);
    }
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(LoadError::Io(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Eight random bytes as 16 hex digits (`getrandom`, else the clock, pid and a counter).
fn random_hex() -> [u8; 16] {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut bytes = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    let n = if got == 8 {
        u64::from_ne_bytes(bytes)
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos
            ^ ((std::process::id() as u64) << 32)
            ^ COUNTER
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    };
    let mut hex = [0u8; 16];
    for (i, h) in hex.iter_mut().enumerate() {
        *h = b"0123456789abcdef"[(n >> (60 - 4 * i)) as usize & 15];
    }
    hex
}

/// The error for memory that a path could not have.
fn no_memory() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::OutOfMemory)
}

/// The bytes of `parts` one after the other, with `tail` bytes of room beyond;
/// `OutOfMemory` when they cannot be had (`PathBuf`'s own operations abort instead).
fn concat(parts: &[&[u8]], tail: usize) -> std::io::Result<Vec<u8>> {
    let len = parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::new();
    v.try_reserve_exact(len + tail).map_err(|_| no_memory())?;
    for p in parts {
        v.extend_from_slice(p);
    }
    Ok(v)
}

/// The path made of `parts` one after the other.
fn path_of(parts: &[&[u8]]) -> std::io::Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(concat(
        parts, 0,
    )?)))
}

/// The path `path` designates once its symbolic links are followed: writing an image
/// through a link writes its target (a dangling link: the target it names is created).
///
/// # Errors
/// An error reading a link; `ELOOP` after 40 links; `OutOfMemory`.
pub fn final_path(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path_of(&[path.as_os_str().as_bytes()])?;
    let mut link = [0u8; libc::PATH_MAX as usize];
    for _ in 0..40 {
        let c = c_path(&p)?;
        // SAFETY: a NUL-terminated path and a buffer of `link.len()` bytes, which
        // `readlink` fills without a terminating NUL.
        let n = unsafe {
            libc::readlink(
                c.as_ptr(),
                link.as_mut_ptr() as *mut libc::c_char,
                link.len(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not a link, or nothing there: the path is final.
                Some(libc::EINVAL | libc::ENOENT) => Ok(p),
                _ => Err(e),
            };
        }
        let link = &link[..n as usize];
        p = match p.parent() {
            Some(dir) if link.first() != Some(&b'/') && !dir.as_os_str().is_empty() => {
                path_of(&[dir.as_os_str().as_bytes(), b"/", link])?
            }
            _ => path_of(&[link])?,
        };
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// How [`write_atomically`] makes its temporary file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Temporary {
    /// An unnamed `O_TMPFILE`, linked under a random name just before the rename; a
    /// random name instead where the file system or the kernel has no `O_TMPFILE`.
    Unnamed,
    /// A random name created with `O_EXCL` (retried on a collision), removed on failure.
    Named,
}

/// `p` as a C string; `EINVAL` when it holds a NUL byte, `OutOfMemory`.
fn c_path(p: &Path) -> std::io::Result<CString> {
    let mut v = concat(&[p.as_os_str().as_bytes()], 1)?;
    v.push(0);
    CString::from_vec_with_nul(v).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens `p` with `flags` (and `O_CLOEXEC`), creating it with `mode` if asked: `open(2)`
/// on a C string of the path allocated fallibly (the standard library makes one of a
/// path of 384 bytes or more on the heap, and aborts when memory runs out).
fn open_path(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> std::io::Result<File> {
    let c = c_path(p)?;
    // SAFETY: a NUL-terminated path; the descriptor returned is ours, wrapped at once.
    unsafe {
        let fd = libc::open(
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(<File as std::os::unix::io::FromRawFd>::from_raw_fd(fd))
    }
}

/// Removes the file `p`, if it can: a clean-up whose failure changes nothing.
fn remove_path(p: &Path) {
    if let Ok(c) = c_path(p) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::unlink(c.as_ptr()) };
    }
}

/// The metadata of what `p` designates, links followed (`std::fs::metadata` with a C
/// string allocated fallibly, as [`open_path`]).
fn metadata(p: &Path) -> std::io::Result<std::fs::Metadata> {
    open_path(p, libc::O_PATH, 0)?.metadata()
}

/// A fresh random name in `dir` for a temporary file.
fn temporary_name(dir: &Path) -> std::io::Result<PathBuf> {
    path_of(&[
        dir.as_os_str().as_bytes(),
        b"/.offheap-",
        &random_hex(),
        b".tmp",
    ])
}

/// Fills the file with `fill`, then gives it `mode` (when the target existed).
fn fill_file<E: From<std::io::Error>>(
    f: &mut File,
    fill: &mut impl FnMut(&mut File) -> Result<(), E>,
    mode: Option<u32>,
) -> Result<(), E> {
    fill(f)?;
    f.flush()?;
    if let Some(mode) = mode {
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Renames `tmp` to `target`, removing `tmp` on failure.
fn rename_or_remove(tmp: &Path, target: &Path) -> std::io::Result<()> {
    let (from, to) = (c_path(tmp)?, c_path(target)?);
    // SAFETY: two NUL-terminated paths.
    if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    remove_path(tmp);
    Err(e)
}

/// The `Named` way: `Ok(())` when written.
fn write_named<E: From<std::io::Error>>(
    dir: &Path,
    target: &Path,
    fill: &mut impl FnMut(&mut File) -> Result<(), E>,
    mode: Option<u32>,
) -> Result<(), E> {
    let (mut f, tmp) = loop {
        let tmp = temporary_name(dir)?;
        match open_path(&tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o666) {
            Ok(f) => break (f, tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = fill_file(&mut f, fill, mode) {
        drop(f);
        remove_path(&tmp);
        return Err(e);
    }
    drop(f);
    Ok(rename_or_remove(&tmp, target)?)
}

/// The `Unnamed` way: `Ok(None)` when done, `Ok(Some(()))` when this kernel or file
/// system has no `O_TMPFILE` (or no `/proc` to link it through), found before `fill` is
/// called.
fn write_unnamed<E: From<std::io::Error>>(
    dir: &Path,
    target: &Path,
    fill: &mut impl FnMut(&mut File) -> Result<(), E>,
    mode: Option<u32>,
) -> Result<Option<()>, E> {
    if !Path::new("/proc/self/fd").is_dir() {
        return Ok(Some(()));
    }
    let cdir = c_path(dir)?;
    // SAFETY: a NUL-terminated path; the descriptor returned is ours (wrapped below).
    let fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => Ok(Some(())),
            _ => Err(e.into()),
        };
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let mut f = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    fill_file(&mut f, fill, mode)?;
    // "/proc/self/fd/" and the descriptor's digits, NUL-terminated, on the stack.
    let mut proc_path = [0u8; 40];
    let len = {
        let mut out = &mut proc_path[..];
        write!(out, "/proc/self/fd/{fd}\0").map_err(|_| no_memory())?;
        40 - out.len()
    };
    let proc_path = std::ffi::CStr::from_bytes_with_nul(&proc_path[..len])
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let tmp = loop {
        let tmp = temporary_name(dir)?;
        let ctmp = c_path(&tmp)?;
        // SAFETY: two NUL-terminated paths; links the open file `fd` designates.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                libc::AT_FDCWD,
                ctmp.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            break tmp;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => continue,
            _ => return Err(e.into()),
        }
    };
    drop(f);
    rename_or_remove(&tmp, target)?;
    Ok(None)
}

/// The directory `target` is in (`.` for a bare name).
fn directory_of(target: &Path) -> std::io::Result<PathBuf> {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => path_of(&[d.as_os_str().as_bytes()]),
        _ => path_of(&[b"."]),
    }
}

/// The directory that writing `path` puts its temporary file in ([`write_atomically`]).
///
/// # Errors
/// As [`final_path`].
pub fn temporary_directory(path: &Path) -> std::io::Result<PathBuf> {
    directory_of(&final_path(path)?)
}

/// A new unnamed file in `dir` (`O_TMPFILE`, readable and writable by this process
/// alone), gone with its last descriptor; `None` where the kernel or the file system has
/// none.
pub fn scratch_file(dir: &Path) -> Option<File> {
    open_path(dir, libc::O_RDWR | libc::O_TMPFILE, 0o600).ok()
}

/// Writes `path` (its final target when it is a symbolic link, see [`final_path`]) with
/// `fill`, called once with a new empty file opened for writing: to a temporary file in
/// the same directory (made as `how` says), renamed over the target when complete. A
/// replaced file's permissions are kept. On any error no temporary file is left and the
/// target is as it was.
///
/// # Errors
/// [`NotRegularFile`] when the target is there but is neither a regular file nor a
/// directory (before `fill` is called), `fill`'s error, or the first I/O error.
pub fn write_atomically<E: From<std::io::Error> + From<NotRegularFile>>(
    path: &Path,
    how: Temporary,
    mut fill: impl FnMut(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let target = final_path(path)?;
    let dir = directory_of(&target)?;
    let mode = match metadata(&target) {
        // Renaming over a FIFO, a socket or a device would replace it with the image (as
        // root, `/dev/null` too): they are refused, as by a load. A directory is left to
        // the rename, which fails ("Is a directory").
        Ok(m) if !m.file_type().is_file() && !m.file_type().is_dir() => {
            return Err(NotRegularFile.into())
        }
        Ok(m) => Some(m.permissions().mode() & 0o7777),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if how == Temporary::Unnamed && write_unnamed(&dir, &target, &mut fill, mode)?.is_none() {
        return Ok(());
    }
    write_named(&dir, &target, &mut fill, mode)
}

/// A reservation of `bytes` bytes of anonymous, readable and writable memory at `address`,
/// or `None` when that address is taken.
fn reserve_at(bytes: usize, address: Word) -> Option<*mut u8> {
    // SAFETY: a new anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing
    // mapping (it fails with EEXIST instead).
    let p = unsafe {
        libc::mmap(
            address as *mut libc::c_void,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if p as Word != address {
        // Kernels before 4.17 take the flag as a hint and map elsewhere.
        // SAFETY: the mapping just made, unused.
        unsafe { libc::munmap(p, bytes) };
        return None;
    }
    Some(p as *mut u8)
}

/// Address space kept free (`PROT_NONE`, nothing committed) until dropped.
#[derive(Debug)]
pub struct Reservation {
    base: *mut libc::c_void,
    bytes: usize,
}

impl Reservation {
    /// `bytes` bytes at `address`, or `None` when something is there.
    pub fn at(address: Word, bytes: usize) -> Option<Reservation> {
        // SAFETY: a new mapping of nothing; MAP_FIXED_NOREPLACE never replaces one.
        let p = unsafe {
            libc::mmap(
                address as *mut libc::c_void,
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let r = Reservation { base: p, bytes };
        // Kernels before 4.17 take the flag as a hint: elsewhere is no reservation.
        (p as Word == address).then_some(r)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own mapping, which nothing uses.
        unsafe { libc::munmap(self.base, self.bytes) };
    }
}

/// A reservation of `bytes` bytes of anonymous, readable and writable memory where the
/// kernel finds room.
fn reserve_anywhere(bytes: usize) -> Result<*mut u8, LoadError> {
    // SAFETY: a new anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOMEM) {
            return Err(LoadError::OutOfMemory(bytes));
        }
        return Err(LoadError::Io(e));
    }
    Ok(p as *mut u8)
}

/// How [`load_payload`] loads.
#[derive(Clone, Copy, Debug)]
pub struct How {
    /// Where the payload starts in the file (a multiple of the page size).
    pub payload_at: u64,
    /// Never at the recorded address.
    pub relocate: bool,
    /// Map the file (else read it).
    pub share: bool,
    /// With `share`, read the file instead when the payload cannot go at its address:
    /// relocating would make nearly every page private anyway (see
    /// [`map_unwritten`]).
    pub read_if_relocated: bool,
    /// The checks will read every page: a mapping is populated at once (one system call
    /// instead of a fault per page). Relocation always reads every page.
    pub reads_all: bool,
    /// Threads to read (or populate a mapping) with.
    pub threads: usize,
}

/// Bytes each thread reads at a time.
const READ_PIECE: usize = 8 << 20;

/// Loads the payload of `f` (`bytes` bytes after the header page) into a reservation of
/// `bytes + TAIL_BYTES` bytes: at `address` unless `how.relocate` or the address is
/// taken, else where the kernel finds room. Read into it (private, on `how.threads`
/// threads), or the file mapped over it (`how.share`, unless relocated and
/// `how.read_if_relocated`). Returns where, how it is held, and whether it is mapped.
///
/// # Errors
/// [`LoadError::OutOfMemory`] when there is no room; [`LoadError::Io`] when the file
/// cannot be read or mapped; the file size check ([`load_read_error`]) when it became
/// shorter while read. Nothing stays mapped then.
pub fn load_payload(
    f: &File,
    bytes: usize,
    address: Word,
    how: &How,
) -> Result<(*mut u8, Mapping, bool), LoadError> {
    let held = bytes + TAIL_BYTES;
    let at_recorded = if how.relocate {
        None
    } else {
        reserve_at(held, address)
    };
    let (base, mapping) = match at_recorded {
        Some(p) => (p, Mapping::Recorded),
        None => (reserve_anywhere(held)?, Mapping::Relocated),
    };
    let mapped = how.share && !(mapping == Mapping::Relocated && how.read_if_relocated);
    let filled = if mapped {
        map_file(
            f,
            how.payload_at,
            base,
            bytes,
            how.reads_all || mapping == Mapping::Relocated,
            how.threads,
        )
    } else {
        // Huge pages where the system gives them on request: a read into fresh memory
        // costs mostly its page faults, and a 2 MiB page takes one fault, not 512.
        // Advice only: its failure changes nothing.
        // SAFETY: advice on our own reservation.
        unsafe { libc::madvise(base as *mut libc::c_void, held, libc::MADV_HUGEPAGE) };
        // SAFETY: the reservation: `held >= bytes` writable bytes, ours alone.
        let buf = unsafe { std::slice::from_raw_parts_mut(base, bytes) };
        super::parallel::parallel(buf.chunks_mut(READ_PIECE), how.threads, |k, piece| {
            read_exact_at(f, piece, how.payload_at + (k * READ_PIECE) as u64)
        })
        .map_err(|_| no_memory())
        .and_then(|read| read.into_iter().collect())
    };
    match filled {
        Ok(()) => Ok((base, mapping, mapped)),
        Err(e) => {
            // SAFETY: the reservation just made; nothing refers to it.
            unsafe { unmap(base, held, mapping) };
            Err(load_read_error(e))
        }
    }
}

/// Maps the payload of `f` (private, writable) over the first `bytes` bytes of the
/// reservation at `base`. With `populate`, the page-cache pages are mapped at once, by
/// `threads` threads in pieces (`MADV_POPULATE_READ`: read faults, so no page is copied;
/// writes still copy only the pages they touch). `MAP_POPULATE` on a read-only mapping
/// made writable afterwards did the same on one thread, and the `mprotect` walked every
/// page again: 35% of a verified load of a 919 MB image.
fn map_file(
    f: &File,
    payload_at: u64,
    base: *mut u8,
    bytes: usize,
    populate: bool,
    threads: usize,
) -> std::io::Result<()> {
    // SAFETY: maps the file over the first `bytes` bytes of our own reservation.
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            f.as_raw_fd(),
            payload_at as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    if !populate {
        return Ok(());
    }
    let start = base as usize;
    super::parallel::parallel((0..bytes).step_by(READ_PIECE), threads, |_, at| {
        let len = READ_PIECE.min(bytes - at);
        // SAFETY: advice on a piece of the mapping just made, ours alone.
        let r = unsafe {
            libc::madvise(
                (start + at) as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_READ,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // A kernel before 5.14: the pages come at the first read of each instead.
            Some(libc::EINVAL) => Ok(()),
            _ => Err(e),
        }
    })
    .map_err(|_| no_memory())
    .and_then(|populated| populated.into_iter().collect())
}

/// Maps the file again, private and writable, over the runs of chunks of the payload at
/// `base` (`bytes` bytes, chunks of `chunk_bytes`) that its load left as they are in the
/// file (`unwritten[k]`, from the checks): a shared load that had to relocate a payload
/// holding pointers nearly everywhere reads it (into huge pages, faster than a
/// copy-on-write fault per 4 KiB page) and then shares what it did not write, the raw
/// blocks, through the page cache as a mapped load does. Whole pages only: a run that
/// ends in the payload's last page leaves that page as read.
///
/// # Errors
/// The `mmap` error; the payload may then have lost a run of pages and must be dropped.
///
/// # Safety
/// `base` is a payload loaded by [`load_payload`] from `f` (whose payload starts at
/// `payload_at`), which nothing uses yet, and `unwritten` says of its chunks what the
/// checks found.
pub unsafe fn map_unwritten(
    f: &File,
    payload_at: u64,
    base: *mut u8,
    bytes: usize,
    chunk_bytes: usize,
    unwritten: &[bool],
) -> std::io::Result<()> {
    let page = super::format::PAGE_BYTES as usize;
    let mut k = 0;
    while k < unwritten.len() {
        if !unwritten[k] {
            k += 1;
            continue;
        }
        let first = k;
        while k < unwritten.len() && unwritten[k] {
            k += 1;
        }
        // Chunks are a power of two of at least a page: `from` is a page boundary.
        let from = first * chunk_bytes;
        let to = (k * chunk_bytes).min(bytes) / page * page;
        if to <= from {
            continue;
        }
        // SAFETY: maps the file over pages of our own payload that nothing uses yet and
        // that hold the file's bytes already (the caller's contract).
        let p = unsafe {
            libc::mmap(
                base.add(from) as *mut libc::c_void,
                to - from,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                f.as_raw_fd(),
                (payload_at + from as u64) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Releases a payload.
///
/// # Safety
/// `base`, `held` and `mapping` describe a payload from [`load_payload`] (`held`: its
/// bytes and [`TAIL_BYTES`]), or an empty one, that nothing uses any more.
pub unsafe fn unmap(base: *mut u8, held: usize, mapping: Mapping) {
    match mapping {
        Mapping::None => {}
        // SAFETY: the caller's contract: a whole reservation of `held` bytes.
        Mapping::Recorded | Mapping::Relocated => unsafe {
            crate::fault::release_mapping(base, held);
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

/// Field 1 of the allocator block that owns payloads at their recorded address.
///
/// # Safety
/// `ptr` and `size` are a payload at its recorded address (`size`: with its tail) that
/// nothing uses.
pub unsafe extern "C" fn offheap_image_unmap_recorded(_allocator: Word, ptr: *mut u8, size: usize) {
    // SAFETY: forwarded.
    unsafe { unmap(ptr, size, Mapping::Recorded) }
}

/// Field 1 of the allocator block that owns relocated payloads.
///
/// # Safety
/// `ptr` and `size` are a relocated payload (`size`: with its tail) that nothing uses.
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
