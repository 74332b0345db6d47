//! The blocks pass 1 has queued but not scanned yet, in the order it scans them.
//!
//! Pass 1 scans depth first by groups: scanning a block queues, one after the other, the
//! blocks its fields lead to that were not seen before (they get consecutive offsets, so
//! a block's children sit together in the copy), and those are scanned next, first child
//! first, before the siblings of the block itself. The blocks waiting to be scanned are
//! therefore a stack of runs of consecutive queue indices: one run per block scanned
//! whose children are not all scanned yet. A list needs one run at a time, a tree one
//! per level of the path being walked (the depth of the source, never its size: a run is
//! dropped as soon as its last block is taken).

use crate::alloc::NoMemory;

/// A run of queued blocks waiting to be scanned: queue indices `next..end`, whose
/// snapshot (when the source is shared) starts at word `snapshot_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The next queue index to scan.
    pub next: usize,
    /// One past the run's last queue index.
    pub end: usize,
    /// Where the snapshot of block `next` starts, when there is a snapshot.
    pub snapshot_at: usize,
}

/// A stack of [`Run`]s; [`Pending::top`] is the next block to scan.
pub struct Pending {
    runs: Vec<Run>,
}

impl Pending {
    /// An empty stack; allocates nothing until the first [`Pending::push`].
    pub fn new() -> Pending {
        Pending { runs: Vec::new() }
    }

    /// Puts a run on top (an empty run is not kept); [`NoMemory`], the stack unchanged,
    /// when it cannot grow.
    #[inline(always)]
    pub fn push(&mut self, run: Run) -> Result<(), NoMemory> {
        if run.next == run.end {
            return Ok(());
        }
        if self.runs.len() == self.runs.capacity() {
            self.grow()?;
        }
        self.runs.push(run);
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) -> Result<(), NoMemory> {
        let more = self.runs.capacity().max(FIRST_RUNS);
        self.runs
            .try_reserve_exact(more)
            .map_err(|_| NoMemory(more * std::mem::size_of::<Run>()))
    }

    /// The top run: its `next` block is the one to scan next, and blocks `next..end`
    /// follow it in order.
    #[inline(always)]
    pub fn top(&self) -> Option<Run> {
        self.runs.last().copied()
    }

    /// Takes the top run's first block, which holds `snapshot_words` words of the
    /// snapshot (0 without one); the run is dropped when that was its last block.
    #[inline(always)]
    pub fn take(&mut self, snapshot_words: usize) {
        if let Some(top) = self.runs.last_mut() {
            top.next += 1;
            top.snapshot_at += snapshot_words;
            if top.next == top.end {
                self.runs.pop();
            }
        }
    }

    /// Bytes of memory the stack holds now.
    pub fn allocated_bytes(&self) -> usize {
        self.runs.capacity() * std::mem::size_of::<Run>()
    }
}

impl Default for Pending {
    fn default() -> Self {
        Pending::new()
    }
}

/// Runs of the stack's first allocation.
const FIRST_RUNS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_taken_first_to_last_top_first_and_dropped_when_done() {
        let mut p = Pending::new();
        p.push(Run {
            next: 0,
            end: 2,
            snapshot_at: 0,
        })
        .unwrap();
        assert_eq!(
            p.top(),
            Some(Run {
                next: 0,
                end: 2,
                snapshot_at: 0
            })
        );
        p.take(3);
        p.push(Run {
            next: 2,
            end: 3,
            snapshot_at: 7,
        })
        .unwrap();
        p.push(Run {
            next: 3,
            end: 3,
            snapshot_at: 9,
        })
        .unwrap(); // empty: not kept
        assert_eq!(
            p.top(),
            Some(Run {
                next: 2,
                end: 3,
                snapshot_at: 7
            })
        );
        p.take(0);
        assert_eq!(
            p.top(),
            Some(Run {
                next: 1,
                end: 2,
                snapshot_at: 3
            })
        );
        p.take(0);
        assert_eq!(p.top(), None);
    }

    #[test]
    fn a_chain_holds_one_run() {
        let mut p = Pending::new();
        p.push(Run {
            next: 0,
            end: 1,
            snapshot_at: 0,
        })
        .unwrap();
        for k in 1..100_000 {
            assert_eq!(p.top().unwrap().next, k - 1);
            p.take(0);
            p.push(Run {
                next: k,
                end: k + 1,
                snapshot_at: 0,
            })
            .unwrap();
            assert_eq!(p.runs.len(), 1);
        }
        assert!(p.allocated_bytes() <= FIRST_RUNS * std::mem::size_of::<Run>());
    }
}
