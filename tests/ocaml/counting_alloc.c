/* Test allocators and probes for the OCaml tests of offheap.
 *
 * An allocator block (Offheap.alloc) is an Abstract_tag block:
 *   field 0: alloc function, field 1: free function (the contract of offheap.h),
 *   field 2: Val_long(id), the allocator's own data, checked by both functions,
 *   field 3: Val_long(slot), the index of its counters in [slots].
 * The counters live in C statics: the OCaml tests read them with test_alloc_counts.
 * Every function here runs with the runtime lock (OCaml 4) or the domain lock held
 * (OCaml 5, systhreads only), so plain counters are enough.
 *
 * The counting allocator wraps offheap_alloc / offheap_free and puts a 16-byte prefix
 * in front of each allocation holding its size and a magic word, so that [free] can
 * check it receives a pointer from [alloc] and the very size given to [alloc]. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

#include "offheap.h"

#define SLOTS 256
#define PREFIX 16
#define LIVE_MAGIC ((size_t)0x6f666668656170ULL)
#define DEAD_MAGIC ((size_t)0x64656164646561ULL)

struct counts {
  long id;              /* the id written in field 2 when the block was made */
  long allocs;          /* calls to alloc */
  long null_returns;    /* calls to alloc that returned NULL */
  long frees;           /* calls to free */
  long outstanding;     /* bytes allocated and not freed yet */
  long total;           /* bytes allocated in all */
  long last_size;       /* size asked by the last alloc */
  long size_mismatches; /* frees whose size differs from the size of the alloc */
  long unknown_frees;   /* frees of a pointer this allocator did not return (or twice) */
  long id_mismatches;   /* calls that saw another id in field 2 than the one written */
  long last_id_seen;    /* the id in field 2 at the last call */
  long unaligned;       /* alloc results not 8-byte aligned (misaligned allocator aside) */
};

static struct counts slots[SLOTS];
static int slots_used = 0;

static struct counts *counts_of(value a) {
  long slot = Long_val(Field(a, 3));
  return &slots[slot];
}

static void see_id(struct counts *c, value a) {
  long id = Long_val(Field(a, 2));
  c->last_id_seen = id;
  if (id != c->id) c->id_mismatches++;
}

static void *counting_alloc_fn(value a, size_t size) {
  struct counts *c = counts_of(a);
  see_id(c, a);
  c->allocs++;
  c->last_size = (long)size;
  char *p = offheap_alloc(a, size + PREFIX);
  if (p == NULL) {
    c->null_returns++;
    return NULL;
  }
  ((size_t *)p)[0] = size;
  ((size_t *)p)[1] = LIVE_MAGIC;
  c->outstanding += (long)size;
  c->total += (long)size;
  if ((uintptr_t)(p + PREFIX) % sizeof(value) != 0) c->unaligned++;
  return p + PREFIX;
}

/* The checks and counts of a free; the start of the allocation, or NULL when [ptr] is
 * not a live allocation of this allocator. */
static char *check_free(value a, void *ptr, size_t size) {
  struct counts *c = counts_of(a);
  see_id(c, a);
  c->frees++;
  if (ptr == NULL) {
    c->unknown_frees++;
    return NULL;
  }
  char *p = (char *)ptr - PREFIX;
  if (((size_t *)p)[1] != LIVE_MAGIC) {
    /* not ours, or freed twice: leave it alone */
    c->unknown_frees++;
    return NULL;
  }
  size_t allocated = ((size_t *)p)[0];
  if (allocated != size) c->size_mismatches++;
  ((size_t *)p)[1] = DEAD_MAGIC;
  c->outstanding -= (long)allocated;
  return p;
}

static void counting_free_fn(value a, void *ptr, size_t size) {
  char *p = check_free(a, ptr, size);
  if (p != NULL) offheap_free(a, p, ((size_t *)p)[0] + PREFIX);
}

/* The quarantine allocator: allocates as the counting one; its free zeroes the memory
 * and keeps it, so that any later write to it (a GC marking a block it still reaches
 * there: a zero header reads as an unmarked block) can be seen. */

