(* OCaml 5: copies made and read by several domains while others allocate and
   collect, headers the GC never touches, and frees deferred past the running major
   cycle. *)

open OUnit2

external guarded_alloc : unit -> Offheap.alloc = "guarded_alloc_make"
external guarded_counts : unit -> int * int = "guarded_alloc_counts"
external header : 'a -> int = "guarded_header"

type 'a tree = Leaf | Node of 'a tree * 'a * 'a tree

let rec build n = if n = 0 then Leaf else Node (build (n - 1), string_of_int n, build (n - 1))

let rec sum_tree = function
  | Leaf -> 0
  | Node (l, s, r) -> sum_tree l + int_of_string s + sum_tree r

(* A value with every kind of block: strings, floats, closures, Int64, sharing. *)
let mixed i =
  let shared = String.make 10 (Char.chr (65 + (i mod 26))) in
  let f x = x + i in
  (List.init 500 (fun k -> (k * i, shared, float_of_int k)), [| 1.5; 2.5 |], f, Int64.of_int i)

let check_mixed i (l, a, f, n) =
  List.iteri (fun k (x, s, fl) -> assert (x = k * i && s.[0] = Char.chr (65 + (i mod 26)) && fl = float_of_int k)) l;
  assert (a = [| 1.5; 2.5 |] && f 1 = i + 1 && n = Int64.of_int i);
  (* sharing: all the strings are one block in the copy too *)
  match l with (_, s0, _) :: rest -> List.iter (fun (_, s, _) -> assert (s == s0)) rest | [] -> ()

(* Four domains copy, read, compare and free in a loop while two more allocate and run
   major collections. *)
let test_parallel_copies _ =
  let stop = Atomic.make false in
  let churn =
    List.init 2 (fun _ ->
        Domain.spawn (fun () ->
            let n = ref 0 in
            while not (Atomic.get stop) do
              ignore (Sys.opaque_identity (List.init 10_000 (fun i -> Some i)));
              incr n;
              if !n mod 50 = 0 then Gc.major ()
            done))
  in
  let workers =
    List.init 4 (fun d ->
        Domain.spawn (fun () ->
            for round = 1 to 60 do
              let i = (d * 1000) + round in
              let v = mixed i in
              let h = Offheap.copy v in
              check_mixed i (Offheap.get h);
              let l, _, _, _ = Offheap.get h and l', _, _, _ = v in
              assert (l = l');
              assert (Hashtbl.hash l = Hashtbl.hash l');
              if round mod 10 = 0 then Gc.full_major ();
              Offheap.free h
            done))
  in
  List.iter Domain.join workers;
  Atomic.set stop true;
  List.iter Domain.join churn

(* Other domains keep reading a value while it is copied, over and over: the copy never
   writes to the source, so readers see it unchanged. *)
let test_copy_while_others_read _ =
  let v = build 14 in
  let expected = sum_tree v in
  let stop = Atomic.make false in
  let readers =
    List.init 3 (fun _ ->
        Domain.spawn (fun () ->
            let reads = ref 0 in
            while not (Atomic.get stop) do
              assert (sum_tree v = expected);
              incr reads
            done;
            !reads))
  in
  for _ = 1 to 30 do
    let h = Offheap.copy v in
    assert_equal expected (sum_tree (Offheap.get h));
    Offheap.free h
  done;
  Atomic.set stop true;
  let reads = List.map Domain.join readers in
  List.iter (fun r -> assert_bool "each reader read" (r > 0)) reads;
  assert_equal expected (sum_tree v)

(* Copies' headers have color NOT_MARKABLE (3 << 8) and stay exactly as written across
   full major collections and compactions, also with other domains running. *)
let test_headers_untouched _ =
  let h = Offheap.copy (build 10, "hello", [| 1.0; 2.0 |]) in
  let ((t, s, a) as c) = Offheap.get h in
  let blocks = [ Obj.repr c; Obj.repr t; Obj.repr s; Obj.repr a ] in
  let before = List.map header blocks in
  List.iter (fun hd -> assert_equal ~printer:string_of_int (3 lsl 8) (hd land (3 lsl 8))) before;
  let d = Domain.spawn (fun () -> for _ = 1 to 3 do Gc.full_major () done) in
  for _ = 1 to 3 do
    Gc.full_major ();
    Gc.compact ()
  done;
  Domain.join d;
  assert_equal before (List.map header blocks);
  assert_equal (sum_tree (build 10)) (sum_tree t);
  Offheap.free h

(* Compare, hash and Marshal treat copies as values, natively on OCaml 5. *)
let test_polymorphic_operations _ =
  let v = (build 8, [ 1L; 2L ], "s", 3.25, Some [| 1; 2 |]) in
  let h = Offheap.copy v in
  let c = Offheap.get h in
  assert_equal 0 (compare c v);
  assert_equal (Hashtbl.hash v) (Hashtbl.hash c);
  assert_equal v (Marshal.from_string (Marshal.to_string c []) 0);
  Offheap.free h

(* A copy freed while a major cycle is running, with a heap block that pointed into it
   when the cycle began and has died since: the memory must not go back (here: become
   inaccessible) before that cycle ends, and must go back after a couple more. *)
let test_deferred_free _ =
  let alloc = guarded_alloc () in
  let allocs0, frees0 = guarded_counts () in
  let handles =
    List.init 20 (fun i -> Offheap.copy ~alloc (List.init 200 (fun k -> (i, k, string_of_int k))))
  in
  assert_equal ~printer:string_of_int (allocs0 + 20) (fst (guarded_counts ()));
  (* Heap blocks pointing into the copies, alive when the next cycle begins. *)
  let holders = ref (List.map (fun h -> Some (Offheap.get h)) handles) in
  Gc.full_major ();
  ignore (Gc.major_slice 1 : int);
  (* mid-cycle: the holders die and the copies are freed *)
  holders := [];
  List.iter Offheap.free handles;
  (* the cycle running at [free] time has not finished: nothing went back yet *)
  assert_bool "frees wait for the running cycle" (Offheap.pending_frees () > 0);
  assert_equal ~printer:string_of_int 20 (Offheap.pending_frees () + snd (guarded_counts ()) - frees0);
  (* Further cycles run, with allocation, in this and another domain: no crash. *)
  let d = Domain.spawn (fun () -> for _ = 1 to 3 do ignore (Sys.opaque_identity (List.init 100_000 Fun.id)); Gc.full_major () done) in
  for _ = 1 to 3 do
    ignore (Sys.opaque_identity (List.init 100_000 Fun.id));
    Gc.full_major ()
  done;
  Domain.join d;
  Gc.full_major ();
  Gc.full_major ();
  assert_equal ~printer:string_of_int (frees0 + 20) (snd (guarded_counts ()));
  assert_equal ~printer:string_of_int 0 (Offheap.pending_frees ());
  List.iter (fun h -> assert_raises (Invalid_argument "Offheap.get: deleted") (fun () -> Offheap.get h)) handles

let () =
  run_test_tt_main
    ("offheap on OCaml 5"
    >::: [
           "parallel copies" >:: test_parallel_copies;
           "copy while others read" >:: test_copy_while_others_read;
           "headers untouched by the GC" >:: test_headers_untouched;
           "compare, hash, Marshal" >:: test_polymorphic_operations;
           "deferred free" >:: test_deferred_free;
         ])
