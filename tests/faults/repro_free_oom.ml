(* Reproducer of an open bug (not run by `dune build @runtest`; see the commit that adds
   it): Offheap.free of a copy whose free waits (OCaml 5 always, OCaml 4 while the major
   GC marks) roots its allocator block with caml_register_generational_global_root
   (src/release.rs, Rooted::new) while holding the release queue's lock. When malloc
   fails there, the runtime raises Out_of_memory from inside the Rust stub: the
   exception crosses Rust frames, the lock is never released (the next free or drain
   that takes it hangs), the handle is already freed although free raised (the copy
   leaks). One step earlier, Box::new of the root's cell aborts the process.

   For k = 0, 1, ...: a child process arms malloc to fail from its k-th call on, frees a
   loaded image's handle (its allocator block is not the default one, so it is rooted),
   disarms, then frees another copy and runs a full major GC under a 5 s watchdog.
   Expected: every child exits 0, its free either done or Out_of_memory with the handle
   still live. Observed (4.13 and 5.3): k = 0 aborts ("memory allocation of 8 bytes
   failed"), k = 1 raises Out_of_memory with the handle freed, then hangs. Exits 1 when
   a child fails. *)

external arm : int -> unit = "fm_arm" [@@noalloc]
external disarm : unit -> int = "fm_disarm" [@@noalloc]

let child path k =
  ignore (Unix.alarm 5);
  (* Warm up: the queue has room, the thread's thread-locals exist. *)
  let w = Offheap.Image.load path in
  Gc.full_major ();
  ignore (Gc.major_slice 1);
  Offheap.free w;
  Gc.full_major ();
  let h = Offheap.Image.load path in
  Gc.full_major ();
  (* OCaml 4: the free waits only while the major GC marks. *)
  ignore (Gc.major_slice 1);
  arm k;
  let result = match Offheap.free h with () -> `Freed | exception Out_of_memory -> `Oom in
  ignore (disarm ());
  let live = match Offheap.get h with _ -> true | exception Invalid_argument _ -> false in
  let bad = result = `Oom && not live in
  if bad then Printf.printf "k=%d: free raised Out_of_memory but the handle is freed\n%!" k;
  if result = `Oom && live then Offheap.free h;
  let h2 = Offheap.copy (Array.make 300 "x") in
  Gc.full_major ();
  ignore (Gc.major_slice 1);
  Offheap.free h2;
  Gc.full_major ();
  exit (if bad then 3 else 0)

let () =
  let path = Filename.temp_file "offheap_repro" ".img" in
  Offheap.Image.write path (Array.init 100 string_of_int);
  let failed = ref false in
  for k = 0 to 6 do
    match Unix.fork () with
    | 0 -> child path k
    | pid -> (
        match Unix.waitpid [] pid with
        | _, Unix.WEXITED 0 -> Printf.printf "k=%d: ok\n%!" k
        | _, Unix.WEXITED c ->
            failed := true;
            Printf.printf "k=%d: exit %d\n%!" k c
        | _, (Unix.WSIGNALED s | Unix.WSTOPPED s) ->
            failed := true;
            Printf.printf "k=%d: %s\n%!" k
              (if s = Sys.sigalrm then "hung (watchdog)"
               else if s = Sys.sigabrt then "aborted"
               else "killed by signal " ^ string_of_int s))
  done;
  Sys.remove path;
  exit (if !failed then 1 else 0)
