(* The benchmark of regions (issue 11), run by [make bench] and [make bench-region]:
   - small adds: 1M adds of a 2-field record to one region, per add, against one
     Offheap.copy and free per record; then the region's free, per chunk; and 1M adds
     of a 3-block record (an int, a string, a float);
   - incremental building: 1M records added in batches of 10k to a list in a region,
     against building the list on the heap and copying it at the end: time, major GC
     work, the major heap's peak, what a major cycle costs at the end of the build (the
     list and the region, or the list on the heap and its copy, alive), and the bytes
     off the heap against one copy of the final list;
   - a map updated in batches: the region's growth against one copy of the final map.

   region_bench.exe [-quick] [-runs N]

   Markdown tables go to stdout; medians of N runs (default 7, quick 3), min-max. *)

module R = Offheap.Region

let runs = ref 7
let quick = ref false

let median_range xs =
  let a = Array.of_list xs in
  Array.sort compare a;
  let n = Array.length a in
  (a.(n / 2), a.(0), a.(n - 1))

let time f =
  Gc.full_major ();
  let t0 = Unix.gettimeofday () in
  let r = f () in
  (r, Unix.gettimeofday () -. t0)

type small = { a : int; b : int }

(* {1 Small adds} *)

let small_adds n =
  let r = R.create () in
  let (), t_add =
    time (fun () ->
        for i = 1 to n do
          ignore (Sys.opaque_identity (R.add r { a = i; b = i }))
        done)
  in
  let chunks = (R.stats r).chunks in
  let (), t_free = time (fun () -> R.free r) in
  (t_add /. float n, t_free, chunks)

(* A record of an int, a string and a float: 3 blocks (the float boxed), 88 bytes in the
   region, from a pool of 1024 strings on the heap (each add copies its string again). *)
type three = { n : int; s : string; x : float }

let names = Array.init 1024 (fun i -> Printf.sprintf "name-%06d" i)

let three_block_adds n =
  let r = R.create () in
  let (), t =
    time (fun () ->
        for i = 1 to n do
          ignore (Sys.opaque_identity (R.add r { n = i; s = names.(i land 1023); x = float i }))
        done)
  in
  R.free r;
  t /. float n

let small_copies n =
  let (), t =
    time (fun () ->
        for i = 1 to n do
          Offheap.free (Offheap.copy { a = i; b = i })
        done)
  in
  t /. float n

(* {1 Incremental building} *)

type record = { id : int; name : string }

let cons_batch b batch tail =
  let l = ref tail in
  for i = b * batch to ((b + 1) * batch) - 1 do
    l := { id = i; name = string_of_int i } :: !l
  done;
  !l

type build = {
  seconds : float;
  major_words : float;
  major_collections : int;
  top_heap_mb : float;
  full_major_ms : float;  (** a full major cycle at the end of the build, all it holds alive *)
  off_heap_bytes : int;  (** the region's bytes, or the final copy's *)
}

(* [f ()] measured: time, major GC work, and the major heap's peak (top_heap_words) in a
   fresh child process, so that each build starts from an empty heap. *)
let in_child f =
  let rd, wr = Unix.pipe () in
  match Unix.fork () with
  | 0 ->
      Unix.close rd;
      Gc.compact ();
      let s0 = Gc.quick_stat () in
      let t0 = Unix.gettimeofday () in
      let off_heap_bytes, alive = f () in
      let t = Unix.gettimeofday () -. t0 in
      let s1 = Gc.quick_stat () in
      let t1 = Unix.gettimeofday () in
      Gc.full_major ();
      let full_major_ms = (Unix.gettimeofday () -. t1) *. 1e3 in
      ignore (Sys.opaque_identity alive);
      let b =
        {
          seconds = t;
          major_words = s1.major_words -. s0.major_words;
          major_collections = s1.major_collections - s0.major_collections;
          top_heap_mb = float (s1.top_heap_words * (Sys.word_size / 8)) /. 1e6;
          full_major_ms;
          off_heap_bytes;
        }
      in
      let oc = Unix.out_channel_of_descr wr in
      Marshal.to_channel oc b [];
      close_out oc;
      Unix._exit 0
  | pid ->
      Unix.close wr;
      let ic = Unix.in_channel_of_descr rd in
      let (b : build) = Marshal.from_channel ic in
      close_in ic;
      ignore (Unix.waitpid [] pid);
      b

(* Each build returns the bytes it holds off the heap and what keeps its result alive. *)
let build_in_region records batch () =
  let r = R.create () in
  let l = ref [] in
  for b = 0 to (records / batch) - 1 do
    l := R.add r (cons_batch b batch !l)
  done;
  ((R.stats r).bytes, Obj.repr !l)

let build_on_heap records batch () =
  let l = ref [] in
  for b = 0 to (records / batch) - 1 do
    l := cons_batch b batch !l
  done;
  let h = Offheap.copy !l in
  ((Offheap.stats h).bytes, Obj.repr (h, !l))

