/* malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign and mmap of this
   program fail from their k-th call on once armed (fm_arm k), or at their k-th call only
   (fm_arm_one k), until fm_disarm: memory exhausted at every point of one call
   (test_free_oom.ml, test_alloc_oom.ml). Linked into the program, so they interpose on
   the C library's. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <errno.h>
#include <sys/mman.h>
#include <dlfcn.h>
#include <caml/mlvalues.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
static long countdown = -1; /* fail when it reaches 0; -1: never */
static long failures = 0, calls = 0;
static int once = 0; /* fail the k-th call only, not every one from it on */
static int should_fail(void) {
  if (countdown < 0) return 0;
  calls++;
  if (countdown == 0) {
    if (once) countdown = -1;
    failures++;
    return 1;
  }
  countdown--;
  return 0;
}
void *malloc(size_t n) { if (should_fail()) { errno = ENOMEM; return NULL; } return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { if (should_fail()) { errno = ENOMEM; return NULL; } return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { if (should_fail()) { errno = ENOMEM; return NULL; } return __libc_realloc(p, n); }
int posix_memalign(void **r, size_t al, size_t n) { if (should_fail()) return ENOMEM; void *p = __libc_memalign(al, n); if (!p) return ENOMEM; *r = p; return 0; }
void *aligned_alloc(size_t al, size_t n) { if (should_fail()) { errno = ENOMEM; return NULL; } return __libc_memalign(al, n); }
void *memalign(size_t al, size_t n) { if (should_fail()) { errno = ENOMEM; return NULL; } return __libc_memalign(al, n); }
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
void *mmap(void *a, size_t l, int prot, int flags, int fd, off_t off) {
  if (!real_mmap) real_mmap = dlsym(RTLD_NEXT, "mmap");
  if (should_fail()) { errno = ENOMEM; return MAP_FAILED; }
  return real_mmap(a, l, prot, flags, fd, off);
}
value fm_arm(value k) { countdown = Long_val(k); once = 0; calls = 0; failures = 0; return Val_unit; }
value fm_arm_one(value k) { countdown = Long_val(k); once = 1; calls = 0; failures = 0; return Val_unit; }
value fm_disarm(value u) { long f = failures; countdown = -1; return Val_long(f); }
value fm_calls(value u) { return Val_long(calls); }
