(* What the tests share: the C test allocators of counting_alloc.c, assertions, walks over
   blocks, memory and runtime probes. *)

open OUnit2

(* {1 The C side} *)

external counting_alloc : int -> Offheap.alloc = "test_counting_alloc"
(** [counting_alloc id]: wraps offheap_alloc/offheap_free, counts, checks sizes; field 2 of
    its block holds [id], which its functions check and record. *)

external null_alloc : int -> Offheap.alloc = "test_null_alloc"
(** Always returns NULL. *)

external misaligned_alloc : int -> Offheap.alloc = "test_misaligned_alloc"
(** Returns memory 4 bytes off word alignment. *)

external quarantine_alloc : int -> Offheap.alloc = "test_quarantine_alloc"
(** Allocates as [counting_alloc]; its free zeroes the memory and keeps it. *)

external quarantine_dirty : Offheap.alloc -> int = "test_quarantine_dirty"
(** Bytes written in the memory that [quarantine_alloc] was given back: a GC marking a
    block there (a zero header reads as unmarked) shows up here. *)

external quarantine_release : Offheap.alloc -> unit = "test_quarantine_release"
(** Really frees the quarantined memory. *)

external alloc_counts_raw : Offheap.alloc -> int array = "test_alloc_counts"
external id_counts_raw : int -> int array = "test_alloc_counts_by_id"

external capi_copy_unchanged : Obj.t -> Obj.t array -> bool -> int array
  = "test_capi_copy_unchanged"
(** [capi_copy_unchanged root blocks copy_static] copies [root] with the C function
    offheap_copy and frees the copy; returns
    [[| copied; size; blocks changed by the copy; alloc calls; root tag; root color |]]. *)

external header_color : Obj.t -> int = "test_header_color"

