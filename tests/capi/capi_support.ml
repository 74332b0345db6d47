(* The C side of test_capi: capi_alloc.c. *)

type mode = Good | Null_result | Misaligned

external copy_raw : Obj.t -> int -> bool -> int array = "capi_test_copy"

type outcome = {
  copied : bool;
  allocs : int;
  frees : int;
  bad_frees : int;
  returned_allocation : bool;
  left_with_caller : bool;
}

(** [copy ~with_free mode v]: [v] copied from C with offheap_copy_with_free (or
    offheap_copy), the allocator answering as [mode] says. *)
let copy ~with_free mode v =
  let m = match mode with Good -> 0 | Null_result -> 1 | Misaligned -> 2 in
  match copy_raw (Obj.repr v) m with_free with
  | [| c; a; f; b; r; l |] ->
      { copied = c = 1; allocs = a; frees = f; bad_frees = b; returned_allocation = r = 1;
        left_with_caller = l = 1 }
  | _ -> assert false

(** [registered_copy v]: [v] copied from C into a malloc'd buffer, registered with
    offheap_register; the copy, the buffer's address and size (for {!release}). *)
external registered_copy : 'a -> 'a * nativeint * int = "capi_test_registered_copy"

(** [release address size]: the buffer unregistered (offheap_unregister) and freed. *)
external release : nativeint -> int -> unit = "capi_test_release"

(** [register_empty v]: offheap_copy's result for [v] when nothing is copied, then a
    buffer of no bytes inside a page, registered and unregistered; what the two
    registrations returned, and whether the page was static data during and after. *)
external register_empty : 'a -> int * int * int * int = "capi_test_register_empty"
