(* The C API on Bigarrays (ba_stubs.c). *)

external data : ('a, 'b, 'c) Bigarray.Genarray.t -> nativeint = "test_ba_data"
(** [Caml_ba_data_val]. *)

external byte_sum : ('a, 'b, 'c) Bigarray.Genarray.t -> int = "test_ba_byte_sum"
(** The sum of the data's bytes, read in C. *)

external flags : ('a, 'b, 'c) Bigarray.Genarray.t -> int = "test_ba_flags"
(** The [flags] word of [struct caml_ba_array]. *)
