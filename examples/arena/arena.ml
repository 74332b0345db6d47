(* Copies with one lifetime, freed all at once: a C arena allocator (arena_stubs.c) for
   the tables of a batch of work. Each round copies a thousand small tables off the heap
   into the arena (a pointer bump each), uses them, frees the handles (which returns no
   memory: the arena's free only counts), then gives all the memory back with one
   [reset]. Read the top of arena_stubs.c for when a reset is safe; the arena refuses
   one while a copy is still out. *)

external create : unit -> Offheap.alloc = "arena_create"

(* Frees every chunk; raises Failure while a copy from the arena is not freed. *)
external reset : Offheap.alloc -> unit = "arena_reset"

(* [reset], then the arena itself: copying into it raises Out_of_memory afterwards. *)
external destroy : Offheap.alloc -> unit = "arena_destroy"
external reserved : Offheap.alloc -> int = "arena_reserved"
external live : Offheap.alloc -> int = "arena_live"

(* One table of a batch: a few hundred bindings. *)
let table round i =
  let t = Hashtbl.create 64 in
  for k = 0 to 199 do
    Hashtbl.replace t (Printf.sprintf "key%d" k) (round, i, float_of_int k)
  done;
  t

let () =
  let rounds = try int_of_string Sys.argv.(1) with _ -> 3 in
  let arena = create () in
  for round = 1 to rounds do
    let handles = List.init 1000 (fun i -> Offheap.copy ~alloc:arena (table round i)) in
    (* The work: read the copies. *)
    let sum =
      List.fold_left
        (fun acc h ->
          let _, _, x = Hashtbl.find (Offheap.get h) "key199" in
          acc +. x)
        0. handles
    in
    assert (sum = 199_000.);
    let bytes = reserved arena and copies = live arena in
    (* A reset now would pull the memory from under live handles: refused. *)
    (match reset arena with
    | () -> assert false
    | exception Failure _ -> ());
    List.iter Offheap.free handles;
    (* OCaml 5 hands a freed copy back to its allocator once the major cycle running at
       [free] has ended (the GC may still read the copy until then): end it. On OCaml 4
       the copies are back already. *)
    Gc.full_major ();
    assert (live arena = 0);
    reset arena;
    Printf.printf "round %d: %d copies in %.1f MB of arena, all freed by one reset\n" round
      copies
      (float_of_int bytes /. 1e6)
  done;
  destroy arena;
  (match Offheap.copy ~alloc:arena (List.init 3 Fun.id) with
  | _ -> assert false
  | exception Out_of_memory -> ());
  print_endline "arena destroyed"
