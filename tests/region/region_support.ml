(* What the region tests share: the C test allocator of budget_alloc.c, and the values
   of the image test, built the same way by the test and by its second process. *)

external budget_alloc : int -> Offheap.alloc = "test_region_budget_alloc"
(** [budget_alloc n]: an allocator that returns NULL after [n] allocations (negative:
    never), counting and checking what it hands out. *)

external misaligned_alloc : int -> Offheap.alloc = "test_region_misaligned_alloc"
(** [budget_alloc], handing out memory 4 bytes off word alignment. *)

external set_budget : Offheap.alloc -> int -> unit = "test_region_set_budget"

type counts = { allocs : int; nulls : int; frees : int; outstanding : int; bad_frees : int }

external counts_raw : Offheap.alloc -> int array = "test_region_counts"

let counts a =
  match counts_raw a with
  | [| allocs; nulls; frees; outstanding; bad_frees |] ->
      { allocs; nulls; frees; outstanding; bad_frees }
  | _ -> assert false

module SM = Map.Make (String)

(* The three roots of the image test after [step] updates: an index (name -> list of
   ints), the array of its names (the same strings as the keys, shared) and a pair of
   both (sharing between roots). *)
let names step = Array.init (50 + step) (fun i -> Printf.sprintf "name-%d" i)

let index_of names =
  Array.fold_left
    (fun m n -> SM.add n (List.init (String.length n) (fun i -> i * Hashtbl.hash n)) m)
    SM.empty names

(* Step [step + 1] from the roots of step [step], taken from region [r]: only the new
   name and its entry are on the heap. *)
let next r (names, index) =
  let name = Printf.sprintf "name-%d" (Array.length names) in
  let index = Offheap.Region.add r (SM.add name (List.init (String.length name) (fun i -> i * Hashtbl.hash name)) index) in
  let names = Offheap.Region.add r (Array.append names [| (SM.find_first (fun k -> k >= name) index |> fst) |]) in
  let pair = Offheap.Region.add r (names, index) in
  (names, index, pair)

let roots (names, index, pair) =
  [ ("names", Obj.repr names); ("index", Obj.repr index); ("pair", Obj.repr pair) ]

let of_roots roots : string array * int list SM.t * (string array * int list SM.t) =
  (Obj.obj (List.assoc "names" roots), Obj.obj (List.assoc "index" roots), Obj.obj (List.assoc "pair" roots))

(* Whether the three roots have the values of step [step] and share as they should. *)
let check step (names', index, ((pnames, pindex) as _pair)) =
  let expected = names step in
  names' = expected
  && SM.equal ( = ) index (index_of expected)
  && pnames == names' && pindex == index
  && Array.for_all (fun n -> fst (SM.find_first (fun k -> k >= n) index) == n) names'
