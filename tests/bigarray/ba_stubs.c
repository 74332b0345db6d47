/* The C API on Bigarrays, for test_bigarray.ml. */

#include <caml/alloc.h>
#include <caml/bigarray.h>
#include <caml/mlvalues.h>

/* The data pointer (Caml_ba_data_val) as a nativeint. */
value test_ba_data(value ba)
{
  return caml_copy_nativeint((intnat)Caml_ba_data_val(ba));
}

/* The sum of the bytes of a Bigarray, read through its data pointer. */
value test_ba_byte_sum(value ba)
{
  struct caml_ba_array *b = Caml_ba_array_val(ba);
  uintnat n = caml_ba_byte_size(b);
  const unsigned char *p = b->data;
  intnat sum = 0;
  for (uintnat i = 0; i < n; i++) sum += p[i];
  return Val_long(sum);
}

/* The flags word. */
value test_ba_flags(value ba)
{
  return Val_long(Caml_ba_array_val(ba)->flags);
}
