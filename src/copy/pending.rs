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
//!
//! Where the blocks discovered lie scattered, pass 1 goes on by batches from the
//! runs left here ([`super::batches`]).

use crate::alloc::NoMemory;

/// A run of queued blocks waiting to be scanned: queue indices `next..end`, the first
/// of which starts at word `at` of the snapshot when the source is shared, else at
/// offset `at` (in words) of the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The next queue index to scan.
    pub next: usize,
    /// One past the run's last queue index.
    pub end: usize,
    /// Where block `next` starts: in the snapshot when the source is shared, else in
    /// the copy.
    pub at: usize,
}

/// A stack of [`Run`]s; [`Pending::top`] is the next block to scan.
///
/// The top run is kept apart from the others: a block with one unseen child (a list
/// cell) replaces the spent top run with its child's, and the vector is never touched.
pub struct Pending {
    /// The top run; spent (`next == end`) when the next one is in `below`.
    top: Run,
    /// The runs under it, the nearest last.
    below: Vec<Run>,
}

impl Pending {
    /// An empty stack; allocates nothing until a run is pushed onto a live one.
    pub fn new() -> Pending {
        Pending {
            top: Run {
                next: 0,
                end: 0,
                at: 0,
            },
            below: Vec::new(),
        }
    }

    /// Puts a run on top (an empty run is not kept); [`NoMemory`], the stack unchanged,
    /// when it cannot grow.
    #[inline(always)]
    pub fn push(&mut self, run: Run) -> Result<(), NoMemory> {
        if run.next == run.end {
            return Ok(());
        }
        if self.top.next != self.top.end {
            if self.below.len() == self.below.capacity() {
                self.grow()?;
            }
            self.below.push(self.top);
        }
        self.top = run;
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) -> Result<(), NoMemory> {
        let more = self.below.capacity().max(FIRST_RUNS);
        self.below
            .try_reserve_exact(more)
            .map_err(|_| NoMemory(more * std::mem::size_of::<Run>()))
    }

    /// The top run: its `next` block is the one to scan next, and blocks `next..end`
    /// follow it in order. `None` when no block is left.
    #[inline(always)]
    pub fn top(&mut self) -> Option<Run> {
        if self.top.next == self.top.end {
            self.top = self.below.pop()?;
        }
        Some(self.top)
    }

    /// Takes the top run's first block, which holds `words` words of the snapshot or
    /// of the copy (whichever [`Run::at`] counts). Call after [`Pending::top`] returned
    /// a run.
    #[inline(always)]
    pub fn take(&mut self, words: usize) {
        debug_assert!(self.top.next < self.top.end, "take without a block");
        self.top.next += 1;
        self.top.at += words;
    }

    /// The number of runs with blocks left to scan.
    pub fn depth(&self) -> usize {
        self.below.len() + usize::from(self.top.next != self.top.end)
    }

    /// The number of blocks left to scan, at least `at_least` if not all were counted:
    /// the count stops there (the stack of a deep source is long).
    pub fn waiting(&self, at_least: usize) -> usize {
        let mut n = self.top.end - self.top.next;
        for run in self.below.iter().rev() {
            if n >= at_least {
                break;
            }
            n += run.end - run.next;
        }
        n
    }

    /// Bytes of memory the stack holds now.
    pub fn allocated_bytes(&self) -> usize {
        self.below.capacity() * std::mem::size_of::<Run>()
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
            at: 0,
        })
        .unwrap();
        assert_eq!(
            p.top(),
            Some(Run {
                next: 0,
                end: 2,
                at: 0,
            })
        );
        p.take(3);
        p.push(Run {
            next: 2,
            end: 3,
            at: 7,
        })
        .unwrap();
        p.push(Run {
            next: 3,
            end: 3,
            at: 9,
        })
        .unwrap(); // empty: not kept
        assert_eq!(
            p.top(),
            Some(Run {
                next: 2,
                end: 3,
                at: 7,
            })
        );
        p.take(0);
        assert_eq!(
            p.top(),
            Some(Run {
                next: 1,
                end: 2,
                at: 3,
            })
        );
        p.take(0);
        assert_eq!(p.top(), None);
    }

    #[test]
    fn depth_counts_the_runs_with_blocks_left() {
        let mut p = Pending::new();
        assert_eq!(p.depth(), 0);
        let run = |next, end| Run { next, end, at: 0 };
        p.push(run(0, 2)).unwrap();
        p.push(run(2, 2)).unwrap(); // empty: not kept
        assert_eq!(p.depth(), 1);
        p.push(run(2, 3)).unwrap();
        assert_eq!(p.depth(), 2);
        p.top();
        p.take(0);
        assert_eq!(p.depth(), 1, "the top run spent");
        p.top();
        p.take(0);
        p.top();
        p.take(0);
        assert_eq!(p.depth(), 0);
        assert_eq!(p.top(), None);
    }

    #[test]
    fn waiting_counts_the_blocks_left_up_to_the_bound() {
        let mut p = Pending::new();
        assert_eq!(p.waiting(8), 0);
        let run = |next, end| Run { next, end, at: 0 };
        p.push(run(0, 3)).unwrap();
        p.push(run(3, 5)).unwrap();
        p.push(run(5, 6)).unwrap();
        assert_eq!(p.waiting(100), 6);
        p.top();
        p.take(0);
        assert_eq!(p.waiting(100), 5, "the top run spent");
        assert_eq!(
            p.waiting(1),
            2,
            "stops at the first run that reaches the bound"
        );
        assert!(p.waiting(3) >= 3);
    }

    #[test]
    fn a_chain_holds_one_run() {
        let mut p = Pending::new();
        p.push(Run {
            next: 0,
            end: 1,
            at: 0,
        })
        .unwrap();
        for k in 1..100_000 {
            assert_eq!(p.top().unwrap().next, k - 1);
            p.take(0);
            p.push(Run {
                next: k,
                end: k + 1,
                at: 0,
            })
            .unwrap();
            assert!(p.below.is_empty());
        }
        assert_eq!(p.allocated_bytes(), 0);
    }
}
