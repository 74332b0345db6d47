//! Memory that pass 1 writes a large copy into as it goes, so that most of the copy is
//! made in one pass over the source.
//!
//! Pass 2 reads every block of the source again, and on a scattered source (a `Map`, a
//! hash table) each of those reads is a cache miss: measured on a `Map` of 1M keys, pass
//! 2 was some 40% of the copy. But pass 1 already knows where each block goes when it
//! meets it (offsets are given in discovery order, and a block's children get theirs
//! while it is scanned), so once the copy's address is known it can write the block
//! there at once, while it is in the cache. The address is known when the memory is
//! had before the size: a [`Reservation`] of address space, made writable (and charged
//! to the process, as an allocation is) as the copy grows, and handed over at the end as
//! the mapping that the default allocator's `alloc(bytes)` would have made
//! ([`crate::alloc::map_huge`]), so that its `free` releases it.
//!
//! A copy starts writing this way once it passes [`DIRECT_FROM_WORDS`] (the size from
//! which the default allocator maps memory): the blocks before are written by pass 2 as
//! before, the others by pass 1. When address space cannot be had (a process under a
//! `ulimit -v` that leaves less than 1 GiB), the copy outgrows the reservation, memory
//! cannot be committed, or the traversal's own tables cannot grow beside the
//! reservation (a limit on address space or data that two passes would fit in), the
//! reservation is given back at once and the copy goes on in two passes (what pass 1
//! wrote is written again by pass 2): a copy never needs more memory at any moment than
//! two passes would.

use crate::alloc::{map_aligned, HUGE_PAGE, LARGE_BYTES};
use crate::layout::WORD_BYTES;

/// Address space reserved for one copy, the first size the process can have (a limit on
/// its address space, `ulimit -v`, may refuse the larger): copies larger than it are
/// made in two passes.
const RESERVED_BYTES: [usize; 3] = [64 << 30, 8 << 30, 1 << 30];

/// The offset (in words) from which pass 1 writes the blocks it discovers.
pub const DIRECT_FROM_WORDS: usize = LARGE_BYTES / WORD_BYTES;

/// At least this much more is committed at a time.
const MIN_COMMIT: usize = 32 << 20;

/// Address space aligned to [`HUGE_PAGE`], of which a prefix is writable: `reserved`
/// bytes at `start`, `committed` of them readable and writable; the copy goes `prefix`
/// bytes in (room that the allocator keeps in front of its copies). Unmapped when
/// dropped.
pub struct Reservation {
    start: *mut u8,
    reserved: usize,
    committed: usize,
    prefix: usize,
}

impl Reservation {
    /// Reserves address space (inaccessible, and not charged against the system's
    /// commit limit until committed) for a copy `prefix` bytes into it; `None` when the
    /// process cannot have it.
    pub fn new(prefix: usize) -> Option<Reservation> {
        if prefix >= MIN_COMMIT {
            return None;
        }
        // Inaccessible: a private mapping is charged to the process only once writable.
        let (start, reserved) = RESERVED_BYTES.into_iter().find_map(|reserved| {
            let start = map_aligned(reserved, libc::PROT_NONE);
            (!start.is_null()).then_some((start, reserved))
        })?;
        Some(Reservation {
            start,
            reserved,
            committed: 0,
            prefix,
        })
    }

    /// Where the copy starts: `prefix` bytes into the reservation.
    pub fn base(&self) -> *mut u8 {
        self.start.wrapping_add(self.prefix)
    }

    /// The bytes in front of the copy.
    pub fn prefix(&self) -> usize {
        self.prefix
    }

    /// Makes the first `bytes` bytes of the copy writable; false when they lie beyond
    /// the reservation or the system will not commit them (nothing changed then).
    #[inline(always)]
    pub fn commit(&mut self, bytes: usize) -> bool {
        bytes + self.prefix <= self.committed || self.commit_more(bytes + self.prefix)
    }

    #[cold]
    #[inline(never)]
    fn commit_more(&mut self, bytes: usize) -> bool {
        if bytes > self.reserved {
            return false;
        }
        let want = bytes
            .max(self.committed + self.committed / 2)
            .max(self.committed + MIN_COMMIT)
            .next_multiple_of(HUGE_PAGE)
            .min(self.reserved);
        // SAFETY: `committed..want` lies inside the reservation, which nothing else uses.
        let done = unsafe {
            libc::mprotect(
                self.start.add(self.committed) as *mut libc::c_void,
                want - self.committed,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } == 0;
        if done {
            self.committed = want;
        }
        done
    }

    /// Hands over the copy's first `bytes` bytes (committed), returning where the copy
    /// starts: the mapping left, of the prefix and those bytes, is what
    /// [`crate::alloc::map_huge`]`(prefix + bytes)` makes, and
    /// [`crate::alloc::unmap_huge`] releases it. The rest is unmapped.
    pub fn into_mapping(mut self, bytes: usize) -> *mut u8 {
        let kept = (self.prefix + bytes).next_multiple_of(HUGE_PAGE);
        debug_assert!(kept <= self.committed, "handing over memory not committed");
        // SAFETY: the range after `kept` lies inside the reservation and nothing uses it.
        unsafe {
            libc::munmap(
                self.start.add(kept) as *mut libc::c_void,
                self.reserved - kept,
            )
        };
        self.reserved = 0;
        self.base()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.reserved > 0 {
            // SAFETY: the whole reservation, which nothing uses any more.
            unsafe { libc::munmap(self.start as *mut libc::c_void, self.reserved) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_in_steps_and_hands_over_a_huge_mapping() {
        let prefix = 32;
        let mut r = Reservation::new(prefix).expect("address space");
        let base = r.base();
        assert_eq!(base as usize % HUGE_PAGE, prefix);
        assert!(r.commit(100));
        assert!(r.commit(MIN_COMMIT + 1));
        // SAFETY: the copy's first `MIN_COMMIT + 1` bytes (and the prefix) are committed.
        unsafe {
            base.sub(prefix).write(7);
            base.write(1);
            base.add(MIN_COMMIT).write(2);
        }
        assert!(!r.commit(RESERVED_BYTES[0]), "beyond the reservation");
        let bytes = MIN_COMMIT + 1;
        let p = r.into_mapping(bytes);
        assert_eq!(p, base);
        // SAFETY: handed over as `map_huge(prefix + bytes)` would have made it.
        unsafe {
            assert_eq!(p.add(MIN_COMMIT).read(), 2);
            crate::alloc::unmap_huge(p.sub(prefix), prefix + bytes);
        }
    }
}
