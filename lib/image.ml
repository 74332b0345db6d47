(* Images: the OCaml half. The format, the writer, the checks and the relocation are in
   Rust (src/image); see image.mli and offheap.mli. *)

type check = Outcome.check =
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

exception Invalid_image = Outcome.Invalid_image

type info = {
  format_version : int;
  ocaml_family : int;
  flat_float_array : bool;
  word_bytes : int;
  address : int;
  payload_bytes : int;
  blocks : int;
  custom_blocks : int;
  file_bytes : int;
  key : string;
}

module type HANDLE = sig
  type 'a t
  type alloc

  val fresh : alloc -> 'a t
  val alloc_of : 'a t -> alloc
end

module type S = sig
  type 'a handle

  type nonrec check = check =
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

  exception Invalid_image of check * string

  type nonrec info = info = {
    format_version : int;
    ocaml_family : int;
    flat_float_array : bool;
    word_bytes : int;
    address : int;
    payload_bytes : int;
    blocks : int;
    custom_blocks : int;
    file_bytes : int;
    key : string;
  }

  val write : ?key:string -> string -> 'a -> unit
  val load :
    ?key:string ->
    ?verify:bool ->
    ?trusted:bool ->
    ?share:bool ->
    ?threads:int ->
    string ->
    'a handle

  val info : string -> info

  val load_relocated :
    ?key:string -> ?verify:bool -> ?share:bool -> ?threads:int -> string -> 'a handle

  val relocated : 'a handle -> bool
  val reseal_header : bytes -> unit
end

let flat_float_array = Obj.tag (Obj.repr (Array.make 1 0.0)) = Obj.double_array_tag

module Make (H : HANDLE) = struct
  type 'a handle = 'a H.t
  type nonrec check = check =
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

  exception Invalid_image = Invalid_image

  type nonrec info = info = {
    format_version : int;
    ocaml_family : int;
    flat_float_array : bool;
    word_bytes : int;
    address : int;
    payload_bytes : int;
    blocks : int;
    custom_blocks : int;
    file_bytes : int;
    key : string;
  }

  (* The externals' types; the region types are not used here. *)
  module Types = struct
    type 'a handle = 'a H.t
    type alloc = H.alloc
    type region
    type region_cell
  end

  module Ext = Stubs.Make (Types)

  (* The allocator blocks that own loaded payloads: their free unmaps. *)
  let recorded_owner = Ext.offheap_stub_image_owner 1
  let relocated_owner = Ext.offheap_stub_image_owner 2

  let write ?(key = "") path v =
    match Ext.offheap_stub_image_write path key flat_float_array v with
    | Outcome.Done -> ()
    | e -> Outcome.fail e

  let load_with ~relocate ?(key = "") ?(verify = true) ?(trusted = false) ?(share = false)
      ?(threads = 0) path =
    if threads < 0 then invalid_arg "Offheap.Image.load: negative ~threads";
    let flag b bit = if b then bit else 0 in
    let flags =
      flag verify 1 lor flag trusted 2 lor flag relocate 4 lor flag flat_float_array 8
      lor flag share 16
      lor (min threads 0xffff lsl 5)
    in
    (* The handle exists before the payload is loaded: no exception can come between
       the two. *)
    let h = H.fresh recorded_owner in
    (* No function call between the stub and the return: bytecode checks for signals
       at every call, and a handler's exception there would lose the loaded payload. *)
    match Ext.offheap_stub_image_load h relocated_owner path key flags with
    | Outcome.Done -> h
    | e -> Outcome.fail e

  let load ?key ?verify ?trusted ?share ?threads path =
    load_with ~relocate:false ?key ?verify ?trusted ?share ?threads path

  let load_relocated ?key ?verify ?share ?threads path =
    load_with ~relocate:true ?key ?verify ?share ?threads path

  let relocated h = H.alloc_of h == relocated_owner
  let reseal_header b = Ext.offheap_stub_image_reseal b

  (* The longest key (src/image/format.rs): the size of [info]'s key buffer. *)
  let max_key = Ext.offheap_stub_image_max_key ()

  let info path =
    let f = Array.make 10 0 and key = Bytes.create max_key in
    match Ext.offheap_stub_image_info path f key with
    | Outcome.Done ->
        {
          format_version = f.(0);
          ocaml_family = f.(1);
          flat_float_array = f.(2) = 1;
          word_bytes = f.(3);
          address = f.(4);
          payload_bytes = f.(5);
          blocks = f.(6);
          custom_blocks = f.(7);
          file_bytes = f.(9);
          key = Bytes.sub_string key 0 f.(8);
        }
    | e -> Outcome.fail e
end
