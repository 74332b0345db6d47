(* Copies freed in loops, with released memory kept unreadable: a free that let the GC
   read a copy after handing its memory back faults at once. Loaded images, large
   copies and regions growing by 2 MiB chunks (the mappings of the default allocator).

   Needs the library built with the cargo feature fault-injection and
   OFFHEAP_POISON_RELEASED set (make test-faults; src/fault.rs): a released mapping's
   range then stays reserved and unreadable instead of being unmapped. Without it, the
   next copy usually takes the same range back, and a read that came too late finds a
   copy there: the bug stays hidden (it showed as a rare crash of the OCaml 5 bytecode
   marker). Major cycles end during the loops (the frees past the limit of waiting
   bytes pay for them), in native code and in bytecode, on OCaml 4 and 5.

   The values written stay in functions that return before their region is freed (the
   rules of Region.free): bytecode keeps a function's locals on its stack until it
   returns, and the GC reads what they point to. *)

open OUnit2
module R = Offheap.Region

let pairs n = List.init n (fun i -> (string_of_int i, i))

let temp () = Filename.temp_file "offheap_released" ".img"

let with_file f =
  let p = temp () in
  Fun.protect ~finally:(fun () -> if Sys.file_exists p then Sys.remove p) (fun () -> f p)

(* A region image of [pairs n] under the root "m", written from a region that the
   function frees after the one holding the added value has returned. *)
let write_region_image p n =
  let r = R.create () in
  (fun () ->
    let m = R.add r (pairs n) in
    R.write_image ~key:"released" p r [ ("m", Obj.repr m) ])
    ();
  R.free r

(* Garbage that makes the major GC advance between frees. *)
let churn () = ignore (Sys.opaque_identity (Array.init 2000 (fun i -> Some i)))

let check n (m : (string * int) list) =
  assert_equal ~printer:string_of_int n (List.length m);
  assert_equal ~msg:"the last pair" (string_of_int (n - 1), n - 1) (List.nth m (n - 1))

let test_region_body _ =
  with_file (fun p ->
      write_region_image p 3000;
      for _ = 1 to 300 do
        let r, roots = R.load_image ~key:"released" p in
        let m : (string * int) list = Obj.obj (List.assoc "m" roots) in
        check 3000 m;
        churn ();
        R.free r
      done)

let test_region_function _ =
  with_file (fun p ->
      write_region_image p 3000;
      let load () =
        let r, roots = R.load_image ~key:"released" p in
        let m : (string * int) list = Obj.obj (List.assoc "m" roots) in
        check 3000 m;
        r
      in
      for _ = 1 to 300 do
        let r = load () in
        churn ();
        R.free r
      done)

let test_handles _ =
  with_file (fun p ->
      Offheap.Image.write p (pairs 3000);
      for i = 1 to 300 do
        let h = Offheap.Image.load ~share:(i mod 2 = 0) p in
        let m = Offheap.get h in
        check 3000 m;
        (* A heap array of pointers into the image, as in [test_large_copies]. *)
        let pointers = Array.of_list m in
        assert_equal ~msg:"the first pair" ("0", 0) pointers.(0);
        churn ();
        Offheap.free h
      done)

(* Payloads of some megabytes freed faster than cycles end: frees past the limit of
   waiting bytes pay for major GC work themselves, some of them a whole cycle (a free
   that pays keeps its own payload one cycle more). *)
let test_paying_frees _ =
  with_file (fun p ->
      write_region_image p 100_000;
      for _ = 1 to 60 do
        let r, roots = R.load_image ~key:"released" p in
        check 100_000 (Obj.obj (List.assoc "m" roots));
        R.free r
      done)

(* Copies of some megabytes (the default allocator maps them, from 4 MiB on). Each
   round also makes a heap array of pointers into its copy, dead at the free: a cycle
   that began while it lived marks its fields after the free, a slice at a time, and
   reads the copy's headers through them until the cycle ends. *)
let records n = Array.init n (fun i -> (i, string_of_int i, float_of_int i))

let test_large_copies _ =
  let v = records 100_000 in
  for _ = 1 to 100 do
    let h = Offheap.copy v in
    let c = Offheap.get h in
    assert_bool "a mapped copy" ((Offheap.stats h).bytes >= 4 lsl 20);
    let pointers = Array.map Fun.id c in
    assert_equal ~msg:"the last record" v.(99_999) pointers.(99_999);
    churn ();
    Offheap.free h
  done

(* Regions grown past their first chunk (chunks of 2 MiB, mapped), read and freed. *)
let test_growing_regions _ =
  for _ = 1 to 40 do
    let r = R.create () in
    let parts = List.init 8 (fun _ -> R.add r (pairs 20_000)) in
    assert_bool "several chunks" ((R.stats r).chunks > 2);
    List.iter (check 20_000) parts;
    churn ();
    R.free r
  done

let () =
  run_test_tt_main
    ("released payloads"
    >::: [
           "region images read in the loop's body, freed last" >:: test_region_body;
           "region images read in a function" >:: test_region_function;
           "image handles read and freed in a loop" >:: test_handles;
           "large images freed faster than cycles end" >:: test_paying_frees;
           "large copies read and freed in a loop" >:: test_large_copies;
           "growing regions read and freed in a loop" >:: test_growing_regions;
         ])
