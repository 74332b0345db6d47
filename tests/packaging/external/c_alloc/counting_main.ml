(* Uses the C allocator of counting.c, built with ocamlfind against the installed
   offheap (native, and bytecode with the allocator in its own stub DLL). *)

external make : unit -> Offheap.alloc = "counting_make"
external held : Offheap.alloc -> int = "counting_held"

let () =
  let alloc = make () in
  let h = Offheap.copy ~alloc (List.init 100 string_of_int) in
  let bytes = (Offheap.stats h).bytes in
  assert (bytes > 0 && held alloc = bytes);
  assert (List.nth (Offheap.get h) 42 = "42");
  Offheap.free h;
  (* OCaml 5 hands the memory back at the end of the running major cycle. *)
  Gc.full_major ();
  assert (held alloc = 0);
  Printf.printf "C allocator via ocamlfind (%s): held %d bytes, 0 after free: ok\n"
    (match Sys.backend_type with Native -> "native" | Bytecode -> "bytecode" | Other s -> s)
    bytes
