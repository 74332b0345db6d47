/* The floor of the benchmark: one memcpy of n bytes between two warm buffers.

   The buffers are allocated and touched in full (and copied once) on the first call for
   a given size, and kept for the following calls of the same size, so the timed memcpy
   pays no page faults: it is what copying the same bytes costs at best. */

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

static char *src = NULL;
static char *dst = NULL;
static size_t size = 0;

static void release(void)
{
  free(src);
  free(dst);
  src = NULL;
  dst = NULL;
  size = 0;
}

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* bench_floor_memcpy n: seconds taken by one memcpy of n bytes, warm. */
CAMLprim value bench_floor_memcpy(value vn)
{
  CAMLparam1(vn);
  size_t n = (size_t)Long_val(vn);
  double t;

  if (n == 0)
    CAMLreturn(caml_copy_double(0.));
  if (n != size) {
    release();
    src = malloc(n);
    dst = malloc(n);
    if (src == NULL || dst == NULL) {
      release();
      caml_raise_out_of_memory();
    }
    memset(src, 0x5a, n);
    memset(dst, 0, n);
    memcpy(dst, src, n);
    size = n;
  }
  t = now();
  memcpy(dst, src, n);
  t = now() - t;
  CAMLreturn(caml_copy_double(t));
}

/* bench_floor_release (): frees the buffers. */
CAMLprim value bench_floor_release(value unit)
{
  (void)unit;
  release();
  return Val_unit;
}