struct quarantined {
  char *p;
  struct quarantined *next;
};

static struct quarantined *quarantine[SLOTS];

static void quarantine_free_fn(value a, void *ptr, size_t size) {
  char *p = check_free(a, ptr, size);
  if (p == NULL) return;
  struct quarantined *q = malloc(sizeof(struct quarantined));
  if (q == NULL) abort();
  memset(p + PREFIX, 0, ((size_t *)p)[0]);
  q->p = p;
  long slot = Long_val(Field(a, 3));
  q->next = quarantine[slot];
  quarantine[slot] = q;
}

/* Always NULL: Offheap.copy must raise Out_of_memory. */
static void *null_alloc_fn(value a, size_t size) {
  struct counts *c = counts_of(a);
  see_id(c, a);
  c->allocs++;
  c->last_size = (long)size;
  c->null_returns++;
  return NULL;
}

/* Returns memory 4 bytes off word alignment; free undoes the offset. */
static void *misaligned_alloc_fn(value a, size_t size) {
  struct counts *c = counts_of(a);
  see_id(c, a);
  c->allocs++;
  c->last_size = (long)size;
  char *p = offheap_alloc(a, size + 8);
  if (p == NULL) {
    c->null_returns++;
    return NULL;
  }
  c->outstanding += (long)size;
  c->total += (long)size;
  return p + 4;
}

static void misaligned_free_fn(value a, void *ptr, size_t size) {
  struct counts *c = counts_of(a);
  see_id(c, a);
  c->frees++;
  if (ptr == NULL || (uintptr_t)ptr % sizeof(value) != 4) {
    c->unknown_frees++;
    return;
  }
  c->outstanding -= (long)size;
  offheap_free(a, (char *)ptr - 4, size + 8);
}

static value make_allocator(value id, void *alloc_fn, void *free_fn) {
  if (slots_used >= SLOTS) caml_failwith("counting_alloc: out of slots");
  int slot = slots_used++;
  memset(&slots[slot], 0, sizeof(struct counts));
  quarantine[slot] = NULL;
  slots[slot].id = Long_val(id);
  slots[slot].last_id_seen = -1;
  value a = caml_alloc_small(4, Abstract_tag);
  Field(a, 0) = (value)alloc_fn;
  Field(a, 1) = (value)free_fn;
  Field(a, 2) = Val_long(Long_val(id));
  Field(a, 3) = Val_long(slot);
  return a;
}

value test_counting_alloc(value id) {
  return make_allocator(id, (void *)counting_alloc_fn, (void *)counting_free_fn);
}

value test_null_alloc(value id) {
  return make_allocator(id, (void *)null_alloc_fn, (void *)counting_free_fn);
}

value test_quarantine_alloc(value id) {
  return make_allocator(id, (void *)counting_alloc_fn, (void *)quarantine_free_fn);
}

/* Bytes written in the quarantined memory of [a] since it was freed. */
value test_quarantine_dirty(value a) {
  long dirty = 0;
  for (struct quarantined *q = quarantine[Long_val(Field(a, 3))]; q != NULL; q = q->next) {
    size_t size = ((size_t *)q->p)[0];
    for (size_t i = 0; i < size; i++)
      if (q->p[PREFIX + i] != 0) dirty++;
  }
  return Val_long(dirty);
}

/* Gives the quarantined memory of [a] back to offheap_free. */
value test_quarantine_release(value a) {
  long slot = Long_val(Field(a, 3));
  struct quarantined *q = quarantine[slot];
  while (q != NULL) {
    struct quarantined *next = q->next;
    offheap_free(a, q->p, ((size_t *)q->p)[0] + PREFIX);
    free(q);
    q = next;
  }
  quarantine[slot] = NULL;
  return Val_unit;
}

value test_misaligned_alloc(value id) {
  return make_allocator(id, (void *)misaligned_alloc_fn, (void *)misaligned_free_fn);
}

/* [| id; allocs; null_returns; frees; outstanding; total; last_size; size_mismatches;
 *    unknown_frees; id_mismatches; last_id_seen; unaligned |] */
