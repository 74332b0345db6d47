//! Where copies get their memory.
//!
//! [`Allocator`] is what the traversal asks for memory. [`CAllocator`] is the OCaml-side
//! allocator: an `Abstract_tag` block whose field 0 is
//! `void *alloc(value allocator, size_t size)` and field 1 is
//! `void free(value allocator, void *ptr, size_t size)`, the layout of the original C
//! library, so allocators written for it work unchanged. [`offheap_alloc`] and
//! [`offheap_free`] are the default pair (`Offheap.malloc`), exported to C so custom
//! allocators can wrap them.

use crate::layout::{Color, Header, Word, ABSTRACT_TAG};

/// The traversal could not get this many bytes for its own tables (queue, visited set,
/// snapshot): reported as [`crate::copy::CopyError::OutOfMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory(pub usize);

/// `value` in a box of its own, or `None` when there is no memory for it (`Box::new`
/// aborts the process instead).
pub fn try_box<T>(value: T) -> Option<Box<T>> {
    let layout = std::alloc::Layout::new::<T>();
    if layout.size() == 0 {
        return Some(Box::new(value));
    }
    // SAFETY: a layout of non-zero size.
    let p = unsafe { std::alloc::alloc(layout) } as *mut T;
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is fresh memory of `T`'s layout from the global allocator, which
    // `Box` frees with that layout.
    unsafe {
        p.write(value);
        Some(Box::from_raw(p))
    }
}

/// A copy of `items`; `None` when there is no memory for it (`to_vec` aborts instead).
pub fn try_copy<T: Copy>(items: &[T]) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(items.len()).ok()?;
    v.extend_from_slice(items);
    Some(v)
}

/// A source of memory for copies.
pub trait Allocator {
    /// `bytes` bytes, word aligned, or null when the memory cannot be had.
    fn alloc(&mut self, bytes: usize) -> *mut u8;

    /// Gives back memory from [`Allocator::alloc`].
    ///
    /// # Safety
    /// `ptr` came from `alloc` on this allocator with this `bytes`, and nothing uses it.
    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize);

    /// `Some(p)` when, for [`LARGE_BYTES`] and more, this allocator's `alloc(bytes)` is
    /// [`map_huge`]`(bytes + p)` plus `p` bytes, and its `free` releases such memory:
    /// then a large copy may be made in address space reserved and mapped the same way,
    /// and handed to this allocator's `free` ([`crate::copy::direct`]). `None` by
    /// default.
    fn huge_mapping_prefix(&self) -> Option<usize> {
        None
    }
}

/// `void *alloc(value allocator, size_t size)`: field 0 of an allocator block.
pub type AllocFn = unsafe extern "C" fn(allocator: Word, size: usize) -> *mut u8;
/// `void free(value allocator, void *ptr, size_t size)`: field 1 of an allocator block.
pub type FreeFn = unsafe extern "C" fn(allocator: Word, ptr: *mut u8, size: usize);

/// An allocator block of C function pointers, as OCaml sees it (`Offheap.alloc`).
#[derive(Clone, Copy, Debug)]
pub struct CAllocator {
    /// The `Abstract_tag` block, passed to both functions as their first argument.
    block: Word,
}

impl CAllocator {
    /// Wraps the allocator block `block`.
    ///
    /// # Safety
    /// `block` is an `Abstract_tag` block with at least two fields holding an [`AllocFn`]
    /// and a [`FreeFn`], and stays alive and in place while the `CAllocator` is used.
    pub unsafe fn new(block: Word) -> CAllocator {
        CAllocator { block }
    }

    /// The free function (field 1).
    pub fn free_fn(&self) -> FreeFn {
        // SAFETY: field 1 holds a `FreeFn` (`new`'s contract).
        unsafe { std::mem::transmute::<Word, FreeFn>(self.field(1)) }
    }

    /// Whether this is the default allocator's block: [`offheap_alloc`] and
    /// [`offheap_free`] (`Offheap.malloc`).
    pub fn is_default(&self) -> bool {
        self.field(0) == offheap_alloc as *const () as usize
            && self.field(1) == offheap_free as *const () as usize
    }

    fn field(&self, i: usize) -> Word {
        // SAFETY: `new`'s contract: the block has fields 0 and 1.
        unsafe { *(self.block as *const Word).add(i) }
    }
}

