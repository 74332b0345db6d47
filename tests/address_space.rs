//! Copies under a lowered address-space limit (`RLIMIT_AS`), so that the traversal's
//! huge-page mappings (queue chunks, large side tables) and the copy's own mapping fail
//! for real: every copy either succeeds (and is isomorphic to the source) or fails with
//! `CopyError::OutOfMemory`; the source stays byte-identical and nothing stays mapped.
//!
//! One test in this binary: the limit is the whole process's.

mod fake_heap;

use fake_heap::{assert_isomorphic, Counting, FakeHeap};
use offheap::alloc::Allocator;
use offheap::copy::visited::{HeaderMarks, SideTable};
use offheap::copy::{self, CopyError};
use offheap::layout::{self, Color, Word};

/// The process's virtual memory size, in bytes (`VmSize` of /proc/self/status).
fn vm_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .expect("a VmSize line");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmSize in kB");
    kb * 1024
}

/// Sets the soft limit, keeping the hard limit `old.rlim_max`.
fn set_limit(bytes: libc::rlim_t, old: &libc::rlimit) {
    let lim = libc::rlimit {
        rlim_cur: bytes.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: a plain system call on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
}

#[test]
fn copies_under_an_address_space_limit_succeed_or_are_out_of_memory() {
    // SAFETY: reading the current limit into a valid struct.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut old) }, 0);
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
    let base = vm_size();
    for table in [false, true] {
        for extra_mib in (0..80).step_by(2) {
            let mut alloc = Counting::new();
            set_limit((base + (extra_mib << 20)) as libc::rlim_t, &old);
            // SAFETY: `root` is a well-formed value of `h`; nothing else touches it.
            let outcome = unsafe {
                if table {
                    copy::copy(root, &mut h, SideTable::new(), &mut alloc)
                } else {
                    copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut alloc)
                }
            };
            set_limit(old.rlim_cur, &old);
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
    let grown = vm_size().saturating_sub(base);
    assert!(
        grown < 16 << 20,
        "nothing stays mapped: the process grew by {grown} bytes"
    );
}