(* {1 Map in batches} *)

module IM = Map.Make (Int)

let map_growth batches per =
  let r = R.create () in
  let apply b m =
    let m = ref m in
    for i = b * per to ((b + 1) * per) - 1 do
      m := IM.add (i * 7919 mod 1_000_003) (string_of_int i) !m
    done;
    !m
  in
  let m = ref (R.add r IM.empty) and reference = ref IM.empty in
  let (), t =
    time (fun () ->
        for b = 0 to batches - 1 do
          m := R.add r (apply b !m)
        done)
  in
  for b = 0 to batches - 1 do
    reference := apply b !reference
  done;
  let h = Offheap.copy !reference in
  let one = (Offheap.stats h).bytes in
  Offheap.free h;
  let grown = (R.stats r).bytes in
  (grown, one, t)

let () =
  Arg.parse
    [ ("-quick", Arg.Set quick, " 3 runs"); ("-runs", Arg.Set_int runs, "N runs (default 7)") ]
    (fun a -> raise (Arg.Bad a))
    "region_bench.exe [-quick] [-runs N]";
  if !quick then runs := 3;
  let n = 1_000_000 in
  Printf.printf "## Regions (OCaml %s, %s)\n\n" Sys.ocaml_version
    (match Sys.backend_type with Sys.Native -> "native" | _ -> "bytecode");
  let adds = List.init !runs (fun _ -> small_adds n) in
  let copies = List.init !runs (fun _ -> small_copies (n / 10)) in
  let m_add, lo_add, hi_add = median_range (List.map (fun (t, _, _) -> t) adds) in
  let m_free, lo_free, hi_free = median_range (List.map (fun (_, t, _) -> t) adds) in
  let _, _, chunks = List.hd adds in
  let m_copy, lo_copy, hi_copy = median_range copies in
  let threes = List.init !runs (fun _ -> three_block_adds n) in
  let m_three, lo_three, hi_three = median_range threes in
  Printf.printf "| 1M small adds (a record of 2 fields) | median | range |\n| --- | ---: | ---: |\n";
  Printf.printf "| `Region.add`, per add | %.0f ns | %.0f-%.0f ns |\n" (m_add *. 1e9) (lo_add *. 1e9)
    (hi_add *. 1e9);
  Printf.printf "| `Offheap.copy` + `free`, per value | %.0f ns | %.0f-%.0f ns |\n" (m_copy *. 1e9)
    (lo_copy *. 1e9) (hi_copy *. 1e9);
  Printf.printf
    "| `Region.add` of a record of an int, a string and a float (3 blocks) | %.0f ns | \
     %.0f-%.0f ns |\n"
    (m_three *. 1e9) (lo_three *. 1e9) (hi_three *. 1e9);
  Printf.printf "| `Region.free` of the 1M values (%d chunks) | %.0f us | %.0f-%.0f us |\n\n" chunks
    (m_free *. 1e6) (lo_free *. 1e6) (hi_free *. 1e6);
  let records = if !quick then 200_000 else n and batch = 10_000 in
  let row name builds ~one_copy =
    let m f = let v, _, _ = median_range (List.map f builds) in v in
    let bytes = m (fun b -> float b.off_heap_bytes) in
    Printf.printf "| %s | %.0f ms | %.1f M | %.0f | %.0f MB | %.1f ms | %.1f MB (%.3fx) |\n" name
      (m (fun b -> b.seconds) *. 1e3)
      (m (fun b -> b.major_words) /. 1e6)
      (m (fun b -> float b.major_collections))
      (m (fun b -> b.top_heap_mb))
      (m (fun b -> b.full_major_ms))
      (bytes /. 1e6) (bytes /. one_copy)
  in
  Printf.printf
    "| %s records in batches of 10k | time | words promoted | major cycles | major heap peak | \
     a major cycle at its end | off the heap (/ one copy) |\n\
     | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    (if !quick then "200k" else "1M");
  let in_region = List.init !runs (fun _ -> in_child (build_in_region records batch)) in
  let on_heap = List.init !runs (fun _ -> in_child (build_on_heap records batch)) in
  let one_copy = float (List.hd on_heap).off_heap_bytes in
  row "added to a region batch by batch" in_region ~one_copy;
  row "built on the heap, copied at the end" on_heap ~one_copy;
  let grown, one, t = map_growth 200 500 in
  Printf.printf
    "\n| Map of 100k int keys, 200 batches of 500 | |\n| --- | ---: |\n\
     | region bytes after the 200 adds | %.1f MB (%.2fx one copy of the final map, %.1f MB) |\n\
     | time of the 200 adds | %.0f ms |\n"
    (float grown /. 1e6) (float grown /. float one) (float one /. 1e6) (t *. 1e3)