impl Allocator for CAllocator {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        // SAFETY: field 0 holds an `AllocFn` (`new`'s contract).
        let alloc: AllocFn = unsafe { std::mem::transmute::<Word, AllocFn>(self.field(0)) };
        // SAFETY: calling the allocator as its C contract says.
        unsafe { alloc(self.block, bytes) }
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: `ptr` and `bytes` came from this allocator's `alloc`.
        unsafe { (self.free_fn())(self.block, ptr, bytes) }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        self.is_default().then_some(0)
    }
}

/// The default allocator, for Rust callers: [`offheap_alloc`] and [`offheap_free`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Malloc;

impl Allocator for Malloc {
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        // SAFETY: the default allocator ignores its allocator argument.
        unsafe { offheap_alloc(0, bytes) }
    }

    unsafe fn free(&mut self, ptr: *mut u8, bytes: usize) {
        // SAFETY: `ptr` and `bytes` came from `offheap_alloc`.
        unsafe { offheap_free(0, ptr, bytes) }
    }

    fn huge_mapping_prefix(&self) -> Option<usize> {
        Some(0)
    }
}

/// From this size up, the default allocator maps memory of its own backed by huge pages:
/// a fresh 4 KiB page costs a page fault, and a large copy would otherwise spend more
/// time faulting than copying.
pub const LARGE_BYTES: usize = 4 << 20;

/// The size and alignment of a transparent huge page on x86-64 and arm64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A private anonymous mapping of at least `bytes` bytes, aligned to [`HUGE_PAGE`] and
/// advised for huge pages; null when the system has no memory for it. Release it with
/// [`unmap_huge`] and the same `bytes`.
///
/// The mapping is reserved honestly (no `MAP_NORESERVE`): under the kernel's overcommit
/// accounting a request the machine cannot back fails here, with NULL, which the copy
/// reports as `Out_of_memory`, instead of succeeding and getting the process killed
/// when the pages are touched. That holds for the copies and for the traversal's own
/// tables alike: a queue chunk is filled front to back, a side table and a snapshot are
/// written all over, so what they reserve is what they will touch (at most the unused
/// tail of the last queue chunk, under 2 MiB, is reserved for nothing).
pub fn map_huge(bytes: usize) -> *mut u8 {
    let Some(len) = bytes
        .max(1)
        .checked_add(HUGE_PAGE - 1)
        .map(|n| n / HUGE_PAGE * HUGE_PAGE)
    else {
        return std::ptr::null_mut();
    };
    map_aligned(len, libc::PROT_READ | libc::PROT_WRITE)
}

/// A private anonymous mapping of `len` bytes (a multiple of [`HUGE_PAGE`]) with access
/// `prot`, aligned to [`HUGE_PAGE`] and advised for huge pages; null when it cannot be
/// had. Mapped with a huge page of slack, then trimmed to the aligned range.
pub(crate) fn map_aligned(len: usize, prot: libc::c_int) -> *mut u8 {
    let Some(mapped) = len.checked_add(HUGE_PAGE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: an anonymous private mapping; no file, no fixed address.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    // Keep the aligned `len` bytes inside the mapping; unmap the slack around them.
    let start = map as usize;
    let aligned = round_up(start, HUGE_PAGE);
    let tail = start + mapped - (aligned + len);
    // SAFETY: both slack ranges lie inside the mapping just made and nothing uses them;
    // the advice is only advice (without transparent huge pages the mapping works as is).
    unsafe {
        if aligned > start {
            libc::munmap(map, aligned - start);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    aligned as *mut u8
}

/// Releases a mapping from [`map_huge`].
///
/// # Safety
/// `ptr` came from `map_huge(bytes)` and nothing uses the memory any more.
pub unsafe fn unmap_huge(ptr: *mut u8, bytes: usize) {
    // SAFETY: the caller passes a whole mapping made by `map_huge`.
    unsafe { crate::fault::release_mapping(ptr, round_up(bytes.max(1), HUGE_PAGE)) };
}

/// Gives the pages of `len` bytes at `ptr` back to the system, keeping the range mapped:
/// private anonymous pages then read as zeros, pages of a private file mapping as the
/// file, and they cost no memory until written again. Advice: when the system refuses
/// it, the pages stay as they were until the range is released.
///
/// # Safety
/// `ptr` is page aligned; the range lies in a private mapping of ours that nothing reads
/// but a GC marker following a pointer left from before a free, or a racing `stats`
/// (see `release`).
pub unsafe fn discard(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller's contract: our own pages, whose contents nothing needs.
        unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    }
}

/// Whether address space that holds no memory still costs the process something: it
/// has a limit on its address space (`ulimit -v`), or the kernel counts every writable
/// private mapping against a strict commit limit (`vm.overcommit_memory` 2), which pages
/// dropped by [`discard`] do not lower. Asked once per process.
pub fn address_space_counts() -> bool {
    static COUNTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COUNTS.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: `limit` is a valid `rlimit` to fill.
        let limited = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0
            && limit.rlim_cur != libc::RLIM_INFINITY;
        // Its first byte, read into a buffer of our own: no allocation that could fail.
        let mut mode = [0u8; 1];
        let strict = std::fs::File::open("/proc/sys/vm/overcommit_memory")
            .and_then(|mut f| std::io::Read::read(&mut f, &mut mode))
            .is_ok_and(|n| n == 1 && mode[0] == b'2');
        limited || strict
    })
}

