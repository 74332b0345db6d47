(* Frees that wait (OCaml 5 always, OCaml 4 while the major GC marks) keep the allocator
   block alive with a root while the copy waits (src/release.rs, Rooted): the root is
   made before the free changes anything and before it takes a lock, and its cell is
   allocated fallibly. With malloc failing from its k-th call on during one free, the
   free either succeeds or raises Out_of_memory with the handle still live (freed again
   later, once malloc works), and the program goes on: no abort, no lock left held (the
   next free and the GC alarm's drain would hang), nothing freed twice. Before the fix
   (found by testing): k = 0 aborted ("memory allocation of 8 bytes failed"), k = 1
   raised Out_of_memory from the runtime's root registration through the Rust frames
   with the release queue locked and the handle freed, and the next free hung.

   Three kinds of handles: a copy made with a C allocator (its block rooted), a region
   made with one (one root for all its chunks), and a loaded image (its owner's free
   function ignores the block: no root). Each case runs in a child process under a
   watchdog: a hang is a failure, as is any signal. fail_malloc.c makes this program's
   malloc, calloc, realloc, memalign and mmap fail on demand. *)

external arm : int -> unit = "fm_arm" [@@noalloc]
external disarm : unit -> int = "fm_disarm" [@@noalloc]

let image_path = Filename.temp_file "offheap_free_oom" ".img"

(* A handle of [kind], its free (as a function that may raise), and whether it is still
   live (then it is freed again). *)
let make kind =
  match kind with
  | `Image ->
      let h = Offheap.Image.load image_path in
      ((fun () -> Offheap.free h), fun () -> Offheap.is_offheap (Offheap.get h))
  | `C_allocator ->
      let a = Support.counting_alloc (Support.fresh_id ()) in
      let h = Offheap.copy ~alloc:a (Array.make 300 "x") in
      ((fun () -> Offheap.free h), fun () -> Offheap.is_offheap (Offheap.get h))
  | `Region ->
      let a = Support.counting_alloc (Support.fresh_id ()) in
      let r = Offheap.Region.create ~alloc:a () in
      ignore (Offheap.Region.add r (Array.make 300 "x") : string array);
      (* An add raises Invalid_argument once the region is freed. *)
      ((fun () -> Offheap.Region.free r), fun () -> Offheap.Region.add r (ref 0) != ref 0)

let live_after live = match live () with b -> b | exception Invalid_argument _ -> false

let child kind k =
  ignore (Unix.alarm 10);
  (* Warm up: the queue has room, the thread-locals exist. *)
  let free, _ = make kind in
  Gc.full_major ();
  ignore (Gc.major_slice 1);
  free ();
  Gc.full_major ();
  let free, live = make kind in
  Gc.full_major ();
  (* OCaml 4: the free waits only while the major GC marks. *)
  ignore (Gc.major_slice 1);
  arm k;
  let result = match free () with () -> `Freed | exception Out_of_memory -> `Oom in
  ignore (disarm ());
  let still_live = live_after live in
  if result = `Oom && not still_live then begin
    Printf.printf "k=%d: free raised Out_of_memory but the handle is freed\n%!" k;
    exit 3
  end;
  if result = `Freed && still_live then begin
    Printf.printf "k=%d: free returned but the handle is live\n%!" k;
    exit 4
  end;
  if result = `Oom then free ();
  (* The queue and its lock still work: more frees that wait, the GC alarm's drains. *)
  for _ = 1 to 3 do
    let free, _ = make kind in
    ignore (Gc.major_slice 1);
    free ();
    Gc.full_major ()
  done;
  exit 0

let () =
  Offheap.Image.write image_path (Array.init 100 string_of_int);
  let failures = ref [] in
  List.iter
    (fun (kind, name) ->
      for k = 0 to 8 do
        match Unix.fork () with
        | 0 -> child kind k
        | pid -> (
            let fail why = failures := Printf.sprintf "%s, k=%d: %s" name k why :: !failures in
            match Unix.waitpid [] pid with
            | _, Unix.WEXITED 0 -> ()
            | _, Unix.WEXITED c -> fail (Printf.sprintf "exit %d" c)
            | _, (Unix.WSIGNALED s | Unix.WSTOPPED s) ->
                fail
                  (if s = Sys.sigalrm then "hung (watchdog)"
                   else if s = Sys.sigabrt then "aborted"
                   else "killed by signal " ^ string_of_int s))
      done)
    [ (`C_allocator, "a copy with a C allocator"); (`Region, "a region with a C allocator"); (`Image, "a loaded image") ];
  Sys.remove image_path;
  match List.rev !failures with
  | [] -> print_endline "frees with malloc failing: 27 cases, none aborted, hung or lost a handle"
  | l ->
      List.iter print_endline l;
      exit 1
