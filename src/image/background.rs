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
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::layout::{self, Word};

/// A buffer to write: its words, of which the first `.1` are written.
type Job = (Vec<Word>, usize);

/// The writing thread, the buffers it owes and the spare buffer. See the module's
/// documentation.
pub struct Background {
    /// Jobs to the thread; `None` once closed.
    jobs: Option<Sender<Job>>,
    /// Buffers written (or the error that stopped the thread), in order.
    written: Receiver<std::io::Result<Vec<Word>>>,
    /// Buffers handed to the thread and not received back.
    in_flight: usize,
    /// An empty buffer to hand out before any comes back.
    spare: Option<Vec<Word>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts a thread writing to `file` with a spare buffer of `words` words; `None`
    /// when the descriptor cannot be duplicated, the spare cannot be had, or the system
    /// makes no thread (buffers are then written by the caller, as before).
    pub fn start(file: &std::fs::File, words: usize) -> Option<Background> {
        let mut spare = Vec::new();
        spare.try_reserve_exact(words).ok()?;
        spare.resize(words, 0);
        let mut out = file.try_clone().ok()?;
        let (jobs, to_write) = channel::<Job>();
        let (done, written) = channel();
        let thread = std::thread::Builder::new()
            .name("offheap-image-write".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                block_signals();
                for (buf, words) in to_write {
                    let r = out
                        .write_all(layout::words_as_bytes(&buf[..words]))
                        .map(|()| buf);
                    let failed = r.is_err();
                    if done.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Background {
            jobs: Some(jobs),
            written,
            in_flight: 0,
            spare: Some(spare),
            thread: Some(thread),
        })
    }

    /// Hands the buffer `buf`, whose first `words` words are to be written, to the
    /// thread, and puts an empty buffer of the same size in its place: the spare, or
    /// the buffer written before, once its write has ended.
    ///
    /// # Errors
    /// The error of an earlier write; `buf` is then left as it is.
    pub fn write(&mut self, buf: &mut Vec<Word>, words: usize) -> std::io::Result<()> {
        let free = match self.spare.take() {
            Some(spare) => spare,
            None => self.receive()?,
        };
        let full = std::mem::replace(buf, free);
        let Some(jobs) = &self.jobs else {
            return Err(stopped());
        };
        match jobs.send((full, words)) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(std::sync::mpsc::SendError((full, _))) => {
                // Not written: the thread ended after a failed write.
                self.spare = Some(full);
                Err(stopped())
            }
        }
    }

    /// Waits for every write handed to the thread, and ends it.
    ///
    /// # Errors
    /// The first write's error.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.jobs = None;
        while self.in_flight > 0 {
            self.receive()?;
        }
        Ok(())
    }

    /// The next buffer the thread wrote, once written.
    fn receive(&mut self) -> std::io::Result<Vec<Word>> {
        if self.in_flight == 0 {
            return Err(stopped());
        }
        self.in_flight -= 1;
        self.written.recv().unwrap_or_else(|_| Err(stopped()))
    }
}

impl Drop for Background {
    /// Closes the jobs and waits for the thread: nothing writes to the file afterwards.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            // The thread's closure does not panic (`panic = "abort"` besides).
            let _ = thread.join();
        }
    }
}

/// The error of a thread that stopped without saying why (it cannot: it ends only when
/// its jobs are closed or after sending an error).
fn stopped() -> std::io::Error {
    std::io::Error::other("the image's writing thread stopped")
}

/// Blocks every signal in the calling thread, so that the process's signals go to its
/// OCaml threads, never to this one.
fn block_signals() {
    // SAFETY: a local signal set, filled and passed to `pthread_sigmask` for this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}
