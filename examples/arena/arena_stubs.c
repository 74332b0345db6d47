/* An arena allocator for offheap: copies are carved out of large chunks by bumping a
 * pointer, a copy's free returns nothing, and arena_reset / arena_destroy release every
 * chunk at once.
 *
 * Why: a program that makes many copies with the same lifetime (the tables of one
 * request, one epoch of a cache, one batch of a compiler) pays one pointer bump per copy
 * instead of a malloc, keeps them close together in memory, and gives all the memory
 * back in one pass over a few chunks instead of one free per copy.
 *
 * The allocator block, as Offheap.alloc expects it (see offheap.h):
 *   field 0: arena_alloc, field 1: arena_free (the allocator contract of offheap.h),
 *   field 2: the struct arena, a pointer (the block is Abstract_tag: the GC never looks
 *            inside it), NULL once destroyed.
 * The block is an ordinary OCaml value; every handle of a copy made from it keeps it
 * alive (Offheap.free needs it to call arena_free).
 *
 * When is arena_reset (or arena_destroy) safe? When no copy of the arena is in use:
 *   1. every copy made from it was given to Offheap.free. Do not skip it because the
 *      memory goes away with the arena anyway: on OCaml 4, Offheap.free also takes the
 *      copy out of the runtime's page table, and on both it makes [get] refuse the handle;
 *   2. on OCaml 5, the major GC cycle that was running at each Offheap.free has ended:
 *      the GC may read a freed copy's headers until then, and offheap calls the
 *      allocator's free only at that point (Gc.full_major () ends it);
 *   3. no reference into a copy is alive any more (as after C's free).
 * The arena counts the copies it handed out and has not been given back (arena_free is a
 * no-op but for that count), so it checks 1 and 2 itself: arena_reset raises Failure
 * while the count is not 0. Rule 3 is the program's job, as with Offheap.free.
 *
 * Thread safety: alloc and free run with the runtime lock (OCaml 4) or a domain lock
 * (OCaml 5) held, but on OCaml 5 several domains may copy at once, and a deferred free
 * runs in whichever domain ends the GC cycle: a mutex guards the arena. It is never held
 * while OCaml code runs, as the contract asks (no call into OCaml, no OCaml allocation
 * in alloc or free). */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>

/* Only for the documentation of the contract here; the arena calls nothing from it. An
 * installed offheap has it in `ocamlfind query offheap` (add -I that to the C flags). */
#include <offheap.h>

#define CHUNK_SIZE ((size_t)1 << 20) /* 1 MiB; a larger copy gets a chunk of its own */
#define ALIGN 16                     /* offheap needs 8 (a word); 16 as malloc gives */

struct chunk {
  struct chunk *next;
  size_t size; /* bytes of data */
  size_t used;
  _Alignas(ALIGN) unsigned char data[];
};

struct arena {
  pthread_mutex_t lock;
  struct chunk *chunks; /* the newest first: the one allocations bump in */
  long live;            /* copies handed out and not freed yet */
  size_t reserved;      /* bytes of all chunks' data */
};

#define Arena_val(a) ((struct arena *)Field((a), 2))

static void *arena_alloc(value a, size_t size) {
  struct arena *ar = Arena_val(a);
  if (ar == NULL) return NULL; /* destroyed: Offheap.copy raises Out_of_memory */
  size = (size + ALIGN - 1) & ~(size_t)(ALIGN - 1);
  pthread_mutex_lock(&ar->lock);
  struct chunk *c = ar->chunks;
  if (c == NULL || c->size - c->used < size) {
    size_t data = size > CHUNK_SIZE ? size : CHUNK_SIZE;
    c = malloc(sizeof(struct chunk) + data);
    if (c == NULL) {
      pthread_mutex_unlock(&ar->lock);
      return NULL;
    }
    c->size = data;
    c->used = 0;
    /* A chunk of its own for a large copy goes second, to keep bumping in the current. */
    if (size > CHUNK_SIZE && ar->chunks != NULL) {
      c->next = ar->chunks->next;
      ar->chunks->next = c;
    } else {
      c->next = ar->chunks;
      ar->chunks = c;
    }
    ar->reserved += data;
  }
  void *p = c->data + c->used;
  c->used += size;
  ar->live++;
  pthread_mutex_unlock(&ar->lock);
  return p;
}

