//! Buffers written to a file on a thread of its own, so that the traversal fills the next
//! buffer of an image while the kernel copies the last one into the page cache.
//!
//! Measured on a 921 MB image (`make bench-image`): the `write` calls were two thirds of
//! `Image.write`, most of it the kernel copying into fresh page-cache pages, and the
//! traversal waited for each.
//!
//! One buffer is written while the other is filled: [`Background::write`] hands a full
//! buffer to the thread and returns an empty one, the spare at first, then the buffer
//! written before (waiting for its write to end). The thread writes with `write(2)` on a
//! duplicate of the file's descriptor, which shares its offset: once [`Background::finish`]
//! has returned, the file is where sequential writes of every buffer would have left it.

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::thread::{self, Job, Thread};
use crate::alloc::try_box;
use crate::layout::{self, Word};

/// What the traversal and the thread hand each other, under [`Shared::state`].
struct State {
    /// A buffer to write and how many of its words: set by the traversal, taken by the
    /// thread.
    job: Option<(Vec<Word>, usize)>,
    /// The buffer last written, or the error that ended the thread: set by the thread,
    /// taken by the traversal.
    written: Option<std::io::Result<Vec<Word>>>,
    /// No more jobs: the thread ends once it has written the one it holds.
    closed: bool,
}

/// The state and the condition both sides wait on, and the file the thread writes to.
///
/// The thread allocates nothing (a futex-based lock and condition, `write(2)`): a
/// thread's first `malloc` gives it an arena of its own, 64 MiB of address space that
/// glibc keeps after the thread ends, which under `ulimit -v` left the OCaml 5 runtime
/// without room for its minor collections (`mpsc` channels allocate on the receiving
/// side).
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// A duplicate of the image file's descriptor: the thread's alone.
    out: std::fs::File,
}

impl Job for Shared {
    /// The thread: writes each job to the file and hands its buffer back, until the jobs
    /// are closed or a write fails.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if let Some((buf, words)) = state.job.take() {
                drop(state);
                let written = (&self.out)
                    .write_all(layout::words_as_bytes(&buf[..words]))
                    .map(|()| buf);
                let failed = written.is_err();
                state = self.lock();
                state.written = Some(written);
                self.changed.notify_all();
                if failed {
                    return;
                }
            } else if state.closed {
                return;
            } else {
                state = self.wait(state);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }
}

/// The writing thread, the buffer it owes and the spare buffer. See the module's
/// documentation.
pub struct Background {
    /// Boxed, so that it stays in place while the thread runs; dropped after the thread
    /// is joined (see `Drop`).
    shared: Box<Shared>,
    /// Whether a buffer handed to the thread has not been received back.
    in_flight: bool,
    /// An empty buffer to hand out before any comes back.
    spare: Option<Vec<Word>>,
    thread: Option<Thread>,
}

impl Background {
    /// Starts a thread writing to `file` with a spare buffer of `words` words; `None`
    /// when the descriptor cannot be duplicated, the spare cannot be had, or the system
    /// makes no thread (buffers are then written by the caller, as before).
    pub fn start(file: &std::fs::File, words: usize) -> Option<Background> {
        let mut spare = Vec::new();
        spare.try_reserve_exact(words).ok()?;
        spare.resize(words, 0);
        let out = file.try_clone().ok()?;
        let shared = try_box(Shared {
            state: Mutex::new(State {
                job: None,
                written: None,
                closed: false,
            }),
            changed: Condvar::new(),
            out,
        })?;
        // SAFETY: `shared` is boxed and dropped only after the thread is joined (`Drop`).
        let thread = unsafe { thread::spawn(&*shared) }?;
        Some(Background {
            shared,
            in_flight: false,
            spare: Some(spare),
            thread: Some(thread),
        })
    }

    /// Hands the buffer `buf`, whose first `words` words are to be written, to the
    /// thread, and puts an empty buffer of the same size in its place: the spare, or
    /// the buffer written before, once its write has ended.
    ///
    /// # Errors
    /// The error of the write before; `buf` is then left as it is.
    pub fn write(&mut self, buf: &mut Vec<Word>, words: usize) -> std::io::Result<()> {
        let free = match self.spare.take() {
            Some(spare) => spare,
            None => self.receive()?,
        };
        let full = std::mem::replace(buf, free);
        self.shared.lock().job = Some((full, words));
        self.shared.changed.notify_all();
        self.in_flight = true;
        Ok(())
    }

    /// Waits for the write handed to the thread, and ends it.
    ///
    /// # Errors
    /// That write's error.
    pub fn finish(mut self) -> std::io::Result<()> {
        if self.in_flight {
            self.receive()?;
        }
        Ok(())
    }

    /// The buffer handed to the thread, once written.
    fn receive(&mut self) -> std::io::Result<Vec<Word>> {
        if !self.in_flight {
            return Err(stopped());
        }
        self.in_flight = false;
        let mut state = self.shared.lock();
        loop {
            if let Some(written) = state.written.take() {
                return written;
            }
            state = self.shared.wait(state);
        }
    }
}

impl Drop for Background {
    /// Closes the jobs and waits for the thread: nothing writes to the file afterwards.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            thread.join();
        }
    }
}

/// The error for a buffer received that was never handed out (a caller's slip: the
/// writer hands one out before each it receives).
fn stopped() -> std::io::Error {
    std::io::Error::other("no buffer was handed to the image's writing thread")
}
