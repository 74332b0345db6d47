(* The main demo: what a large long-lived value costs the major GC while it lives on
   the heap, and after it moved off the heap with Offheap.copy. *)

type entry = { word : string; postings : int list; weight : float }

(* A word index: 1M words, each with a few postings and a weight. *)
let build_index n =
  let index = Hashtbl.create n in
  for i = 0 to n - 1 do
    let word = Printf.sprintf "word%07d" i in
    let postings = List.init (1 + (i mod 5)) (fun k -> (i * 7) + k) in
    Hashtbl.replace index word { word; postings; weight = float_of_int i /. 3. }
  done;
  index

let time f =
  let t0 = Unix.gettimeofday () in
  let r = f () in
  (r, (Unix.gettimeofday () -. t0) *. 1000.)

(* Median time of a few full major collections. *)
let full_major_ms () =
  let runs =
    List.init 5 (fun _ -> snd (time Gc.full_major)) |> List.sort compare
  in
  List.nth runs 2

let heap_mb () =
  Gc.compact ();
  let s = Gc.quick_stat () in
  float_of_int (s.Gc.heap_words * (Sys.word_size / 8)) /. 1e6

let () =
  let n = try int_of_string Sys.argv.(1) with _ -> 1_000_000 in
  Printf.printf "offheap demo: a word index of %d entries (OCaml %s)\n\n%!" n
    Sys.ocaml_version;
  let empty_ms = full_major_ms () and empty_mb = heap_mb () in
  let index = build_index n in
  let on_heap_ms = full_major_ms () and on_heap_mb = heap_mb () in
  let h, copy_ms = time (fun () -> Offheap.copy index) in
  let found = (Hashtbl.find (Offheap.get h) "word0000042").postings in
  assert (found = (Hashtbl.find index "word0000042").postings);
  (* From here on only the copy is used: the original becomes garbage. *)
  let off_heap_ms = full_major_ms () and off_heap_mb = heap_mb () in
  let lookups = ref 0 in
  for i = 0 to 999 do
    let e = Hashtbl.find (Offheap.get h) (Printf.sprintf "word%07d" (i * 997 mod n)) in
    lookups := !lookups + List.length e.postings
  done;
  let stats = Offheap.stats h in
  Printf.printf "| value lives       | major heap | Gc.full_major |\n";
  Printf.printf "|-------------------|-----------:|--------------:|\n";
  Printf.printf "| nowhere (baseline)| %7.1f MB | %9.2f ms |\n" empty_mb empty_ms;
  Printf.printf "| on the heap       | %7.1f MB | %9.2f ms |\n" on_heap_mb on_heap_ms;
  Printf.printf "| off the heap      | %7.1f MB | %9.2f ms |\n\n" off_heap_mb off_heap_ms;
  Printf.printf
    "Offheap.copy took %.1f ms for %.1f MB in %d blocks; 1000 lookups in the copy \
     found %d postings.\n"
    copy_ms
    (float_of_int stats.bytes /. 1e6)
    stats.blocks !lookups;
  Printf.printf "Each full major GC is %.0fx faster with the index off the heap.\n"
    (on_heap_ms /. off_heap_ms);
  let (), free_ms = time (fun () -> Offheap.free h) in
  Printf.printf "Offheap.free took %.2f ms.\n" free_ms