/* Called by offheap for a copy made by arena_alloc, with the size given to it: the memory
 * stays in the arena until arena_reset; only the count of live copies goes down. */
static void arena_free(value a, void *p, size_t size) {
  (void)p;
  (void)size;
  struct arena *ar = Arena_val(a);
  if (ar == NULL) return;
  pthread_mutex_lock(&ar->lock);
  ar->live--;
  pthread_mutex_unlock(&ar->lock);
}

static void release_chunks(struct arena *ar) {
  struct chunk *c = ar->chunks;
  while (c != NULL) {
    struct chunk *next = c->next;
    free(c);
    c = next;
  }
  ar->chunks = NULL;
  ar->reserved = 0;
}

/* Raises Failure unless every copy from the arena has been freed (see the top). */
static struct arena *quiet_arena(value a, const char *what) {
  struct arena *ar = Arena_val(a);
  if (ar == NULL) caml_invalid_argument("arena: destroyed");
  pthread_mutex_lock(&ar->lock);
  long live = ar->live;
  if (live != 0) {
    pthread_mutex_unlock(&ar->lock);
    char msg[200];
    snprintf(msg, sizeof msg,
             "%s: %ld copies not freed yet (Offheap.free each; on OCaml 5, "
             "Gc.full_major () then hands them back)",
             what, live);
    caml_failwith(msg);
  }
  return ar; /* locked */
}

/* unit -> Offheap.alloc */
value arena_create(value unit) {
  CAMLparam1(unit);
  CAMLlocal1(a);
  struct arena *ar = malloc(sizeof *ar);
  if (ar == NULL) caml_raise_out_of_memory();
  pthread_mutex_init(&ar->lock, NULL);
  ar->chunks = NULL;
  ar->live = 0;
  ar->reserved = 0;
  a = caml_alloc_small(3, Abstract_tag);
  Field(a, 0) = (value)arena_alloc;
  Field(a, 1) = (value)arena_free;
  Field(a, 2) = (value)ar;
  CAMLreturn(a);
}

/* Offheap.alloc -> unit: all the memory back at once; the arena stays usable. */
value arena_reset(value a) {
  struct arena *ar = quiet_arena(a, "arena_reset");
  release_chunks(ar);
  pthread_mutex_unlock(&ar->lock);
  return Val_unit;
}

/* Offheap.alloc -> unit: reset, then the arena itself; copying into it raises
 * Out_of_memory from then on. */
value arena_destroy(value a) {
  struct arena *ar = quiet_arena(a, "arena_destroy");
  release_chunks(ar);
  pthread_mutex_unlock(&ar->lock);
  pthread_mutex_destroy(&ar->lock);
  Field(a, 2) = (value)NULL;
  free(ar);
  return Val_unit;
}

/* Offheap.alloc -> int: bytes the arena holds (its chunks), used or not. */
value arena_reserved(value a) {
  struct arena *ar = Arena_val(a);
  if (ar == NULL) return Val_long(0);
  pthread_mutex_lock(&ar->lock);
  long reserved = (long)ar->reserved;
  pthread_mutex_unlock(&ar->lock);
  return Val_long(reserved);
}

/* Offheap.alloc -> int: copies handed out and not freed yet. */
value arena_live(value a) {
  struct arena *ar = Arena_val(a);
  if (ar == NULL) return Val_long(0);
  pthread_mutex_lock(&ar->lock);
  long live = ar->live;
  pthread_mutex_unlock(&ar->lock);
  return Val_long(live);
}
