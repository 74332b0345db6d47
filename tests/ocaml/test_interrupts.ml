(* Interruptions: a signal handler that raises, firing every millisecond during large
   copies and frees, and threads freeing one handle at once. Nothing may be lost: every
   allocation made for a copy is owned by a handle, and every handle is freed once. *)

open OUnit2
open Support

exception Timeout

(* Whether the SIGALRM handler raises: only inside the operations under test, so that
   the test's own loop and cleanup are never interrupted. *)
let armed = ref false

(* [f ()] with a SIGALRM handler that raises [Timeout], while [armed], every [period]
   seconds. *)
let with_alarm ~period f =
  let timer v = ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = v; it_value = v }) in
  let old = Sys.signal Sys.sigalrm (Sys.Signal_handle (fun _ -> if !armed then raise Timeout)) in
  timer period;
  Fun.protect
    ~finally:(fun () ->
      armed := false;
      timer 0.;
      (* A tick sent just before the timer stopped can still be pending at the process,
         for another thread to take later (the main thread blocks SIGALRM while its
         handler runs): ignoring the signal discards it before [old] (the default:
         termination) is back. *)
      Sys.set_signal Sys.sigalrm Sys.Signal_ignore;
      Sys.set_signal Sys.sigalrm old)
    f

let big_list n = List.init n (fun i -> (i, o "x"))

(* Copies and frees of a large value while the alarm fires: each handle is stored in a
   slot of an array made beforehand, which allocates nothing, so an exception between [copy] and the
   store can only come from inside the library. Afterwards every slot still live is
   freed: the allocator must have nothing outstanding, and the process's memory is back
   where it was. *)
let test_alarm_copy_free _ =
  let v = big_list 300_000 in
  let id = fresh_id () in
  let a = counting_alloc id in
  let rounds = 30 in
  let freed = Offheap.copy ~alloc:a [] in
  Offheap.free freed;
  let slots = Array.make rounds freed in
  let interrupted = ref 0 in
  let loop rounds =
    with_alarm ~period:0.001 (fun () ->
        for i = 0 to rounds - 1 do
          try
            armed := true;
            slots.(i) <- Offheap.copy ~alloc:a v;
            Offheap.free slots.(i);
            (* An allocation: native code on OCaml 4 runs signal handlers only there, so
               the alarm also raises in rounds where no point of the library did. *)
            ignore (Sys.opaque_identity (Array.make 8 i));
            armed := false
          with Timeout ->
            armed := false;
            incr interrupted
        done);
    Array.iter (fun h -> try Offheap.free h with Invalid_argument _ -> ()) slots;
    settle ()
  in
  (* A first loop: the memory the allocators and the runtime keep after first use (the
     traversal's queue comes from malloc, which keeps freed memory for reuse). *)
  loop 10;
  let heap () = (Gc.quick_stat ()).Gc.heap_words * (Sys.word_size / 8) in
  let before = rss () - heap () in
  loop rounds;
  assert_bool "the alarm interrupted some rounds" (!interrupted > 0);
  assert_no_leak ~msg:"after interrupted copies and frees" a;
  (* Resident memory outside the OCaml heap; a copy is 14 MB. *)
  let after = rss () - heap () in
  assert_bool
    (Printf.sprintf "resident memory grew by %d KiB" ((after - before) / 1024))
    (after - before < 8 lsl 20);
  (* The source is intact. *)
  assert_equal ~printer:pint 300_000 (List.length v);
  List.iteri (fun i (j, s) -> assert (i = j && s = "x")) v

(* [get] on a handle freed by another thread raises; [free] succeeds once. *)
let test_threads_free_once _ =
  let id = fresh_id () in
  let a = counting_alloc id in
  let rounds = if native then 200 else 50 and threads = 4 in
  for _ = 1 to rounds do
    let h = Offheap.copy ~alloc:a (o [ 1; 2; 3 ], o "abc") in
    let wins = Atomic.make 0 and losses = Atomic.make 0 in
    let go = Atomic.make false in
    let worker () =
      while not (Atomic.get go) do
        Thread.yield ()
      done;
      (match Offheap.get h with
      | l, s -> assert (List.length l = 3 && String.length s = 3)
      | exception Invalid_argument _ -> ());
      match Offheap.free h with
      | () -> Atomic.incr wins
      | exception Invalid_argument _ -> Atomic.incr losses
    in
    let ts = List.init threads (fun _ -> Thread.create worker ()) in
    Atomic.set go true;
    List.iter Thread.join ts;
    assert_equal ~msg:"frees that succeeded" ~printer:pint 1 (Atomic.get wins);
    assert_equal ~msg:"frees that raised" ~printer:pint (threads - 1) (Atomic.get losses)
  done;
  assert_no_leak ~msg:"threads freeing one handle" a

(* [with_copy] frees its copy whatever a signal handler raises once [f] has returned
   or raised: a signal that came during [f] (a timeout while [f] reads the copy without
   allocating) is handled at the first poll point after it, and with_copy must not call
   a function (whose entry polls, in native code and in bytecode) before freeing. The
   handler sends itself a second signal: bytecode handles the first at the end of
   with_copy's [try], inside it, and the second at the next poll, which must not come
   before the free of the exception's path either. *)
exception Pending

let test_with_copy_pending_signal _ =
  let id = fresh_id () in
  let a = counting_alloc id in
  let armed = ref false and calls = ref 0 and raised = ref 0 in
  let handler _ =
    if !armed then (
      incr calls;
      if !calls = 1 then pend_sigusr1 ();
      raise Pending)
  in
  let old = Sys.signal Sys.sigusr1 (Sys.Signal_handle handler) in
  let v = big_list 1000 in
  let round f =
    calls := 0;
    armed := true;
    (match Offheap.with_copy ~alloc:a v f with
    | n -> assert_equal ~printer:pint 1000 n
    | exception Pending -> incr raised);
    armed := false
  in
  Fun.protect
    ~finally:(fun () -> Sys.set_signal Sys.sigusr1 old)
    (fun () ->
      for _ = 1 to 10 do
        (* [f] returns with a signal pending *)
        round (fun c ->
            pend_sigusr1 ();
            List.length c);
        (* [f] raises with a signal pending *)
        round (fun _ ->
            pend_sigusr1 ();
            raise Pending)
      done);
  assert_bool "the handler raised" (!raised >= 10);
  assert_no_leak ~msg:"with_copy interrupted after f" a

let () =
  run_test_tt_main
    ("interrupts"
    >::: [
           "SIGALRM raising during copies and frees" >:: test_alarm_copy_free;
           "threads freeing one handle" >:: test_threads_free_once;
           "with_copy frees when a pending signal raises after f"
           >:: test_with_copy_pending_signal;
         ])
