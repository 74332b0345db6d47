//! What a thread keeps for its next copies, given back when the thread ends: the slab's
//! free slots (`runtime::slab`), a queue's spare first vector
//! ([`crate::copy::queue`]), the space of walks beyond the stack
//! ([`crate::copy::small`]), the errors of failed region adds (`region_stubs`).
//!
//! Not by `thread_local!` destructors: the first use of such a variable in a thread
//! registers its destructor with glibc (`__cxa_thread_atexit_impl`), whose `calloc`
//! failing is a fatal error ("failed to register TLS destructor: out of memory"), so a
//! thread's first copy with memory exhausted ended the process
//! (`tests/faults/test_alloc_oom.ml`). Here one POSIX thread-specific key, made once per
//! process, has a destructor that gives everything back; a thread arms it by setting its
//! value ([`watched`]), which allocates nothing for the first 32 keys of a process and
//! else fails cleanly. A thread that cannot arm it keeps nothing between copies.
//!
//! The thread-local variables themselves have no destructors (raw pointers, counts).

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    /// Whether this thread's key is set: its end calls [`thread_ends`].
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}

/// The key, or `None` when the process has no key left.
static KEY: OnceLock<Option<libc::pthread_key_t>> = OnceLock::new();

/// Whether what this thread keeps for its next copies will be given back when it ends:
/// arms that at the first call in the thread. `false` when it cannot be armed: the
/// thread must then keep nothing.
#[inline]
pub fn watched() -> bool {
    WATCHED.get() || watch()
}

#[cold]
fn watch() -> bool {
    let Some(key) = *KEY.get_or_init(make_key) else {
        return false;
    };
    // Any non-null value: the destructor runs only for keys whose value is not null.
    let marker = std::ptr::NonNull::<libc::c_void>::dangling().as_ptr();
    // SAFETY: a key made by `make_key`, never deleted.
    let set = unsafe { libc::pthread_setspecific(key, marker) } == 0;
    WATCHED.set(set);
    set
}

fn make_key() -> Option<libc::pthread_key_t> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is written by `pthread_key_create`; `thread_ends` has the
    // destructor's signature.
    let made = unsafe { libc::pthread_key_create(&mut key, Some(thread_ends)) } == 0;
    made.then_some(key)
}

/// The key's destructor, at the end of a thread that armed it: gives back what the
/// thread kept. A copy made afterwards in the same thread (by another destructor) arms
/// the key again, and the system calls this once more.
unsafe extern "C" fn thread_ends(_marker: *mut libc::c_void) {
    WATCHED.set(false);
    #[cfg(feature = "stubs")]
    crate::runtime::slab::thread_ends();
    crate::copy::queue::thread_ends();
    crate::copy::small::thread_ends();
    #[cfg(feature = "stubs")]
    crate::region_stubs::thread_ends();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_watched_once_asked() {
        std::thread::spawn(|| {
            assert!(!WATCHED.get());
            assert!(watched());
            assert!(WATCHED.get());
            assert!(watched());
        })
        .join()
        .unwrap();
    }
}
