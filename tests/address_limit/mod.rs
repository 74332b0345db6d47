//! The process's address-space limit (`RLIMIT_AS`), for the test binaries that lower it
//! (each runs one test: the limit is the whole process's).

/// The process's virtual memory size, in bytes (`VmSize` of /proc/self/status).
pub fn vm_size() -> usize {
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

/// The limit now.
pub fn current() -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit into `old`, a valid struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut old) }, 0);
    old
}

/// Sets the soft limit, keeping the hard limit `old.rlim_max`.
pub fn set(bytes: libc::rlim_t, old: &libc::rlimit) {
    let lim = libc::rlimit {
        rlim_cur: bytes.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: a plain system call on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
}
