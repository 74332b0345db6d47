(* The OCaml half of offheap: handles, the default allocator, deferred frees. The
   traversal itself is in Rust (src/copy); see offheap.mli for the manual. *)

type alloc

type stats = { bytes : int; blocks : int; transient_bytes : int }

type 'a t = {
  mutable root : Obj.t;  (** the copy; [()] once freed *)
  mutable live : bool;
  base : int;  (** address of the allocation; 0 when nothing was allocated *)
  stats : stats;
  alloc : alloc;  (** keeps the allocator block alive until the copy is released *)
}

external stub_malloc : unit -> alloc = "offheap_stub_malloc"

(* Fills [result] with root, base, bytes, blocks, transient bytes and returns 0; or
   returns 1 (out of memory) or the message of an Invalid_argument. *)
external stub_copy : alloc -> bool -> 'a -> Obj.t array -> Obj.t = "offheap_stub_copy"

external stub_release : alloc -> int -> int -> unit = "offheap_stub_release"
external stub_defers_free : unit -> bool = "offheap_stub_defers_free"
external stub_major_cycles : unit -> int = "offheap_stub_major_cycles"

let malloc = stub_malloc ()

(* OCaml 5: a major cycle that began before [free] may still reach the copy through
   blocks that were alive when it began, and its marker reads the headers there. Memory
   is handed back only once the cycles completed exceed the count seen at [free]: at the
   end of a later cycle (a GC alarm), or at the next [copy] or [free]. A program that
   frees much and allocates little completes no cycle, so once more than
   [pending_limit] bytes wait, [free] finishes the running cycle itself. The list is
   shared by all domains, hence the atomics. *)
let defers_free = stub_defers_free ()
let pending_limit = 8 lsl 20

type pending = { after_cycle : int; bytes : int; release : unit -> unit }

let pending : pending list Atomic.t = Atomic.make []
let pending_bytes = Atomic.make 0

let rec push p =
  let l = Atomic.get pending in
  if not (Atomic.compare_and_set pending l (p :: l)) then push p

let drain () =
  match Atomic.get pending with
  | [] -> ()
  | _ ->
      let due = Atomic.exchange pending [] in
      let completed = stub_major_cycles () in
      List.iter
        (fun p ->
          if completed > p.after_cycle then begin
            p.release ();
            ignore (Atomic.fetch_and_add pending_bytes (-p.bytes) : int)
          end
          else push p)
        due

let defer_release ~bytes release =
  push { after_cycle = stub_major_cycles (); bytes; release };
  ignore (Atomic.fetch_and_add pending_bytes bytes : int);
  drain ();
  if Atomic.get pending_bytes > pending_limit then begin
    Gc.major ();
    drain ()
  end

let pending_frees () = List.length (Atomic.get pending)
let () = if defers_free then ignore (Gc.create_alarm drain : Gc.alarm)

let copy ?(alloc = malloc) v =
  if defers_free then drain ();
  let r = Array.make 5 (Obj.repr 0) in
  let status = stub_copy alloc false v r in
  if status = Obj.repr 0 then
    let int i : int = Obj.obj r.(i) in
    let stats = { bytes = int 2; blocks = int 3; transient_bytes = int 4 } in
    { root = r.(0); live = true; base = int 1; stats; alloc }
  else if status = Obj.repr 1 then raise Out_of_memory
  else invalid_arg (Obj.obj status : string)

let get h = if h.live then Obj.obj h.root else invalid_arg "Offheap.get: deleted"
let stats h = h.stats

let free h =
  if not h.live then invalid_arg "Offheap.free: deleted";
  h.live <- false;
  h.root <- Obj.repr ();
  if h.base <> 0 then begin
    let release () = stub_release h.alloc h.base h.stats.bytes in
    if defers_free then defer_release ~bytes:h.stats.bytes release else release ()
  end

let delete = free

(* Images (image.ml): handles to loaded payloads are ordinary handles whose allocator
   block unmaps. *)
module Image = Image.Make (struct
  type nonrec 'a t = 'a t
  type nonrec alloc = alloc

  let make ~root ~base ~bytes ~blocks ~alloc =
    if defers_free then drain ();
    { root; live = true; base; stats = { bytes; blocks; transient_bytes = 0 }; alloc }

  let alloc_of h = h.alloc
end)
