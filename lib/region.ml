(* Regions: the OCaml half. Chunks, bump allocation and rollback are in Rust
   (src/region.rs), the externals in src/region_stubs.rs; see region.mli and
   offheap.mli. *)

module type BASE = sig
  type alloc
  type 'a handle

  val malloc : alloc
  val handle_blocks : 'a handle -> int
  val image_write : ?key:string -> string -> 'a -> unit
  val image_load : ?key:string -> ?verify:bool -> ?share:bool -> string -> 'a handle

  val pay_gc_work : int -> unit
end

module type S = sig
  type alloc
  type t
  type stats = { bytes : int; reserved : int; blocks : int; chunks : int; values : int }

  val create : ?alloc:alloc -> ?chunk_bytes:int -> unit -> t
  val add : t -> 'a -> 'a
  val add_deep : t -> 'a -> 'a
  val mem : t -> 'a -> bool
  val free : t -> unit
  val stats : t -> stats
  val chunk_bytes : t -> int
  val write_image : ?key:string -> string -> t -> (string * Obj.t) list -> unit

  val load_image :
    ?key:string ->
    ?alloc:alloc ->
    ?chunk_bytes:int ->
    ?verify:bool ->
    ?share:bool ->
    string ->
    t * (string * Obj.t) list
end

module Make (B : BASE) = struct
  type alloc = B.alloc
  type cell

  (* The record that src/region_stubs.rs reads: [cell] holds the Rust region (finalised
     with the record), [alloc] the allocator of its chunks, [image_owner] the allocator
     block that unmaps the loaded image it was made from (set by the adopt stub). *)
  type t = { cell : cell; alloc : alloc; mutable image_owner : alloc }
  type stats = { bytes : int; reserved : int; blocks : int; chunks : int; values : int }

  (* The externals (generated from src/region_stubs.rs into lib/stubs.ml):
     - [offheap_region_cell]: the cell, or the integer 1 when out of memory;
     - [offheap_region_add]: the copy, or its third argument (the error is then kept for
       [offheap_region_error], which returns it as an [Outcome.t]);
     - [offheap_region_free]: an [Outcome.t], as [Offheap.free]'s stub;
     - [offheap_region_adopt]: takes the payload of a loaded image's handle into an
       empty region: its root, or the third argument when out of memory (the handle
       still owns the payload);
     - [offheap_region_count_loaded]: adds the blocks of the adopted image to the
       stats (read from the freed handle). *)
  module Ext = Stubs.Make (struct
    type 'a handle = 'a B.handle
    type nonrec alloc = alloc
    type region = t
    type region_cell = cell
  end)

  let stub_cell = Ext.offheap_region_cell
  let stub_add = Ext.offheap_region_add
  let stub_mem = Ext.offheap_region_mem
  let stub_stat = Ext.offheap_region_stat
  let stub_count_loaded = Ext.offheap_region_count_loaded

  (* A block no copy can be: what a failed add returns. *)
  let failed = Obj.repr (ref ())

  let create ?(alloc = B.malloc) ?(chunk_bytes = 0) () =
    if chunk_bytes < 0 then invalid_arg "Offheap.Region.create: negative chunk_bytes";
    let cell = stub_cell chunk_bytes alloc in
    if Obj.is_int (Obj.repr cell) then raise Out_of_memory;
    { cell; alloc; image_owner = alloc }

  let fail () = Outcome.fail (Ext.offheap_region_error ())

  (* After a failed [stub_add]: OCaml 5, beside other domains, adds a value too large
     for a side table with the other domains stopped (src/region_stubs.rs); else, or
     when that fails too, raises the error. *)
  let add_failed r v deep =
    let c = Ext.offheap_region_add_stopped r v failed deep in
    if c == failed then fail () else Obj.obj c

  let add r v =
    let c = stub_add r v failed false in
    if c == failed then add_failed r v false else Obj.obj c

  let add_deep r v =
    let c = stub_add r v failed true in
    if c == failed then add_failed r v true else Obj.obj c

  let mem r v = stub_mem r v
  let freed r = stub_stat r 1 <> 0
  let chunk_bytes r = stub_stat r 0

  (* One stub call, one lock: the fields describe one moment, also beside adds from
     other domains (read one by one, [bytes] could exceed [reserved]). *)
  let stats r =
    let f = Array.make 5 0 in
    Ext.offheap_region_stats r f;
    { bytes = f.(0); reserved = f.(1); blocks = f.(2); chunks = f.(3); values = f.(4) }

  (* What a free stub's outcome asks for: the GC work of Offheap.free
     (src/release.rs), or its error. Freed already: an exception from here on loses
     nothing. *)
  let after_free = function
    | Outcome.Done -> ()
    | Done_slice words -> B.pay_gc_work words
    | e -> Outcome.fail e

  let free r = after_free (Ext.offheap_region_free r)

  (* Region images are images whose key is this prefix and the user's: a plain image
     does not load as a region, nor a region image as a plain one. *)
  let region_key key = "offheap.region:" ^ key

  (* The longest user key: the image's, less the prefix. *)
  let max_key = Ext.offheap_stub_image_max_key () - String.length (region_key "")

  let write_image ?(key = "") path r roots =
    if freed r then invalid_arg "Offheap.Region.write_image: freed";
    if String.length key > max_key then
      invalid_arg
        (Printf.sprintf "Offheap.Region.write_image: key of %d bytes (at most %d)"
           (String.length key) max_key);
    B.image_write ~key:(region_key key) path (Array.of_list roots)

  (* The named roots in the root block of a region image, if it has their shape: an
     array of pairs of a string and a value. *)
  let roots_of root =
    let is_pair p =
      Obj.is_block p && Obj.tag p = 0 && Obj.size p = 2
      && Obj.is_block (Obj.field p 0)
      && Obj.tag (Obj.field p 0) = Obj.string_tag
    in
    if Obj.is_int root || Obj.tag root <> 0 then None
    else
      let pairs = List.init (Obj.size root) (Obj.field root) in
      if List.for_all is_pair pairs then
        Some (List.map (fun p -> ((Obj.obj (Obj.field p 0) : string), Obj.field p 1)) pairs)
      else None

  let load_image ?(key = "") ?alloc ?chunk_bytes ?verify ?share path =
    let r = create ?alloc ?chunk_bytes () in
    let h = B.image_load ~key:(region_key key) ?verify ?share path in
    (* No function call between the load and the adopt stub: a signal handler's
       exception there would leave the payload to a handle nobody frees. The external
       itself, not [stub_adopt]: a let-bound external is a closure, whose entry checks
       for signals in bytecode. *)
    let root = Ext.offheap_region_adopt r h failed in
    if root == failed then (
      after_free (Ext.offheap_stub_free h);
      raise Out_of_memory);
    (* From here [r] owns the payload and only this frame holds [r]: whatever raises
       before the result is made (a signal handler's exception at the first poll point,
       often for a signal that came during the load) frees it. The result is made
       inside the handler's scope; returning it takes no call nor allocation. The
       failure paths call the free stubs themselves, not [free] (here and for [h] above):
       the entry of a function is a poll point, where a signal handler's exception
       would leave the payload to no one (as in [Offheap.with_copy]). *)
    match
      stub_count_loaded r (B.handle_blocks h);
      match roots_of root with Some roots -> Some (r, roots) | None -> None
    with
    | Some loaded -> loaded
    | None ->
        after_free (Ext.offheap_region_free r);
        raise
          (Outcome.Invalid_image
             ( Bad_structure,
               Printf.sprintf "Offheap.Region.load_image: %s: not a region image" path ))
    | exception e ->
        after_free (Ext.offheap_region_free r);
        raise e
end
