//! Copies under a lowered address-space limit (`RLIMIT_AS`), so that the traversal's
//! huge-page mappings (queue chunks, large side tables) and the copy's own mapping fail
//! for real: every copy either succeeds (and is isomorphic to the source) or fails with
//! `CopyError::OutOfMemory`; the source stays byte-identical and nothing stays mapped.
//!
//! One test in this binary: the limit is the whole process's.

mod address_limit;
mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::{HeaderMarks, SideTable};
use offheap::copy::{self, CopyError};
use offheap::layout::{self, Color, Word};

#[test]
fn copies_under_an_address_space_limit_succeed_or_are_out_of_memory() {
    let old = address_limit::current();
    assert_eq!(
        old.rlim_max,
        libc::RLIM_INFINITY,
        "the test needs to raise the limit back"
    );
    // A list of 400k cells of 3 words: 9.6 MB to copy; the queue needs 6.4 MB (three
    // huge-page chunks past its first 2 MiB), the side table 16 MiB.
    let mut h = FakeHeap::new(1_300_000);
    let mut list = layout::val_int(0);
    for i in 0..400_000 {
        list = h.block(0, &[layout::val_int(i), list]);
    }
    let root = list;
    let before = h.snapshot();
    let mut outcomes: Vec<Result<usize, usize>> = Vec::with_capacity(1000);
    let mut copy_bytes = 0;
    let base = address_limit::vm_size();
    for table in [false, true] {
        for extra_mib in (0..80).step_by(2) {
            let mut alloc = Counting::new();
            address_limit::set((base + (extra_mib << 20)) as libc::rlim_t, &old);
            // SAFETY: `root` is a well-formed value of `h`; nothing else touches it.
            let outcome = unsafe {
                if table {
                    copy::copy(root, &mut h, SideTable::new(), &mut alloc)
                } else {
                    copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut alloc)
                }
            };
            address_limit::set(old.rlim_cur, &old);
            assert!(
                h.snapshot() == before,
                "source changed (table: {table}, +{extra_mib} MiB)"
            );
            match outcome {
                Ok(c) => {
                    assert_isomorphic(&mut h, root, c.root, c.base as Word, c.bytes);
                    copy_bytes = c.bytes;
                    // SAFETY: from this allocator; not used after.
                    unsafe { alloc.free(c.base, c.bytes) };
                    outcomes.push(Ok(extra_mib));
                }
                Err(CopyError::OutOfMemory(bytes)) => outcomes.push(Err(bytes)),
                Err(e) => panic!("table: {table}, +{extra_mib} MiB: {e}"),
            }
            assert!(alloc.live.is_empty(), "the copy's memory was given back");
        }
    }
    assert!(
        outcomes.iter().any(Result::is_ok),
        "some copies fit: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(b) if *b != copy_bytes)),
        "some failures were the traversal's own tables: {outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(b) if *b == copy_bytes)),
        "some failures were the copy's allocation: {outcomes:?}"
    );
    let grown = address_limit::vm_size().saturating_sub(base);
    assert!(
        grown < 16 << 20,
        "nothing stays mapped: the process grew by {grown} bytes"
    );
}
