/* Test allocators for the C interface (offheap_copy, offheap_copy_with_free): they
 * count calls and remember what they handed out, so that the tests can check that
 * every failure path gives the buffer back (or, without a free function, leaves it with
 * the caller exactly when offheap.h says so). */

#include <stdint.h>
#include <stdlib.h>

#define CAML_INTERNALS
#include <caml/address_class.h>
#include <caml/version.h>
#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

#include "offheap.h"

enum mode { GOOD = 0, NULL_RESULT = 1, MISALIGNED = 2 };

struct state {
  enum mode mode;
  long allocs, frees;
  char *raw;          /* the malloc'd block behind the last allocation, or NULL */
  void *given;        /* what alloc returned */
  size_t given_size;  /* the size it was asked for */
  long bad_frees;     /* frees of another pointer or size than alloc gave */
};

static void *test_alloc(void *data, size_t size) {
  struct state *s = data;
  s->allocs++;
  s->given_size = size;
  if (s->mode == NULL_RESULT) return NULL;
  s->raw = malloc(size + 8);
  if (s->raw == NULL) return NULL;
  s->given = s->mode == MISALIGNED ? s->raw + 4 : s->raw;
  return s->given;
}

static void test_free(void *data, void *ptr, size_t size) {
  struct state *s = data;
  s->frees++;
  if (ptr != s->given || size != s->given_size || s->raw == NULL) {
    s->bad_frees++;
    return;
  }
  free(s->raw);
  s->raw = NULL;
}

/* Copies [v] with offheap_copy_with_free (or offheap_copy when [with_free] is false)
 * and an allocator in [mode]. Returns
 *   [| copied; allocs; frees; bad frees; returned the allocation (ptr and size);
 *      memory left with the caller (alloc'd, not freed, not returned) |].
 * Memory left with the caller is released here, after being counted. */
value capi_test_copy(value v, value mode, value with_free) {
  CAMLparam3(v, mode, with_free);
  CAMLlocal1(r);
  struct state s = { (enum mode)Long_val(mode), 0, 0, NULL, NULL, 0, 0 };
  offheap_buffer_t buf =
      Bool_val(with_free) ? offheap_copy_with_free(v, &s, test_alloc, test_free, 0)
                          : offheap_copy(v, &s, test_alloc, 0);
  long copied = buf.ptr != NULL;
  long returned = copied && buf.ptr == s.given && buf.size == s.given_size;
  long left = 0;
  if (copied) {
    free(s.raw); /* the copy: ours to free */
  } else if (s.raw != NULL) {
    left = 1; /* not freed, not returned: the caller's to free */
    free(s.raw);
  }
  long out[] = { copied, s.allocs, s.frees, s.bad_frees, returned, left };
  r = caml_alloc_tuple(6);
  for (int i = 0; i < 6; i++) Store_field(r, i, Val_long(out[i]));
  CAMLreturn(r);
}

static void *malloc_alloc(void *data, size_t size) {
  (void)data;
  return malloc(size);
}

/* Copies [v] into a malloc'd buffer and registers it with offheap_register: returns
 * (the copy, the buffer's address, its size), or raises Failure. */
value capi_test_registered_copy(value v) {
  CAMLparam1(v);
  CAMLlocal2(r, address);
  offheap_buffer_t buf = offheap_copy(v, NULL, malloc_alloc, 0);
  if (buf.ptr == NULL) caml_failwith("capi_test_registered_copy: not copied");
  if (!offheap_register(buf.ptr, buf.size)) {
    free(buf.ptr);
    caml_failwith("capi_test_registered_copy: not registered");
  }
  address = caml_copy_nativeint((intnat)buf.ptr);
  r = caml_alloc_tuple(3);
  Store_field(r, 0, (value)((char *)buf.ptr + sizeof(header_t)));
  Store_field(r, 1, address);
  Store_field(r, 2, Val_long(buf.size));
  CAMLreturn(r);
}

/* Unregisters (offheap_unregister) and frees a buffer of capi_test_registered_copy. */
value capi_test_release(value address, value size) {
  void *p = (void *)Nativeint_val(address);
  offheap_unregister(p, Long_val(size));
  free(p);
  return Val_unit;
}

/* Whether the page of [p] is static data in OCaml 4's page table (0 on OCaml 5). */
static long static_page(void *p) {
#if OCAML_VERSION_MAJOR < 5
  return (caml_page_table_lookup(p) & In_static_data) != 0;
#else
  (void)p;
  return 0;
#endif
}

/* Empty buffers registered as any buffer of offheap_copy: its result for [v] when
 * nothing is copied ({ NULL, 0 }), then a buffer of no bytes in the middle of a page
 * of malloc'd memory. Returns [| what offheap_register returned for each; whether
 * the page of the second was static data while registered; whether it is after
 * offheap_unregister |]. */
value capi_test_register_empty(value v) {
  CAMLparam1(v);
  CAMLlocal1(r);
  offheap_buffer_t buf = offheap_copy(v, NULL, malloc_alloc, 0);
  int first = offheap_register(buf.ptr, buf.size);
  offheap_unregister(buf.ptr, buf.size);
  char *page = malloc(3 * 4096);
  if (page == NULL) caml_raise_out_of_memory();
  char *inside = (char *)(((uintptr_t)page + 4096) & ~(uintptr_t)4095) + 24;
  int second = offheap_register(inside, 0);
  long during = static_page(inside);
  offheap_unregister(inside, 0);
  long after = static_page(inside);
  free(page);
  r = caml_alloc_tuple(4);
  Store_field(r, 0, Val_long(first));
  Store_field(r, 1, Val_long(second));
  Store_field(r, 2, Val_long(during));
  Store_field(r, 3, Val_long(after));
  CAMLreturn(r);
}
