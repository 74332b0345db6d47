(* The OCaml half of offheap: handles, the default allocator, deferred frees. The
   traversal itself is in Rust (src/copy); see offheap.mli for the manual. *)

type alloc

type stats = { bytes : int; blocks : int; transient_bytes : int }

(* The handle (src/handle.rs): three fields, four words with the header. Allocated here
   in state "fresh" before the copy is made, filled by the copy stub, freed by one
   compare-and-swap on [state] in the free stub. [state] is positive while live (the
   address of the copy's record, off the heap, halved) and negative once freed, when
   [root] and [alloc] hold the copy's byte and block counts. Nothing between the stub's
   return and [copy]'s allocates, so no exception (a signal handler's, say) can come
   between a copy and its handle. *)
type 'a t = {
  root : Obj.t;
  alloc : alloc;  (** keeps the allocator block alive until the copy is released *)
  mutable state : int;
}

let fresh_state = -1

external stub_malloc : unit -> alloc = "offheap_stub_malloc"

(* 0 when [h] now owns the copy; 1 out of memory; else the message of an
   Invalid_argument. *)
external stub_copy : 'a t -> bool -> 'a -> Obj.t = "offheap_stub_copy"

(* 0 freed; n > 0 freed, and so much waits for the end of the major cycle that a major
   slice of n words should be run; -1 freed already; -2 out of memory (still live). *)
external stub_free : 'a t -> int = "offheap_stub_free"

(* The root of a live handle, else its second argument. *)
external stub_get : 'a t -> Obj.t -> Obj.t = "offheap_stub_get" [@@noalloc]

(* Statistic 0 bytes, 1 blocks, 2 transient bytes of a live or freed handle. *)
external stub_stat : 'a t -> int -> int = "offheap_stub_stat" [@@noalloc]
external stub_drain : unit -> unit = "offheap_stub_drain"
external stub_defers_free : unit -> bool = "offheap_stub_defers_free"
external stub_pending_frees : unit -> int = "offheap_stub_pending_frees"

let malloc = stub_malloc ()

(* OCaml 5: a freed copy's memory goes back once the major cycle running at [free]
   has ended (src/release.rs): at the end of a later cycle (this alarm), or at the
   next [copy] or [free]. *)
let () = if stub_defers_free () then ignore (Gc.create_alarm stub_drain : Gc.alarm)
let pending_frees = stub_pending_frees

let fresh alloc = { root = Obj.repr 0; alloc; state = fresh_state }

let copy ?(alloc = malloc) v =
  let h = fresh alloc in
  let status = stub_copy h false v in
  if status == Obj.repr 0 then h
  else if status == Obj.repr 1 then raise Out_of_memory
  else invalid_arg (Obj.obj status : string)

(* A block no handle's root can be: what [stub_get] returns for a freed handle. *)
let freed_marker = Obj.repr (ref ())

let get h =
  let r = stub_get h freed_marker in
  if r == freed_marker then invalid_arg "Offheap.get: deleted" else Obj.obj r

let stats (h : _ t) =
  { bytes = stub_stat h 0; blocks = stub_stat h 1; transient_bytes = stub_stat h 2 }

let free h =
  let r = stub_free h in
  if r = 0 then ()
  else if r > 0 then
    (* The handle is freed already: an exception from here on loses nothing. Bounded
       work, never a whole cycle: the frees of a program that allocates little pay for
       the cycles after which their memory goes back (src/release.rs). *)
    ignore (Gc.major_slice r : int)
  else if r = -1 then invalid_arg "Offheap.free: deleted"
  else raise Out_of_memory

let delete = free

(* Images (image.ml): handles to loaded payloads are ordinary handles whose allocator
   block unmaps; the load stub fills a fresh handle as the copy stub does. *)
module Image = Image.Make (struct
  type nonrec 'a t = 'a t
  type nonrec alloc = alloc

  let fresh = fresh
  let alloc_of h = h.alloc
end)

(* Regions (region.ml): chunks freed through the same queue as copies. *)
module Region = Region.Make (struct
  type nonrec alloc = alloc
  type nonrec 'a handle = 'a t

  let malloc = malloc

  let free_handle = free
  let handle_blocks h = (stats h).blocks
  let image_write ?key path v = Image.write ?key path v
  let image_load ?key ?verify ?share path = Image.load ?key ?verify ?share path

  exception Invalid_image = Image.Invalid_image
end)
