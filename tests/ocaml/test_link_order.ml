(* offheap linked before threads.posix: the order dune gives [(libraries offheap
   threads.posix)], the natural way to write it. offheap sets up its runtime hooks when
   its module initialises; the Thread module initialises later and installs hooks of
   its own. Copies must keep working, in native code and in bytecode, also after
   minor and major collections and from threads. (test_offheap links threads.posix
   first.) *)

open OUnit2

let value () = List.init 1000 (fun i -> (i, string_of_int i))

let copy_and_check v =
  let h = Offheap.copy v in
  assert_equal v (Offheap.get h);
  Offheap.free h

let test_copies_after_gc _ =
  let v = value () in
  for _ = 1 to 50 do
    copy_and_check v;
    ignore (Sys.opaque_identity (List.init 10_000 Fun.id))
  done;
  Gc.full_major ();
  copy_and_check v

let test_copies_in_threads _ =
  let v = value () in
  let results = Array.make 4 "did not finish" in
  let threads =
    List.init 4 (fun i ->
        Thread.create
          (fun () ->
            try
              for _ = 1 to 20 do
                copy_and_check v;
                Thread.yield ()
              done;
              results.(i) <- "ok"
            with e -> results.(i) <- Printexc.to_string e)
          ())
  in
  List.iter Thread.join threads;
  Array.iteri
    (fun i r -> assert_equal ~msg:(Printf.sprintf "thread %d" i) ~printer:Fun.id "ok" r)
    results

let () =
  run_test_tt_main
    ("offheap linked before threads.posix"
    >::: [
           "copies after minor and major GCs" >:: test_copies_after_gc;
           "copies from 4 threads" >:: test_copies_in_threads;
         ])
