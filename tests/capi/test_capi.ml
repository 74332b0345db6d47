(* The C interface's failure paths (offheap.h): with offheap_copy_with_free, no failure
   leaves memory with the caller; with offheap_copy, only misaligned memory does. *)

open OUnit2
open Capi_support

let o = Sys.opaque_identity

let value () = o (List.init 100 (fun i -> (i, string_of_int i)))

(* The values copied by each path of the traversal: the general one and its walk (a
   list), and the shallow path (a raw root; a record whose fields lead to raw blocks). *)
let values () =
  [ ("a list", Obj.repr (value ())); ("a string", Obj.repr (o (String.make 20 's')));
    ( "a record of raw blocks",
      Obj.repr
        (o (String.make 3 'a', 1, float (o 2), Int64.of_int (o 7), Array.make 2 (float (o 1))))
    ) ]

let check ~msg expected got =
  let p o =
    Printf.sprintf "{copied=%b; allocs=%d; frees=%d; bad_frees=%d; returned=%b; left=%b}"
      o.copied o.allocs o.frees o.bad_frees o.returned_allocation o.left_with_caller
  in
  assert_equal ~msg ~printer:p expected got

let outcome ?(copied = false) ?(allocs = 0) ?(frees = 0) ?(returned = false) ?(left = false) () =
  { copied; allocs; frees; bad_frees = 0; returned_allocation = returned; left_with_caller = left }

let test_success _ =
  List.iter
    (fun (what, v) ->
      List.iter
        (fun with_free ->
          check ~msg:(what ^ ": a copy: one alloc, returned, never freed")
            (outcome ~copied:true ~allocs:1 ~returned:true ())
            (copy ~with_free Good v))
        [ true; false ])
    (values ())

let test_nothing_to_copy _ =
  List.iter
    (fun with_free ->
      check ~msg:"an immediate: no alloc" (outcome ()) (copy ~with_free Good 42))
    [ true; false ]

let test_refused_value _ =
  let unforced = lazy (print_endline "never") in
  let abstract = Obj.new_block Obj.abstract_tag 2 in
  List.iter
    (fun with_free ->
      check ~msg:"unforced lazy: no alloc" (outcome ()) (copy ~with_free Good (o [ unforced ]));
      check ~msg:"abstract block: no alloc" (outcome ())
        (copy ~with_free Good (o (1, abstract))))
    [ true; false ]

let test_null _ =
  List.iter
    (fun (what, v) ->
      List.iter
        (fun with_free ->
          check ~msg:(what ^ ": NULL: one alloc, nothing to free") (outcome ~allocs:1 ())
            (copy ~with_free Null_result v))
        [ true; false ])
    (values ())

let test_misaligned _ =
  List.iter
    (fun (what, v) ->
      check ~msg:(what ^ ": misaligned, with a free function: freed at once")
        (outcome ~allocs:1 ~frees:1 ())
        (copy ~with_free:true Misaligned v);
      check ~msg:(what ^ ": misaligned, without: left with the caller (documented)")
        (outcome ~allocs:1 ~left:true ())
        (copy ~with_free:false Misaligned v))
    (values ())

(* Buffers of offheap_copy registered with offheap_register, each between two copies of
   2.5-4 KB made by offheap (from malloc, like the buffers: a 4 KiB page holds the end of
   one and the start of the next). Freeing the copies after them leaves the buffers'
   pages registered, and unregistering and freeing the buffers leaves the pages of the
   copies before them registered (OCaml 4; on OCaml 5 nothing is registered and the same
   holds). *)
let test_registered_beside_copies _ =
  let n = 200 in
  let fresh i = (i, string_of_int i, [ float i ]) in
  let big i = o (Array.init (300 + (i mod 200)) (fun k -> k + i)) in
  (* The buffers' values are kept in [values] alone, cleared before the buffers are
     freed: on OCaml 5 nothing may point into freed memory. *)
  let values = Array.make n (Obj.repr 0) and buffers = Array.make n (0n, 0) in
  let copies =
    Array.init n (fun i ->
        let before = Offheap.copy (big i) in
        let c, address, size = registered_copy (o (fresh i)) in
        values.(i) <- Obj.repr c;
        buffers.(i) <- (address, size);
        let after = Offheap.copy (big (i + 1)) in
        (before, after))
  in
  let same ~msg a b =
    assert_bool (msg ^ ": compare") (compare a b = 0);
    assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash a) (Hashtbl.hash b);
    assert_equal ~msg:(msg ^ ": Marshal") (Marshal.to_string a []) (Marshal.to_string b [])
  in
  Array.iter (fun (_, after) -> Offheap.free after) copies;
  Array.iteri (fun i c -> same ~msg:"a buffer" (Obj.obj c) (fresh i)) values;
  Array.fill values 0 n (Obj.repr 0);
  Array.iter (fun (address, size) -> release address size) buffers;
  Array.iteri (fun i (before, _) -> same ~msg:"a copy" (Offheap.get before) (big i)) copies;
  Array.iter (fun (before, _) -> Offheap.free before) copies

(* An empty buffer registers nothing: offheap_copy's { NULL, 0 } (nothing copied)
   registered as any buffer of it took the pages from 0 to the end of the address space
   (the page table grew until the memory ran out), and a buffer of no bytes inside a
   page registered that page. *)
let test_register_empty _ =
  let first, second, during, after = register_empty 42 in
  assert_equal ~msg:"offheap_register(NULL, 0)" ~printer:string_of_int 1 first;
  assert_equal ~msg:"offheap_register(p, 0)" ~printer:string_of_int 1 second;
  assert_equal ~msg:"the page of p registered" ~printer:string_of_int 0 during;
  assert_equal ~msg:"the page of p after offheap_unregister" ~printer:string_of_int 0 after

let () =
  run_test_tt_main
    ("offheap C interface"
    >::: [
           "success" >:: test_success;
           "nothing to copy" >:: test_nothing_to_copy;
           "value refused" >:: test_refused_value;
           "allocator returns NULL" >:: test_null;
           "misaligned memory" >:: test_misaligned;
           "registered beside copies" >:: test_registered_beside_copies;
           "empty buffers register nothing" >:: test_register_empty;
         ])
