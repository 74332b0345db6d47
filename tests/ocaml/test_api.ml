(* The API of issue 12: is_offheap, measure, with_copy, Not_copyable and its reasons, the
   covariance of ['a Offheap.t]. Native code and bytecode, OCaml 4.13 and 5.3. *)

open OUnit2
open Support

let abstract_block () = Obj.repr (Obj.new_block Obj.abstract_tag 1)

(* {1 Covariance} *)

(* Compiles only because ['a Offheap.t] is covariant. *)
let widen (h : [ `A ] Offheap.t) : [ `A | `B ] Offheap.t = (h :> [ `A | `B ] Offheap.t)

let test_covariant _ =
  let h = widen (Offheap.copy `A) in
  assert_bool "the widened handle reads the copy" (Offheap.get h = `A);
  Offheap.free h

(* {1 is_offheap} *)

let test_is_offheap _ =
  assert_bool "an int" (not (Offheap.is_offheap 3));
  assert_bool "a constant constructor" (not (Offheap.is_offheap None));
  let young = Array.make 3 (str "x") in
  assert_bool "a young block" (not (Offheap.is_offheap young));
  Gc.full_major ();
  assert_bool "a major block" (not (Offheap.is_offheap young));
  let big = Array.make 100_000 0 in
  assert_bool "a large block" (not (Offheap.is_offheap big));
  let h = Offheap.copy (young, [ o 1.5 ], str "s") in
  (match Offheap.get h with
  | (a, l, s) as root ->
      assert_bool "the copy's root" (Offheap.is_offheap root);
      assert_bool "an array in the copy" (Offheap.is_offheap a);
      assert_bool "a string in the copy" (Offheap.is_offheap a.(0));
      assert_bool "a list in the copy" (Offheap.is_offheap l);
      assert_bool "a float in the copy" (Offheap.is_offheap (List.hd l));
      assert_bool "the last block of the copy" (Offheap.is_offheap s);
      assert_bool "an int in the copy" (not (Offheap.is_offheap (Array.length a))));
  Offheap.free h;
  (* A string literal is static data in native code; bytecode loads it into the heap. *)
  assert_equal ~msg:"a literal" native (Offheap.is_offheap "a literal");
  (* The source is still on the heap after it was copied. *)
  assert_bool "the source" (not (Offheap.is_offheap young))

(* Functions defined together share one closure block: all but the first are infix
   pointers into it. A block is off the heap or not as a whole, and a copy shares or
   copies it as a whole; on OCaml 5 the color of the infix header (what the compiler
   wrote, not the block's) once made [is_offheap] say false for an infix pointer into a
   copy or into static data (native code's toplevel functions), and [copy] copy a
   static closure block again for its infix pointers, apart from its shared first
   function. *)
let rec even_top n = n = 0 || odd_top (n - 1)
and odd_top n = n <> 0 && even_top (n - 1)

(* The closure block an infix pointer [f] points into. *)
let enclosing f =
  let f = Obj.repr f in
  if Obj.tag f = Obj.infix_tag then Obj.add_offset f (Int32.of_int (-8 * Obj.size f)) else f

let test_is_offheap_infix _ =
  assert_bool "odd_top is an infix pointer" (Obj.tag (Obj.repr odd_top) = Obj.infix_tag);
  assert_bool "odd_top is in even_top's block" (enclosing odd_top == Obj.repr even_top);
  assert_equal ~msg:"an infix pointer into static data (native) or the heap (bytecode)"
    (Offheap.is_offheap even_top) (Offheap.is_offheap odd_top);
  let h = Offheap.copy (even_top, odd_top) in
  (match Offheap.get h with
  | e, o ->
      assert_bool "one closure block in the copy too" (enclosing o == Obj.repr e);
      assert_equal ~msg:"shared as a whole, or copied as a whole" (e == even_top) (o == odd_top);
      assert_equal ~msg:"Marshal"
        (Marshal.to_string (even_top, odd_top) [ Marshal.Closures ])
        (Marshal.to_string (e, o) [ Marshal.Closures ]);
      assert_bool "called" (e 10 && o 7));
  Offheap.free h;
  let s = str "env" in
  let rec even n = n = 0 || odd (n - 1) and odd n = String.length s = 3 && n <> 0 && even (n - 1) in
  let h = Offheap.copy (even, odd) in
  (match Offheap.get h with
  | e, o ->
      assert_bool "a closure in the copy" (Offheap.is_offheap e);
      assert_bool "an infix pointer into the copy" (Offheap.is_offheap o);
      (* A copy of blocks of a copy shares them: only the new pair is copied. *)
      let h2 = Offheap.copy (o, e) in
      (match Offheap.get h2 with
      | o2, e2 ->
          assert_bool "the closure shared" (e2 == e);
          assert_bool "the infix pointer shared" (o2 == o);
          assert_equal ~msg:"only the pair copied" ~printer:pint 1 (Offheap.stats h2).blocks);
      Offheap.free h2);
  Offheap.free h

(* {1 measure} *)

type 'a tree = Leaf | Node of 'a tree * 'a * 'a tree

let rec tree n = if n = 0 then Leaf else Node (tree (n - 1), str (string_of_int n), tree (n - 1))

(* Shapes of every kind: [measure] says what [copy] then takes, byte for byte. *)
let shapes () =
  let shared = str "shared" in
  let rec cycle = 1 :: 2 :: cycle in
  let rec even n = n = 0 || odd (n - 1) and odd n = n <> 0 && even (n - 1) in
  [
    ("list", Obj.repr (List.init 1000 Fun.id));
    ("strings", Obj.repr (Array.init 300 (fun i -> String.make i 'x')));
    ("floats", Obj.repr ([| 1.5; 2.5 |], [ o 3.5 ], Int64.of_int 7, Int32.one));
    ("sharing", Obj.repr (shared, shared, [ shared; shared ]));
    ("cycle", Obj.repr cycle);
    ("closures", Obj.repr (even, odd, fun x -> x + Array.length [| shared |]));
    ("tree", Obj.repr (tree 10));
    ("forced lazy", Obj.repr (let l = lazy (str "forced") in ignore (Lazy.force l); l));
    ("object", Obj.repr (object val x = o 3 method x = x end));
    ("big array", Obj.repr (Array.make 200_000 (Some 1)));
  ]

let test_measure_is_the_copy _ =
  List.iter
    (fun (what, v) ->
      let blocks = blocks_of v in
      let before = snapshot blocks in
      let m = Offheap.measure v in
      assert_same_blocks ~msg:(what ^ ": source after measure") blocks before;
      let a = counting_alloc (fresh_id ()) in
      let h = Offheap.copy ~alloc:a v in
      let s = Offheap.stats h in
      assert_equal ~msg:(what ^ ": bytes") ~printer:pint s.bytes m.bytes;
      assert_equal ~msg:(what ^ ": blocks") ~printer:pint s.blocks m.blocks;
      assert_equal ~msg:(what ^ ": size asked of the allocator") ~printer:pint
        (counts a).last_size m.bytes;
      (* Values of at most 32 blocks and 1 KiB may be copied through a buffer on the
         stack, without tables (src/copy/small.rs); beyond, the walk's own buffers or the
         traversal's tables count. *)
      if m.blocks > 32 || m.bytes > 1024 then
        assert_bool (what ^ ": transient bytes") (m.transient_bytes > 0);
      Offheap.free h;
      assert_no_leak ~msg:what a)
    (shapes ())

let test_measure_nothing_to_copy _ =
  let zero = { Offheap.bytes = 0; blocks = 0; transient_bytes = 0 } in
  assert_equal zero (Offheap.measure 42);
  assert_equal zero (Offheap.measure ());
  let h = Offheap.copy [ str "off"; str "heap" ] in
  assert_equal ~msg:"a copy is not copied again" zero (Offheap.measure (Offheap.get h));
  Offheap.free h

(* Measuring allocates nothing that stays: a million measures keep the RSS flat. *)
let test_measure_leaks_nothing _ =
  let v = List.init 10_000 (fun i -> (i, str "x")) in
  for _ = 1 to 20 do ignore (Offheap.measure v) done;
  let before = rss () in
  for _ = 1 to 500 do ignore (Offheap.measure v) done;
  let growth = rss () - before in
  assert_bool (Printf.sprintf "RSS grew by %d bytes" growth) (growth < 10 lsl 20)

(* {1 Not_copyable: every reason from a real value, by copy, measure and with_copy} *)

let reason_of f =
  match f () with
  | _ -> assert_failure "no Not_copyable"
  | exception Offheap.Not_copyable r -> r

let assert_refused ~msg expected v =
  let blocks = blocks_of v in
  let before = snapshot blocks in
  let a = counting_alloc (fresh_id ()) in
  let called = ref false in
  let printer r = Printexc.to_string (Offheap.Not_copyable r) in
  assert_equal ~msg:(msg ^ ": copy") ~printer expected
    (reason_of (fun () -> Offheap.copy ~alloc:a v));
  assert_equal ~msg:(msg ^ ": measure") ~printer expected
    (reason_of (fun () -> Offheap.measure v));
  assert_equal ~msg:(msg ^ ": with_copy") ~printer expected
    (reason_of (fun () -> Offheap.with_copy ~alloc:a v (fun _ -> called := true)));
  assert_bool (msg ^ ": with_copy called f") (not !called);
  assert_equal ~msg:(msg ^ ": allocs") ~printer:pint 0 (counts a).allocs;
  assert_same_blocks ~msg:(msg ^ ": source") blocks before

let test_reasons _ =
  assert_refused ~msg:"abstract" Offheap.Abstract (o 1, [ abstract_block () ]);
  assert_refused ~msg:"channel" (Offheap.Custom "_chan") [ stdout ];
  assert_refused ~msg:"mutex" (Offheap.Custom "_mutex") (Mutex.create ());
  let l = lazy (str "later") in
  assert_refused ~msg:"lazy" Offheap.Unforced_lazy (1, l);
  assert_bool "still unforced" (not (Lazy.is_val l))

let test_printer _ =
  assert_equal ~printer:Fun.id "Offheap.Not_copyable(Custom \"_chan\")"
    (Printexc.to_string (Offheap.Not_copyable (Offheap.Custom "_chan")));
  assert_equal ~printer:Fun.id "Offheap.Not_copyable(Unforced_lazy)"
    (Printexc.to_string (Offheap.Not_copyable Offheap.Unforced_lazy))

(* Misuse stays Invalid_argument; the allocator's NULL stays Out_of_memory. *)
let test_misuse_and_memory _ =
  let h = Offheap.copy [ 1 ] in
  Offheap.free h;
  assert_freed h;
  assert_raises Out_of_memory (fun () -> Offheap.copy ~alloc:(null_alloc (fresh_id ())) [ o 1 ]);
  match Offheap.copy ~alloc:(misaligned_alloc (fresh_id ())) [ o 1 ] with
  | _ -> assert_failure "misaligned memory accepted"
  | exception Invalid_argument m -> assert_bool m (contains m "aligned")

(* {1 with_copy} *)

exception Found of int

let test_with_copy_returns _ =
  let a = counting_alloc (fresh_id ()) in
  let v = List.init 100 (fun i -> str (string_of_int i)) in
  let n =
    Offheap.with_copy ~alloc:a v (fun c ->
        assert_bool "f gets the copy" (Offheap.is_offheap c);
        assert_equal v c;
        List.length c)
  in
  assert_equal ~printer:pint 100 n;
  assert_equal ~msg:"one copy made" ~printer:pint 1 (counts a).allocs;
  assert_no_leak ~msg:"with_copy returned" a;
  (* nothing to copy: f gets the value itself *)
  assert_equal 7 (Offheap.with_copy ~alloc:a 7 (fun x -> x))

let test_with_copy_raises _ =
  let a = counting_alloc (fresh_id ()) in
  let v = Array.init 50 (fun i -> (i, str "x")) in
  (match
     Offheap.with_copy ~alloc:a v (fun c ->
         Array.iter (fun (i, _) -> if i = 42 then raise (Found i)) c;
         0)
   with
  | _ -> assert_failure "the exception was lost"
  | exception Found 42 -> ());
  assert_equal ~printer:pint 1 (counts a).allocs;
  assert_no_leak ~msg:"with_copy raised" a;
  (* The backtrace is f's. *)
  Printexc.record_backtrace true;
  (match Offheap.with_copy ~alloc:a v (fun _ -> failwith "inside") with
  | _ -> assert_failure "no exception"
  | exception Failure _ ->
      let bt = Printexc.get_backtrace () in
      assert_bool ("backtrace: " ^ bt) (bt = "" || contains bt "test_api"));
  assert_no_leak ~msg:"with_copy raised twice" a

(* Copies made and freed in a loop: on OCaml 5 bytecode a stale root into a freed copy
   would crash the GC (the quarantine allocator zeroes freed memory and checks it is
   never written again). *)
let test_with_copy_loop _ =
  let a = quarantine_alloc (fresh_id ()) in
  let total = ref 0 in
  for i = 1 to 200 do
    total := !total + Offheap.with_copy ~alloc:a (List.init i (fun j -> str (string_of_int j))) List.length;
    if i mod 50 = 0 then Gc.full_major ()
  done;
  settle ();
  Gc.full_major ();
  assert_equal ~printer:pint (200 * 201 / 2) !total;
  assert_equal ~msg:"quarantined memory written" ~printer:pint 0 (quarantine_dirty a);
  quarantine_release a

let () =
  run_test_tt_main
    ("api"
    >::: [
           "covariant handles" >:: test_covariant;
           "is_offheap" >:: test_is_offheap;
           "is_offheap and copy, infix pointers" >:: test_is_offheap_infix;
           "measure = what copy takes" >:: test_measure_is_the_copy;
           "measure, nothing to copy" >:: test_measure_nothing_to_copy;
           "measure leaks nothing" >:: test_measure_leaks_nothing;
           "Not_copyable reasons" >:: test_reasons;
           "Not_copyable printer" >:: test_printer;
           "misuse and memory" >:: test_misuse_and_memory;
           "with_copy returns" >:: test_with_copy_returns;
           "with_copy raises" >:: test_with_copy_raises;
           "with_copy in a loop" >:: test_with_copy_loop;
         ])
