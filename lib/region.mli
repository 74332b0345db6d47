(** Regions: one off-heap area that values are added to.

    This module is exposed as {!Offheap.Region}; see there. It is a functor only because
    the allocator and handle types live in [Offheap], which exposes this module. *)

(** What [Offheap] gives the functor. *)
module type BASE = sig
  type alloc
  type 'a handle

  val malloc : alloc
  (** The default allocator of chunks. *)

  val handle_blocks : 'a handle -> int
  (** The [blocks] of {!Offheap.stats}, also after the handle was freed. *)

  val image_write : ?key:string -> string -> 'a -> unit
  (** {!Offheap.Image.write}. *)

  val image_load : ?key:string -> ?verify:bool -> ?share:bool -> string -> 'a handle
  (** {!Offheap.Image.load}. *)

  val pay_gc_work : int -> unit
  (** The major GC work a free pays: a slice of that many words. *)
end

module type S = sig
  type alloc

  type t
  (** A region: chunks of memory outside the GC heap that values are copied into by
      {!add}, freed all at once by {!free}. *)

  type stats = {
    bytes : int;  (** bytes of the blocks copied into the region, headers included *)
    reserved : int;  (** bytes of its chunks, taken from the allocator *)
    blocks : int;  (** blocks copied into the region *)
    chunks : int;  (** chunks held now (0 after {!free}) *)
    values : int;  (** successful {!add}s *)
  }
  (** What a region holds. *)

  val create : ?alloc:alloc -> ?chunk_bytes:int -> unit -> t
  (** [create ?alloc ?chunk_bytes ()] is an empty region; it takes no memory until the
      first {!add}. Its chunks come from [alloc] (default {!Offheap.malloc}; a C
      allocator has the contract of {!Offheap.alloc}), [chunk_bytes] at a time
      (at least 4 KiB; [0] means the default: 1 MiB, and with the default allocator
      2 MiB from the second chunk on, each then mapped as one huge page). An add of
      more than a 32nd of the next chunk's size gets a chunk of its own, of its size
      and one word more; smaller ones share chunks, so that a chunk loses less than a
      32nd of itself at its end.

      {[
        let r = Offheap.Region.create ~chunk_bytes:(4 lsl 20) () in
        assert ((Offheap.Region.stats r).chunks = 0);
        Offheap.Region.free r
      ]}

      @raise Invalid_argument when [chunk_bytes] is negative.
      @raise Out_of_memory when there is no memory for the region's bookkeeping. *)

  val add : t -> 'a -> 'a
  (** [add r v] copies into [r] the blocks of [v] that are on the GC heap and returns
      the copy of [v], valid until [r] is freed. Blocks outside the heap are pointed to,
      not copied: those already in [r] (so a structure grown step by step from values
      taken from [r] costs only its new blocks), in other copies, and static data
      (in native code on OCaml 4, constants written in the program, such as
      [[ 1; 2 ]], are static data). The copy keeps sharing and cycles as
      {!Offheap.copy} does. Nothing already in [r] ever moves. An immediate, or a
      value wholly outside the heap, is returned as it is.

      {[
        let r = Offheap.Region.create () in
        let l = Offheap.Region.add r (List.init 2 succ) in
        let l' = Offheap.Region.add r (0 :: l) in
        (* only the new cons cell was copied: [l'] points to [l] *)
        assert (List.tl l' == l && (Offheap.Region.stats r).blocks = 3);
        Offheap.Region.free r
      ]}

      Old versions stay: adding [Map.add k v m] for an [m] taken from [r] copies the
      new path from the root to [k]; the old path stays in [r], dead, until [r] is
      freed. To compact, {!add_deep} the live value to a new region and free the old
      one (or write it with {!write_image}, which keeps only what the roots reach).

      Adds to one region from several domains (OCaml 5) or threads are safe: they take
      the region's lock in turn. With other domains running, an add of a value of more
      than 1024 blocks stops them for its time, as {!Offheap.copy} does. The rules of
      {!Offheap.copy} hold for the copy (no
      mutation that makes it point into the heap; after {!free}, every reference into
      it is dangling). A value that points to another copy stays valid only while that
      copy is not freed.

      @raise Offheap.Not_copyable when [v] reaches a block that cannot be copied, with
      the reason (as for {!Offheap.copy}).
      @raise Invalid_argument ["Offheap.Region.add: freed"] when [r] was freed, or when
      the allocator returns misaligned memory.
      @raise Out_of_memory when the allocator returns [NULL] or the traversal has no
      memory. On every error, [r] is exactly as it was before the add (its stats and
      contents, no chunk taken) and [v] is unchanged. *)

  val add_deep : t -> 'a -> 'a
  (** [add_deep r v] is {!add}, except that every block [v] reaches is copied,
      outside the heap too: blocks of other regions and copies, and static data. Into a
      fresh region, it copies the live part of a region (sharing kept) so that the old
      one can be freed: compaction. Pass several roots as one tuple to keep the sharing
      between them.

      {[
        let old = Offheap.Region.create () in
        let m = ref (Offheap.Region.add old [ 0 ]) in
        for i = 1 to 100 do m := Offheap.Region.add old (List.map (( + ) i) !m) done;
        let fresh = Offheap.Region.create () in
        let live = Offheap.Region.add_deep fresh !m in
        Offheap.Region.free old;
        assert (live = [ 5050 ] && (Offheap.Region.stats fresh).blocks = 1);
        Offheap.Region.free fresh
      ]}

      @raise Offheap.Not_copyable, [Invalid_argument] and [Out_of_memory] as {!add}
      does, with [r] and [v] unchanged. *)

  val mem : t -> 'a -> bool
  (** [mem r v] tells whether [v] is a block inside one of the chunks of [r]: false for
      immediates, for values on the GC heap or in other copies, and once [r] is freed.

      {[
        let r = Offheap.Region.create () in
        let s = Offheap.Region.add r (String.make 3 'x') in
        assert (Offheap.Region.mem r s && not (Offheap.Region.mem r (ref 0)));
        Offheap.Region.free r
      ]}

      Raises nothing. *)

  val free : t -> unit
  (** [free r] releases every chunk of [r], in time proportional to the number of
      chunks, not of values. Every value taken from [r] is dangling from then on (the
      rules of {!Offheap.free}, including that no root may still point into [r]; the
      memory goes back once the running major cycle (OCaml 4: marking) has ended; on
      OCaml 5 the pages of chunks of the default allocator may go back at once, see
      {!Offheap.free}). Of
      several domains freeing [r] at once, exactly one succeeds.

      {[
        let r = Offheap.Region.create () in
        ignore (Offheap.Region.add r [| 1.0; 2.0 |]);
        Offheap.Region.free r;
        assert (try Offheap.Region.free r; false with Invalid_argument _ -> true)
      ]}

      @raise Invalid_argument ["Offheap.Region.free: freed"] when [r] was freed already.
      @raise Out_of_memory when there is no memory to queue the frees (OCaml 5); [r] is
      then still live. *)

  val stats : t -> stats
  (** [stats r] describes what [r] holds; still available after {!free} (with
      [chunks = 0]).

      {[
        let r = Offheap.Region.create () in
        ignore (Offheap.Region.add r (List.init 1 succ));
        assert ((Offheap.Region.stats r).bytes = 24);
        Offheap.Region.free r
      ]}

      Raises nothing. *)

  val chunk_bytes : t -> int
  (** [chunk_bytes r] is the size of the first chunk of [r], as {!create} settled it.

      {[
        assert (Offheap.Region.chunk_bytes (Offheap.Region.create ()) = 1 lsl 20)
      ]}

      Raises nothing. *)

  val write_image : ?key:string -> string -> t -> (string * Obj.t) list -> unit
  (** [write_image ?key path r roots] saves the values [roots] of [r], each under its
      name, in one image file (as {!Offheap.Image.write} does, with the same guarantees
      on [path]). The roots are normally values of [r]; what they reach is written
      whatever it is (static data, other copies, even values on the heap), sharing
      between roots kept, once each. What no root reaches (the dead old versions of a
      persistent structure) is left out, so that writing compacts. [key] is that of {!Offheap.Image.write}; a region image only loads with
      {!load_image}, and a plain image never does.

      {[
        let r = Offheap.Region.create () in
        let names = Offheap.Region.add r (Array.init 2 (fun i -> String.make 1 "ab".[i])) in
        let count = Offheap.Region.add r (ref 2) in
        Offheap.Region.write_image ~key:"v1" "names.img" r
          [ ("names", Obj.repr names); ("count", Obj.repr count) ];
        Offheap.Region.free r
      ]}

      @raise Invalid_argument when [r] was freed, or [key] is longer than 3977 bytes
      (the limit of {!Offheap.Image.write} less the region images' prefix).
      @raise Offheap.Not_copyable as {!Offheap.Image.write} (a closure, an abstract
      block...).
      @raise Sys_error when the file cannot be written, or [path] is a FIFO, a socket
      or a device (as {!Offheap.Image.write}).
      @raise Out_of_memory when there is no memory for the copy. *)

  val load_image :
    ?key:string ->
    ?alloc:alloc ->
    ?chunk_bytes:int ->
    ?verify:bool ->
    ?share:bool ->
    string ->
    t * (string * Obj.t) list
  (** [load_image ?key ?alloc ?chunk_bytes ?verify ?share path] loads a region image
      and returns a region holding it and its named roots, in the order they were
      written. The image is loaded, checked and relocated as by {!Offheap.Image.load}
      ([verify] and [share] as there); its payload becomes the region's first chunk,
      and later {!add}s take new chunks from [alloc] ([chunk_bytes] as for {!create}).
      The region can be written again with {!write_image}, and must be freed with
      {!free}. The types of the roots are the caller's promise, as with [Marshal]: the
      [key] is the guard. The roots point into the region: no variable may still hold
      them when it is freed (the rules of {!free}). In bytecode a function's locals
      live until it returns (a loop body's until the body ends), used or not: read
      the roots in a function that returns before the [free], or in the body of a loop
      that ends with it, never in the function that goes on running after the
      [free].

      {[
        (* The roots, and what they lead to, stay in this function. *)
        let load path =
          let r, roots = Offheap.Region.load_image ~key:"v1" path in
          let names : string array = Obj.obj (List.assoc "names" roots) in
          (r, names.(1) = "b")
        in
        let r, second_is_b = load "names.img" in
        assert second_is_b;
        Offheap.Region.free r
      ]}

      @raise Offheap.Image.Invalid_image when the file fails a check of
      {!Offheap.Image.load}, including a key that differs (a plain image has another
      key than any region image), or its root is not a list of named roots.
      @raise Sys_error when the file cannot be opened or read.
      @raise Out_of_memory when there is no memory for the payload. *)
end

module Make (B : BASE) : S with type alloc = B.alloc
