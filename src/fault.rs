//! Panic injection for the tests of what happens when a stub panics (feature
//! `fault-injection`, never in a release build of the library).
//!
//! [`point`] marks a place where a panic is injected when the environment variable
//! `OFFHEAP_INJECT_PANIC` names it. Without the feature it is an empty inline function.
//! Points: `measure`, `write`, `restore` (the traversal's passes), `image-write` (the
//! image write stub, which holds the runtime: the copy goes to the file as it is made)
//! and `image-load` (the image load stub, while the runtime lock is released).

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
