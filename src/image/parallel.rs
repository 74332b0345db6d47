//! Work split over threads: the checks of a payload's chunks, the read of a payload.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `f` on every item, on up to `threads` threads (the calling one among them);
/// the results in item order. Items go to whichever thread is free. Threads that the
/// system cannot make (a limit on processes or memory) are done without: their items
/// go to the threads there are, the calling one at least.
pub fn parallel<I: Send, R: Send>(
    items: Vec<I>,
    threads: usize,
    f: impl Fn(usize, I) -> R + Sync,
) -> Vec<R> {
    let n = items.len();
    if threads <= 1 || n <= 1 {
        return items
            .into_iter()
            .enumerate()
            .map(|(k, i)| f(k, i))
            .collect();
    }
    let slots: Vec<Mutex<Option<I>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= n {
            break;
        }
        let item = slots[k]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("each item taken once");
        let r = f(k, item);
        *results[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    };
    std::thread::scope(|s| {
        for _ in 1..threads.min(n) {
            // `Scope::spawn` would panic when the system refuses a thread.
            if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every item done")
        })
        .collect()
}
