(* The OCaml half of offheap: handles, the default allocator, deferred frees. The
   traversal itself is in Rust (src/copy); see offheap.mli for the manual. *)

type alloc

type stats = { bytes : int; blocks : int; transient_bytes : int }

(* The handle (src/handle.rs): three fields, four words with the header, read and
   written by the stubs alone. Allocated here in state "fresh" before the copy is made,
   filled by the copy stub, freed by one compare-and-swap on [state] in the free stub.
   [state] is positive while live (the address of the copy's record, off the heap,
   halved) and negative once freed, when [root] and [alloc] hold the copy's byte and
   block counts. Nothing between the stub's return and [copy]'s allocates, so no
   exception (a signal handler's, say) can come between a copy and its handle.

   Two kinds of block: a copy of the default allocator has an unscanned handle,
   allocated here as a record of three floats and made an abstract block by the copy
   stub, whose words the GC never reads ([alloc] then holds the default allocator's
   block outside the heap); any other has a record whose [alloc] keeps its allocator
   block alive. *)
type 'a t = Obj.t

type record_handle = {
  root : Obj.t;
  alloc : alloc;  (** keeps the allocator block alive until the copy is released *)
  mutable state : int;
}

type unscanned_handle = {
  mutable u_root : float;
  mutable u_alloc : float;
  mutable u_state : float;
}

let fresh_state = -1

type reason = Outcome.reason =
  | Abstract
  | Unforced_lazy
  | Forcing_lazy
  | Continuation
  | Closure
  | Outside_heap
  | Custom of string
  | Bad_bigarray of string

exception Not_copyable = Outcome.Not_copyable

(* The externals, generated from the Rust stubs (lib/stubs.ml). Every fallible one
   returns an [Outcome.t]: [Done] (an immediate) on success, else an error that
   [Outcome.fail] raises. *)
module Types = struct
  type nonrec 'a handle = 'a t
  type nonrec alloc = alloc

  (* Not used here: regions have their own (region.ml). *)
  type region
  type region_cell
end

module Ext = Stubs.Make (Types)

let stub_malloc = Ext.offheap_stub_malloc
let stub_stat = Ext.offheap_stub_stat
let stub_drain = Ext.offheap_stub_drain
let stub_defers_free = Ext.offheap_stub_defers_free
let stub_pending_frees = Ext.offheap_stub_pending_frees

let malloc = stub_malloc ()

(* A freed copy's memory goes back once the major cycle running at [free] has ended
   (OCaml 5), or its marking (OCaml 4, when it was marking; src/release.rs): at the end
   of a later cycle (this alarm), or at the next [copy] or [free]. *)
let () = if stub_defers_free () then ignore (Gc.create_alarm stub_drain : Gc.alarm)

(* Bytecode keeps dead locals on the stack until the function returns, where the GC
   scans them, and another domain or thread may begin a cycle before then: on OCaml 5 a
   freed copy waits one cycle more (src/release.rs, [EXTRA_WAIT]). *)
let () = if Sys.backend_type = Sys.Bytecode then Ext.offheap_stub_bytecode ()
let pending_frees = stub_pending_frees

let fresh alloc : 'a t =
  (* An unscanned handle is fresh with every word zero. *)
  if alloc == malloc then Obj.repr { u_root = 0.; u_alloc = 0.; u_state = 0. }
  else Obj.repr { root = Obj.repr 0; alloc; state = fresh_state }

let copy ?(alloc = malloc) v =
  let h = fresh alloc in
  (* No function call between the stub and the return: bytecode checks for signals at
     every call, and a handler's exception there would lose the copy. *)
  match Ext.offheap_stub_copy h false v with Outcome.Done -> h | e -> Outcome.fail e

(* A block no handle's root can be: what [stub_get] returns for a freed handle. *)
let freed_marker = Obj.repr (ref ())

let get h =
  let r = Ext.offheap_stub_get h freed_marker in
  if r == freed_marker then invalid_arg "Offheap.get: deleted" else Obj.obj r

let stats (h : _ t) =
  { bytes = stub_stat h 0; blocks = stub_stat h 1; transient_bytes = stub_stat h 2 }

(* The major GC work a free pays (src/release.rs), a slice of [words]; then what became
   due goes back. *)
let pay_gc_work words =
  ignore (Gc.major_slice words : int);
  stub_drain ()

let free h =
  match Ext.offheap_stub_free h with
  | Outcome.Done -> ()
  | Done_slice words ->
      (* The handle is freed already: an exception from here on loses nothing. The GC
         work owed by earlier frees past the limit, when no cycle has ended since (at
         most one cycle's work): a program that allocates little pays for the cycles
         after which its memory goes back (src/release.rs; beside other domains the
         runtime shares that work among them instead). What the end of a cycle made due
         goes back at once (the alarm may have run before). *)
      pay_gc_work words
  | e -> Outcome.fail e

let delete = free

let measure v =
  let fields = Array.make 3 0 in
  match Ext.offheap_stub_measure v fields with
  | Outcome.Done -> { bytes = fields.(0); blocks = fields.(1); transient_bytes = fields.(2) }
  | e -> Outcome.fail e

let is_offheap v = Ext.offheap_stub_is_offheap v

let with_copy ?alloc v f =
  let h = copy ?alloc v in
  (* [get h] goes straight to [f]: no local of this frame holds the copy once [f] has
     returned (OCaml 5 bytecode keeps locals until the function returns).

     Once [f] has returned or raised, the free stub is called directly, not [free]: the
     entry of a function is a poll point (native code and bytecode), where a signal that
     came during [f] (a timeout while [f] read the copy without allocating) would run
     its handler, and an exception from it would leave the copy to no one. Between [f]
     and the stub nothing polls; after the stub the copy is freed, and an exception
     (from the GC work the free asks for) loses nothing. *)
  match f (get h) with
  | r -> (
      match Ext.offheap_stub_free h with
      | Outcome.Done -> r
      | Done_slice words ->
          pay_gc_work words;
          r
      | e -> Outcome.fail e)
  | exception e -> (
      let freed = Ext.offheap_stub_free h in
      let backtrace = Printexc.get_raw_backtrace () in
      (* [Out_of_memory] is raised again as it is: restoring a backtrace stores the
         exception in a global root, and on OCaml 5.3 the root's [malloc] failing raises
         with the roots' lock held, after which the next collection hangs
         (runtime/globroots.c; found by tests/faults/test_alloc_oom.ml). *)
      let reraise () =
        match e with Out_of_memory -> raise e | _ -> Printexc.raise_with_backtrace e backtrace
      in
      match freed with
      | Outcome.Done -> reraise ()
      | Done_slice words ->
          pay_gc_work words;
          reraise ()
      | failed -> Outcome.fail failed)

(* Images (image.ml): handles to loaded payloads are ordinary handles whose allocator
   block unmaps; the load stub fills a fresh handle as the copy stub does. *)
module Image = Image.Make (struct
  type nonrec 'a t = 'a t
  type nonrec alloc = alloc

  let fresh = fresh
  (* An unscanned handle (abstract, or a float record before its copy stub) holds the
     default allocator; a record, its own. *)
  let alloc_of h = if Obj.tag h <> 0 then malloc else (Obj.obj h : record_handle).alloc
end)

(* Regions (region.ml): chunks freed through the same queue as copies. *)
module Region = Region.Make (struct
  type nonrec alloc = alloc
  type nonrec 'a handle = 'a t

  let malloc = malloc
  let handle_blocks h = (stats h).blocks
  let image_write ?key path v = Image.write ?key path v
  let image_load ?key ?verify ?share path = Image.load ?key ?verify ?share path
  let pay_gc_work = pay_gc_work
end)
