(* The benchmark run by [make bench]: offheap's copy against a Marshal round trip and a
   warm memcpy of the same bytes (the floor), on the eight workloads of issue 3, plus the
   copy's effect on the major GC and the traversal's transient memory.

   bench.exe [-quick] [-small] [-scale F] [-runs N] [-only NAME[,NAME...]]

   Markdown tables go to stdout, preceded by a line describing the machine; progress goes
   to stderr. Each workload's data is built once, measured, and dropped before the next
   one is built. *)

external floor_memcpy : int -> float = "bench_floor_memcpy"
(** [floor_memcpy n] is the time in seconds of one memcpy of [n] bytes between two
    buffers allocated and touched beforehand, kept from one call to the next of the same
    size (floor.c). *)

external floor_release : unit -> unit = "bench_floor_release"

(* {1 Workloads} *)

type tree = Leaf | Node of { l : tree; r : tree; key : int; v : float }
(* A node is a block of 4 fields and its own boxed float: 40 + 16 bytes. *)

type node = { id : int; mutable a : node; mutable b : node }
(* A graph node: 32 bytes; [id] is its index in the graph's array. *)

type workload =
  | W : {
      name : string;  (** for [-only] *)
      size : int;  (** elements at scale 1 *)
      label : int -> string;  (** for the tables, given the scaled size *)
      build : int -> 'a;
      same : 'a -> 'a -> bool;  (** checks a copy against the original, once *)
      original : float;  (** the original C library's MB/s in issue 3 *)
    }
      -> workload

let count n =
  if n >= 1_000_000 && n mod 1_000_000 = 0 then Printf.sprintf "%dM" (n / 1_000_000)
  else if n >= 1_000_000 then Printf.sprintf "%.1fM" (float n /. 1e6)
  else if n >= 1_000 && n mod 1_000 = 0 then Printf.sprintf "%dk" (n / 1_000)
  else string_of_int n

let rec build_tree lo hi =
  if lo >= hi then Leaf
  else
    let mid = lo + ((hi - lo) / 2) in
    let l = build_tree lo mid in
    let r = build_tree (mid + 1) hi in
    Node { l; r; key = mid; v = float_of_int mid }

let random_string st =
  String.init (8 + Random.State.int st 33) (fun _ ->
      Char.chr (97 + Random.State.int st 26))

let build_graph n =
  let g =
    Array.init n (fun id ->
        let rec x = { id; a = x; b = x } in
        x)
  in
  let st = Random.State.make [| 5 |] in
  Array.iter
    (fun x ->
      x.a <- g.(Random.State.int st n);
      x.b <- g.(Random.State.int st n))
    g;
  g

(* Sharing is checked too: the copy's edges must point to the copy's own nodes. *)
let same_graph g g' =
  Array.length g = Array.length g'
  && begin
       let ok = ref true in
       Array.iteri
         (fun i x ->
           let y = g'.(i) in
           if y.id <> x.id || y.a != g'.(x.a.id) || y.b != g'.(x.b.id) then ok := false)
         g;
       !ok
     end

let build_hashtbl n =
  let t = Hashtbl.create 16 in
  for i = 0 to n - 1 do
    Hashtbl.add t (Printf.sprintf "k%07d" i) i
  done;
  t

let same_hashtbl t t' =
  Hashtbl.length t = Hashtbl.length t'
  && Hashtbl.fold (fun k v ok -> ok && Hashtbl.find_opt t' k = Some v) t true

let workloads =
  [
    W
      {
        name = "int-list";
        size = 10_000_000;
        label = (fun n -> Printf.sprintf "int list, %s elements" (count n));
        build = (fun n -> List.init n (fun i -> i));
        same = ( = );
        original = 687.;
      };
    W
      {
        name = "tree";
        size = 2_000_000;
        label =
          (fun n ->
            Printf.sprintf "balanced tree of records, %s nodes, a boxed float each"
              (count n));
        build = (fun n -> build_tree 0 n);
        same = ( = );
        original = 272.;
      };
    W
      {
        name = "strings";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "array of %s strings of 8-40 bytes" (count n));
        build =
          (fun n ->
            let st = Random.State.make [| 3 |] in
            Array.init n (fun _ -> random_string st));
        same = ( = );
        original = 993.;
      };
    W
      {
        name = "float-array";
        size = 10_000_000;
        label = (fun n -> Printf.sprintf "float array, %s" (count n));
        build = (fun n -> Array.init n float_of_int);
        same = ( = );
        original = 1951.;
      };
    W
      {
        name = "graph";
        size = 1_000_000;
        label =
          (fun n ->
            Printf.sprintf "graph of %s records, 2 random edges each (sharing, cycles)"
              (count n));
        build = build_graph;
        same = same_graph;
        original = 282.;
      };
    W
      {
        name = "hashtbl";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "Hashtbl of %s string -> int" (count n));
        build = build_hashtbl;
        same = same_hashtbl;
        original = 182.;
      };
    W
      {
        name = "big-string";
        size = 100_000_000;
        label = (fun n -> Printf.sprintf "one %g MB string" (float n /. 1e6));
        build = (fun n -> String.init n (fun i -> Char.unsafe_chr (i land 255)));
        same = String.equal;
        original = 2242.;
      };
    W
      {
        name = "int64-list";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "list of %s boxed Int64" (count n));
        build = (fun n -> List.init n Int64.of_int);
        same = ( = );
        original = 859.;
      };
  ]