/// [`discard`] for the whole of a [`map_huge`] mapping.
///
/// # Safety
/// `ptr` came from `map_huge(bytes)`; its contents are as [`discard`] requires.
pub unsafe fn discard_huge(ptr: *mut u8, bytes: usize) {
    // SAFETY: the whole mapping, page aligned; the caller's contract.
    unsafe { discard(ptr, round_up(bytes.max(1), HUGE_PAGE)) };
}

/// A zero-filled array for the traversal's own tables: from [`HUGE_PAGE`] bytes on, a
/// [`map_huge`] mapping (zeroed by the kernel, one page fault per 2 MiB), else the heap.
/// An array of length 0 holds no memory.
pub struct ZeroedArray<T> {
    /// `len` initialised (zero) elements; dangling when `len` is 0.
    ptr: *mut T,
    len: usize,
}

impl<T> ZeroedArray<T> {
    /// An array of no elements, holding no memory.
    pub const fn empty() -> ZeroedArray<T> {
        ZeroedArray {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        }
    }
}

impl<T: Copy> ZeroedArray<T> {
    /// `len` elements, all bytes zero; [`NoMemory`] when the memory cannot be had (or
    /// its size overflows).
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`.
    pub unsafe fn new(len: usize) -> Result<ZeroedArray<T>, NoMemory> {
        if len == 0 || std::mem::size_of::<T>() == 0 {
            return Ok(ZeroedArray {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        let layout = std::alloc::Layout::array::<T>(len)
            .map_err(|_| NoMemory(len.saturating_mul(std::mem::size_of::<T>())))?;
        let ptr = if layout.size() >= HUGE_PAGE {
            map_huge(layout.size()) as *mut T
        } else {
            // SAFETY: a non-zero-sized layout.
            unsafe { std::alloc::alloc_zeroed(layout) as *mut T }
        };
        if ptr.is_null() {
            return Err(NoMemory(layout.size()));
        }
        Ok(ZeroedArray { ptr, len })
    }
}

impl<T> std::ops::Deref for ZeroedArray<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `len` zero-initialised elements, valid per `new`'s contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> std::ops::DerefMut for ZeroedArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        let bytes = self.len * std::mem::size_of::<T>();
        if bytes == 0 {
            return; // `empty`, or zero-sized elements: nothing was allocated
        }
        // SAFETY: `new` made this very layout, so it is valid; the memory was made by
        // `new` with it, by the same rule.
        unsafe {
            let layout =
                std::alloc::Layout::from_size_align_unchecked(bytes, std::mem::align_of::<T>());
            if layout.size() >= HUGE_PAGE {
                unmap_huge(self.ptr as *mut u8, layout.size())
            } else {
                std::alloc::dealloc(self.ptr as *mut u8, layout)
            }
        }
    }
}

/// Whether the default allocator gives `size` bytes a mapping of its own, backed by huge
/// pages ([`map_huge`]), rather than `malloc` memory: from [`LARGE_BYTES`] on, where
/// rounding up to whole huge pages adds at most half the size, and for whole huge pages, which a
/// mapping fits exactly (a region's chunks).
pub fn maps_huge(size: usize) -> bool {
    size >= LARGE_BYTES || (size != 0 && size.is_multiple_of(HUGE_PAGE))
}

/// The default allocator's `alloc`: `malloc`, or (see [`maps_huge`]) a private mapping
/// aligned to and advised for 2 MiB huge pages.
///
/// # Safety
/// Callable from C with any arguments; `allocator` is ignored.
#[no_mangle]
pub unsafe extern "C" fn offheap_alloc(_allocator: Word, size: usize) -> *mut u8 {
    if maps_huge(size) {
        map_huge(size)
    } else {
        // SAFETY: plain malloc.
        unsafe { libc::malloc(size.max(1)) as *mut u8 }
    }
}

/// The default allocator's `free`, for memory from [`offheap_alloc`] of the same `size`.
///
/// # Safety
/// `ptr` came from `offheap_alloc(_, size)` and is not used any more.
#[no_mangle]
pub unsafe extern "C" fn offheap_free(_allocator: Word, ptr: *mut u8, size: usize) {
    if ptr.is_null() {
        return;
    }
    if maps_huge(size) {
        // SAFETY: `ptr` is a mapping from `map_huge(size)`.
        unsafe { unmap_huge(ptr, size) }
    } else {
        // SAFETY: `ptr` came from malloc.
        unsafe { libc::free(ptr as *mut libc::c_void) }
    }
}

/// An allocator block outside the heap holding the default allocator's functions: its
/// header, then fields 0 and 1 as `Offheap.malloc`'s block holds them.
#[repr(C)]
struct StaticAllocatorBlock {
    header: Word,
    alloc: AllocFn,
    free: FreeFn,
}

/// The default allocator's block for handles that keep none (`handle.rs`: unscanned
/// handles). It never moves nor dies, where `Offheap.malloc`'s block may move (OCaml 4's
/// compaction) and a handle the GC does not scan could not follow it.
static DEFAULT_BLOCK: StaticAllocatorBlock = StaticAllocatorBlock {
    header: Header::new(2, Color::Unmarkable, ABSTRACT_TAG).0,
    alloc: offheap_alloc,
    free: offheap_free,
};

/// The default allocator's block outside the heap, as an OCaml value (the address of its
/// first field): an allocator block for [`CAllocator::new`], default by
/// [`CAllocator::is_default`], that never moves nor dies.
pub fn default_block() -> Word {
    std::ptr::addr_of!(DEFAULT_BLOCK.alloc) as Word
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allocator_small_and_large() {
        for size in [
            1,
            24,
            4096,
            HUGE_PAGE - 8,
            HUGE_PAGE,
            HUGE_PAGE + 8,
            LARGE_BYTES - 8,
            LARGE_BYTES,
            LARGE_BYTES + 12345,
            3 * LARGE_BYTES,
        ] {
            let p = Malloc.alloc(size);
            assert!(!p.is_null());
            assert_eq!(p as usize % 8, 0);
            // SAFETY: `p` holds `size` bytes.
            unsafe {
                std::ptr::write_bytes(p, 0xAB, size);
                assert_eq!(*p.add(size - 1), 0xAB);
                Malloc.free(p, size);
            }
        }
    }

    #[test]
    fn whole_huge_pages_and_large_sizes_are_mapped() {
        for (size, mapped) in [
            (1, false),
            (HUGE_PAGE - 8, false),
            (HUGE_PAGE, true),
            (HUGE_PAGE + 8, false),
            (3 * HUGE_PAGE / 2, false),
            (LARGE_BYTES - 8, false),
            (LARGE_BYTES, true),
            (LARGE_BYTES + 8, true),
            (3 * HUGE_PAGE, true),
        ] {
            assert_eq!(maps_huge(size), mapped, "{size}");
            let p = Malloc.alloc(size);
            assert!(!p.is_null());
            if mapped {
                // A mapping of its own starts on a huge page; malloc's memory does not.
                assert_eq!(p as usize % HUGE_PAGE, 0, "{size}");
            }
            // SAFETY: `p` came from `alloc(size)`; freeing it by the other path than
            // the one it was made by would abort (free of a mapping) or leak.
            unsafe { Malloc.free(p, size) };
        }
        assert!(!maps_huge(0));
    }
}
