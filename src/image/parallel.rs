//! Work split over threads: the checks of a payload's chunks, the read of a payload.

use std::sync::Mutex;

use super::thread;
use crate::alloc::NoMemory;

/// At most this many threads run the items besides the calling one (their handles are
/// kept in an array on the stack: nothing is allocated for them).
const MAX_HELPERS: usize = 63;

/// Runs `f` on every item, on up to `threads` threads (the calling one among them);
/// the results in item order. Items go to whichever thread is free. Threads that the
/// system cannot make (a limit on processes or memory) are done without: their items
/// go to the threads there are, the calling one at least.
///
/// # Errors
/// [`NoMemory`] when there is no memory for the results (nothing has run then).
pub fn parallel<I: Send, R: Send>(
    items: impl ExactSizeIterator<Item = I> + Send,
    threads: usize,
    f: impl Fn(usize, I) -> R + Sync,
) -> Result<Vec<R>, NoMemory> {
    let n = items.len();
    let mut results: Vec<R> = Vec::new();
    results
        .try_reserve_exact(n)
        .map_err(|_| NoMemory(n * std::mem::size_of::<R>()))?;
    if threads <= 1 || n <= 1 {
        results.extend(items.enumerate().map(|(k, i)| f(k, i)));
        return Ok(results);
    }
    let mut done: Vec<Option<R>> = Vec::new();
    done.try_reserve_exact(n)
        .map_err(|_| NoMemory(n * std::mem::size_of::<Option<R>>()))?;
    done.resize_with(n, || None);
    let items = Mutex::new(items.enumerate());
    let done = Mutex::new(done);
    let work = || loop {
        let Some((k, item)) = items.lock().unwrap_or_else(|p| p.into_inner()).next() else {
            break;
        };
        let r = f(k, item);
        done.lock().unwrap_or_else(|p| p.into_inner())[k] = Some(r);
    };
    let mut helpers: [Option<thread::Thread>; MAX_HELPERS] = [const { None }; MAX_HELPERS];
    for slot in helpers.iter_mut().take((threads.min(n)) - 1) {
        // SAFETY: `work` lives on this frame until every helper is joined below.
        *slot = unsafe { thread::spawn(&work) };
        if slot.is_none() {
            break;
        }
    }
    work();
    for helper in helpers.into_iter().flatten() {
        helper.join();
    }
    let done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    // Every item was taken by a thread that stored its result before ending.
    results.extend(done.into_iter().flatten());
    debug_assert_eq!(results.len(), n, "every item done");
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_item_order() {
        for threads in [0, 1, 2, 5, 200] {
            for n in [0, 1, 2, 7, 100] {
                let r = parallel((0..n).map(|i| i * 3), threads, |k, i| (k, i + 1)).unwrap();
                let want: Vec<_> = (0..n).map(|k| (k, k * 3 + 1)).collect();
                assert_eq!(r, want, "{threads} threads, {n} items");
            }
        }
    }

    #[test]
    fn items_may_borrow_mutably() {
        let mut buf = vec![0u8; 1000];
        parallel(buf.chunks_mut(64), 3, |k, piece| piece.fill(k as u8)).unwrap();
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(*b as usize, i / 64);
        }
    }
}