external pend_sigusr1 : unit -> unit = "test_pend_sigusr1" [@@noalloc]
(** Sends SIGUSR1 to the calling thread: its OCaml handler runs at the next poll point of
    OCaml code (a function's entry, an allocation, the end of a [try] in bytecode), not
    inside this call. *)

type counts = {
  id : int;
  allocs : int;
  null_returns : int;
  frees : int;
  outstanding : int;
  total : int;
  last_size : int;
  size_mismatches : int;
  unknown_frees : int;
  id_mismatches : int;
  last_id_seen : int;
  unaligned : int;
}

let counts_of_array = function
  | [| id; allocs; null_returns; frees; outstanding; total; last_size; size_mismatches;
       unknown_frees; id_mismatches; last_id_seen; unaligned |] ->
      { id; allocs; null_returns; frees; outstanding; total; last_size; size_mismatches;
        unknown_frees; id_mismatches; last_id_seen; unaligned }
  | _ -> assert false

(** The counters of the allocator [a]. *)
let counts a = counts_of_array (alloc_counts_raw a)

(** The counters of the allocator made with [id], without its block. *)
let counts_of_id id = counts_of_array (id_counts_raw id)

let next_id = ref 1000

let fresh_id () =
  incr next_id;
  !next_id

(* {1 Runtime facts} *)

let native = Sys.backend_type = Sys.Native
let ocaml5 = Scanf.sscanf Sys.ocaml_version "%d." (fun major -> major >= 5)

(** Hides a constant from the compiler: values built from it are built at run time, in
    the heap, instead of being static data of the executable (native code). *)
let o = Sys.opaque_identity

(** A fresh heap copy of [s]. *)
let str s = Bytes.to_string (Bytes.of_string s)

(** Resident set size of the process, in bytes. *)
let rss () =
  let ic = open_in "/proc/self/statm" in
  let line = input_line ic in
  close_in ic;
  Scanf.sscanf line "%d %d" (fun _ resident -> resident * 4096)

(** {!Probes.settle}: hands back the frees that wait for the end of a major cycle. *)
let settle = Probes.settle

(* {1 Assertions} *)

let pint = string_of_int

let contains = Probes.contains

(** [f ()] raises [Invalid_argument] with a message containing [sub]; returns it. *)
let raises_invalid ~sub f =
  match f () with
  | _ -> assert_failure (Printf.sprintf "no Invalid_argument (expected one naming %S)" sub)
  | exception Invalid_argument msg ->
      if not (contains msg sub) then
        assert_failure (Printf.sprintf "Invalid_argument %S does not name %S" msg sub);
      msg

(** [f ()] raises [Offheap.Not_copyable]; returns its reason. *)
let not_copyable f =
  match f () with
  | _ -> assert_failure "no Offheap.Not_copyable"
  | exception Offheap.Not_copyable r -> r

(** [h] was freed: [get] and [free] raise the documented messages. *)
let assert_freed h =
  assert_equal ~printer:Fun.id "Offheap.get: deleted"
    (raises_invalid ~sub:"deleted" (fun () -> Offheap.get h));
  assert_equal ~printer:Fun.id "Offheap.free: deleted"
    (raises_invalid ~sub:"deleted" (fun () -> Offheap.free h))

(** Every alloc of [a] was freed, with its own size, by the block that allocated it. *)
let assert_no_leak ?(msg = "") a =
  settle ();
  let c = counts a in
  let m what = msg ^ ": " ^ what in
  assert_equal ~msg:(m "frees = successful allocs") ~printer:pint (c.allocs - c.null_returns)
    c.frees;
  assert_equal ~msg:(m "bytes outstanding") ~printer:pint 0 c.outstanding;
  assert_equal ~msg:(m "frees with another size than allocated") ~printer:pint 0
    c.size_mismatches;
  assert_equal ~msg:(m "frees of unknown pointers") ~printer:pint 0 c.unknown_frees;
  assert_equal ~msg:(m "calls that saw another id in field 2") ~printer:pint 0 c.id_mismatches;
  assert_equal ~msg:(m "unaligned results") ~printer:pint 0 c.unaligned

(** [with_copy ?alloc v f] copies [v], calls [f] on the handle, frees the copy and checks
    that [get] and [free] then raise. Every reference into the copy is taken inside [f],
    whose frame is gone when the copy is freed: a bytecode function keeps its local
    variables on the stack until it returns, and on OCaml 5 the GC would follow them
    into freed memory. *)
let with_copy ?alloc v f =
  let h = Offheap.copy ?alloc v in
  f h;
  Offheap.free h;
  assert_freed h

(* {1 Walking blocks} *)

(** An [Obj.t array] that is never a flat float array, whatever its elements. *)
let obj_array l =
  let a = Array.make (List.length l) (Obj.repr 0) in
  List.iteri (fun i x -> a.(i) <- x) l;
  a

(** Every distinct block reachable from [v], by physical equality (quadratic: for values
    of up to a few thousand blocks). Closures, infix pointers and unscanned blocks are
    leaves. *)
let blocks_of v =
  let seen = ref [] in
  let todo = Stack.create () in
  Stack.push (Obj.repr v) todo;
  while not (Stack.is_empty todo) do
    let b = Stack.pop todo in
    if Obj.is_block b && not (List.memq b !seen) then begin
      seen := b :: !seen;
      let tag = Obj.tag b in
      if tag < Obj.no_scan_tag && tag <> Obj.closure_tag && tag <> Obj.infix_tag then
        for i = Obj.size b - 1 downto 0 do
          Stack.push (Obj.field b i) todo
        done
    end
  done;
  obj_array (List.rev !seen)

(** Bytes of the heap blocks reachable from [v], headers included: what a copy of [v]
    takes. Static data is not counted (nor followed): [Obj.reachable_words] leaves it out
    on OCaml 4; on OCaml 5 it counts it, but static data has the color no GC marks (3)
    there, which no heap block has. Data values only (closures are not followed). *)
let heap_bytes v =
  if not ocaml5 then 8 * Obj.reachable_words (Obj.repr v)
  else begin
    let seen = ref [] and bytes = ref 0 in
    let todo = Stack.create () in
    Stack.push (Obj.repr v) todo;
    while not (Stack.is_empty todo) do
      let b = Stack.pop todo in
      if Obj.is_block b && header_color b <> 3 && not (List.memq b !seen) then begin
        seen := b :: !seen;
        bytes := !bytes + (8 * (Obj.size b + 1));
        let tag = Obj.tag b in
        if tag < Obj.no_scan_tag && tag <> Obj.closure_tag && tag <> Obj.infix_tag then
          for i = 0 to Obj.size b - 1 do
            Stack.push (Obj.field b i) todo
          done
      end
    done;
    !bytes
  end

(** What a block holds: its tag, size, fields (physically) or raw contents. *)
type snapshot = { tag : int; size : int; fields : Obj.t list; raw : string }

let snapshot_block b =
  let tag = Obj.tag b and size = Obj.size b in
  let bits f = Int64.to_string (Int64.bits_of_float f) in
  if tag < Obj.no_scan_tag && tag <> Obj.closure_tag && tag <> Obj.infix_tag then
    { tag; size; fields = List.init size (Obj.field b); raw = "" }
  else if tag = Obj.string_tag then
    { tag; size; fields = []; raw = Bytes.to_string (Obj.obj b : bytes) }
  else if tag = Obj.double_tag then { tag; size; fields = []; raw = bits (Obj.obj b) }
  else if tag = Obj.double_array_tag then
    let a : float array = Obj.obj b in
    { tag; size; fields = []; raw = String.concat "," (Array.to_list (Array.map bits a)) }
  else { tag; size; fields = []; raw = "" }

let snapshot blocks = Array.map snapshot_block blocks

(** The blocks hold what [before] recorded: same tags and sizes, fields physically equal,
    same bytes. *)
let assert_same_blocks ~msg blocks before =
  Array.iteri
    (fun i b ->
      let now = snapshot_block b and was = before.(i) in
      let m = Printf.sprintf "%s: block %d" msg i in
      assert_equal ~msg:(m ^ " tag") ~printer:pint was.tag now.tag;
      assert_equal ~msg:(m ^ " size") ~printer:pint was.size now.size;
      assert_bool (m ^ " fields") (List.for_all2 ( == ) was.fields now.fields);
      assert_equal ~msg:(m ^ " contents") was.raw now.raw)
    blocks

(** Every block of the copy [c] (as far as [blocks_of] sees) has the header color no GC
    marks (3). *)
let assert_unmarkable ~msg c =
  Array.iter
    (fun b ->
      if Obj.tag b <> Obj.infix_tag then
        assert_equal ~msg:(msg ^ ": header color of a block of the copy") ~printer:pint 3
          (header_color b))
    (blocks_of c)
