/* offheap.h: the C interface of offheap, for custom allocators and C stubs.
 *
 * An allocator, as OCaml sees it (Offheap.alloc), is an Abstract_tag block:
 *   field 0: void *alloc(value allocator, size_t size)
 *   field 1: void  free(value allocator, void *ptr, size_t size)
 *   fields 2..: free for the allocator's own data.
 * Both functions receive the block itself as [allocator].
 *
 * The allocator contract:
 * - [alloc] is called at most once per Offheap.copy (not at all when nothing needs
 *   copying), with the exact size of the copy. It returns [size] bytes aligned to at
 *   least sizeof(value) (8 bytes), or NULL; NULL makes Offheap.copy raise
 *   Out_of_memory, with nothing else allocated. Memory that is not aligned is handed
 *   back to [free] at once, and Offheap.copy raises Invalid_argument.
 * - [free] receives a pointer returned by [alloc] on the same block and the very [size]
 *   given to that [alloc], once per copy, when the copy is released: never for a copy
 *   the program does not free. On OCaml 5 it may be called some time after
 *   Offheap.free (at the end of the major GC cycle that was running), from whichever
 *   domain or thread ends that cycle or calls Offheap.copy/free next; an allocator
 *   shared by several domains needs its own lock.
 * - Each handle keeps its allocator block alive until its copy is released, so the
 *   block's fields (and C data they point to) may be used by [free].
 * - Neither function may call into OCaml, allocate on the OCaml heap or release the
 *   runtime lock: [alloc] runs in the middle of a copy, while the source's headers may
 *   be marked.
 * - offheap registers copies in OCaml 4's page table itself; an allocator need not (the
 *   original C library's default allocator did, and allocators that still do keep
 *   working).
 *
 * Example: an allocator that counts the bytes it holds in field 2.
 *
 *   static void *counting_alloc(value a, size_t size) {
 *     void *p = offheap_alloc(a, size);
 *     if (p) Field(a, 2) += (value)size << 1;   // field 2 is an OCaml int
 *     return p;
 *   }
 *   static void counting_free(value a, void *p, size_t size) {
 *     Field(a, 2) -= (value)size << 1;
 *     offheap_free(a, p, size);
 *   }
 *   value make_counting(value unit) {
 *     value a = caml_alloc_small(3, Abstract_tag);
 *     Field(a, 0) = (value)counting_alloc;
 *     Field(a, 1) = (value)counting_free;
 *     Field(a, 2) = Val_int(0);
 *     return a;
 *   }
 */

#ifndef OFFHEAP_H
#define OFFHEAP_H

#include <stddef.h>
#include <caml/mlvalues.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The function in field 0 of an allocator block, stored as a value: (value)my_alloc.
 * [data] is the block itself (a value and a pointer have the same size, so the function
 * may as well be declared void *my_alloc(value allocator, size_t size)). offheap_copy
 * takes the same type, with [data] its own argument. */
typedef void *(*alloc_t)(void *data, size_t size);

/* The function in field 1 of an allocator block, stored as a value: (value)my_free;
 * [data] is the block, as for alloc_t. offheap_copy_with_free takes the same type, with
 * [data] its own argument. */
typedef void (*free_t)(void *data, void *ptr, size_t size);

/* The default allocator's alloc (Offheap.malloc): malloc, or for 4 MiB and more, and
 * for whole multiples of 2 MiB, a private anonymous mapping advised for huge pages.
 * [allocator] is ignored. */
void *offheap_alloc(value allocator, size_t size);

/* The default allocator's free, for memory from offheap_alloc of the same [size]. */
void offheap_free(value allocator, void *ptr, size_t size);

/* A buffer made by offheap_copy. */
typedef struct {
  void *ptr;   /* start of the allocation: the header of the root block */
  size_t size; /* its size in bytes */
} offheap_buffer_t;

/* Copies [v] into one buffer of exactly the size it needs, from alloc_fn(data, size),
 * called at most once. The root block comes first: the copy of [v] is
 * (value)((char *)ptr + sizeof(header_t)), plus the infix offset when [v] points inside a
 * closure. Headers carry the color no GC marks. With [copy_static] non-zero, static data
 * reachable from [v] is copied too (else it is shared). On OCaml 5 other domains may
 * run and write to [v] meanwhile: the copy still succeeds, each field holding a value
 * it held at some moment during the call.
 *
 * Returns { NULL, 0 } when nothing is copied ([v] an immediate, or outside the heap and
 * not copy_static) and on failure; the source is left as it was. The failures:
 * - a block that cannot be copied (abstract, custom other than Int32/Int64/Nativeint,
 *   unforced lazy, continuation): alloc_fn is not called;
 * - no memory for the traversal's own tables: alloc_fn is not called;
 * - alloc_fn returned NULL: nothing to free;
 * - alloc_fn returned memory not aligned to sizeof(value): the only failure after an
 *   allocation. offheap_copy has no free function, so that buffer stays with the
 *   caller's allocator (lost to it, unless it can tell); offheap_copy_with_free hands it
 *   to free_fn at once.
 * The buffer is not registered in OCaml 4's page table: register it with
 * offheap_register (below) before handing it to polymorphic compare, hash or Marshal
 * there. Call with the runtime lock held; alloc_fn follows the allocator contract
 * above. */
offheap_buffer_t offheap_copy(value v, void *data, alloc_t alloc_fn, int copy_static);

/* offheap_copy, with free_fn(data, ptr, size) to give back a buffer from alloc_fn that
 * cannot become the copy (with the pointer and size alloc_fn saw): on every failure,
 * nothing from alloc_fn stays with the caller. A successful copy is never passed to
 * free_fn: free it yourself when done. free_fn may be NULL (then this is offheap_copy);
 * it follows the allocator contract above (no call into OCaml). */
offheap_buffer_t offheap_copy_with_free(value v, void *data, alloc_t alloc_fn,
                                        free_t free_fn, int copy_static);

/* Registers the buffer [ptr, ptr + size) of a copy from offheap_copy as static data in
 * OCaml 4's page table, as offheap registers its own copies, counting the pages it shares
 * with them (a 4 KiB page may hold the end of one allocation and the start of the
 * next). Registering with caml_page_table_add directly does not count them: freeing a
 * neighbouring copy (Offheap.free, Region.free) would then unregister a shared page
 * under the buffer, and a caml_page_table_remove of the buffer would unregister pages
 * under its neighbours. Returns 1, or 0 when the page table could not grow (nothing is
 * registered then). A buffer of no bytes (offheap_copy's { NULL, 0 } when nothing was
 * copied) registers nothing and returns 1. On OCaml 5 (no page table) does nothing and
 * returns 1. Call with the runtime lock held, once per buffer. */
int offheap_register(void *ptr, size_t size);

/* Undoes offheap_register(ptr, size) once no value in the buffer is used any more,
 * before the buffer is freed: the pages it shares with other registered memory stay
 * registered. On OCaml 5 does nothing. Call with the runtime lock held.
 *
 * Freeing a buffer: on OCaml 5 no block of the heap may still point into it, dead or
 * not, until the major cycle running when it stopped being used has ended: the GC reads
 * the header of every block that a block it marks points to, and the freed memory may
 * hold anything by then. Clear such fields first (or free the buffer later, as
 * Offheap.free does for copies). On OCaml 4 likewise, until the marking running when
 * it stopped being used has ended: memory handed back to malloc may become part of the
 * GC heap, where the page table sends the marker. */
void offheap_unregister(void *ptr, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* OFFHEAP_H */
