/* A C allocator built against the INSTALLED offheap.h (ocamlfind query offheap): it
 * wraps the default allocator, offheap_alloc / offheap_free, and keeps in field 2 of its
 * block (an OCaml int) the bytes it holds. It follows the contract of offheap.h: no call
 * into OCaml, no OCaml allocation in alloc or free, and free gets back the size given to
 * alloc. */

#include <caml/alloc.h>
#include <caml/memory.h>
#include <caml/mlvalues.h>
#include <offheap.h>

static void *counting_alloc(value a, size_t size) {
  void *p = offheap_alloc(a, size);
  if (p != NULL) Field(a, 2) = Val_long(Long_val(Field(a, 2)) + (long)size);
  return p;
}

static void counting_free(value a, void *p, size_t size) {
  Field(a, 2) = Val_long(Long_val(Field(a, 2)) - (long)size);
  offheap_free(a, p, size);
}

value counting_make(value unit) {
  (void)unit;
  value a = caml_alloc_small(3, Abstract_tag);
  Field(a, 0) = (value)counting_alloc;
  Field(a, 1) = (value)counting_free;
  Field(a, 2) = Val_long(0);
  return a;
}

/* The bytes held now: field 2 of the allocator block. */
value counting_held(value a) { return Field(a, 2); }
