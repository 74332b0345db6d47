/* The test allocator of the region tests: an allocator block (the contract of
 * offheap.h) that wraps offheap_alloc / offheap_free, counts what it hands out, checks
 * that every free gets back a live pointer with the size it was allocated with, and
 * returns NULL once its budget of allocations is spent (so an add that needs a new
 * chunk fails in the middle of a region's life).
 *
 * Block: field 0 alloc, field 1 free, field 2 Val_long(slot). Counters are updated
 * atomically: adds from several domains call it (each region's adds in turn). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

#include "offheap.h"

#define SLOTS 64
#define PREFIX 16
#define LIVE ((size_t)0x6c697665726567ULL)
#define DEAD ((size_t)0x64656164726567ULL)

struct counts {
  long budget;      /* allocations still allowed; negative: unlimited */
  long allocs;      /* calls to alloc */
  long nulls;       /* calls that returned NULL */
  long frees;       /* calls to free */
  long outstanding; /* bytes handed out and not freed */
  long bad_frees;   /* frees of an unknown pointer or with another size */
};

static struct counts slots[SLOTS];
static long slots_used = 0;

static struct counts *counts_of(value a) { return &slots[Long_val(Field(a, 2))]; }

static void *budget_alloc_fn(value a, size_t size) {
  struct counts *c = counts_of(a);
  __atomic_fetch_add(&c->allocs, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&c->budget, __ATOMIC_SEQ_CST) >= 0 &&
      __atomic_fetch_sub(&c->budget, 1, __ATOMIC_SEQ_CST) <= 0) {
    __atomic_store_n(&c->budget, 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&c->nulls, 1, __ATOMIC_SEQ_CST);
    return NULL;
  }
  char *p = offheap_alloc(a, size + PREFIX);
  if (p == NULL) {
    __atomic_fetch_add(&c->nulls, 1, __ATOMIC_SEQ_CST);
    return NULL;
  }
  ((size_t *)p)[0] = size;
  ((size_t *)p)[1] = LIVE;
  __atomic_fetch_add(&c->outstanding, (long)size, __ATOMIC_SEQ_CST);
  return p + PREFIX;
}

static void budget_free_fn(value a, void *ptr, size_t size) {
  struct counts *c = counts_of(a);
  __atomic_fetch_add(&c->frees, 1, __ATOMIC_SEQ_CST);
  char *p = (char *)ptr - PREFIX;
  if (ptr == NULL || ((size_t *)p)[1] != LIVE || ((size_t *)p)[0] != size) {
    __atomic_fetch_add(&c->bad_frees, 1, __ATOMIC_SEQ_CST);
    return;
  }
  ((size_t *)p)[1] = DEAD;
  __atomic_fetch_sub(&c->outstanding, (long)size, __ATOMIC_SEQ_CST);
  offheap_free(a, p, size + PREFIX);
}

/* The same, 4 bytes off word alignment (the region must give such memory back). */
static void *misaligned_alloc_fn(value a, size_t size) {
  char *p = budget_alloc_fn(a, size + 8);
  return p == NULL ? NULL : p + 4;
}

static void misaligned_free_fn(value a, void *ptr, size_t size) {
  budget_free_fn(a, (char *)ptr - 4, size + 8);
}

static value make(value budget, void *alloc_fn, void *free_fn) {
  if (slots_used >= SLOTS) caml_failwith("budget_alloc: out of slots");
  long slot = slots_used++;
  memset(&slots[slot], 0, sizeof(struct counts));
  slots[slot].budget = Long_val(budget);
  value a = caml_alloc_small(3, Abstract_tag);
  Field(a, 0) = (value)alloc_fn;
  Field(a, 1) = (value)free_fn;
  Field(a, 2) = Val_long(slot);
  return a;
}

value test_region_misaligned_alloc(value budget) {
  return make(budget, (void *)misaligned_alloc_fn, (void *)misaligned_free_fn);
}

/* A new allocator with [budget] allocations (negative: unlimited). */
value test_region_budget_alloc(value budget) {
  return make(budget, (void *)budget_alloc_fn, (void *)budget_free_fn);
}

value test_region_set_budget(value a, value budget) {
  __atomic_store_n(&counts_of(a)->budget, Long_val(budget), __ATOMIC_SEQ_CST);
  return Val_unit;
}

/* [| allocs; nulls; frees; outstanding; bad_frees |] */
value test_region_counts(value a) {
  struct counts *c = counts_of(a);
  value r = caml_alloc_tuple(5);
  Field(r, 0) = Val_long(c->allocs);
  Field(r, 1) = Val_long(c->nulls);
  Field(r, 2) = Val_long(c->frees);
  Field(r, 3) = Val_long(c->outstanding);
  Field(r, 4) = Val_long(c->bad_frees);
  return r;
}