static value counts_to_ocaml(struct counts c) {
  CAMLparam0();
  CAMLlocal1(r);
  long fields[] = { c.id, c.allocs, c.null_returns, c.frees, c.outstanding, c.total,
                    c.last_size, c.size_mismatches, c.unknown_frees, c.id_mismatches,
                    c.last_id_seen, c.unaligned };
  size_t n = sizeof(fields) / sizeof(fields[0]);
  r = caml_alloc_tuple(n);
  for (size_t i = 0; i < n; i++) Store_field(r, i, Val_long(fields[i]));
  CAMLreturn(r);
}

value test_alloc_counts(value a) {
  return counts_to_ocaml(*counts_of(a));
}

/* The counters of the allocator made with [id] (the last one, if several were). */
value test_alloc_counts_by_id(value id) {
  for (int slot = slots_used - 1; slot >= 0; slot--)
    if (slots[slot].id == Long_val(id)) return counts_to_ocaml(slots[slot]);
  caml_invalid_argument("test_alloc_counts_by_id: no such allocator");
}

/* The C interface: offheap_copy with an alloc_fn of our own. */

struct capi_data {
  long calls;
  size_t size;
};

static void *capi_alloc_fn(void *data, size_t size) {
  struct capi_data *d = data;
  d->calls++;
  d->size = size;
  return offheap_alloc(Val_unit, size);
}

/* Copies [root] with offheap_copy and checks that every block of [blocks] (header and
 * fields, byte for byte) is the same after the copy as before. Nothing is allocated on
 * the OCaml heap between the snapshot and the check, so no GC runs in between.
 * Returns [| copied (0/1); size; mismatching blocks; alloc calls;
 *            root block's tag in the copy or -1; root copy's header color |]. */
value test_capi_copy_unchanged(value root, value blocks, value copy_static) {
  CAMLparam3(root, blocks, copy_static);
  CAMLlocal1(r);
  mlsize_t n = Wosize_val(blocks);
  char **snaps = calloc(n ? n : 1, sizeof(char *));
  if (snaps == NULL) caml_raise_out_of_memory();
  for (mlsize_t i = 0; i < n; i++) {
    value b = Field(blocks, i);
    size_t len = (Wosize_val(b) + 1) * sizeof(value);
    snaps[i] = malloc(len);
    if (snaps[i] == NULL) caml_raise_out_of_memory();
    memcpy(snaps[i], (char *)b - sizeof(value), len);
  }
  struct capi_data d = { 0, 0 };
  offheap_buffer_t buf = offheap_copy(root, &d, capi_alloc_fn, Bool_val(copy_static));
  long mismatches = 0;
  for (mlsize_t i = 0; i < n; i++) {
    value b = Field(blocks, i);
    size_t len = (Wosize_val(b) + 1) * sizeof(value);
    if (memcmp(snaps[i], (char *)b - sizeof(value), len) != 0) mismatches++;
    free(snaps[i]);
  }
  free(snaps);
  long tag = -1, color = -1;
  if (buf.ptr != NULL) {
    header_t hd = *(header_t *)buf.ptr;
    tag = (long)(hd & 0xFF);
    color = (long)((hd >> 8) & 3);
  }
  long size = (long)buf.size;
  if (buf.ptr != NULL) offheap_free(Val_unit, buf.ptr, buf.size);
  long out[] = { buf.ptr != NULL, size, mismatches, d.calls, tag, color };
  r = caml_alloc_tuple(6);
  for (int i = 0; i < 6; i++) Store_field(r, i, Val_long(out[i]));
  CAMLreturn(r);
}

/* The color bits of a block's header (0..3): 3 on every block of a copy. */
value test_header_color(value v) {
  return Val_long((Hd_val(v) >> 8) & 3);
}

/* Sends SIGUSR1 to the calling thread: the runtime's handler records it, and its OCaml
 * handler runs at the next point where OCaml code polls (not here: a C call does not). */
#include <signal.h>
value test_pend_sigusr1(value unit) {
  (void)unit;
  raise(SIGUSR1);
  return Val_unit;
}
