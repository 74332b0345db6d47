/* Test allocator for OCaml 5's deferred frees: every copy gets pages of its own from
   mmap, and free makes them inaccessible (PROT_NONE) instead of giving them back, so a
   GC that still read a freed copy would crash at once. Counts allocations and frees. */

#define _GNU_SOURCE
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <caml/alloc.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

#include "offheap.h"

static atomic_long allocs, frees;

static size_t round_to_pages(size_t size) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  return (size + page - 1) / page * page;
}

static void *guarded_alloc(value allocator, size_t size) {
  (void)allocator;
  void *p = mmap(NULL, round_to_pages(size), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  atomic_fetch_add(&allocs, 1);
  return p;
}

static void guarded_free(value allocator, void *ptr, size_t size) {
  (void)allocator;
  mprotect(ptr, round_to_pages(size), PROT_NONE);
  atomic_fetch_add(&frees, 1);
}

/* An allocator block: the two functions in an Abstract_tag block. */
static value allocator_block(void *(*alloc)(value, size_t),
                             void (*free_fn)(value, void *, size_t)) {
  value a = caml_alloc_small(2, Abstract_tag);
  Field(a, 0) = (value)alloc;
  Field(a, 1) = (value)free_fn;
  return a;
}

value guarded_alloc_make(value unit) {
  (void)unit;
  return allocator_block(guarded_alloc, guarded_free);
}

/* A plain allocator, malloc and free, that is not offheap's default: the handles of its
   copies keep their record apart (as a loaded image's do). */
static void *plain_alloc(value allocator, size_t size) {
  (void)allocator;
  return malloc(size);
}

static void plain_free(value allocator, void *ptr, size_t size) {
  (void)allocator;
  (void)size;
  free(ptr);
}

value guarded_plain_make(value unit) {
  (void)unit;
  return allocator_block(plain_alloc, plain_free);
}

value guarded_alloc_counts(value unit) {
  CAMLparam1(unit);
  CAMLlocal1(pair);
  pair = caml_alloc_tuple(2);
  Store_field(pair, 0, Val_long(atomic_load(&allocs)));
  Store_field(pair, 1, Val_long(atomic_load(&frees)));
  CAMLreturn(pair);
}

/* The header word of a block, as an OCaml int (bits 0-62). */
value guarded_header(value v) { return Val_long(Hd_val(v)); }
