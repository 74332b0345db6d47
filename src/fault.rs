//! Faults for tests (feature `fault-injection`, never in a release build of the
//! library): panics injected in stubs, and the released memory of copies kept
//! unreadable.
//!
//! [`point`] marks a place where a panic is injected when the environment variable
//! `OFFHEAP_INJECT_PANIC` names it. Without the feature it is an empty inline function.
//! Points: `measure`, `write`, `restore` (the traversal's passes), `image-write` (the
//! image write stub, which holds the runtime: the copy goes to the file as it is made)
//! and `image-load` (the image load stub, while the runtime lock is released).
//!
//! [`release_mapping`] releases the mappings that hold copies (loaded image payloads, the
//! default allocator's large copies and region chunks): when `OFFHEAP_POISON_RELEASED`
//! is set it keeps their address range reserved but unreadable (`PROT_NONE`) instead of
//! unmapping it. An address is then never reused, so a read of released memory (the GC
//! following a pointer that a free let through too early) faults at once, where a
//! reused range would hide it (`tests/faults/test_released.ml`).

/// Panics if `OFFHEAP_INJECT_PANIC` is `name` (read once per process).
#[cfg(feature = "fault-injection")]
#[inline(never)]
pub fn point(name: &str) {
    static WANTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var("OFFHEAP_INJECT_PANIC").ok());
    if wanted.as_deref() == Some(name) {
        panic!("offheap: panic injected at {name}");
    }
}

/// Without the feature `fault-injection`: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Whether released mappings are kept unreadable (`OFFHEAP_POISON_RELEASED` set; read
/// once per process).
#[cfg(feature = "fault-injection")]
fn poison_released() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var_os("OFFHEAP_POISON_RELEASED").is_some())
}

/// Without the feature `fault-injection`: never.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn poison_released() -> bool {
    false
}

/// Releases the mapping of `len` bytes at `ptr`: unmaps it, or (poisoned, tests only)
/// drops its pages and keeps the range reserved and unreadable.
///
/// # Safety
/// `ptr` and `len` are a whole mapping, or whole pages of one, that nothing uses any more.
pub unsafe fn release_mapping(ptr: *mut u8, len: usize) {
    let p = ptr as *mut libc::c_void;
    // SAFETY: the caller's contract: our own pages, unused.
    unsafe {
        if poison_released() {
            libc::madvise(p, len, libc::MADV_DONTNEED);
            libc::mprotect(p, len, libc::PROT_NONE);
        } else {
            libc::munmap(p, len);
        }
    }
}
