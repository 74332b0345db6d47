(* Images: the OCaml half. The format, the writer, the checks and the relocation are in
   Rust (src/image); see image.mli and offheap.mli. *)

exception Invalid_image of string

let () =
  Printexc.register_printer (function
    | Invalid_image m -> Some (Printf.sprintf "Offheap.Image.Invalid_image(%S)" m)
    | _ -> None)

module type HANDLE = sig
  type 'a t
  type alloc

  val fresh : alloc -> 'a t
  val alloc_of : 'a t -> alloc
end

module type S = sig
  type 'a handle

  exception Invalid_image of string

  val write : ?key:string -> string -> 'a -> unit
  val load :
    ?key:string ->
    ?verify:bool ->
    ?trusted:bool ->
    ?share:bool ->
    ?threads:int ->
    string ->
    'a handle

  val load_relocated :
    ?key:string -> ?verify:bool -> ?share:bool -> ?threads:int -> string -> 'a handle

  val relocated : 'a handle -> bool
end

(* Both return a string on failure: its first byte says which exception, the rest is
   the message. *)
external stub_write : string -> string -> bool -> 'a -> Obj.t = "offheap_stub_image_write"

let flat_float_array = Obj.tag (Obj.repr (Array.make 1 0.0)) = Obj.double_array_tag
let is_failure r = Obj.is_block r && Obj.tag r = Obj.string_tag

let fail r =
  let s : string = Obj.obj r in
  let message = String.sub s 1 (String.length s - 1) in
  match s.[0] with
  | 'S' -> raise (Sys_error message)
  | 'I' -> raise (Invalid_image message)
  | 'A' -> invalid_arg message
  | _ -> raise Out_of_memory

module Make (H : HANDLE) = struct
  type 'a handle = 'a H.t

  exception Invalid_image = Invalid_image

  (* The allocator blocks that own loaded payloads: their free unmaps. *)
  external stub_owner : int -> H.alloc = "offheap_stub_image_owner"

  (* Fills the fresh handle (whose allocator is [recorded_owner]) and returns 0, its
     allocator set to the second argument when the payload was relocated; or returns a
     failure string. The handle exists before the payload is loaded: no exception can
     come between the two. *)
  external stub_load : 'a handle -> H.alloc -> string -> string -> int -> Obj.t
    = "offheap_stub_image_load"

  let recorded_owner = stub_owner 1
  let relocated_owner = stub_owner 2

  let write ?(key = "") path v =
    let r = stub_write path key flat_float_array v in
    if is_failure r then fail r

  let load_with ~relocate ?(key = "") ?(verify = true) ?(trusted = false) ?(share = false)
      ?(threads = 0) path =
    if threads < 0 then invalid_arg "Offheap.Image.load: negative ~threads";
    let flag b bit = if b then bit else 0 in
    let flags =
      flag verify 1 lor flag trusted 2 lor flag relocate 4 lor flag flat_float_array 8
      lor flag share 16
      lor (min threads 0xffff lsl 5)
    in
    let h = H.fresh recorded_owner in
    let r = stub_load h relocated_owner path key flags in
    (* No function call between the stub and the return: bytecode checks for signals
       at every call, and a handler's exception there would lose the loaded payload. *)
    if r == Obj.repr 0 then h else fail r

  let load ?key ?verify ?trusted ?share ?threads path =
    load_with ~relocate:false ?key ?verify ?trusted ?share ?threads path

  let load_relocated ?key ?verify ?share ?threads path =
    load_with ~relocate:true ?key ?verify ?share ?threads path
  let relocated h = H.alloc_of h == relocated_owner
end