let workload_name (W w) = w.name

(* {1 Measuring} *)

type config = { scale : float; runs : int }

type sample = { median : float; min : float; max : float }

let summarize xs =
  let a = Array.of_list xs in
  Array.sort compare a;
  let n = Array.length a in
  let median =
    if n mod 2 = 1 then a.(n / 2) else (a.((n / 2) - 1) +. a.(n / 2)) /. 2.
  in
  { median; min = a.(0); max = a.(n - 1) }

let progress fmt = Printf.ksprintf prerr_endline fmt

(* [timed f] runs [f] after a full major GC, so that no GC debt left by what came
   before is billed to [f]. *)
let timed f =
  Gc.full_major ();
  let t0 = Unix.gettimeofday () in
  let r = f () in
  let t = Unix.gettimeofday () -. t0 in
  (r, t)

type copy_result = {
  stats : Offheap.stats;
  copy : sample;
  free : sample;
  marshal : sample;
  floor : sample;
}

type run = {
  run_stats : Offheap.stats;
  t_copy : float;
  t_free : float;
  t_marshal : float;
  t_floor : float;
}

(* One run: the copy, its free, a Marshal round trip (default flags: sharing kept) and the
   floor for the copy's byte count, side by side. *)
let run_once v =
  let h, t_copy = timed (fun () -> Offheap.copy v) in
  let run_stats = Offheap.stats h in
  let (), t_free = timed (fun () -> Offheap.free h) in
  let (), t_marshal =
    timed (fun () ->
        let s = Marshal.to_string v [] in
        ignore (Sys.opaque_identity (Marshal.from_string s 0 : 'a)))
  in
  let t_floor = floor_memcpy run_stats.bytes in
  { run_stats; t_copy; t_free; t_marshal; t_floor }

(* A warm-up run, a check of the copy, then the timed runs. *)
let measure_copy cfg same v =
  ignore (run_once v : run);
  (let h = Offheap.copy v in
   if not (same v (Offheap.get h)) then failwith "the copy differs from the original";
   Offheap.free h);
  let runs = List.init cfg.runs (fun _ -> run_once v) in
  let pick f = summarize (List.map f runs) in
  {
    stats = (List.hd runs).run_stats;
    copy = pick (fun r -> r.t_copy);
    free = pick (fun r -> r.t_free);
    marshal = pick (fun r -> r.t_marshal);
    floor = pick (fun r -> r.t_floor);
  }

type gc_cost = { heap_bytes : int; full_major : sample }

(* The major heap's size once compacted, and what a full major GC costs with what is live
   at the time. *)
let gc_cost cfg =
  Gc.compact ();
  let heap_bytes = (Gc.quick_stat ()).heap_words * (Sys.word_size / 8) in
  let times =
    List.init cfg.runs (fun _ ->
        let t0 = Unix.gettimeofday () in
        Gc.full_major ();
        Unix.gettimeofday () -. t0)
  in
  { heap_bytes; full_major = summarize times }

type result = {
  name : string;
  label : string;
  original : float;
  result : copy_result;
  on_heap : gc_cost;
  off_heap : gc_cost;
  collected : bool;  (** the original was gone during the off-heap measurement *)
}

(* Everything that needs the original runs inside [with_original], which returns only a
   handle to a copy: once it has returned, the original is unreachable, which the weak
   pointer confirms. *)
let run_workload cfg (W w) =
  let n = max 1 (truncate ((cfg.scale *. float w.size) +. 0.5)) in
  let label = w.label n in
  let[@inline never] with_original () =
    progress "%s: building %s" w.name label;
    let v = w.build n in
    let weak = Weak.create 1 in
    Weak.set weak 0 (Some (Obj.repr v));
    progress "%s: copy, free, Marshal, floor: 1 + %d runs" w.name cfg.runs;
    let result = measure_copy cfg w.same v in
    progress "%s: full major GC, value on the heap" w.name;
    let on_heap = gc_cost cfg in
    let h = Offheap.copy v in
    (result, on_heap, h, weak)
  in
  let result, on_heap, h, weak = with_original () in
  progress "%s: full major GC, only the off-heap copy" w.name;
  let off_heap = gc_cost cfg in
  let collected = not (Weak.check weak 0) in
  Offheap.free h;
  floor_release ();
  Gc.compact ();
  progress "%s: copy %.1f ms, Marshal %.1f ms, floor %.2f ms" w.name
    (result.copy.median *. 1e3) (result.marshal.median *. 1e3)
    (result.floor.median *. 1e3);
  { name = w.name; label; original = w.original; result; on_heap; off_heap; collected }

(* {1 Output} *)

let ms s =
  let x = s *. 1e3 in
  if x >= 100. then Printf.sprintf "%.0f" x
  else if x >= 10. then Printf.sprintf "%.1f" x
  else if x >= 1. then Printf.sprintf "%.2f" x
  else Printf.sprintf "%.3f" x

let ms_range s = Printf.sprintf "%s (%s-%s)" (ms s.median) (ms s.min) (ms s.max)
let mb bytes = Printf.sprintf "%.1f" (float bytes /. 1e6)
let mb_per_s bytes seconds = float bytes /. seconds /. 1e6

let table header align rows =
  let line cells = print_endline ("| " ^ String.concat " | " cells ^ " |") in
  line header;
  line (List.map (function `L -> "---" | `R -> "---:") align);
  List.iter line rows;
  print_newline ()

(* The value of the first line "name... : value" of [lines] that starts with [prefix]. *)
let field prefix lines =
  List.find_map
    (fun l ->
      match String.index_opt l ':' with
      | Some i when String.starts_with ~prefix l ->
          Some (String.trim (String.sub l (i + 1) (String.length l - i - 1)))
      | _ -> None)
    lines

let read_lines path =
  match open_in path with
  | exception Sys_error _ -> []
  | ic ->
      let rec loop acc =
        match input_line ic with
        | l -> loop (l :: acc)
        | exception End_of_file ->
            close_in ic;
            List.rev acc
      in
      loop []

let command_output cmd =
  match Unix.open_process_in cmd with
  | exception Unix.Unix_error _ -> None
  | ic ->
      let l = try Some (String.trim (input_line ic)) with End_of_file -> None in
      ignore (Unix.close_process_in ic : Unix.process_status);
      l

let machine () =
  let cpuinfo = read_lines "/proc/cpuinfo" in
  let cpu = Option.value (field "model name" cpuinfo) ~default:"unknown CPU" in
  let nproc =
    match command_output "nproc 2>/dev/null" with
    | Some n when n <> "" -> n
    | _ ->
        string_of_int
          (List.length
             (List.filter (fun l -> field "processor" [ l ] <> None) cpuinfo))
  in
  let ram =
    match field "MemTotal" (read_lines "/proc/meminfo") with
    | Some kb -> (
        match Scanf.sscanf kb "%d kB" (fun k -> k) with
        | k -> Printf.sprintf ", %.0f GiB RAM" (float k /. 1048576.)
        | exception (Scanf.Scan_failure _ | Failure _ | End_of_file) -> "")
    | None -> ""
  in
  let kernel =
    match command_output "uname -sr 2>/dev/null" with Some k -> ", " ^ k | None -> ""
  in
  (* The selected value is the bracketed one: "always [madvise] never". *)
  let thp =
    match read_lines "/sys/kernel/mm/transparent_hugepage/enabled" with
    | l :: _ -> (
        match (String.index_opt l '[', String.index_opt l ']') with
        | Some i, Some j when j > i ->
            ", transparent huge pages " ^ String.sub l (i + 1) (j - i - 1)
        | _ -> "")
    | [] -> ""
  in
  let load =
    match read_lines "/proc/loadavg" with
    | l :: _ -> ", load average " ^ List.hd (String.split_on_char ' ' l) ^ " at start"
    | [] -> ""
  in
  let t = Unix.gmtime (Unix.time ()) in
  Printf.sprintf "%s, nproc %s%s%s%s, OCaml %s, %04d-%02d-%02d %02d:%02d UTC%s" cpu nproc
    ram kernel thp Sys.ocaml_version (t.tm_year + 1900) (t.tm_mon + 1) t.tm_mday t.tm_hour
    t.tm_min load

let print_results cfg machine empty results =
  Printf.printf "Machine: %s. Scale %g: median (min-max) of %d runs after 1 warm-up; \
                 MB = 10^6 bytes.\n\n"
    machine cfg.scale cfg.runs;
  print_endline
    "Copy (`Offheap.copy`, default allocator), free, Marshal round trip \
     (`to_string` + `from_string`, default flags) and warm memcpy of the copy's bytes, \
     in ms:";
  print_newline ();
  table
    [
      "workload";
      "bytes";
      "copy ms median (min-max)";
      "MB/s";
      "free ms";
      "Marshal ms";
      "floor ms";
      "copy/Marshal";
      "copy/floor";
      "transient B/block";
    ]
    [ `L; `R; `R; `R; `R; `R; `R; `R; `R; `R ]
    (List.map
       (fun r ->
         let c = r.result in
         [
           r.label;
           mb c.stats.bytes ^ " MB";
           ms_range c.copy;
           Printf.sprintf "%.0f" (mb_per_s c.stats.bytes c.copy.median);
           ms_range c.free;
           ms_range c.marshal;
           ms_range c.floor;
           Printf.sprintf "%.2f" (c.copy.median /. c.marshal.median);
           Printf.sprintf "%.1f" (c.copy.median /. c.floor.median);
           Printf.sprintf "%.1f"
             (float c.stats.transient_bytes /. float (max 1 c.stats.blocks));
         ])
       results);
  print_endline
    "GC effect: major heap once compacted, and median `Gc.full_major` time, with the \
     value on the heap vs. only its off-heap copy live:";
  print_newline ();
  table
    [
      "workload";
      "heap MB on-heap";
      "heap MB off-heap";
      "full_major ms on-heap";
      "full_major ms off-heap";
    ]
    [ `L; `R; `R; `R; `R ]
    ([
       "empty heap (baseline)";
       mb empty.heap_bytes;
       mb empty.heap_bytes;
       ms empty.full_major.median;
       ms empty.full_major.median;
     ]
    :: List.map
         (fun r ->
           [
             r.label;
             mb r.on_heap.heap_bytes;
             mb r.off_heap.heap_bytes;
             ms r.on_heap.full_major.median;
             ms r.off_heap.full_major.median;
           ])
         results);
  (match List.filter (fun r -> not r.collected) results with
  | [] -> ()
  | l ->
      Printf.printf "WARNING: original still reachable when measured off-heap: %s\n\n"
        (String.concat ", " (List.map (fun r -> r.name) l)));
  print_endline
    "Copy details: blocks copied, the traversal's peak transient memory, free against \
     copy, and throughput against the original C library (issue 3's table, same kind of \
     machine; at scale 1 only):";
  print_newline ();
  table
    [
      "workload";
      "blocks";
      "transient MB";
      "free/copy";
      "original MB/s";
      "offheap/original";
    ]
    [ `L; `R; `R; `R; `R; `R ]
    (List.map
       (fun r ->
         let c = r.result in
         let speed = mb_per_s c.stats.bytes c.copy.median in
         [
           r.label;
           string_of_int c.stats.blocks;
           Printf.sprintf "%.2f" (float c.stats.transient_bytes /. 1e6);
           Printf.sprintf "%.1f%%" (100. *. c.free.median /. c.copy.median);
           (if cfg.scale = 1. then Printf.sprintf "%.0f" r.original else "-");
           (if cfg.scale = 1. then Printf.sprintf "%.2fx" (speed /. r.original) else "-");
         ])
       results)

(* {1 Small values: the per-call cost}

   Issue 9's workload: 100k records of 5 fields with a string (88 bytes each), copied
   one at a time. Per call: a copy alone (into an array of handles), a free alone, a
   copy and its free interleaved, and a Marshal round trip of one value. The original's
   ratios are quoted from issue 9 (176 ns a copy, 130 ns interleaved, 355 ns a Marshal
   round trip, measured there the same day), not measured here. *)

type small = { sa : int; sb : string; sc : float; sd : int; se : int }

let small_values cfg =
  let n = max 1000 (int_of_float (100_000. *. cfg.scale)) in
  progress "small values: %d records, %d runs" n cfg.runs;
  let values =
    Array.init n (fun i ->
        { sa = i; sb = Printf.sprintf "name-%010d" i; sc = float i; sd = i; se = -i })
  in
  let handles = Array.make n (Offheap.copy values.(0)) in
  Offheap.free handles.(0);
  let per_call f =
    Gc.full_major ();
    let t0 = Unix.gettimeofday () in
    f ();
    (Unix.gettimeofday () -. t0) *. 1e9 /. float n
  in
  let copy_all () = Array.iteri (fun i v -> handles.(i) <- Offheap.copy v) values in
  let free_all () = Array.iter Offheap.free handles in
  let interleaved () = Array.iter (fun v -> Offheap.free (Offheap.copy v)) values in
  let marshal () =
    Array.iter
      (fun v -> ignore (Sys.opaque_identity (Marshal.from_string (Marshal.to_string v []) 0 : small)))
      values
  in
  (* A warm-up of each, then the runs, interleaved. *)
  copy_all ();
  free_all ();
  interleaved ();
  marshal ();
  let runs =
    List.init cfg.runs (fun _ ->
        let c = per_call copy_all in
        let f = per_call free_all in
        let i = per_call interleaved in
        let m = per_call marshal in
        (c, f, i, m))
  in
  let pick g = summarize (List.map g runs) in
  let copy = pick (fun (c, _, _, _) -> c)
  and free = pick (fun (_, f, _, _) -> f)
  and inter = pick (fun (_, _, i, _) -> i)
  and marshal = pick (fun (_, _, _, m) -> m) in
  let h = Offheap.copy values.(0) in
  let handle_words = Obj.size (Obj.repr h) + 1 in
  let bytes = (Offheap.stats h).bytes in
  Offheap.free h;
  let ns s = Printf.sprintf "%.0f (%.0f-%.0f)" s.median s.min s.max in
  let ratio s = Printf.sprintf "%.2f" (s.median /. marshal.median) in
  Printf.printf
    "\n### Small values, per call (OCaml %s)\n\n%d records of 5 fields with a string, %d bytes \
     each off the heap; a handle takes %d words of the GC heap, header included. Median \
     (min-max) of %d runs.\n\n"
    Sys.ocaml_version n bytes handle_words cfg.runs;
  table
    [ "operation"; "ns per call"; "/ Marshal round trip"; "original, quoted: / Marshal" ]
    [ `L; `R; `R; `R ]
    [
      [ "copy"; ns copy; ratio copy; "0.50" ];
      [ "free"; ns free; ratio free; "-" ];
      [ "copy + free, interleaved"; ns inter; ratio inter; "0.37" ];
      [ "Marshal round trip"; ns marshal; "1.00"; "1.00" ];
    ]

(* {1 Main} *)

let () =
  let quick = ref false in
  let scale = ref None in
  let runs = ref None in
  let only = ref [] in
  let small_only = ref false in
  let names = List.map workload_name workloads in
  let spec =
    Arg.align
      [
        ("-quick", Arg.Set quick, " Quick mode: scale 0.1 and 3 runs (unless given)");
        ("-small", Arg.Set small_only, " Only the small values' per-call table");
        ( "-scale",
          Arg.Float (fun f -> scale := Some f),
          "F Multiply the workload sizes by F (default 1.0)" );
        ( "-runs",
          Arg.Int (fun n -> runs := Some n),
          "N Timed runs per measurement, after one warm-up (default 7, quick 3)" );
        ( "-only",
          Arg.String (fun s -> only := !only @ String.split_on_char ',' s),
          "NAME Run only this workload (comma-separated list), one of: "
          ^ String.concat ", " names );
      ]
  in
  Arg.parse spec
    (fun a -> raise (Arg.Bad ("unexpected argument " ^ a)))
    "bench.exe [-quick] [-scale F] [-runs N] [-only NAME[,NAME...]]";
  List.iter
    (fun n ->
      if not (List.mem n names) then begin
        Printf.eprintf "unknown workload %S; the workloads are: %s\n" n
          (String.concat ", " names);
        exit 2
      end)
    !only;
  let cfg =
    {
      scale = Option.value !scale ~default:(if !quick then 0.1 else 1.0);
      runs = max 1 (Option.value !runs ~default:(if !quick then 3 else 7));
    }
  in
  let selected =
    List.filter (fun w -> !only = [] || List.mem (workload_name w) !only) workloads
  in
  if !small_only then begin
    print_endline (machine ());
    small_values cfg;
    exit 0
  end;
  let machine = machine () in
  let t0 = Unix.gettimeofday () in
  progress "empty heap: full major GC";
  let empty = gc_cost cfg in
  let results = List.map (run_workload cfg) selected in
  progress "done in %.0f s" (Unix.gettimeofday () -. t0);
  print_results cfg machine empty results;
  if !only = [] then small_values cfg
