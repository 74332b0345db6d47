//! Work split over threads when the system refuses threads: `image::parallel` (the
//! checks and reads of image loads) does without them instead of failing, and every
//! item is done once. In a test binary of its own: it lowers the process's address-space
//! limit, which would disturb tests running beside it.

mod address_limit;

use offheap::image::parallel::parallel;

#[test]
fn items_are_all_done_when_threads_are_refused() {
    let items: Vec<usize> = (0..2000).collect();
    let limit = address_limit::current();
    // Room for a few thread stacks (2 MiB each), not for the 1999 asked for.
    address_limit::set(
        (address_limit::vm_size() + (16 << 20)) as libc::rlim_t,
        &limit,
    );
    let spawned = std::sync::Mutex::new(std::collections::HashSet::new());
    let results = parallel(items.iter().copied(), 2000, |k, item| {
        spawned.lock().unwrap().insert(std::thread::current().id());
        // A little work, so that threads that were made take part.
        std::thread::sleep(std::time::Duration::from_micros(50));
        (k, item * 2)
    })
    .expect("memory for the results");
    address_limit::set(limit.rlim_cur, &limit);
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
