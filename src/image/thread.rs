//! Threads that the system may refuse, made without allocating: `pthread_create` on a
//! job that the caller keeps alive until [`Thread::join`].
//!
//! `std::thread` allocates where a failure ends the process: the thread's handle and
//! result (`Arc`s), its boxed closure, its name, and in the new thread the registration
//! of a thread-local destructor (glibc's `__cxa_thread_atexit_impl`, whose `calloc`
//! failing is a fatal error: "failed to register TLS destructor"). With memory
//! exhausted (`ulimit -v`, or `malloc` failing), an image's write or load aborted there
//! (`tests/faults/test_alloc_oom.ml`). Here the only allocations are the system's own
//! (the stack, the thread's TLS block), and their failure is `pthread_create`'s error.
//!
//! A job runs with every signal blocked, so that the process's signals go to its OCaml
//! threads, and must not panic (the crate is built with `panic = "abort"`; a panic
//! could not unwind out of the thread's `extern "C"` entry anyway).

/// What a thread made by [`spawn`] runs.
pub trait Job: Sync {
    /// The thread's work.
    fn run(&self);
}

impl<F: Fn() + Sync> Job for F {
    fn run(&self) {
        self()
    }
}

/// A thread started by [`spawn`], not yet joined.
#[must_use = "a thread must be joined before its job is dropped"]
pub struct Thread(libc::pthread_t);

/// The stack of a job's thread: as `std::thread`'s default.
const STACK_BYTES: usize = 2 << 20;

/// Starts a thread running `job.run()`; `None` when the system makes no thread (no
/// memory for its stack, a limit on threads).
///
/// # Safety
/// `job` stays alive, and in place, until the thread is joined ([`Thread::join`]).
pub unsafe fn spawn<J: Job>(job: &J) -> Option<Thread> {
    // SAFETY: `attr` is initialised by `pthread_attr_init` before any other use and
    // destroyed once `pthread_create` has copied what it needs; `job` outlives the thread
    // (the caller's contract), and `run_job::<J>` reads it as the `J` it is.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_attr_init(&mut attr) != 0 {
            return None;
        }
        libc::pthread_attr_setstacksize(&mut attr, STACK_BYTES);
        let mut thread: libc::pthread_t = std::mem::zeroed();
        let made = libc::pthread_create(
            &mut thread,
            &attr,
            run_job::<J>,
            job as *const J as *mut libc::c_void,
        );
        libc::pthread_attr_destroy(&mut attr);
        (made == 0).then_some(Thread(thread))
    }
}

impl Thread {
    /// Waits for the thread to end.
    pub fn join(self) {
        // SAFETY: a thread made by `spawn`, joined once (`self` is consumed).
        unsafe {
            libc::pthread_join(self.0, std::ptr::null_mut());
        }
    }
}

/// The thread's entry: blocks signals, runs the job.
extern "C" fn run_job<J: Job>(job: *mut libc::c_void) -> *mut libc::c_void {
    block_signals();
    // SAFETY: `spawn`'s argument, a `J` that outlives the thread (its caller's contract).
    unsafe { (*(job as *const J)).run() };
    std::ptr::null_mut()
}

/// Blocks every signal in the calling thread.
fn block_signals() {
    // SAFETY: a local signal set, filled and passed to `pthread_sigmask` for this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// The processors this process may run on (its CPU affinity mask), at least 1.
///
/// `std::thread::available_parallelism` also reads cgroup quotas from `/proc`, in
/// `String`s whose allocation aborts when memory is exhausted.
pub fn available() -> usize {
    // SAFETY: a local CPU set, filled by `sched_getaffinity` for this process and read
    // by `CPU_COUNT`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        (libc::CPU_COUNT(&set) as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn jobs_run_and_are_joined() {
        let count = AtomicUsize::new(0);
        let job = || {
            count.fetch_add(1, Ordering::Relaxed);
        };
        // SAFETY: `job` lives until both threads are joined below.
        let threads = [unsafe { spawn(&job) }, unsafe { spawn(&job) }];
        for t in threads.into_iter().flatten() {
            t.join();
        }
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn there_is_a_processor() {
        assert!(available() >= 1);
        assert!(available() <= 4096);
    }
}
