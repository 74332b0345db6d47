//! Work split over threads when the system refuses threads: `image::parallel` (the
//! checks and reads of image loads) does without them instead of failing, and every
//! item is done once. In a test binary of its own: it lowers the process's address-space
//! limit, which would disturb tests running beside it.

use offheap::image::parallel::parallel;

/// The process's address space in use, in bytes (`VmSize`).
fn address_space_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .expect("a VmSize line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmSize in kB");
    kib * 1024
}

#[test]
fn items_are_all_done_when_threads_are_refused() {
    let items: Vec<usize> = (0..2000).collect();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit into `limit`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) }, 0);
    // Room for a few thread stacks (2 MiB each), not for the 1999 asked for.
    let lowered = libc::rlimit {
        rlim_cur: (address_space_bytes() + (16 << 20)).min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: sets the soft limit only; it is raised back below.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lowered) }, 0);
    let spawned = std::sync::Mutex::new(std::collections::HashSet::new());
    let results = parallel(items.clone(), 2000, |k, item| {
        spawned.lock().unwrap().insert(std::thread::current().id());
        // A little work, so that threads that were made take part.
        std::thread::sleep(std::time::Duration::from_micros(50));
        (k, item * 2)
    });
    // SAFETY: puts the soft limit back.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
    let threads = spawned.lock().unwrap().len();
    assert_eq!(results.len(), items.len());
    for (k, &(at, doubled)) in results.iter().enumerate() {
        assert_eq!((at, doubled), (k, 2 * k), "item {k} done once, in order");
    }
    assert!(
        (1..2000).contains(&threads),
        "some threads refused, the work done by {threads}"
    );
}
