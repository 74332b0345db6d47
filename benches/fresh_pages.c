/* What a copy's fresh memory costs on this machine: the first touch of an anonymous
   mapping (what every copy, queue chunk and side table gets from the kernel), with
   4 KiB pages and with transparent huge pages (offheap's mappings from 4 MiB up are
   advised MADV_HUGEPAGE), against a warm memset of the same bytes. Each kind is
   measured right after the same amount was freed, and again after a pause: in a VM
   with free page reporting (virtio-balloon), the kernel hands free 2 MiB blocks back
   to the hypervisor a few seconds after they were freed, and the first touch of such
   a block then costs a fault in the hypervisor too.

   Run by `make bench-pages`: fresh_pages [MB] [PAUSE_SECONDS] [ROUNDS]; a Markdown
   table on stdout, medians and ranges of ROUNDS. */

#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HUGE_PAGE (2UL << 20)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* A 2 MiB-aligned anonymous mapping of n bytes, advised [advice]; exits on failure. */
static char *map(size_t n, int advice) {
  char *m = mmap(NULL, n + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  if (m == MAP_FAILED) {
    perror("mmap");
    exit(1);
  }
  char *p = (char *)(((size_t)m + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1));
  madvise(p, n, advice);
  return p;
}

/* Seconds to write one byte in every 4 KiB page of a fresh mapping of n bytes. */
static double first_touch(size_t n, int advice) {
  char *p = map(n, advice);
  double t0 = now();
  for (size_t i = 0; i < n; i += 4096) p[i] = 1;
  double t = now() - t0;
  munmap(p, n);
  return t;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  size_t mb = argc > 1 ? (size_t)atol(argv[1]) : 512;
  int pause = argc > 2 ? atoi(argv[2]) : 6;
  int rounds = argc > 3 ? atoi(argv[3]) : 3;
  size_t n = mb << 20;
  enum { SMALL_RECENT, SMALL_PAUSED, HUGE_RECENT, HUGE_PAUSED, WARM, KINDS };
  const char *names[KINDS] = {
      "4 KiB pages, right after a free of as much",
      "4 KiB pages, after a pause",
      "huge pages, right after a free of as much",
      "huge pages, after a pause",
      "warm memset (no fault)",
  };
  double t[KINDS][64];
  if (rounds > 64) rounds = 64;
  for (int r = 0; r < rounds; r++) {
    sleep(pause);
    t[SMALL_PAUSED][r] = first_touch(n, MADV_NOHUGEPAGE);
    t[SMALL_RECENT][r] = first_touch(n, MADV_NOHUGEPAGE);
    sleep(pause);
    t[HUGE_PAUSED][r] = first_touch(n, MADV_HUGEPAGE);
    t[HUGE_RECENT][r] = first_touch(n, MADV_HUGEPAGE);
    char *p = map(n, MADV_HUGEPAGE);
    memset(p, 1, n);
    double t0 = now();
    memset(p, 2, n);
    t[WARM][r] = now() - t0;
    munmap(p, n);
  }
  printf("First touch of %zu MiB of fresh anonymous memory (pause %d s), median (min-max) "
         "of %d rounds:\n\n",
         mb, pause, rounds);
  printf("| memory | ms | GB/s |\n| --- | ---: | ---: |\n");
  for (int k = 0; k < KINDS; k++) {
    qsort(t[k], rounds, sizeof(double), cmp);
    double med = t[k][rounds / 2];
    printf("| %s | %.0f (%.0f-%.0f) | %.2f |\n", names[k], med * 1e3, t[k][0] * 1e3,
           t[k][rounds - 1] * 1e3, n / med / 1e9);
  }
  return 0;
}
