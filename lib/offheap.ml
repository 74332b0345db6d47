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

external stub_init : unit -> unit = "offheap_stub_init"
external stub_malloc : unit -> alloc = "offheap_stub_malloc"

external stub_copy :
  alloc -> bool -> 'a -> (Obj.t * int * int * int * int, bool * string) result
  = "offheap_stub_copy"

external stub_release : alloc -> int -> int -> unit = "offheap_stub_release"
external stub_defers_free : unit -> bool = "offheap_stub_defers_free"
external stub_major_cycles : unit -> int = "offheap_stub_major_cycles"

let () = stub_init ()
let malloc = stub_malloc ()

(* OCaml 5: a major cycle that began before [free] may still reach the copy through
   blocks that were alive when it began, and its marker reads the headers there. Memory
   is handed back only once the cycles completed exceed the count seen at [free]. The list
   is shared by all domains, hence the atomic. *)
let defers_free = stub_defers_free ()

type pending = { after_cycle : int; release : unit -> unit }

let pending : pending list Atomic.t = Atomic.make []

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
        (fun p -> if completed > p.after_cycle then p.release () else push p)
        due

let pending_frees () = List.length (Atomic.get pending)
let () = if defers_free then ignore (Gc.create_alarm drain : Gc.alarm)

let copy ?(alloc = malloc) v =
  if defers_free then drain ();
  match stub_copy alloc false v with
  | Ok (root, base, bytes, blocks, transient_bytes) ->
      { root; live = true; base; stats = { bytes; blocks; transient_bytes }; alloc }
  | Error (true, _) -> raise Out_of_memory
  | Error (false, message) -> invalid_arg message

let get h = if h.live then Obj.obj h.root else invalid_arg "Offheap.get: deleted"
let stats h = h.stats

let free h =
  if not h.live then invalid_arg "Offheap.free: deleted";
  h.live <- false;
  h.root <- Obj.repr ();
  if h.base <> 0 then begin
    let release () = stub_release h.alloc h.base h.stats.bytes in
    if defers_free then begin
      push { after_cycle = stub_major_cycles (); release };
      drain ()
    end
    else release ()
  end

let delete = free
