/* LD_PRELOAD shim for test_image_adv: makes the system calls that Image.write's scratch
   files need fail, as file systems and full disks make them fail.

   ADV_NO_TMPFILE=1       open(..., O_TMPFILE) fails with EOPNOTSUPP, from the kernel
                          (the open is made on /proc, which has none), as on a file
                          system without unnamed files
   ADV_NO_FALLOCATE=1     fallocate fails with EOPNOTSUPP
   ADV_ENOSPC_AFTER=N     fallocate fails with ENOSPC after N calls that worked
   ADV_NO_SHARED_MMAP=1   mmap of a file, shared, fails with ENODEV
   ADV_SHRINK_AT_PREAD=N  the Nth pread (from 1) first truncates its file to the offset
                          it reads at, as a writer rewriting the file in place would
   ADV_REPORT=PATH        at exit, writes "O_TMPFILE-opens fallocates" to PATH */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

static long tmpfile_opens, fallocates;

static int env(const char *name) {
  const char *v = getenv(name);
  return v ? atoi(v) : -1;
}

__attribute__((destructor)) static void report(void) {
  const char *p = getenv("ADV_REPORT");
  if (p) {
    FILE *f = fopen(p, "w");
    if (f) {
      fprintf(f, "%ld %ld\n", tmpfile_opens, fallocates);
      fclose(f);
    }
  }
}

static const char *tmpfile_dir(const char *path, int flags) {
  if ((flags & O_TMPFILE) != O_TMPFILE) return path;
  tmpfile_opens++;
  return env("ADV_NO_TMPFILE") == 1 ? "/proc" : path;
}

int open64(const char *path, int flags, ...) {
  static int (*real)(const char *, int, ...);
  if (!real) real = dlsym(RTLD_NEXT, "open64");
  va_list ap;
  va_start(ap, flags);
  int mode = va_arg(ap, int);
  va_end(ap);
  return real(tmpfile_dir(path, flags), flags, mode);
}
int open(const char *path, int flags, ...) __attribute__((alias("open64")));

int openat64(int d, const char *path, int flags, ...) {
  static int (*real)(int, const char *, int, ...);
  if (!real) real = dlsym(RTLD_NEXT, "openat64");
  va_list ap;
  va_start(ap, flags);
  int mode = va_arg(ap, int);
  va_end(ap);
  const char *p = tmpfile_dir(path, flags);
  return real(p == path ? d : AT_FDCWD, p, flags, mode);
}
int openat(int d, const char *path, int flags, ...) __attribute__((alias("openat64")));

int fallocate64(int fd, int mode, off_t off, off_t len) {
  static int (*real)(int, int, off_t, off_t);
  if (!real) real = dlsym(RTLD_NEXT, "fallocate64");
  fallocates++;
  if (env("ADV_NO_FALLOCATE") == 1) {
    errno = EOPNOTSUPP;
    return -1;
  }
  int after = env("ADV_ENOSPC_AFTER");
  if (after >= 0 && fallocates > after) {
    errno = ENOSPC;
    return -1;
  }
  return real(fd, mode, off, len);
}
int fallocate(int fd, int mode, off_t off, off_t len) __attribute__((alias("fallocate64")));

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  static void *(*real)(void *, size_t, int, int, int, off_t);
  if (!real) real = dlsym(RTLD_NEXT, "mmap64");
  if (fd >= 0 && (flags & MAP_SHARED) && env("ADV_NO_SHARED_MMAP") == 1) {
    errno = ENODEV;
    return MAP_FAILED;
  }
  return real(addr, len, prot, flags, fd, off);
}
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap64")));

static long preads;

ssize_t pread64(int fd, void *buf, size_t count, off_t off) {
  static ssize_t (*real)(int, void *, size_t, off_t);
  if (!real) real = dlsym(RTLD_NEXT, "pread64");
  if (++preads == env("ADV_SHRINK_AT_PREAD")) {
    /* the file is open read-only: truncated by its name */
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) abort();
    path[n] = 0;
    if (truncate(path, off) != 0) abort();
  }
  return real(fd, buf, count, off);
}
ssize_t pread(int fd, void *buf, size_t count, off_t off) __attribute__((alias("pread64")));
