(* The OCaml tests of offheap (issue 2, "Semantics" and "Tests"): every kind of value,
   sharing and cycles, the source left alone, errors, allocators, the GC, polymorphic
   operations, deep values, memory, threads, the handle's life cycle. The same
   executable runs in native code and in bytecode, and under OCAMLRUNPARAM=s=4k.

   One rule throughout: a reference into a copy is only ever bound inside a function
   that has returned by the time the copy is freed (see [Support.with_copy]); the test
   "a reference left in a local variable" shows why. *)

open OUnit2
open Support

(* {1 Types used below} *)

type color = Red | Green | Blue
type point = { x : int; y : float; label : string; tags : string list }

type shape =
  | Dot
  | Circle of point * float
  | Rect of { w : int; h : int; corner : point }
  | Group of shape list

type floats = { fa : float; fb : float; fc : float }
type parity = { even : int -> bool; odd : int -> bool }
type node = { id : int; mutable next : node option; mutable self : node option }
type gnode = { gid : int; mutable edges : gnode list; payload : string }
type tree = Leaf | Node of tree * int * tree
type nest = Nest of nest list
type slot = { mutable content : Obj.t }
type mut = { mutable count : int; mutable ratio : float; buf : bytes; cells : int array }

exception Custom_exn of string * int
exception Constant_exn

module SMap = Map.Make (String)

let make_point i =
  {
    x = o i;
    y = float_of_int i /. 4.;
    label = "p" ^ string_of_int i;
    tags = List.init (i mod 4) string_of_int;
  }

let make_shapes () =
  let p = make_point 3 in
  [
    Dot;
    Circle (p, o 1.5);
    Rect { w = o 2; h = 3; corner = p };
    Group [ Dot; Circle (make_point 5, 0.25) ];
  ]

(* Closures built at run time, with an environment. *)
let make_adder n = fun x -> x + n

let make_parity base =
  let rec even n = if n = base then true else odd (n - 1)
  and odd n = if n = base then false else even (n - 1) in
  { even; odd }

let make_counter start =
  object
    val mutable n = start
    val label = "counter " ^ string_of_int start
    method get = n
    method incr = n <- n + 1
    method label = label
  end

(* Static data: in native code these are in the executable, not in the heap. *)
let static_string = "a constant string literal"
let static_list = [ 1; 2; 3 ]

(* {1 Kinds} *)

let check_immediate name v =
  let h = Offheap.copy v in
  assert_bool (name ^ ": get is v") (Offheap.get h == v);
  assert_bool (name ^ ": get = v") (Offheap.get h = v);
  let s = Offheap.stats h in
  assert_equal ~msg:(name ^ ": bytes") ~printer:pint 0 s.bytes;
  assert_equal ~msg:(name ^ ": blocks") ~printer:pint 0 s.blocks;
  Offheap.free h;
  assert_freed h

