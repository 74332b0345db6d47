(* How every stub reports how it went (src/outcome.rs builds these values): the
   exceptions of offheap, the reasons and checks they carry, and [fail], the one place
   that turns a stub's error into its exception. *)

type reason =
  | Abstract
  | Unforced_lazy
  | Forcing_lazy
  | Continuation
  | Closure
  | Outside_heap
  | Custom of string
  | Bad_bigarray of string

type check =
  | Not_an_image
  | Format_version
  | Word_size
  | Byte_order
  | Ocaml_family
  | Flat_float_arrays
  | Key_mismatch
  | Truncated
  | Damaged_header
  | Bad_header
  | Damaged_payload
  | Bad_structure

exception Not_copyable of reason
exception Invalid_image of check * string

(* The constructors' order is the encoding (src/outcome.rs): [Done] and [No_memory] are
   immediates, errors are blocks, and so is [Done_slice] (a free after which a major
   slice of n words should run: the GC work owed by earlier frees, src/release.rs). *)
type t =
  | Done
  | No_memory
  | Cannot_copy of reason
  | Misuse of string
  | System of string
  | Bad_image of check * string
  | Done_slice of int

let fail = function
  | No_memory -> raise Out_of_memory
  | Cannot_copy r -> raise (Not_copyable r)
  | Misuse m -> invalid_arg m
  | System m -> raise (Sys_error m)
  | Bad_image (c, m) -> raise (Invalid_image (c, m))
  | (Done | Done_slice _) as _success -> invalid_arg "Offheap: a success reported as an error"

let reason_name = function
  | Abstract -> "Abstract"
  | Unforced_lazy -> "Unforced_lazy"
  | Forcing_lazy -> "Forcing_lazy"
  | Continuation -> "Continuation"
  | Closure -> "Closure"
  | Outside_heap -> "Outside_heap"
  | Custom id -> Printf.sprintf "Custom %S" id
  | Bad_bigarray what -> Printf.sprintf "Bad_bigarray %S" what

let check_name = function
  | Not_an_image -> "Not_an_image"
  | Format_version -> "Format_version"
  | Word_size -> "Word_size"
  | Byte_order -> "Byte_order"
  | Ocaml_family -> "Ocaml_family"
  | Flat_float_arrays -> "Flat_float_arrays"
  | Key_mismatch -> "Key_mismatch"
  | Truncated -> "Truncated"
  | Damaged_header -> "Damaged_header"
  | Bad_header -> "Bad_header"
  | Damaged_payload -> "Damaged_payload"
  | Bad_structure -> "Bad_structure"

let () =
  Printexc.register_printer (function
    | Not_copyable r -> Some (Printf.sprintf "Offheap.Not_copyable(%s)" (reason_name r))
    | Invalid_image (c, m) ->
        Some (Printf.sprintf "Offheap.Image.Invalid_image(%s, %S)" (check_name c) m)
    | _ -> None)
