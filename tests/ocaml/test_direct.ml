(* Large copies that pass 1 writes as it goes (src/copy/direct.rs): with the default
   allocator, from 4 MiB of copy on, the blocks are written into address space reserved
   for the copy and handed over as the allocator's own mapping. Every kind of block
   after that point, single blocks larger than the first 4 MiB, failures after the
   writing began, a C allocator (which must get one alloc of the exact size), copies of
   copies, and limits on address space and data (in a child process). Native code and
   bytecode, OCaml 4.13 and 5.3.

   Every value below is laid out so that what it tests comes after the first 4 MiB of
   the copy: a [prefix] is discovered first, and what the value holds besides after
   it. *)

open OUnit2
open Support

type point = { x : int; y : float; label : string; tags : string list }

type shape =
  | Dot
  | Circle of point * float
  | Rect of { w : int; h : int; corner : point }
  | Group of shape list

type parity = { even : int -> bool; odd : int -> bool }
type slot = { mutable content : Obj.t }

let abstract_block () = Obj.repr (Obj.new_block Obj.abstract_tag 1)

let make_parity base =
  let rec even n = if n = base then true else odd (n - 1)
  and odd n = if n = base then false else even (n - 1) in
  { even; odd }

let make_counter start =
  object
    val mutable n = start
    method get = n
    method incr = n <- n + 1
  end

let mb n = n lsl 20

(** A 5 MiB string. *)
let prefix () = str (String.make (mb 5) 'p')

(** 600 000 strings of 1 to 6 characters: 14.4 MB of copy, its first 4.8 MB one
    array. *)
let strings () = Array.init 600_000 (fun i -> str (string_of_int i))