let test_immediates _ =
  check_immediate "int" (o 42);
  check_immediate "max_int" max_int;
  check_immediate "min_int" min_int;
  check_immediate "char" 'x';
  check_immediate "bool" true;
  check_immediate "unit" ();
  check_immediate "constant constructor" Blue;
  check_immediate "constant constructor" Red;
  check_immediate "polymorphic variant" `Poly;
  check_immediate "empty list" ([] : int list);
  check_immediate "None" (None : int option);
  let a = counting_alloc (fresh_id ()) in
  with_copy ~alloc:a Green (fun h -> assert_equal Green (Offheap.get h));
  settle ();
  let c = counts a in
  assert_equal ~msg:"allocs for an immediate" ~printer:pint 0 c.allocs;
  assert_equal ~msg:"frees for an immediate" ~printer:pint 0 c.frees

let test_tuples _ =
  let t = (o 1, str "two", o 3.0 +. 0., (o 4, [ o 5; 6 ]), Some (str "seven")) in
  with_copy t (fun h ->
      let ((a, b, c, (d, e), f) as copy) = Offheap.get h in
      assert_bool "copied" (copy != t);
      assert_equal 1 a;
      assert_equal "two" b;
      assert_equal 3.0 c;
      assert_equal 4 d;
      assert_equal [ 5; 6 ] e;
      assert_equal (Some "seven") f;
      assert_equal t copy;
      assert_equal ~msg:"bytes = heap words of the source" ~printer:pint (heap_bytes t)
        (Offheap.stats h).bytes;
      assert_unmarkable ~msg:"tuple" (Obj.repr copy));
  (* the example of the documentation *)
  with_copy (o 1, o 2) (fun h ->
      assert_equal ~printer:pint 24 (Offheap.stats h).bytes;
      assert_equal ~printer:pint 1 (Offheap.stats h).blocks)

let test_records_variants _ =
  let shapes = make_shapes () in
  with_copy shapes (fun h ->
      let c = Offheap.get h in
      assert_equal shapes c;
      assert_bool "copied" (c != shapes);
      (match (c, shapes) with
      | ( [ Dot; Circle (p1, r); Rect { w; h = hh; corner }; Group [ Dot; Circle (q, s) ] ],
          [ _; Circle (p, _); _; _ ] ) ->
          assert_equal 1.5 r;
          assert_equal 0.25 s;
          assert_equal 2 w;
          assert_equal 3 hh;
          assert_bool "the point shared by Circle and Rect is one block in the copy"
            (p1 == corner);
          assert_bool "the point was copied" (p1 != p);
          assert_equal "p3" p1.label;
          assert_equal [ "0"; "1"; "2" ] p1.tags;
          assert_equal 5 q.x;
          assert_equal 1.25 q.y
      | _ -> assert_failure "the copy has another shape");
      assert_equal ~printer:pint (heap_bytes shapes) (Offheap.stats h).bytes;
      assert_unmarkable ~msg:"variants" (Obj.repr c))

let test_polymorphic_variants _ =
  let pv : [ `A | `B of int | `C of string * float | `D of [ `A | `B of int ] list ] list =
    [ `A; `B (o 3); `C (str "x", o 2.5); `D [ `A; `B (o 4) ] ]
  in
  with_copy pv (fun h ->
      let c = Offheap.get h in
      assert_equal pv c;
      match c with
      | [ `A; `B 3; `C ("x", 2.5); `D [ `A; `B 4 ] ] -> ()
      | _ -> assert_failure "polymorphic variants of the copy")

let test_arrays _ =
  (* the empty array is the atom, static data: shared, not copied *)
  with_copy [||] (fun h ->
      assert_equal ~msg:"[||] bytes" ~printer:pint 0 (Offheap.stats h).bytes;
      assert_bool "[||] itself" (Offheap.get h == [||]));
  (* more than 256 fields *)
  let a = Array.init 300 (fun i -> string_of_int i) in
  with_copy a (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:pint 300 (Array.length c);
      Array.iteri (fun i s -> assert_equal ~printer:Fun.id (string_of_int i) s) c;
      assert_equal ~printer:pint (8 * (301 + (300 * 2))) (Offheap.stats h).bytes;
      assert_equal ~printer:pint 301 (Offheap.stats h).blocks);
  (* a large int array, and arrays of arrays *)
  let big = Array.init 100_000 (fun i -> i * 7) in
  with_copy big (fun h ->
      assert_equal big (Offheap.get h);
      assert_equal ~printer:pint (8 * 100_001) (Offheap.stats h).bytes);
  let m = Array.init 20 (fun i -> Array.init (i + 1) (fun j -> (i, str (string_of_int j)))) in
  with_copy m (fun h ->
      let c = Offheap.get h in
      assert_equal m c;
      (* a pointer from the copy into the copy itself is allowed *)
      c.(3).(2) <- c.(3).(1);
      assert_equal ~msg:"copy after the write" (3, "1") c.(3).(2);
      assert_bool "pointer within the copy" (c.(3).(2) == c.(3).(1));
      assert_equal ~msg:"source not changed by a write to the copy" (3, "2") m.(3).(2))

let test_strings _ =
  for n = 0 to 64 do
    let s = String.init n (fun i -> Char.chr (((i * 37) + n) land 255)) in
    let msg = Printf.sprintf "string of length %d" n in
    with_copy s (fun h ->
        let c = Offheap.get h in
        assert_bool (msg ^ ": copied") (c != s);
        assert_equal ~msg ~printer:pint n (String.length c);
        assert_equal ~msg s c;
        assert_equal ~msg:(msg ^ ": bytes") ~printer:pint (8 * (2 + (n / 8)))
          (Offheap.stats h).bytes;
        assert_equal ~msg ~printer:pint Obj.string_tag (Obj.tag (Obj.repr c)));
    let b = Bytes.init n (fun i -> Char.chr (255 - ((i * 11) land 255))) in
    let saved = Bytes.copy b in
    with_copy b (fun h ->
        let c = Offheap.get h in
        assert_equal ~msg:(msg ^ ": bytes") saved c;
        if n > 0 then begin
          Bytes.set c (n - 1) '!';
          assert_equal ~msg:(msg ^ ": source after a write to the copy") saved b;
          Bytes.set b 0 '?';
          assert_equal ~msg:(msg ^ ": copy after a write to the source")
            (if n = 1 then '!' else Bytes.get saved 0)
            (Bytes.get c 0)
        end)
  done

let nan_patterns =
  [
    0x7FF8_0000_DEAD_BEEFL (* quiet NaN with a payload *);
    0xFFF8_0000_0000_1234L (* negative quiet NaN *);
    0x7FF0_0000_0000_0001L (* signaling NaN *);
    0x7FF4_0000_0000_0000L (* signaling NaN *);
    0x8000_0000_0000_0000L (* -0. *);
    0x7FF0_0000_0000_0000L (* infinity *);
    0x0000_0000_0000_0001L (* smallest subnormal *);
  ]

let bits = Int64.bits_of_float
let pbits = Printf.sprintf "%Lx"

let test_floats _ =
  (* boxed floats *)
  List.iter
    (fun b ->
      let f = Int64.float_of_bits (o b) in
      let msg = Printf.sprintf "boxed float %Lx" b in
      with_copy f (fun h ->
          let c = Offheap.get h in
          assert_equal ~msg ~printer:pbits (bits f) (bits c);
          assert_equal ~msg ~printer:pint Obj.double_tag (Obj.tag (Obj.repr c));
          assert_equal ~msg ~printer:pint 16 (Offheap.stats h).bytes))
    nan_patterns;
  with_copy (o 3.25 *. 2.) (fun h -> assert_equal 6.5 (Offheap.get h));
  (* flat float arrays *)
  let a = Array.of_list (List.map Int64.float_of_bits (o nan_patterns)) in
  let saved = Array.map bits a in
  with_copy a (fun h ->
      let c = Offheap.get h in
      assert_equal ~msg:"a float array is flat" ~printer:pint Obj.double_array_tag
        (Obj.tag (Obj.repr c));
      assert_equal ~printer:pint (8 * (1 + Array.length a)) (Offheap.stats h).bytes;
      Array.iteri
        (fun i f ->
          assert_equal ~msg:(Printf.sprintf "float array field %d" i) ~printer:pbits saved.(i)
            (bits f))
        c;
      c.(0) <- 1.0;
      assert_equal ~msg:"source after a write to the copy" ~printer:pbits saved.(0)
        (bits a.(0)));
  (* float records are flat too *)
  let nth i = List.nth nan_patterns i in
  let r =
    { fa = Int64.float_of_bits (o (nth 0)); fb = Int64.float_of_bits (nth 2); fc = o (-0.) }
  in
  with_copy r (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:pint Obj.double_array_tag (Obj.tag (Obj.repr c));
      assert_equal ~printer:pbits (bits r.fa) (bits c.fa);
      assert_equal ~printer:pbits (bits r.fb) (bits c.fb);
      assert_equal ~printer:pbits 0x8000_0000_0000_0000L (bits c.fc));
  (* floats inside other blocks *)
  let mixed = [ (o 1.5, str "a"); (nan, str "b"); (-0., str "c") ] in
  with_copy mixed (fun h ->
      List.iter2
        (fun (f, s) (f', s') ->
          assert_equal ~printer:pbits (bits f) (bits f');
          assert_equal s s')
        mixed (Offheap.get h))

let test_closures _ =
  (* a closure with an environment *)
  with_copy (make_adder (o 10)) (fun h ->
      assert_bool "closure copied" ((Offheap.stats h).bytes > 0);
      assert_equal ~printer:pint Obj.closure_tag (Obj.tag (Obj.repr (Offheap.get h)));
      assert_equal ~printer:pint 15 ((Offheap.get h) 5));
  (* a closure over heap data *)
  let words = List.init 100 (fun i -> str (string_of_int i)) in
  let total () = List.fold_left (fun acc w -> acc + int_of_string w) 0 words in
  with_copy total (fun h -> assert_equal ~printer:pint 4950 ((Offheap.get h) ()));
  (* a closure over a mutable counter: the copy counts on its own *)
  let counter =
    let c = ref (o 0) in
    fun () ->
      incr c;
      !c
  in
  assert_equal 1 (counter ());
  with_copy counter (fun h ->
      let copied = Offheap.get h in
      assert_equal ~msg:"copy" 2 (copied ());
      assert_equal ~msg:"copy" 3 (copied ());
      assert_equal ~msg:"original" 2 (counter ()));
  (* partial application *)
  with_copy (List.map (( * ) (o 3))) (fun h ->
      assert_equal [ 3; 6; 9 ] ((Offheap.get h) [ 1; 2; 3 ]));
  (* mutually recursive functions in a record, in a tuple, and alone (infix pointer) *)
  let p = make_parity (o 0) in
  with_copy p (fun h ->
      let c = Offheap.get h in
      Gc.compact ();
      assert_bool "even 10" (c.even 10);
      assert_bool "odd 11" (c.odd 11);
      assert_bool "not odd 100" (not (c.odd 100));
      assert_bool "not even 7" (not (c.even 7)));
  with_copy (p.even, p.odd, o 1) (fun h ->
      let e, od, _ = Offheap.get h in
      assert_bool "tuple: even 4" (e 4);
      assert_bool "tuple: odd 5" (od 5);
      assert_bool "tuple: not odd 6" (not (od 6)));
  let p2 = make_parity (o 2) in
  with_copy p2.odd (fun h ->
      assert_bool "infix root: odd 5 (base 2)" ((Offheap.get h) 5);
      assert_bool "infix root: not odd 6 (base 2)" (not ((Offheap.get h) 6)));
  (* closures sharing one environment block and one function value *)
  let shared = make_parity (o 1) in
  with_copy (shared, shared.even, [ shared.odd ]) (fun h ->
      let s, e, ods = Offheap.get h in
      assert_bool "shared record" (s.even == e && List.hd ods == s.odd);
      assert_bool "even 3 (base 1)" (e 3))

let test_lazy _ =
  let l = lazy (String.make (o 3) 'x') in
  assert_equal "xxx" (Lazy.force l);
  with_copy l (fun h ->
      assert_bool "is_val" (Lazy.is_val (Offheap.get h));
      assert_equal "xxx" (Lazy.force (Offheap.get h)));
  (* a lazy forced to a float keeps its forward block *)
  let lf = lazy (float_of_string (o "2.5")) in
  assert_equal 2.5 (Lazy.force lf);
  with_copy (lf, lf) (fun h ->
      let a, b = Offheap.get h in
      assert_equal 2.5 (Lazy.force a);
      assert_bool "shared" (a == b));
  let lp = Lazy.from_fun (fun () -> make_point (o 7)) in
  ignore (Lazy.force lp);
  with_copy [ lp; lp ] (fun h ->
      match Offheap.get h with
      | [ a; b ] ->
          assert_equal 7 (Lazy.force a).x;
          assert_bool "forced values shared" (Lazy.force a == Lazy.force b)
      | _ -> assert_failure "list of lazies")

let test_objects _ =
  let obj = make_counter (o 5) in
  obj#incr;
  with_copy obj (fun h ->
      let c = Offheap.get h in
      assert_equal ~msg:"method on the copy" ~printer:pint 6 c#get;
      assert_equal "counter 5" c#label;
      assert_equal ~msg:"same object id" ~printer:pint (Oo.id obj) (Oo.id c);
      c#incr;
      c#incr;
      assert_equal ~msg:"instance variable of the copy" ~printer:pint 8 c#get;
      assert_equal ~msg:"instance variable of the source" ~printer:pint 6 obj#get;
      obj#incr;
      assert_equal ~printer:pint 8 c#get;
      let check_oo_copy () =
        let c2 = Oo.copy c in
        c2#incr;
        assert_equal ~msg:"Oo.copy of the copy" ~printer:pint 9 c2#get
      in
      check_oo_copy ();
      assert_equal ~printer:pint 8 c#get);
  with_copy (object method answer = o 42 end) (fun h -> assert_equal 42 (Offheap.get h)#answer)

let test_exceptions _ =
  let e = Custom_exn (str "boom", o 42) in
  with_copy e (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:Fun.id (Printexc.to_string e) (Printexc.to_string c);
      let shown = Printexc.to_string c in
      assert_bool shown (contains shown "Custom_exn(\"boom\", 42)");
      assert_equal ~printer:Fun.id (Printexc.exn_slot_name e) (Printexc.exn_slot_name c);
      (* documented: the copy carries a copy of the constructor and no longer matches it *)
      assert_bool "the source matches its constructor"
        (match e with Custom_exn _ -> true | _ -> false);
      assert_bool "the copy does not match the original constructor"
        (match c with Custom_exn _ -> false | _ -> true);
      assert_bool "raised and caught as any exception"
        (try raise c with
        | Custom_exn _ -> false
        | x -> Printexc.to_string x = Printexc.to_string e);
      (* the runtime remembers the last exception raised (for backtraces): make it
         another one before the copy is freed *)
      try raise Exit with Exit -> ());
  with_copy Constant_exn (fun h ->
      let c = Offheap.get h in
      assert_bool (Printexc.to_string c) (contains (Printexc.to_string c) ".Constant_exn");
      assert_bool "constant exception copy does not match"
        (match c with Constant_exn -> false | _ -> true));
  (* Not_found is static data in native code (shared: it still matches), in the heap in
     bytecode (copied: it no longer matches) *)
  with_copy Not_found (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:Fun.id "Not_found" (Printexc.to_string c);
      let copied = (Offheap.stats h).bytes > 0 in
      if native then assert_bool "Not_found is static in native code" (not copied);
      assert_equal ~msg:"matches Not_found iff it was not copied" (not copied)
        (match c with Not_found -> true | _ -> false))

let test_boxed_integers _ =
  let i32 = Int32.of_string (o "-123456789") in
  let i64 = Int64.of_string (o "0x1234_5678_9ABC_DEF0") in
  let nat = Nativeint.of_string (o "987654321987") in
  let v = (i32, i64, nat, [ Int64.min_int; Int64.of_int (o (-1)) ]) in
  with_copy v (fun h ->
      let a, b, c, l = Offheap.get h in
      assert_equal ~printer:Int32.to_string (-123456789l) a;
      assert_equal ~printer:Int64.to_string 0x1234_5678_9ABC_DEF0L b;
      assert_equal ~printer:Nativeint.to_string 987654321987n c;
      assert_equal [ Int64.min_int; -1L ] l;
      assert_equal ~printer:Int32.to_string (-123456788l) (Int32.add a 1l);
      assert_equal ~printer:Int64.to_string 0x1234_5678_9ABC_DEF2L (Int64.add b 2L);
      assert_equal ~printer:Int64.to_string (Int64.mul 0x1234_5678_9ABC_DEF0L 3L)
        (Int64.mul b 3L);
      assert_equal ~printer:Nativeint.to_string 1975308643974n (Nativeint.shift_left c 1);
      assert_equal "-123456789" (Int32.to_string a);
      assert_equal ~printer:pint Obj.custom_tag (Obj.tag (Obj.repr b));
      assert_equal ~printer:pint 0 (Int64.compare b i64);
      assert_bool "copied" (b != i64);
      assert_equal ~msg:"bytes = heap words of the source" ~printer:pint (heap_bytes v)
        (Offheap.stats h).bytes)

let make_table n =
  let t = Hashtbl.create 16 in
  for i = 0 to n - 1 do
    Hashtbl.replace t (string_of_int i) (List.init (i mod 5) (fun j -> i + j))
  done;
  t

let test_hashtbl_map _ =
  let t = make_table 1000 in
  with_copy t (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:pint 1000 (Hashtbl.length c);
      for i = 0 to 999 do
        let k = string_of_int i in
        assert_equal ~msg:k (Hashtbl.find t k) (Hashtbl.find c k)
      done;
      assert_bool "missing key" (not (Hashtbl.mem c "1000"));
      assert_equal ~printer:pint 1000 (Hashtbl.fold (fun _ _ n -> n + 1) c 0));
  let add m i = SMap.add (string_of_int i) (i * i) m in
  let m = List.fold_left add SMap.empty (List.init 1000 Fun.id) in
  with_copy m (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:pint 1000 (SMap.cardinal c);
      for i = 0 to 999 do
        assert_equal ~printer:pint (i * i) (SMap.find (string_of_int i) c)
      done;
      assert_equal (SMap.bindings m) (SMap.bindings c);
      (* a heap map built on the copy: the copy is only read *)
      let grown () = SMap.cardinal (SMap.add "new" 1 c) in
      assert_equal ~printer:pint 1001 (grown ());
      assert_equal ~printer:pint 1000 (SMap.cardinal c))

let test_copy_of_copy _ =
  let inner = List.init 100 (fun i -> str (string_of_int i)) in
  let h1 = Offheap.copy inner in
  (* the heap tuple pointing into the first copy lives in this function's frame only *)
  let nested () =
    let v = (Offheap.get h1, Array.make (o 3) 0) in
    with_copy v (fun h2 ->
        let first, arr = Offheap.get h2 in
        assert_bool "the earlier copy is shared, not copied again" (first == Offheap.get h1);
        assert_equal ~msg:"bytes: only the tuple and the array" ~printer:pint (8 * (3 + 4))
          (Offheap.stats h2).bytes;
        assert_equal ~printer:pint 2 (Offheap.stats h2).blocks;
        assert_equal [| 0; 0; 0 |] arr;
        assert_equal inner first);
    (* a copy whose root is itself an earlier copy: nothing copied *)
    with_copy (Offheap.get h1) (fun h3 ->
        assert_bool "get returns it" (Offheap.get h3 == Offheap.get h1);
        assert_equal ~printer:pint 0 (Offheap.stats h3).bytes)
  in
  nested ();
  assert_equal inner (Offheap.get h1);
  Offheap.free h1

let test_static_data _ =
  let check name v =
    with_copy v (fun h ->
        let copied = (Offheap.stats h).bytes > 0 in
        assert_equal ~msg:name v (Offheap.get h);
        (* native code: static data, shared; bytecode: the literals live in the heap *)
        assert_equal ~msg:(name ^ ": static in native code only") (not native) copied;
        assert_equal ~msg:(name ^ ": physically equal iff not copied") (not copied)
          (Offheap.get h == v))
  in
  check "string literal" static_string;
  check "constant list" static_list;
  check "local constant" [ "x"; "y" ];
  (* a heap block pointing to static data copies the block only *)
  with_copy (o 1, static_string) (fun h ->
      let _, s = Offheap.get h in
      if native then begin
        assert_bool "static string shared" (s == static_string);
        assert_equal ~printer:pint 24 (Offheap.stats h).bytes
      end;
      assert_equal static_string s)

let test_stats _ =
  (* 300 blocks: beyond the path of small values, which needs no tables. *)
  let v = List.init 100 (fun i -> (i, str "abc")) in
  let h = Offheap.copy v in
  let s = Offheap.stats h in
  assert_equal ~printer:pint 300 s.blocks;
  assert_equal ~printer:pint (8 * ((100 * 3) + (100 * 3) + (100 * 2))) s.bytes;
  assert_bool "transient bytes counted" (s.transient_bytes > 0);
  Offheap.free h;
  assert_equal ~msg:"stats after free" s (Offheap.stats h)

let kinds =
  "kinds"
  >::: [
         "immediates" >:: test_immediates;
         "tuples" >:: test_tuples;
         "records and variants" >:: test_records_variants;
         "polymorphic variants" >:: test_polymorphic_variants;
         "arrays (empty, > 256 fields, nested)" >:: test_arrays;
         "strings and bytes of length 0..64" >:: test_strings;
         "floats, float arrays, float records, NaN payloads" >:: test_floats;
         "closures, mutual recursion, infix root" >:: test_closures;
         "forced lazy values" >:: test_lazy;
         "objects" >:: test_objects;
         "exceptions" >:: test_exceptions;
         "Int32, Int64, Nativeint" >:: test_boxed_integers;
         "Hashtbl and Map" >:: test_hashtbl_map;
         "a value holding an earlier copy" >:: test_copy_of_copy;
         "static data" >:: test_static_data;
         "stats" >:: test_stats;
       ]

(* {1 Sharing and cycles} *)

let test_sharing _ =
  let s = String.make (o 10) 'x' in
  let tail = List.init 3 (fun i -> o i) in
  let v = (s, s, [ s; s ], 0 :: tail, 9 :: tail) in
  with_copy v (fun h ->
      let a, b, l, t1, t2 = Offheap.get h in
      assert_bool "string shared" (a == b && List.for_all (fun x -> x == a) l);
      assert_bool "string copied" (a != s);
      assert_bool "tail shared" (List.tl t1 == List.tl t2);
      assert_equal ~msg:"each block once" ~printer:pint (1 + 1 + 2 + 2 + 3)
        (Offheap.stats h).blocks)

let test_cycles _ =
  let rec l = o 1 :: o 2 :: l in
  with_copy l (fun h ->
      let c = Offheap.get h in
      assert_bool "cyclic list" (List.tl (List.tl c) == c);
      assert_bool "copied" (c != l);
      assert_equal [ 1; 2 ] [ List.hd c; List.hd (List.tl c) ];
      assert_equal ~printer:pint 2 (Offheap.stats h).blocks);
  let r = { id = o 1; next = None; self = None } in
  r.self <- Some r;
  let r2 = { id = 2; next = Some r; self = None } in
  r.next <- Some r2;
  with_copy r (fun h ->
      let c = Offheap.get h in
      (match (c.self, c.next) with
      | Some me, Some other ->
          assert_bool "record pointing to itself" (me == c);
          assert_equal 2 other.id;
          assert_bool "two-record cycle"
            (match other.next with Some back -> back == c | None -> false)
      | _ -> assert_failure "fields of the copy");
      assert_equal ~msg:"r, r2 and three options" ~printer:pint 5 (Offheap.stats h).blocks;
      (* mutating the copy to point into the copy itself is allowed *)
      c.next <- c.self;
      assert_bool "the copy changed" (match c.next with Some x -> x == c | None -> false);
      assert_bool "source unchanged" (match r.next with Some x -> x == r2 | None -> false))

let test_graph _ =
  let rng = Random.State.make [| 42 |] in
  let n = 300 in
  let payloads = Array.init 20 (fun i -> str ("payload " ^ string_of_int i)) in
  let nodes = Array.init n (fun i -> { gid = i; edges = []; payload = payloads.(i mod 20) }) in
  Array.iter
    (fun nd ->
      nd.edges <- List.init (Random.State.int rng 5) (fun _ -> nodes.(Random.State.int rng n)))
    nodes;
  nodes.(0).edges <- nodes.(0) :: nodes.(0).edges;
  with_copy nodes (fun h ->
      let c = Offheap.get h in
      Array.iteri
        (fun i nd ->
          let nd' = c.(i) in
          assert_equal ~printer:pint i nd'.gid;
          assert_bool "node copied" (nd' != nd);
          assert_bool "payload shared as in the source" (nd'.payload == c.(i mod 20).payload);
          assert_bool "edges lead to the same nodes"
            (List.for_all2 (fun e e' -> e' == c.(e.gid)) nd.edges nd'.edges))
        nodes;
      assert_bool "self loop" (List.hd c.(0).edges == c.(0)))

let sharing =
  "sharing and cycles"
  >::: [
         "shared blocks copied once" >:: test_sharing;
         "cyclic list, self-referencing record" >:: test_cycles;
         "random graph isomorphic" >:: test_graph;
       ]

(* {1 The source is left alone} *)

let make_source () =
  let p = make_point 2 in
  ( make_shapes (),
    [| Some p; None; Some p |],
    { count = o 1; ratio = 0.5; buf = Bytes.of_string "buffer"; cells = [| 1; 2; 3 |] },
    (Int64.of_int (o 77), [ nan; 1.5 ], [| 1.0; 2.0 |]),
    String.make (o 3) 'q' )

let test_source_after_copy _ =
  let v = make_source () and twin = make_source () in
  let blocks = blocks_of v in
  let before = snapshot blocks in
  with_copy v (fun h ->
      assert_same_blocks ~msg:"after copy" blocks before;
      assert_equal ~msg:"source structurally equal to its twin" 0 (compare v twin);
      Gc.full_major ();
      Gc.compact ();
      assert_same_blocks ~msg:"after copy and compaction" blocks before;
      assert_equal 0 (compare v twin);
      assert_equal 0 (compare (Offheap.get h) twin));
  assert_same_blocks ~msg:"after free" blocks before;
  assert_equal 0 (compare v twin)

let test_mutations_independent _ =
  let v = make_source () in
  let _, arr0, m, _, _ = v in
  with_copy v (fun h ->
      let _, arr, m', _, _ = Offheap.get h in
      (* the source changes, the copy does not *)
      m.count <- 10;
      m.ratio <- 2.5;
      Bytes.set m.buf 0 'B';
      m.cells.(0) <- 100;
      assert_equal ~printer:pint 1 m'.count;
      assert_equal 0.5 m'.ratio;
      assert_equal "buffer" (Bytes.to_string m'.buf);
      assert_equal [| 1; 2; 3 |] m'.cells;
      (* the copy changes (immediates, floats, bytes, pointers within the copy), the
         source does not *)
      m'.count <- 20;
      m'.ratio <- 4.5;
      Bytes.set m'.buf 5 'R';
      m'.cells.(2) <- 300;
      arr.(1) <- arr.(0);
      assert_equal ~printer:pint 10 m.count;
      assert_equal 2.5 m.ratio;
      assert_equal "Buffer" (Bytes.to_string m.buf);
      assert_equal [| 100; 2; 3 |] m.cells;
      assert_equal ~msg:"source array" None arr0.(1);
      assert_equal ~printer:pint 20 m'.count;
      assert_equal 4.5 m'.ratio;
      assert_equal "buffeR" (Bytes.to_string m'.buf);
      assert_equal [| 1; 2; 300 |] m'.cells;
      assert_bool "copy array" (arr.(1) == arr.(0)))

let abstract_block () = Obj.repr (Obj.new_block Obj.abstract_tag 1)

let test_capi_unchanged _ =
  let v = make_source () in
  let blocks = blocks_of v in
  let expected = heap_bytes v in
  match capi_copy_unchanged (Obj.repr v) blocks false with
  | [| copied; size; changed; calls; tag; color |] ->
      assert_equal ~msg:"copied" 1 copied;
      assert_equal ~msg:"size" ~printer:pint expected size;
      assert_equal ~msg:"source blocks changed (headers or fields)" ~printer:pint 0 changed;
      assert_equal ~msg:"allocator calls" ~printer:pint 1 calls;
      assert_equal ~msg:"root tag" ~printer:pint 0 tag;
      assert_equal ~msg:"root color" ~printer:pint 3 color
  | _ -> assert_failure "capi_copy_unchanged"

let test_capi_failure_unchanged _ =
  let bad = [ Obj.repr (make_source ()); Obj.repr (make_shapes ()); abstract_block () ] in
  let v = (make_source (), bad) in
  let blocks = blocks_of v in
  let before = snapshot blocks in
  (match capi_copy_unchanged (Obj.repr v) blocks false with
  | [| copied; _; changed; calls; _; _ |] ->
      assert_equal ~msg:"not copied" 0 copied;
      assert_equal ~msg:"source blocks changed (headers or fields)" ~printer:pint 0 changed;
      assert_equal ~msg:"nothing allocated" ~printer:pint 0 calls
  | _ -> assert_failure "capi_copy_unchanged");
  Gc.full_major ();
  Gc.compact ();
  assert_same_blocks ~msg:"after failed copy and compaction" blocks before

let test_capi_copy_static _ =
  let run v copy_static =
    match capi_copy_unchanged (Obj.repr v) (blocks_of v) copy_static with
    | [| copied; size; changed; _; _; _ |] ->
        assert_equal ~msg:"source blocks changed" ~printer:pint 0 changed;
        (copied = 1, size)
    | _ -> assert_failure "capi_copy_unchanged"
  in
  let copied, size = run static_list true in
  assert_bool "copy_static: static data copied" copied;
  assert_equal ~printer:pint 72 size;
  let copied, _ = run static_list false in
  assert_equal ~msg:"without copy_static: copied only in bytecode" (not native) copied;
  let copied, _ = run (o 5) true in
  assert_bool "an immediate is never copied" (not copied);
  (* Regression: an empty array is the runtime's atom, read-only memory on OCaml 5; a
     copy of static data must not mark its header (it faulted there). *)
  let copied, size = run (Sys.opaque_identity ([||] : int array), [ 1; 2 ]) true in
  assert_bool "copy_static reaching an atom" copied;
  assert_bool "the atom is copied too" (size >= 8 * (3 + 1 + 6))

let source =
  "source unchanged"
  >::: [
         "after a copy, blocks and fields the same" >:: test_source_after_copy;
         "mutations of source and copy independent" >:: test_mutations_independent;
         "C offheap_copy: source bytes and headers unchanged" >:: test_capi_unchanged;
         "C offheap_copy: failure leaves the source unchanged" >:: test_capi_failure_unchanged;
         "C offheap_copy: copy_static" >:: test_capi_copy_static;
       ]

(* {1 Errors} *)

(** [v] cannot be copied: [Not_copyable] for a reason of [kind], nothing allocated, the
    source the same before and after, and after a full major GC and a compaction. *)
let check_refused ~kind v =
  let blocks = blocks_of v in
  let before = snapshot blocks in
  let a = counting_alloc (fresh_id ()) in
  let of_kind r =
    match (kind, r) with
    | "abstract", Offheap.Abstract | "custom", Offheap.Custom _ | "lazy", Offheap.Unforced_lazy ->
        true
    | _ -> false
  in
  let r = not_copyable (fun () -> Offheap.copy ~alloc:a v) in
  assert_bool (kind ^ ": " ^ Printexc.to_string (Offheap.Not_copyable r)) (of_kind r);
  assert_equal ~msg:(kind ^ ": allocs") ~printer:pint 0 (counts a).allocs;
  assert_same_blocks ~msg:(kind ^ ": after the failed copy") blocks before;
  assert_bool kind (of_kind (not_copyable (fun () -> Offheap.copy v)));
  Gc.full_major ();
  Gc.compact ();
  assert_same_blocks ~msg:(kind ^ ": after GC") blocks before

let test_abstract _ =
  check_refused ~kind:"abstract" (abstract_block ());
  check_refused ~kind:"abstract" (o 1, [ abstract_block () ]);
  check_refused ~kind:"abstract" (make_source (), Weak.create 3)

let test_custom _ =
  check_refused ~kind:"custom" stdin;
  check_refused ~kind:"custom" (make_shapes (), [ (o 1, Some stdout) ]);
  assert_equal (Offheap.Custom "_chan") (not_copyable (fun () -> Offheap.copy stderr));
  let ba = Bigarray.Array1.create Bigarray.char Bigarray.c_layout 16 in
  let m = Mutex.create () in
  check_refused ~kind:"custom" (str "lock", m);
  check_refused ~kind:"custom" (ba, m);
  (* the mutex and the Bigarray still work *)
  Mutex.lock m;
  Mutex.unlock m;
  Bigarray.Array1.set ba 0 'z';
  assert_equal 'z' (Bigarray.Array1.get ba 0)

let test_unforced_lazy _ =
  let l = lazy (make_point (o 4)) in
  check_refused ~kind:"lazy" l;
  let v = (make_source (), [ l ]) in
  check_refused ~kind:"lazy" v;
  assert_bool "still unforced" (not (Lazy.is_val l));
  (* force it: now it copies *)
  assert_equal 4 (Lazy.force l).x;
  with_copy v (fun h ->
      match Offheap.get h with
      | _, [ l' ] -> assert_equal 4 (Lazy.force l').x
      | _ -> assert_failure "copy of the forced lazy")

(* The bad block comes last in the traversal, after half a million blocks were visited:
   every visited block must be given back as it was. *)
let test_deep_failure _ =
  let n = 500_000 in
  let slots = List.init n (fun i -> { content = Obj.repr i }) in
  let last = List.nth slots (n - 1) in
  last.content <- abstract_block ();
  let a = counting_alloc (fresh_id ()) in
  assert_equal Offheap.Abstract (not_copyable (fun () -> Offheap.copy ~alloc:a slots));
  assert_equal ~printer:pint 0 (counts a).allocs;
  Gc.full_major ();
  Gc.compact ();
  assert_equal ~printer:pint n (List.length slots);
  List.iteri
    (fun i s -> if i < n - 1 then assert_equal ~printer:pint i (Obj.obj s.content))
    slots;
  (* fixed, the same blocks copy: no mark of the failed copy was left behind *)
  last.content <- Obj.repr (n - 1);
  with_copy ~alloc:a slots (fun h ->
      assert_equal ~printer:pint (5 * 8 * n) (Offheap.stats h).bytes;
      List.iteri (fun i s -> assert_equal ~printer:pint i (Obj.obj s.content)) (Offheap.get h));
  assert_no_leak ~msg:"deep failure" a

let test_null_allocator _ =
  let a = null_alloc (fresh_id ()) in
  let v = make_source () in
  let blocks = blocks_of v in
  let before = snapshot blocks in
  assert_raises Out_of_memory (fun () -> Offheap.copy ~alloc:a v);
  let c = counts a in
  assert_equal ~msg:"one alloc asked" ~printer:pint 1 c.allocs;
  assert_equal ~msg:"size asked" ~printer:pint (heap_bytes v) c.last_size;
  assert_equal ~msg:"frees" ~printer:pint 0 c.frees;
  assert_same_blocks ~msg:"after Out_of_memory" blocks before;
  Gc.full_major ();
  Gc.compact ();
  assert_same_blocks ~msg:"after Out_of_memory and GC" blocks before;
  (* immediates need no memory *)
  with_copy ~alloc:a (o 3) (fun h -> assert_equal 3 (Offheap.get h));
  (* the source copies fine afterwards *)
  let good = counting_alloc (fresh_id ()) in
  with_copy ~alloc:good v (fun h -> assert_equal 0 (compare v (Offheap.get h)));
  settle ();
  assert_equal ~printer:pint 0 (counts a).frees;
  assert_no_leak ~msg:"after Out_of_memory" good

let test_misaligned_allocator _ =
  let a = misaligned_alloc (fresh_id ()) in
  let v = make_shapes () in
  let blocks = blocks_of v in
  let before = snapshot blocks in
  (match Offheap.copy ~alloc:a v with
  | _ -> assert_failure "misaligned memory accepted"
  | exception Invalid_argument msg -> assert_bool msg (contains msg "aligned")
  | exception Out_of_memory -> ());
  assert_same_blocks ~msg:"after misaligned memory" blocks before;
  let c = counts a in
  assert_equal ~printer:pint 1 c.allocs;
  assert_equal ~msg:"the misaligned memory was given back" ~printer:pint 1 c.frees;
  assert_equal ~printer:pint 0 c.outstanding;
  assert_equal ~printer:pint 0 c.unknown_frees

(* Failed copies leak nothing: a leaked queue or visited set per attempt would show. *)
let test_failures_leak_nothing _ =
  let v = List.init 40_000 Fun.id in
  let bad = (v, abstract_block ()) in
  let bad_late = List.rev (abstract_block () :: List.rev_map Obj.repr v) in
  let a = null_alloc (fresh_id ()) in
  for _ = 1 to 10 do
    (try ignore (Offheap.copy ~alloc:a v) with Out_of_memory -> ());
    try ignore (Offheap.copy bad_late) with Offheap.Not_copyable _ -> ()
  done;
  let before = rss () in
  for _ = 1 to 300 do
    assert_raises Out_of_memory (fun () -> Offheap.copy ~alloc:a v);
    assert_equal Offheap.Abstract (not_copyable (fun () -> Offheap.copy bad));
    assert_equal Offheap.Abstract (not_copyable (fun () -> Offheap.copy bad_late))
  done;
  let growth = rss () - before in
  assert_bool
    (Printf.sprintf "RSS grew by %d bytes over 900 failed copies" growth)
    (growth < 10 lsl 20);
  assert_equal ~printer:pint 310 (counts a).allocs

let errors =
  "errors"
  >::: [
         "abstract blocks" >:: test_abstract;
         "custom blocks: channels, Bigarray, Mutex" >:: test_custom;
         "unforced lazy" >:: test_unforced_lazy;
         "failure deep in a large value" >:: test_deep_failure;
         "NULL allocator: Out_of_memory" >:: test_null_allocator;
         "misaligned allocator" >:: test_misaligned_allocator;
         "failed copies leak nothing" >:: test_failures_leak_nothing;
       ]

(* {1 The counting allocator} *)

let test_one_exact_alloc _ =
  let id = fresh_id () in
  let a = counting_alloc id in
  let values =
    [
      Obj.repr (List.init 100 Fun.id);
      Obj.repr (make_shapes ());
      Obj.repr (str "");
      Obj.repr (String.make (o 1000) 'a');
      Obj.repr (Array.init 7 float_of_int);
      Obj.repr (make_table 50);
      Obj.repr (Int64.of_int (o 5), [ Int32.of_int (o 6) ]);
    ]
  in
  let total = ref 0 in
  List.iteri
    (fun i v ->
      let msg = Printf.sprintf "value %d" i in
      let before = counts a in
      with_copy ~alloc:a v (fun h ->
          let c = counts a in
          let bytes = (Offheap.stats h).bytes in
          total := !total + bytes;
          assert_equal ~msg:(msg ^ ": one alloc per copy") ~printer:pint (before.allocs + 1)
            c.allocs;
          assert_equal ~msg:(msg ^ ": alloc size = stats bytes") ~printer:pint bytes
            c.last_size;
          assert_equal ~msg:(msg ^ ": stats bytes = heap words of the value") ~printer:pint
            (heap_bytes v) bytes;
          assert_equal ~msg:(msg ^ ": the C function saw field 2") ~printer:pint id
            c.last_id_seen;
          assert_equal ~msg:(msg ^ ": same value") 0 (compare v (Offheap.get h));
          assert_equal ~msg:(msg ^ ": same hash") (Hashtbl.hash v)
            (Hashtbl.hash (Offheap.get h)));
      settle ();
      assert_equal ~msg:(msg ^ ": one free") ~printer:pint (before.frees + 1) (counts a).frees)
    values;
  assert_equal ~msg:"total bytes" ~printer:pint !total (counts a).total;
  assert_no_leak ~msg:"counting" a

let test_many_live_copies _ =
  let a = counting_alloc (fresh_id ()) and b = counting_alloc (fresh_id ()) in
  let handles =
    List.init 200 (fun i ->
        let alloc = if i mod 2 = 0 then a else b in
        (i, Offheap.copy ~alloc (i, List.init (i mod 17) string_of_int)))
  in
  let live c = c.allocs - c.frees in
  assert_equal ~printer:pint 100 (counts a).allocs;
  assert_equal ~printer:pint 100 (live (counts b));
  let bytes even =
    List.fold_left
      (fun acc (i, h) -> if (i mod 2 = 0) = even then acc + (Offheap.stats h).bytes else acc)
      0 handles
  in
  assert_equal ~msg:"outstanding = bytes of the live copies" ~printer:pint (bytes true)
    (counts a).outstanding;
  assert_equal ~printer:pint (bytes false) (counts b).outstanding;
  Gc.compact ();
  List.iter
    (fun (i, h) ->
      let j, l = Offheap.get h in
      assert_equal ~printer:pint i j;
      assert_equal (List.init (i mod 17) string_of_int) l)
    handles;
  List.iter (fun (_, h) -> Offheap.free h) handles;
  assert_no_leak ~msg:"allocator a" a;
  assert_no_leak ~msg:"allocator b" b

(* The handle keeps its allocator alive: the program keeps no reference to the
   allocator block, which compaction may move, until the free. *)
let test_allocator_kept_alive _ =
  let id = fresh_id () and id' = fresh_id () in
  let h = Offheap.copy ~alloc:(counting_alloc id) (make_shapes ()) in
  let h' = Offheap.copy ~alloc:(counting_alloc id') [ o 1 ] in
  ignore (Sys.opaque_identity (List.init 100_000 (fun i -> (i, i))));
  Gc.compact ();
  Gc.full_major ();
  assert_equal (make_shapes ()) (Offheap.get h);
  Offheap.free h;
  Offheap.free h';
  settle ();
  List.iter
    (fun id ->
      let c = counts_of_id id in
      assert_equal ~msg:"allocs" ~printer:pint 1 c.allocs;
      assert_equal ~msg:"frees" ~printer:pint 1 c.frees;
      assert_equal ~msg:"the free saw the block" ~printer:pint id c.last_id_seen;
      assert_equal ~msg:"outstanding" ~printer:pint 0 c.outstanding;
      assert_equal ~msg:"size mismatches" ~printer:pint 0 c.size_mismatches;
      assert_equal ~msg:"unknown frees" ~printer:pint 0 c.unknown_frees)
    [ id; id' ]

(* While a free waits (OCaml 5 always, OCaml 4 while the major GC marks), the allocator
   block is kept alive by a slot that the GC scans (src/release.rs, Rooted) and follows
   when it moves: the block is young when the copy is made, nothing else holds it, and
   a minor collection, a compaction and full major cycles run before the free function
   is called with it. *)
let test_allocator_kept_while_waiting _ =
  let id = fresh_id () in
  let h = Offheap.copy ~alloc:(counting_alloc id) (make_shapes ()) in
  (* Read: a copy whose value no [get] returned goes back at its free. *)
  ignore (Sys.opaque_identity (Offheap.get h));
  Gc.full_major ();
  ignore (Gc.major_slice 1);
  Offheap.free h;
  let waited = Offheap.pending_frees () > 0 in
  ignore (Sys.opaque_identity (List.init 100_000 (fun i -> (i, i))));
  Gc.compact ();
  Gc.full_major ();
  settle ();
  assert_bool "the free waited" waited;
  let c = counts_of_id id in
  assert_equal ~msg:"frees" ~printer:pint 1 c.frees;
  assert_equal ~msg:"the free saw the block" ~printer:pint id c.last_id_seen;
  assert_equal ~msg:"outstanding" ~printer:pint 0 c.outstanding;
  assert_equal ~msg:"unknown frees" ~printer:pint 0 c.unknown_frees

(* A copy whose value no [get] returned has nothing pointing into it but its handle: its
   free gives it back to the allocator at once, even while the major GC marks (OCaml 4)
   or a cycle runs (OCaml 5), where a copy read waits (src/release.rs). *)
let test_unread_copy_back_at_once _ =
  let a = counting_alloc (fresh_id ()) in
  let unread = Offheap.copy ~alloc:a (make_shapes ()) in
  let read = Offheap.copy ~alloc:a (make_shapes ()) in
  ignore (Sys.opaque_identity (Offheap.get read));
  Gc.full_major ();
  ignore (Gc.major_slice 1);
  Offheap.free unread;
  assert_equal ~msg:"the unread copy's free called the allocator's" ~printer:pint 1
    (counts a).frees;
  Offheap.free read;
  let waited = Offheap.pending_frees () > 0 and frees = (counts a).frees in
  settle ();
  assert_bool "the read copy waited" waited;
  assert_equal ~msg:"the read copy's free waited" ~printer:pint 1 frees;
  assert_equal ~msg:"both freed in the end" ~printer:pint 2 (counts a).frees;
  assert_equal ~msg:"outstanding" ~printer:pint 0 (counts a).outstanding

let allocator =
  "counting allocator"
  >::: [
         "one alloc per copy, exact size, field 2 seen, one free" >:: test_one_exact_alloc;
         "many live copies, two allocators" >:: test_many_live_copies;
         "allocator kept alive by the handle" >:: test_allocator_kept_alive;
         "allocator kept alive while its free waits" >:: test_allocator_kept_while_waiting;
         "a copy never read: back to its allocator at once" >:: test_unread_copy_back_at_once;
       ]

(* {1 The GC} *)

let test_gc_with_live_copies _ =
  let shapes = make_shapes () and table = make_table 200 and parity = make_parity (o 0) in
  let pairs = Array.init 1000 (fun i -> (i, float_of_int i)) in
  let hs = Offheap.copy shapes and ht = Offheap.copy table and hp = Offheap.copy parity in
  let ha = Offheap.copy pairs in
  let check_table () =
    let t = Offheap.get ht in
    assert_equal [ 199; 200; 201; 202 ] (Hashtbl.find t "199");
    assert_equal [ 6 ] (Hashtbl.find t "6");
    assert_equal ~printer:pint 200 (Hashtbl.length t)
  in
  let check_all () =
    assert_equal (make_shapes ()) (Offheap.get hs);
    check_table ();
    assert_bool "closure after GC" ((Offheap.get hp).even 50);
    assert_equal (999, 999.) (Offheap.get ha).(999)
  in
  (* heap blocks pointing into the copies *)
  let keep =
    Array.init 1000 (fun i ->
        if i mod 2 = 0 then Obj.repr (Offheap.get ht) else Obj.repr (Offheap.get hs))
  in
  let garbage = ref [] in
  for round = 1 to 5 do
    let older = if round mod 2 = 0 then [] else !garbage in
    garbage := List.init 20_000 (fun i -> (i, str "garbage")) :: older;
    Gc.full_major ();
    Gc.compact ();
    check_all ();
    assert_bool "heap references to copies" (keep.(5) == Obj.repr (Offheap.get hs))
  done;
  garbage := [];
  (* free two, collect, the others still read well *)
  Array.fill keep 0 1000 (Obj.repr 0);
  Offheap.free hs;
  Offheap.free hp;
  Array.fill keep 0 1000 (Obj.repr (Offheap.get ht));
  Gc.full_major ();
  Gc.compact ();
  check_table ();
  assert_equal (999, 999.) (Offheap.get ha).(999);
  Array.fill keep 0 1000 (Obj.repr 0);
  Offheap.free ht;
  Offheap.free ha;
  Gc.full_major ();
  Gc.compact ();
  settle ()

let test_young_and_major _ =
  (* just allocated: in the minor heap *)
  for i = 1 to 200 do
    let v = (i, str (string_of_int i), [ float_of_int i ]) in
    with_copy v (fun h -> assert_equal v (Offheap.get h))
  done;
  (* promoted: in the major heap *)
  let v = make_source () in
  Gc.full_major ();
  with_copy v (fun h -> assert_equal 0 (compare v (Offheap.get h)));
  (* a young block pointing to major blocks *)
  let old = List.init 100 string_of_int in
  let r = ref [] in
  Gc.full_major ();
  r := List.init 10 (fun i -> str (string_of_int i));
  with_copy (old, r, [ old ]) (fun h ->
      let old', r', l' = Offheap.get h in
      assert_equal old old';
      assert_equal !r !r';
      assert_bool "shared" (List.hd l' == old'));
  (* a copy of values spread over many minor collections *)
  let values = List.init 20_000 (fun i -> str (string_of_int i)) in
  with_copy values (fun h ->
      Gc.compact ();
      assert_equal values (Offheap.get h))

(* One long-lived value copied again and again while the program allocates, until ten
   major cycles have gone by, so that copies are made at every stage of a cycle. The
   size is checked before the copy is read: a wrong copy is reported, not followed. *)
let test_copies_during_major_cycles _ =
  let v = List.init 1000 (fun i -> (i, string_of_int i)) in
  let expected = heap_bytes v in
  Gc.compact ();
  let cycles () = (Gc.quick_stat ()).Gc.major_collections in
  let start = cycles () in
  let wrong = ref [] and rounds = ref 0 in
  while cycles () - start < 10 && !rounds < 20_000 do
    incr rounds;
    let h = Offheap.copy v in
    if (Offheap.stats h).bytes <> expected then
      wrong := Printf.sprintf "round %d: %d bytes" !rounds (Offheap.stats h).bytes :: !wrong
    else if compare (Offheap.get h) v <> 0 then
      wrong := Printf.sprintf "round %d: another value" !rounds :: !wrong;
    Offheap.free h;
    ignore (Sys.opaque_identity (Array.make 30_000 (ref !rounds)))
  done;
  assert_bool "ten major cycles" (cycles () - start >= 10);
  assert_equal
    ~msg:(Printf.sprintf "wrong copies of %d bytes, in %d rounds" expected !rounds)
    ~printer:(fun l -> String.concat "; " (List.filteri (fun i _ -> i < 10) l))
    [] (List.rev !wrong)

(* The GC never touches the memory of a freed copy, once the free was handed to the
   allocator (at once on OCaml 4, at the end of the running major cycle on OCaml 5): the
   quarantine allocator zeroes it and watches for writes. *)
let test_gc_after_free _ =
  let a = quarantine_alloc (fresh_id ()) in
  let values =
    [ Obj.repr (make_shapes ()); Obj.repr (make_table 100); Obj.repr (make_parity (o 0)) ]
  in
  let use h =
    let c = Offheap.get h in
    (* read it, and leave heap garbage pointing into it *)
    ignore (Sys.opaque_identity (Hashtbl.hash c, Array.make 10 c))
  in
  for _ = 1 to 3 do
    List.iter (fun v -> with_copy ~alloc:a v use) values;
    ignore (Sys.opaque_identity (List.init 50_000 Fun.id));
    Gc.full_major ()
  done;
  settle ();
  for _ = 1 to 3 do
    Gc.full_major ()
  done;
  Gc.compact ();
  assert_equal ~printer:pint 9 (counts a).frees;
  assert_equal ~msg:"bytes the GC wrote in freed copies" ~printer:pint 0 (quarantine_dirty a);
  quarantine_release a

(* A reference into a copy left in a local variable and never used after the free: dead
   for the program, but in bytecode a local stays in its stack frame until the function
   returns, and the GC scans it. The freed memory is zeroed (quarantine allocator), as
   it may be reused in a real program; the GC must neither write to it nor crash on it,
   compaction included. Run in a child process, so that a crash fails this test only. *)
let stale_local a =
  let h = Offheap.copy ~alloc:a (make_shapes ()) in
  let c = Offheap.get h in
  assert_equal (make_shapes ()) c;
  Offheap.free h;
  settle ();
  for _ = 1 to 3 do
    Gc.full_major ()
  done;
  Gc.compact ();
  ((counts a).frees, quarantine_dirty a)

let ocaml5_bytecode =
  Sys.ocaml_version >= "5" && Sys.backend_type = Sys.Bytecode

let test_stale_local _ =
  let a = quarantine_alloc (fresh_id ()) in
  flush_all ();
  match Unix.fork () with
  | 0 ->
      let code =
        match stale_local a with 1, 0 -> 0 | 1, _ -> 1 | _ -> 2 | exception _ -> 3
      in
      Unix._exit code
  | pid -> (
      let _, status = Unix.waitpid [] pid in
      quarantine_release a;
      match status with
      | Unix.WEXITED 0 -> ()
      | Unix.WEXITED 1 -> assert_failure "the GC wrote in the freed copy"
      | Unix.WEXITED n -> assert_failure (Printf.sprintf "the child failed (exit %d)" n)
      | Unix.WSIGNALED n | Unix.WSTOPPED n ->
          assert_failure
            (Printf.sprintf
               "the GC crashed (OCaml signal %d) on a dead local variable referring to a \
                freed copy"
               n))

let gc =
  "GC stress"
  >::: [
         "full_major and compact with live copies and after frees" >:: test_gc_with_live_copies;
         "young and major values" >:: test_young_and_major;
         "one value copied again and again over ten major cycles"
         >:: test_copies_during_major_cycles;
         "the GC never touches a freed copy" >:: test_gc_after_free;
       ]
       @ (* A dead local left in a bytecode frame is still a root. OCaml 4 ignores
            roots outside the page table (as long as the memory does not become part
            of the heap: the quarantine allocator never hands it out again, malloc
            may, so offheap.mli's rule holds there too), and native code keeps no
            dead locals; OCaml 5 bytecode keeps them and reads what they point to:
            no root may point into a copy when it is freed. *)
       (if ocaml5_bytecode then []
        else [ "a reference left in a local variable after free" >:: test_stale_local ])

(* {1 compare, hash, Marshal} *)

let check_polymorphic name v other =
  let m = name ^ ": " in
  with_copy v (fun h ->
      let c = Offheap.get h in
      assert_bool (m ^ "copied") ((Offheap.stats h).bytes > 0);
      assert_equal ~msg:(m ^ "compare") ~printer:pint 0 (compare c v);
      assert_bool (m ^ "=") (c = v);
      assert_equal ~msg:(m ^ "compare with another value") ~printer:pint (compare v other)
        (compare c other);
      assert_equal ~msg:(m ^ "compare the other way") ~printer:pint (compare other v)
        (compare other c);
      assert_equal ~msg:(m ^ "Hashtbl.hash") ~printer:pint (Hashtbl.hash v) (Hashtbl.hash c);
      assert_equal ~msg:(m ^ "Hashtbl.hash_param") ~printer:pint
        (Hashtbl.hash_param 1000 1000 v) (Hashtbl.hash_param 1000 1000 c);
      let s = Marshal.to_string c [] in
      assert_equal ~msg:(m ^ "Marshal bytes") (Marshal.to_string v []) s;
      assert_bool (m ^ "Marshal round trip") (Marshal.from_string s 0 = v);
      assert_bool (m ^ "Marshal No_sharing")
        (Marshal.from_string (Marshal.to_string c [ Marshal.No_sharing ]) 0 = v))

let test_compare_hash_marshal _ =
  check_polymorphic "int list" (List.init 1000 Fun.id) (List.init 1000 (fun i -> i + 1));
  check_polymorphic "record" (make_point 3) (make_point 4);
  check_polymorphic "string" (str "hello, world") (str "hello");
  check_polymorphic "float" (o 3.25 +. 0.) 1.0;
  check_polymorphic "Int64" (Int64.of_int (o 123456789)) 5L;
  check_polymorphic "Int32" (Int32.of_int (o (-7))) 5l;
  check_polymorphic "Nativeint" (Nativeint.of_int (o max_int)) 5n;
  check_polymorphic "variants" (make_shapes ()) [ Dot ];
  check_polymorphic "polymorphic variants" [ `A (o 1); `B (str "x") ] [ `A 1 ];
  check_polymorphic "float array" (Array.init 10 float_of_int) [| 1.0 |];
  let nested () =
    let shapes, options, m, (i, _, floats), s = make_source () in
    (shapes, options, m, (i, floats), s)
  in
  check_polymorphic "nested" (nested ()) (nested ());
  check_polymorphic "map"
    (List.fold_left (fun m i -> SMap.add (string_of_int i) i m) SMap.empty
       (List.init 100 Fun.id))
    SMap.empty

