(* A user of the installed offheap: copy, read, stats, free; in native code and in
   bytecode (where dlloffheap_stubs.so is loaded from the installed stublibs). *)

type entry = { word : string; postings : int list }

let () =
  let index = Hashtbl.create 16 in
  List.iteri
    (fun i word -> Hashtbl.replace index word { word; postings = [ i; i * 10 ] })
    [ "copy"; "get"; "free" ];
  let h = Offheap.copy index in
  let e = Hashtbl.find (Offheap.get h) "get" in
  assert (e.word = "get" && e.postings = [ 1; 10 ]);
  assert ((Offheap.stats h).blocks > 10);
  Offheap.free h;
  (match Offheap.get h with
  | _ -> assert false
  | exception Invalid_argument msg -> assert (msg = "Offheap.get: deleted"));
  Printf.printf "external dune project (%s): ok\n"
    (match Sys.backend_type with Native -> "native" | Bytecode -> "bytecode" | Other s -> s)