(** One of each kind of data block, around [i]. *)
let kinds i =
  let p =
    { x = o i; y = float_of_int i; label = str ("p" ^ string_of_int i);
      tags = List.init (i mod 3) string_of_int }
  in
  let lz = lazy (o i * 2) in
  ignore (Lazy.force lz);
  let lf = lazy (float_of_int (o i)) in
  ignore (Lazy.force lf);
  ( (Dot, Circle (p, o 1.5), Rect { w = i; h = 2; corner = p }, Group [ Dot; Circle (p, 0.) ]),
    (Int32.of_int i, Int64.of_int (i * 3), Nativeint.of_int (-i)),
    (Array.init (i mod 7) float_of_int, o 3.5 +. float_of_int i, str (String.make (i mod 50) 'x')),
    (lz, lf, `A (o i), [| Some p; None |], Bytes.make (i mod 17) 'b') )

(** [v] copies (beyond 5 MiB) into a copy equal to it by every polymorphic operation:
    [=], [compare], [Hashtbl.hash], [Marshal]; its statistics are [measure]'s. *)
let check_large name v =
  let m = Offheap.measure v in
  assert_bool (name ^ ": a copy beyond 5 MiB") (m.bytes > mb 5);
  with_copy v (fun h ->
      let c = Offheap.get h in
      let s = Offheap.stats h in
      assert_equal ~msg:(name ^ ": bytes = measure") ~printer:pint m.bytes s.bytes;
      assert_equal ~msg:(name ^ ": blocks = measure") ~printer:pint m.blocks s.blocks;
      assert_bool (name ^ ": off the heap") (Offheap.is_offheap c);
      assert_bool (name ^ ": =") (c = v);
      assert_equal ~msg:(name ^ ": compare") ~printer:pint 0 (compare c v);
      assert_equal ~msg:(name ^ ": Hashtbl.hash") ~printer:pint (Hashtbl.hash v) (Hashtbl.hash c);
      assert_equal ~msg:(name ^ ": Hashtbl.hash_param") ~printer:pint
        (Hashtbl.hash_param 1000 1000 v) (Hashtbl.hash_param 1000 1000 c);
      assert_bool (name ^ ": Marshal bytes") (Marshal.to_string c [] = Marshal.to_string v []))

let test_kinds _ =
  let ks = Array.init 8_000 kinds and ss = strings () in
  check_large "a string, then every kind" (prefix (), ks);
  check_large "600 000 strings, then every kind" (ss, ks);
  check_large "every kind, then 600 000 strings" (ks, ss);
  check_large "strings of every length up to 70"
    (prefix (), Array.init 200_000 (fun i -> str (String.make (i mod 71) (Char.chr (65 + (i mod 26))))))

let test_giant_blocks _ =
  let pre = prefix () in
  (* the first 5.6 MB: one array, whose fields are all copied by pass 1 *)
  check_large "a 700 000-field array first"
    (Array.init 700_000 (fun i -> if i mod 2 = 0 then Obj.repr (str (string_of_int i)) else Obj.repr i));
  check_large "a 20 MB string after 4 MiB" (pre, str (String.make 20_000_000 'z'), o 1);
  check_large "a 1M-field array after 4 MiB" (pre, Array.init 1_000_000 (fun i -> i * 3));
  check_large "a float array of 1M after 4 MiB" (pre, Array.init 1_000_000 float_of_int);
  check_large "floats after 4 MiB" (pre, List.init 200_000 (fun i -> o (float_of_int i)));
  (* a block across the 4 MiB point: the first 4 MiB minus 8 words are an array, the
     block after it crosses the point *)
  let words = (mb 4 / 8) - 8 in
  check_large "a block across the 4 MiB point"
    (Array.make (words - 1) 0, Array.init 100 (fun i -> str (string_of_int i)), pre)

let test_closures _ =
  let pre = prefix () in
  let ps = Array.init 20_000 (fun i -> make_parity (o (i mod 5))) in
  let adders = Array.init 20_000 (fun i -> ( + ) (o i)) in
  let maps = Array.init 1000 (fun i -> List.map (( * ) (o i))) in
  let objs = Array.init 20_000 (fun i -> make_counter (o i)) in
  let v = (pre, ps, adders, maps, objs, ps.(3).odd) in
  with_copy v (fun h ->
      let pre', ps', adders', maps', objs', odd' = Offheap.get h in
      assert_bool "prefix" (pre' = pre);
      for i = 0 to 19_999 do
        assert_bool "even" (ps'.(i).even ((i mod 5) + 4));
        assert_bool "not odd" (not (ps'.(i).odd ((i mod 5) + 4)));
        assert_equal ~printer:pint (i + 5) (adders'.(i) 5)
      done;
      assert_equal [ 7; 14 ] (maps'.(7) [ 1; 2 ]);
      assert_bool "infix root shared" (odd' == ps'.(3).odd);
      assert_bool "infix pointer called" (odd' 4);
      for i = 0 to 19_999 do
        assert_equal ~printer:pint (Oo.id objs.(i)) (Oo.id objs'.(i));
        objs'.(i)#incr;
        assert_equal ~printer:pint (i + 1) objs'.(i)#get;
        assert_equal ~msg:"the source's object" ~printer:pint i objs.(i)#get
      done;
      Gc.compact ();
      assert_bool "after compact" (ps'.(7).even 8))

let test_closures_marshal _ =
  let pre = prefix () in
  let v = (pre, Array.init 20_000 (fun i -> (make_parity (o (i mod 3)), ( + ) (o i)))) in
  with_copy v (fun h ->
      assert_bool "Marshal with closures: same bytes"
        (Marshal.to_string (Offheap.get h) [ Marshal.Closures ]
        = Marshal.to_string v [ Marshal.Closures ]))

let test_sharing_cycles _ =
  let pre = prefix () in
  let shared = Array.init 100 (fun i -> str (string_of_int i)) in
  let rec cycle = 1 :: 2 :: cycle in
  let v =
    (pre, Array.init 200_000 (fun i -> (shared.(i mod 100), shared)),
     Array.init 1000 (fun i -> if i mod 2 = 0 then cycle else [ i ]))
  in
  with_copy v (fun h ->
      let _, a, cs = Offheap.get h in
      assert_bool "shared array" (snd a.(0) == snd a.(199_999));
      assert_bool "shared string" (fst a.(5) == fst a.(105) && fst a.(5) == (snd a.(0)).(5));
      assert_bool "not the source's" (not (fst a.(5) == shared.(5)));
      match cs.(0) with
      | 1 :: 2 :: rest -> assert_bool "cycle" (rest == cs.(0) && cs.(0) == cs.(998))
      | _ -> assert_failure "cycle")

(* {1 Failures after pass 1 began writing} *)

let status_kb = Probes.status_kb

let test_failures _ =
  let pre = prefix () in
  let slots = Array.init 50_000 (fun i -> { content = Obj.repr (str (string_of_int i)) }) in
  let v = (pre, slots) in
  let bad =
    [ ("abstract", abstract_block, ( = ) Offheap.Abstract);
      ("channel", (fun () -> Obj.repr stdout), ( = ) (Offheap.Custom "_chan"));
      ("unforced lazy", (fun () -> Obj.repr (lazy (o 1 + 1))), ( = ) Offheap.Unforced_lazy) ]
  in
  let vm_before = status_kb "VmSize" in
  for round = 1 to 4 do
    List.iter
      (fun (name, make, expected) ->
        let k = (round * 7919) mod 50_000 in
        let old = slots.(k).content in
        slots.(k).content <- make ();
        let r = not_copyable (fun () -> Offheap.copy v) in
        assert_bool (name ^ ": " ^ Printexc.to_string (Offheap.Not_copyable r)) (expected r);
        slots.(k).content <- old)
      bad;
    if round mod 2 = 0 then Gc.compact ()
  done;
  (* a reservation left behind would be 64 GiB of address space *)
  let vm_after = status_kb "VmSize" in
  assert_bool
    (Printf.sprintf "VmSize grew from %d to %d kB over 12 failed copies" vm_before vm_after)
    (vm_after < vm_before + (1 lsl 20));
  Array.iteri
    (fun i s -> assert_equal ~printer:Fun.id (string_of_int i) (Obj.obj s.content))
    slots;
  assert_equal ~msg:"the prefix" (String.make (mb 5) 'p') pre;
  check_large "after the failures" v

(* {1 Scattered values: pass 1 by batches} *)

module SMap = Map.Make (String)
module ISet = Set.Make (Int)

(* Trees and tables of random keys, whose blocks lie all over the heap: pass 1 goes on by
   batches after its first 16384 blocks (src/copy/batches.rs). A [Map] of 60 000 random
   strings to every kind of block (closures, infix pointers, lazy values, objects, boxed
   integers, float arrays), a [Set] of random ints, a [Hashtbl] of the same keys, all
   sharing their keys; copied with the default allocator (pass 1 writes the copy) and
   with a C allocator (pass 2 writes it), equal by every polymorphic operation; then
   failures hung from the last key (the rightmost node, among the last blocks
   discovered), which leave the source as it was. *)
let scattered_values () =
  let st = Random.State.make [| 29 |] in
  let letter _ = Char.chr (97 + Random.State.int st 26) in
  let key _ = str (String.init (8 + Random.State.int st 12) letter) in
  let keys = Array.init 60_000 key in
  let map = Array.fold_left (fun m k -> SMap.add k (String.length k, k) m) SMap.empty keys in
  let set = Array.fold_left (fun s _ -> ISet.add (Random.State.bits st) s) ISet.empty keys in
  let table = Hashtbl.create 16 in
  Array.iteri (fun i k -> Hashtbl.replace table k (o (float_of_int i), [ k ])) keys;
  (keys, map, set, table)

let test_scattered _ =
  let keys, map, set, table = scattered_values () in
  let map_of f = Array.fold_left (fun m k -> SMap.add k (f k) m) SMap.empty keys in
  let kinds_map = map_of (fun k -> kinds (String.length k)) in
  let closures = map_of (fun k -> make_parity (o (String.length k mod 5))) in
  check_large "a Map of random strings" (prefix (), map);
  check_large "a Set of random ints" (prefix (), set);
  check_large "a Hashtbl of random strings" (prefix (), table);
  check_large "all of them, sharing keys" (map, set, table, keys);
  check_large "a Map to every kind" (prefix (), kinds_map);
  with_copy closures (fun h ->
      SMap.iter
        (fun k p ->
          let n = (String.length k mod 5) + 4 in
          assert_bool "even" (p.even n);
          assert_bool "not odd" (not (p.odd n)))
        (Offheap.get h));
  let a = counting_alloc (fresh_id ()) in
  let v = (map, set, table) in
  let m = Offheap.measure v in
  with_copy ~alloc:a v (fun h ->
      let c = counts a in
      assert_equal ~msg:"one alloc" ~printer:pint 1 c.allocs;
      assert_equal ~msg:"of the copy's size" ~printer:pint m.bytes c.last_size;
      assert_equal ~msg:"stats" ~printer:pint m.bytes (Offheap.stats h).bytes;
      assert_bool "a C allocator's copy, =" (Offheap.get h = v);
      assert_bool "Marshal bytes" (Marshal.to_string (Offheap.get h) [] = Marshal.to_string v []));
  assert_no_leak ~msg:"scattered, C allocator" a

let test_scattered_failures _ =
  let keys, map, _, _ = scattered_values () in
  let last, _ = SMap.max_binding map in
  let expected = Marshal.to_string map [] in
  let vm_before = status_kb "VmSize" in
  List.iter
    (fun (name, make, expected) ->
      let bad = SMap.add last (0, Obj.obj (make ())) map in
      let r = not_copyable (fun () -> Offheap.copy (prefix (), bad)) in
      assert_bool (name ^ ": " ^ Printexc.to_string (Offheap.Not_copyable r)) (expected r);
      let a = counting_alloc (fresh_id ()) in
      let r = not_copyable (fun () -> Offheap.copy ~alloc:a bad) in
      assert_bool (name ^ ", C allocator") (expected r);
      assert_equal ~msg:(name ^ ": nothing allocated") ~printer:pint 0 (counts a).allocs;
      Gc.compact ())
    [ ("abstract", abstract_block, ( = ) Offheap.Abstract);
      ("channel", (fun () -> Obj.repr stdout), ( = ) (Offheap.Custom "_chan"));
      ("unforced lazy", (fun () -> Obj.repr (lazy (o 1 + 1))), ( = ) Offheap.Unforced_lazy) ];
  assert_bool "VmSize: reservations unmapped" (status_kb "VmSize" < vm_before + (1 lsl 20));
  assert_bool "the source as it was" (Marshal.to_string map [] = expected);
  assert_equal ~printer:pint (Array.length keys) (SMap.cardinal map);
  check_large "after the failures" (prefix (), map)

(* {1 Allocators, handles, copies of copies} *)

let test_c_allocator _ =
  let a = counting_alloc (fresh_id ()) in
  let v = (prefix (), Array.init 8_000 kinds) in
  let m = Offheap.measure v in
  with_copy ~alloc:a v (fun h ->
      assert_bool "equal" (Offheap.get h = v);
      let c = counts a in
      assert_equal ~msg:"one alloc" ~printer:pint 1 c.allocs;
      assert_equal ~msg:"of the copy's size" ~printer:pint m.bytes c.last_size;
      assert_equal ~msg:"stats" ~printer:pint m.bytes (Offheap.stats h).bytes);
  assert_no_leak ~msg:"C allocator" a;
  (* the default allocator's own block, given explicitly, is the default *)
  with_copy ~alloc:Offheap.malloc v (fun h -> assert_bool "malloc" (Offheap.get h = v))

let test_handles _ =
  let v = (prefix (), Array.init 8_000 kinds) in
  let n =
    Offheap.with_copy v (fun c ->
        assert_bool "with_copy: off the heap" (Offheap.is_offheap c);
        Array.length (snd c) + if c = v then 1 else 0)
  in
  assert_equal ~printer:pint 8_001 n;
  (match Offheap.with_copy v (fun _ -> failwith "inside") with
  | _ -> assert_failure "with_copy returned"
  | exception Failure msg -> assert_equal "inside" msg);
  let h = Offheap.copy v in
  (Offheap.delete [@alert "-deprecated"]) h;
  assert_freed h;
  settle ();
  (* the reservation is trimmed to the copy, and freeing gives it all back *)
  let bytes = (Offheap.measure v).bytes in
  let vm_before = status_kb "VmSize" in
  let live = List.init 5 (fun _ -> Offheap.copy v) in
  let vm_live = status_kb "VmSize" in
  assert_bool
    (Printf.sprintf "5 live copies of %d kB: VmSize %d -> %d kB" (bytes / 1024) vm_before vm_live)
    (vm_live < vm_before + (5 * ((bytes / 1024) + 4096)) + (64 * 1024));
  List.iter Offheap.free live;
  settle ();
  let vm_after = status_kb "VmSize" in
  assert_bool
    (Printf.sprintf "after the frees: VmSize %d -> %d kB" vm_before vm_after)
    (vm_after < vm_before + (64 * 1024))

(* A large value holding another copy: the copy is shared, not copied again. *)
let copy_around inner =
  let v = (Offheap.get inner, Array.init 300_000 (fun i -> (i, str "x"))) in
  let h = Offheap.copy v in
  let shared = fst (Offheap.get h) == Offheap.get inner in
  let equal = snd (Offheap.get h) = snd v in
  let bytes = (Offheap.stats h).bytes in
  Offheap.free h;
  assert_bool "the inner copy shared" shared;
  assert_bool "equal" equal;
  bytes

let test_copy_of_copy _ =
  let inner = Offheap.copy (strings ()) in
  let bytes = copy_around inner in
  let own = Offheap.measure (Array.init 300_000 (fun i -> (i, str "x"))) in
  assert_equal ~msg:"only the outer part copied" ~printer:pint (own.bytes + (3 * 8)) bytes;
  Offheap.free inner;
  settle ()

(* {1 Limits on address space and data, in a child process} *)

let prlimit resource value =
  let cmd = Printf.sprintf "prlimit --pid %d --%s=%s" (Unix.getpid ()) resource value in
  if Sys.command cmd <> 0 then failwith cmd

(* Started under [ulimit -S -v] of 8 GiB: the 64 GiB reservation cannot be had, the copy
   is made in two passes. Then, under limits on data around the copy's size: each copy
   succeeds or raises Out_of_memory, the source stays intact, and once the limit is
   lifted the copy succeeds. Prints what it saw; exits 0 when all held. *)
let limits_child () =
  let v = (prefix (), Array.init 300_000 (fun i -> [ i; i + 1 ])) in
  let check what =
    let pre, lists = v in
    if pre <> String.make (mb 5) 'p' then failwith (what ^ ": source changed");
    Array.iteri (fun i l -> if l <> [ i; i + 1 ] then failwith (what ^ ": source changed")) lists
  in
  let copy_ok what =
    let h = Offheap.copy v in
    let ok = Offheap.get h = v && (Offheap.stats h).bytes = (Offheap.measure v).bytes in
    Offheap.free h;
    if not ok then failwith (what ^ ": copy differs")
  in
  copy_ok "under ulimit -v";
  prlimit "as" "unlimited:unlimited";
  let bytes = (Offheap.measure v).bytes in
  let oom = ref 0 in
  List.iter
    (fun extra ->
      let limit = (status_kb "VmData" * 1024) + extra in
      prlimit "data" (Printf.sprintf "%d:unlimited" limit);
      (match copy_ok "under a data limit" with () -> () | exception Out_of_memory -> incr oom);
      prlimit "data" "unlimited:unlimited";
      check "after a copy under a data limit")
    [ bytes / 2; bytes; bytes * 2; bytes * 3 ];
  copy_ok "limit lifted";
  settle ();
  Printf.printf "limits: %d Out_of_memory of 4\n%!" !oom;
  exit 0

let test_limits _ =
  let status, output =
    Probes.run_self ~shell:(Printf.sprintf "ulimit -S -v %d &&" (8 lsl 20)) [ "limits-child" ]
  in
  assert_equal ~msg:("the child: " ^ output) ~printer:pint 0 status;
  assert_bool ("the child: " ^ output) (contains output "limits: ")

let () =
  if Array.length Sys.argv > 1 && Sys.argv.(1) = "limits-child" then limits_child ();
  run_test_tt_main
    ("copies written by pass 1"
    >::: [
           "every kind of block after 4 MiB" >:: test_kinds;
           "single blocks beyond 4 MiB, a block across it" >:: test_giant_blocks;
           "closures, infix pointers, partial applications, objects" >:: test_closures;
           "Marshal with closures" >:: test_closures_marshal;
           "sharing and cycles" >:: test_sharing_cycles;
           "failures after pass 1 began writing" >:: test_failures;
           "scattered maps, sets and tables, by batches" >:: test_scattered;
           "failures met by batches" >:: test_scattered_failures;
           "a C allocator: one alloc of the exact size" >:: test_c_allocator;
           "with_copy, delete" >:: test_handles;
           "a copy holding another copy" >:: test_copy_of_copy;
           "limits on address space and data" >:: test_limits;
         ])