let test_marshal_closures _ =
  with_copy (make_adder (o 7)) (fun h ->
      let s = Marshal.to_string (Offheap.get h) [ Marshal.Closures ] in
      let g : int -> int = Marshal.from_string s 0 in
      assert_equal ~printer:pint 10 (g 3))

let test_hashtbl_lookup _ =
  let t = Hashtbl.create 16 in
  for i = 0 to 999 do
    Hashtbl.add t (str (string_of_int i), Int64.of_int i) (float_of_int i)
  done;
  with_copy t (fun h ->
      let c = Offheap.get h in
      for i = 0 to 999 do
        assert_equal ~printer:string_of_float (float_of_int i)
          (Hashtbl.find c (string_of_int i, Int64.of_int i))
      done;
      (* keys from the copy, hashed off the heap *)
      Hashtbl.iter
        (fun k v ->
          assert_equal v (Hashtbl.find c k);
          assert_equal v (Hashtbl.find t k))
        c;
      assert_raises Not_found (fun () -> Hashtbl.find c ("1000", 1000L)))

(* Small copies sit next to each other, sharing pages: freeing one must not take its
   neighbours out of the runtime's page table (OCaml 4). *)
let test_adjacent_copies _ =
  let check_all handles values which =
    Array.iteri
      (fun i h ->
        if which i then begin
          let c = Offheap.get h and v = values.(i) in
          let m = Printf.sprintf "copy %d" i in
          assert_equal ~msg:(m ^ ": compare") ~printer:pint 0 (compare c v);
          assert_equal ~msg:(m ^ ": hash") ~printer:pint (Hashtbl.hash v) (Hashtbl.hash c);
          assert_equal ~msg:(m ^ ": Marshal") (Marshal.to_string v []) (Marshal.to_string c [])
        end)
      handles
  in
  let run alloc =
    let n = 2000 in
    let values = Array.init n (fun i -> (i, str (string_of_int i), [ Int64.of_int i ])) in
    let handles = Array.map (fun v -> Offheap.copy ?alloc v) values in
    Array.iteri (fun i h -> if i mod 2 = 0 then Offheap.free h) handles;
    check_all handles values (fun i -> i mod 2 = 1);
    Gc.compact ();
    check_all handles values (fun i -> i mod 2 = 1);
    Array.iteri (fun i h -> if i mod 4 = 1 then Offheap.free h) handles;
    check_all handles values (fun i -> i mod 4 = 3);
    Array.iteri (fun i h -> if i mod 4 = 3 then Offheap.free h) handles
  in
  run None;
  let a = counting_alloc (fresh_id ()) in
  run (Some a);
  assert_no_leak ~msg:"adjacent copies" a

let polymorphic =
  "compare, hash, Marshal"
  >::: [
         "same answers as on the source" >:: test_compare_hash_marshal;
         "Marshal of a copied closure" >:: test_marshal_closures;
         "Hashtbl.find on a copied table" >:: test_hashtbl_lookup;
         "adjacent copies, every other one freed" >:: test_adjacent_copies;
       ]

(* {1 Deep values} *)

let test_long_list _ =
  let n = 10_000_000 in
  let l = List.init n Fun.id in
  with_copy l (fun h ->
      let c = Offheap.get h in
      let s = Offheap.stats h in
      assert_equal ~printer:pint n s.blocks;
      assert_equal ~printer:pint (24 * n) s.bytes;
      assert_bool
        (Printf.sprintf "transient memory bounded per block (%d bytes for %d blocks)"
           s.transient_bytes n)
        (s.transient_bytes <= 64 * n);
      assert_equal ~printer:pint n (List.length c);
      assert_bool "elements" (List.for_all2 ( = ) l c);
      assert_equal ~printer:pint 0 (compare l c);
      assert_equal (Hashtbl.hash l) (Hashtbl.hash c))

(* [depth] nested nodes, each the right child of the one above. *)
let right_tree depth =
  let t = ref Leaf in
  for i = 1 to depth do
    t := Node (Leaf, i, !t)
  done;
  !t

let test_deep_tree _ =
  let depth = 1_000_000 in
  let t = right_tree depth in
  with_copy t (fun h ->
      let c = Offheap.get h in
      assert_equal ~printer:pint depth (Offheap.stats h).blocks;
      (* an iterative walk *)
      let rec walk expected t t' =
        match (t, t') with
        | Leaf, Leaf -> assert_equal ~printer:pint 0 expected
        | Node (Leaf, i, r), Node (Leaf, i', r') ->
            if i <> expected || i' <> expected then assert_failure "node value";
            walk (expected - 1) r r'
        | _ -> assert_failure "shape of the tree"
      in
      walk depth t c;
      assert_equal ~msg:"compare (right-nested: iterative in the runtime)" ~printer:pint 0
        (compare t c));
  (* nested through the first field: Nest [ Nest [ ... ] ], two blocks a level *)
  let n = ref (Nest (o [])) in
  for _ = 1 to depth do
    n := Nest [ !n ]
  done;
  with_copy !n (fun h ->
      assert_equal ~printer:pint ((2 * depth) + 1) (Offheap.stats h).blocks;
      let rec depth_of acc (Nest l) =
        match l with [] -> acc | [ x ] -> depth_of (acc + 1) x | _ -> -1
      in
      assert_equal ~printer:pint depth (depth_of 0 (Offheap.get h)))

let deep =
  "deep values"
  >::: [
         "a 10-million-element list" >:: test_long_list;
         "million-deep nesting" >:: test_deep_tree;
       ]

(* {1 Memory} *)

let test_rss_rounds _ =
  let v = Array.init 1000 (fun i -> String.make 1000 (Char.chr (65 + (i mod 26)))) in
  let size = heap_bytes v in
  assert_bool "about 1 MB" (size > 1_000_000 && size < 1_100_000);
  let round i =
    with_copy v (fun h ->
        let c = Offheap.get h in
        assert_equal ~printer:pint size (Offheap.stats h).bytes;
        assert_equal ~printer:Fun.id v.(i mod 1000) c.(i mod 1000);
        if i mod 100 = 0 then assert_equal v c)
  in
  for i = 1 to 20 do
    round i
  done;
  let before = rss () in
  for i = 1 to 1000 do
    round i
  done;
  let growth = rss () - before in
  assert_bool
    (Printf.sprintf
       "RSS grew by %d bytes over 1000 rounds of copy + free of %d bytes (%d frees pending)"
       growth size (Offheap.pending_frees ()))
    (growth < 20 lsl 20)

let memory = "memory" >::: [ "1000 rounds of copy + free of 1 MB" >:: test_rss_rounds ]

(* {1 Threads} *)

let test_threads _ =
  let shared = List.init 10_000 (fun i -> (i, str (string_of_int i))) in
  let rounds = 100 in
  let allocs = Array.init 4 (fun _ -> counting_alloc (fresh_id ())) in
  let results = Array.make 4 "did not finish" in
  let one_round tid round =
    let v =
      Array.init 300 (fun i -> (tid, round, str (Printf.sprintf "%d-%d-%d" tid round i)))
    in
    with_copy ~alloc:allocs.(tid) v (fun h ->
        Thread.yield ();
        with_copy shared (fun hs ->
            if Offheap.get h <> v then failwith "own value";
            Thread.yield ();
            if compare (Offheap.get hs) shared <> 0 then failwith "shared value";
            let tid', round', s = (Offheap.get h).(299) in
            if tid' <> tid || round' <> round || s <> Printf.sprintf "%d-%d-299" tid round then
              failwith "last element"))
  in
  let worker tid () =
    try
      for round = 1 to rounds do
        one_round tid round
      done;
      results.(tid) <- "ok"
    with e -> results.(tid) <- Printexc.to_string e
  in
  let gc_thread =
    Thread.create
      (fun () ->
        for _ = 1 to 5 do
          Gc.full_major ();
          Thread.yield ()
        done)
      ()
  in
  let threads = List.init 4 (fun tid -> Thread.create (worker tid) ()) in
  List.iter Thread.join threads;
  Thread.join gc_thread;
  Array.iteri
    (fun tid r -> assert_equal ~msg:(Printf.sprintf "thread %d" tid) ~printer:Fun.id "ok" r)
    results;
  Array.iteri
    (fun tid a ->
      assert_equal ~printer:pint rounds (counts a).allocs;
      assert_no_leak ~msg:(Printf.sprintf "thread %d" tid) a)
    allocs

let threads = "threads" >::: [ "4 systhreads copying at once" >:: test_threads ]

(* {1 Life cycle of a handle} *)

let test_free_then_get _ =
  let h = Offheap.copy (make_shapes ()) in
  Offheap.free h;
  assert_freed h;
  assert_freed h;
  let h = Offheap.copy (Array.make (o 10) "x") in
  Offheap.free h;
  assert_freed h

let test_delete_alias _ =
  let h = Offheap.copy [ o 1; 2 ] in
  (Offheap.delete [@alert "-deprecated"]) h;
  assert_equal ~printer:Fun.id "Offheap.get: deleted"
    (raises_invalid ~sub:"deleted" (fun () -> Offheap.get h));
  assert_equal ~printer:Fun.id "Offheap.free: deleted"
    (raises_invalid ~sub:"deleted" (fun () -> (Offheap.delete [@alert "-deprecated"]) h));
  let a = counting_alloc (fresh_id ()) in
  let h = Offheap.copy ~alloc:a (make_point (o 1)) in
  (Offheap.delete [@alert "-deprecated"]) h;
  assert_freed h;
  assert_no_leak ~msg:"delete" a

let test_deferred_frees _ =
  let a = counting_alloc (fresh_id ()) in
  let h = Offheap.copy ~alloc:a (make_shapes ()) in
  Offheap.free h;
  let c = counts a in
  assert_bool "freed, or pending until the major cycle (OCaml 4: its marking) ends"
    (c.frees = 1 || Offheap.pending_frees () >= 1);
  settle ();
  assert_equal ~printer:pint 1 (counts a).frees

let lifecycle =
  "life cycle"
  >::: [
         "get and free after free raise" >:: test_free_then_get;
         "delete alias" >:: test_delete_alias;
         "frees deferred (OCaml 4: while the GC marks), then done" >:: test_deferred_frees;
       ]

let () =
  run_test_tt_main
    ("offheap"
    >::: [
           kinds;
           sharing;
           source;
           errors;
           allocator;
           gc;
           polymorphic;
           deep;
           memory;
           threads;
           lifecycle;
         ])
