(* The C interface's failure paths (offheap.h): with offheap_copy_with_free, no failure
   leaves memory with the caller; with offheap_copy, only misaligned memory does. *)

open OUnit2
open Capi_support

let o = Sys.opaque_identity

let value () = o (List.init 100 (fun i -> (i, string_of_int i)))

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
    (fun with_free ->
      check ~msg:"a copy: one alloc, returned, never freed"
        (outcome ~copied:true ~allocs:1 ~returned:true ())
        (copy ~with_free Good (value ())))
    [ true; false ]

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
    (fun with_free ->
      check ~msg:"NULL: one alloc, nothing to free" (outcome ~allocs:1 ())
        (copy ~with_free Null_result (value ())))
    [ true; false ]

let test_misaligned _ =
  check ~msg:"misaligned, with a free function: freed at once"
    (outcome ~allocs:1 ~frees:1 ())
    (copy ~with_free:true Misaligned (value ()));
  check ~msg:"misaligned, without: left with the caller (documented)"
    (outcome ~allocs:1 ~left:true ())
    (copy ~with_free:false Misaligned (value ()))

let () =
  run_test_tt_main
    ("offheap C interface"
    >::: [
           "success" >:: test_success;
           "nothing to copy" >:: test_nothing_to_copy;
           "value refused" >:: test_refused_value;
           "allocator returns NULL" >:: test_null;
           "misaligned memory" >:: test_misaligned;
         ])
