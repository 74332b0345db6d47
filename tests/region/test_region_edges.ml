(* Regions at their edges, from what users do: chunk sizes from 1 byte to 2^62 (the
   small ones raised to the minimum, the impossible ones Out_of_memory with the region
   unchanged and usable), region images with no roots, immediate roots, empty arrays and
   strings as roots (blocks of no fields, which can end the payload), loaded twice at
   once (the second load relocated), added to and written over the file the first load
   maps, and a C allocator for the chunks added after a load (its NULL leaving the
   loaded region as it was). Native and bytecode, OCaml 4 and 5. *)

open OUnit2
open Region_support
module R = Offheap.Region

let pint = string_of_int

(* A fresh heap string: never static data. *)
let str s = Bytes.to_string (Bytes.of_string s)

let temp () = Filename.temp_file "offheap_region_edges" ".img"

let with_file f =
  let p = temp () in
  Fun.protect ~finally:(fun () -> if Sys.file_exists p then Sys.remove p) (fun () -> f p)

(* The values of a region are used in functions that return before it is freed (the
   rules of Region.free; bytecode keeps locals until the function returns). *)
let using r f = f r

(* [f r roots] on the region loaded from [p], freed once [f] has returned: the roots
   live in [f]'s frame only. *)
let with_loaded ?key ?share ?alloc ?chunk_bytes p f =
  let r =
    (fun () ->
      let r, roots = R.load_image ?key ?share ?alloc ?chunk_bytes p in
      f r roots;
      r)
      ()
  in
  R.free r

let test_chunk_sizes _ =
  List.iter
    (fun chunk_bytes ->
      let r = R.create ~chunk_bytes () in
      using r (fun r ->
          for i = 1 to 300 do
            let x = R.add r (i, str (string_of_int i)) in
            assert_equal ~msg:"added" (i, string_of_int i) x
          done;
          let big = R.add r (Array.init 10_000 (fun i -> str (string_of_int i))) in
          assert_equal ~msg:"a large add" "9999" big.(9999);
          let s = R.stats r in
          assert_bool "chunks of at least 4 KiB" (s.reserved >= 4096 * (s.chunks - 1));
          assert_equal ~msg:"values" ~printer:pint 301 s.values);
      R.free r)
    [ 1; 8; 4095; 4096; 4097 ];
  List.iter
    (fun chunk_bytes ->
      let r = R.create ~chunk_bytes () in
      (* Rounded up to a word (these are whole words but max_int), never past the
         largest int (max_int was reported as a negative size, found by testing). *)
      assert_equal ~msg:"chunk_bytes reported" ~printer:pint
        (min chunk_bytes (max_int land lnot 7))
        (R.chunk_bytes r);
      using r (fun r ->
          let before = R.stats r in
          (match R.add r (Array.init 1000 (fun i -> str (string_of_int i))) with
          | _ -> assert_failure (Printf.sprintf "chunk_bytes %d: a chunk was allocated" chunk_bytes)
          | exception Out_of_memory -> ());
          assert_equal ~msg:"unchanged by the failed add" before (R.stats r);
          (* An add of its own chunk (larger than a 32nd of the next one) cannot be
             made either; an immediate needs no chunk. *)
          assert_equal ~msg:"an immediate" 3 (R.add r 3));
      R.free r)
    [ 1 lsl 50; 1 lsl 61; max_int - 4095; max_int ]

let test_roots_of_no_fields _ =
  with_file (fun p ->
      let r = R.create () in
      R.write_image ~key:"none" p r [];
      R.free r;
      with_loaded ~key:"none" p (fun r roots ->
          assert_equal ~msg:"no roots" 0 (List.length roots);
          let l = R.add r (List.init 3 (fun i -> str (string_of_int i))) in
          assert_equal ~msg:"added to an empty image" [ "0"; "1"; "2" ] l;
          assert_bool "in the region" (R.mem r l));
      let r = R.create () in
      using r (fun r ->
          let s = R.add r (str "abc") in
          R.write_image ~key:"atoms" p r
            [
              ("int", Obj.repr 7);
              ("s", Obj.repr s);
              ("empty", Obj.repr [||]);
              ("", Obj.repr "");
              ("floats", Obj.repr (Float.Array.create 0));
              ("int", Obj.repr 8);
            ]);
      R.free r;
      List.iter
        (fun share ->
          with_loaded ~key:"atoms" ~share p (fun r roots ->
              assert_equal ~msg:"names, in order" [ "int"; "s"; "empty"; ""; "floats"; "int" ]
                (List.map fst roots);
              assert_equal ~msg:"the first of two names" 7 (Obj.obj (List.assoc "int" roots));
              let empty : int array = Obj.obj (List.assoc "empty" roots) in
              assert_bool "blocks of no fields are in the region"
                (R.mem r empty && R.mem r (List.assoc "" roots) && R.mem r (List.assoc "s" roots));
              assert_bool "compare, hash" (empty = [||] && Hashtbl.hash empty = Hashtbl.hash [||]);
              assert_equal ~msg:"Marshal" [||] (Marshal.from_string (Marshal.to_string empty []) 0);
              let a, b = R.add r (empty, [ empty; empty ]) in
              assert_bool "pointed to, not copied" (a == empty && List.hd b == empty)))
        [ false; true ])

let index n = Array.init n (fun i -> (str (string_of_int i), List.init (i mod 5) Fun.id))

let test_loaded_twice _ =
  with_file (fun p ->
      let r = R.create ~chunk_bytes:4096 () in
      using r (fun r ->
          let v = R.add r (index 500) in
          R.write_image ~key:"twice" p r [ ("v", Obj.repr v) ]);
      R.free r;
      with_loaded ~key:"twice" ~share:true p (fun r1 roots1 ->
          with_loaded ~key:"twice" p (fun r2 roots2 ->
              let v1 : (string * int list) array = Obj.obj (List.assoc "v" roots1) in
              let v2 : (string * int list) array = Obj.obj (List.assoc "v" roots2) in
              assert_bool "equal" (v1 = v2 && v1 = index 500);
              assert_bool "apart" (v1 != v2 && R.mem r1 v1 && R.mem r2 v2);
              assert_bool "each in its own region" ((not (R.mem r1 v2)) && not (R.mem r2 v1));
              (* The second load, relocated, added to and written over the file the first
                 one maps (a rename: the mapping keeps the old file). *)
              let more = R.add r2 (Array.append v1 [| (str "new", [ 9 ]) |]) in
              assert_bool "the first load's blocks pointed to" (more.(0) == v1.(0));
              R.write_image ~key:"twice" p r2 [ ("v", Obj.repr more) ];
              assert_bool "the first load unchanged" (v1 = index 500)));
      with_loaded ~key:"twice" p (fun r3 roots3 ->
          let v3 : (string * int list) array = Obj.obj (List.assoc "v" roots3) in
          assert_equal ~msg:"written again" ~printer:pint 501 (Array.length v3);
          assert_bool "contents" (Array.sub v3 0 500 = index 500 && v3.(500) = ("new", [ 9 ]));
          let s = R.stats r3 in
          assert_equal ~msg:"one chunk: the payload" ~printer:pint 1 s.chunks))

let test_loaded_with_allocator _ =
  with_file (fun p ->
      let r = R.create () in
      using r (fun r -> R.write_image ~key:"alloc" p r [ ("v", Obj.repr (R.add r (index 100))) ]);
      R.free r;
      let a = budget_alloc 1 in
      with_loaded ~key:"alloc" ~alloc:a ~chunk_bytes:8192 p (fun r roots ->
          let v : (string * int list) array = Obj.obj (List.assoc "v" roots) in
          let x = R.add r (v.(3), str "one chunk") in
          assert_bool "added" (fst x == v.(3) && snd x = "one chunk");
          let before = R.stats r in
          (match R.add r (Array.init 5000 (fun i -> str (string_of_int i))) with
          | _ -> assert_failure "the allocator's NULL"
          | exception Out_of_memory -> ());
          assert_equal ~msg:"unchanged by the failed add" before (R.stats r);
          assert_equal ~msg:"the allocator holds the one chunk" ~printer:pint 8192
            (counts a).outstanding;
          assert_bool "loaded values intact" (v = index 100));
      Probes.settle ();
      let c = counts a in
      assert_equal ~msg:"everything given back" ~printer:pint 0 c.outstanding;
      assert_equal ~msg:"no bad frees" ~printer:pint 0 c.bad_frees)

(* The loop of the example of [load_image]: load, read the roots in a function that
   returns before the free, free; and the same with the roots read in the loop's own
   body, the free last (bytecode drops a loop body's locals when the body ends). The
   image is written by a function that returns before its region is freed: this test
   once held the added value in its own frame, where bytecode keeps it for the whole
   loop, and the marker of OCaml 5 bytecode read the freed region through it now and
   then (tests/faults/test_released makes such reads fault at once). *)
let test_free_in_loop _ =
  with_file (fun path ->
      let r = R.create () in
      using r (fun r ->
          let m = R.add r (List.init 3000 (fun i -> (str (pint i), i))) in
          R.write_image ~key:"loop" path r [ ("m", Obj.repr m) ]);
      R.free r;
      let load () =
        let r, roots = R.load_image ~key:"loop" path in
        let m : (string * int) list = Obj.obj (List.assoc "m" roots) in
        (r, List.length m)
      in
      for _ = 1 to 300 do
        let r, n = load () in
        assert_equal ~printer:pint 3000 n;
        R.free r
      done;
      for _ = 1 to 300 do
        let r, roots = R.load_image ~key:"loop" path in
        let m : (string * int) list = Obj.obj (List.assoc "m" roots) in
        assert_equal ~printer:pint 3000 (List.length m);
        R.free r
      done)

let () =
  run_test_tt_main
    ("region edges"
    >::: [
           "chunk sizes from 1 byte to max_int" >:: test_chunk_sizes;
           "region images of no roots and of blocks of no fields" >:: test_roots_of_no_fields;
           "one region image loaded twice at once" >:: test_loaded_twice;
           "a loaded region growing with a C allocator" >:: test_loaded_with_allocator;
           "loads freed in a loop" >:: test_free_in_loop;
         ]);
  Probes.settle ()
