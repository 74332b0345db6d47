(* The benchmark run by [make bench]: offheap's copy against a Marshal round trip and a
   warm memcpy of the same bytes (the floor), on the eight workloads of issue 3, plus the
   copy's effect on the major GC and the traversal's transient memory.

   bench.exe [-quick] [-small] [-domains] [-scale F] [-runs N] [-only NAME[,NAME...]]

   -small: only the per-call tables (small values, then values and strings of every
   size).
   -domains (OCaml 5): the copy with one domain and with a second domain running (beyond
   1024 blocks the copy then stops it for the time of the copy), and how long it keeps
   the other domain waiting.

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
      marshal_flags : Marshal.extern_flags list;
          (** for the Marshal round trip: [Closures] where the value holds closures *)
      original : quoted option;
          (** the original C library's figure, quoted from an issue (not measured) *)
    }
      -> workload

(* A figure of the original C library quoted from an issue: its throughput (issue 3's
   table, another day on the same kind of machine), or its copy time as a fraction of a
   Marshal round trip measured in the same run (issue 9). *)
and quoted = Mb_per_s of float | Of_marshal of float

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

(* A [Map.Make(String)] built by inserting random keys of 10-20 bytes (issue 9). *)
module String_map = Map.Make (String)

let build_string_map n =
  let st = Random.State.make [| 9 |] in
  let rec add m i =
    if i = n then m
    else
      let k =
        String.init (10 + Random.State.int st 11) (fun _ ->
            Char.chr (97 + Random.State.int st 26))
      in
      add (String_map.add k i m) (i + 1)
  in
  add String_map.empty 0

(* An expression tree (issue 9): 8 constructors, built depth-first (children before
   their parent, left to right), names shared from a pool of 64 strings. *)
type expr =
  | Int of int
  | Var of string
  | Neg of expr
  | Add of expr * expr
  | Mul of expr * expr
  | Let of string * expr * expr
  | If of expr * expr * expr
  | Call of string * expr * expr

let build_ast n =
  let st = Random.State.make [| 11 |] in
  let names = Array.init 64 (fun i -> Printf.sprintf "name_%d" i) in
  let name () = names.(Random.State.int st 64) in
  (* [gen n]: a tree of exactly [n] nodes; random splits keep the depth logarithmic. *)
  let rec gen n =
    if n = 1 then
      if Random.State.bool st then Int (Random.State.int st 1000) else Var (name ())
    else if n = 2 then Neg (gen 1)
    else
      let split m =
        let a = 1 + Random.State.int st (m - 1) in
        (a, m - a)
      in
      match Random.State.int st 6 with
      | 0 ->
          let e = gen (n - 1) in
          Neg e
      | (1 | 2 | 3 | 4) as c ->
          let a, b = split (n - 1) in
          let x = gen a in
          let y = gen b in
          if c = 1 then Add (x, y)
          else if c = 2 then Mul (x, y)
          else if c = 3 then Let (name (), x, y)
          else Call (name (), x, y)
      | _ when n >= 4 ->
          let a, rest = split (n - 1) in
          let a, rest = if rest < 2 then (a - 1, rest + 1) else (a, rest) in
          let b, c = split rest in
          let x = gen a in
          let y = gen b in
          let z = gen c in
          If (x, y, z)
      | _ ->
          let x = gen 1 in
          let y = gen (n - 2) in
          Add (x, y)
  in
  gen n

let rec ast_size = function
  | Int _ | Var _ -> 1
  | Neg e -> 1 + ast_size e
  | Add (a, b) | Mul (a, b) | Let (_, a, b) | Call (_, a, b) -> 1 + ast_size a + ast_size b
  | If (a, b, c) -> 1 + ast_size a + ast_size b + ast_size c

(* A table of records keyed by int, as a cache or an in-memory database holds. *)
type item = { id : int; title : string; price : float; stock : int; tags : string list }

let make_item st i =
  {
    id = i;
    title = random_string st;
    price = float i *. 0.25;
    stock = Random.State.int st 100;
    tags = (if i mod 3 = 0 then [ "sale" ] else []);
  }

let build_item_table n =
  let st = Random.State.make [| 13 |] in
  let t = Hashtbl.create 16 in
  for i = 0 to n - 1 do
    Hashtbl.replace t i (make_item st i)
  done;
  t

let same_item_table t t' =
  Hashtbl.length t = Hashtbl.length t'
  && Hashtbl.fold (fun k v ok -> ok && Hashtbl.find_opt t' k = Some v) t true

(* An array of records mixing a string and boxed floats (a record with a non-float
   field boxes each float). *)
type point = { label : string; x : float; y : float }

let build_points n =
  let st = Random.State.make [| 17 |] in
  Array.init n (fun i -> { label = random_string st; x = float i; y = -.float i })

(* A [Set.Make(Int)] built by inserting random ints. *)
module Int_set = Set.Make (Int)

let build_int_set n =
  let st = Random.State.make [| 19 |] in
  let rec add s i =
    if i = n then s else add (Int_set.add (Random.State.bits st) s) (i + 1)
  in
  add Int_set.empty 0

(* A token stream: a list of small variants, constant constructors among them. *)
type token = Eof | Comma | Kw of int | Ident of string | Num of int | Str of string * int

let build_tokens n =
  let st = Random.State.make [| 23 |] in
  let idents = Array.init 256 (fun i -> "id" ^ string_of_int i) in
  List.init n (fun i ->
      match i mod 7 with
      | 0 -> Comma
      | 1 | 4 -> Ident idents.(Random.State.int st 256)
      | 2 -> Kw (i land 31)
      | 3 -> Num i
      | 5 -> Str (random_string st, i)
      | _ -> if i = n - 1 then Eof else Num (-i))

(* Closures: an array of handlers, each capturing its own small environment (a record
   and a string), the shape of a table of callbacks. *)
type handler = { on : int -> int; describe : unit -> string }

let build_handlers n =
  let st = Random.State.make [| 29 |] in
  Array.init n (fun i ->
      let name = random_string st in
      let k = i * 3 in
      { on = (fun x -> x + k); describe = (fun () -> name) })

let same_handlers a b =
  Array.length a = Array.length b
  && begin
       let ok = ref true in
       Array.iteri
         (fun i h ->
           let h' = b.(i) in
           if h.on i <> h'.on i || h.describe () <> h'.describe () then ok := false)
         a;
       !ok
     end

let workloads =
  [
    W
      {
        name = "int-list";
        size = 10_000_000;
        label = (fun n -> Printf.sprintf "int list, %s elements" (count n));
        build = (fun n -> List.init n (fun i -> i));
        same = ( = );
        marshal_flags = [];
        original = Some (Mb_per_s 687.);
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
        marshal_flags = [];
        original = Some (Mb_per_s 272.);
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
        marshal_flags = [];
        original = Some (Mb_per_s 993.);
      };
    W
      {
        name = "float-array";
        size = 10_000_000;
        label = (fun n -> Printf.sprintf "float array, %s" (count n));
        build = (fun n -> Array.init n float_of_int);
        same = ( = );
        marshal_flags = [];
        original = Some (Mb_per_s 1951.);
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
        marshal_flags = [];
        original = Some (Mb_per_s 282.);
      };
    W
      {
        name = "hashtbl";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "Hashtbl of %s string -> int" (count n));
        build = build_hashtbl;
        same = same_hashtbl;
        marshal_flags = [];
        original = Some (Mb_per_s 182.);
      };
    W
      {
        name = "big-string";
        size = 100_000_000;
        label = (fun n -> Printf.sprintf "one %g MB string" (float n /. 1e6));
        build = (fun n -> String.init n (fun i -> Char.unsafe_chr (i land 255)));
        same = String.equal;
        marshal_flags = [];
        original = Some (Mb_per_s 2242.);
      };
    W
      {
        name = "int64-list";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "list of %s boxed Int64" (count n));
        build = (fun n -> List.init n Int64.of_int);
        same = ( = );
        marshal_flags = [];
        original = Some (Mb_per_s 859.);
      };
    W
      {
        name = "string-map";
        size = 1_000_000;
        label =
          (fun n ->
            Printf.sprintf "Map.Make(String) of %s random 10-20-byte keys" (count n));
        build = build_string_map;
        same = String_map.equal Int.equal;
        marshal_flags = [];
        original = Some (Of_marshal 0.72);
      };
    W
      {
        name = "ast";
        size = 3_000_000;
        label =
          (fun n ->
            Printf.sprintf
              "expression tree of %s nodes (8 constructors, built depth-first, 64 \
               shared names)"
              (count n));
        build =
          (fun n ->
            let e = build_ast n in
            assert (ast_size e = n);
            e);
        same = ( = );
        marshal_flags = [];
        original = Some (Of_marshal 0.97);
      };
    W
      {
        name = "item-table";
        size = 500_000;
        label =
          (fun n ->
            Printf.sprintf "Hashtbl of %s int -> record (string, float, list)" (count n));
        build = build_item_table;
        same = same_item_table;
        marshal_flags = [];
        original = None;
      };
    W
      {
        name = "points";
        size = 1_000_000;
        label =
          (fun n ->
            Printf.sprintf "array of %s records {string; float; float}" (count n));
        build = build_points;
        same = ( = );
        marshal_flags = [];
        original = None;
      };
    W
      {
        name = "int-set";
        size = 1_000_000;
        label = (fun n -> Printf.sprintf "Set.Make(Int) of %s random ints" (count n));
        build = build_int_set;
        same = Int_set.equal;
        marshal_flags = [];
        original = None;
      };
    W
      {
        name = "tokens";
        size = 2_000_000;
        label =
          (fun n -> Printf.sprintf "list of %s small variants (tokens)" (count n));
        build = build_tokens;
        same = ( = );
        marshal_flags = [];
        original = None;
      };
    W
      {
        name = "closures";
        size = 300_000;
        label =
          (fun n ->
            Printf.sprintf "array of %s records of 2 closures (captured string, int)"
              (count n));
        build = build_handlers;
        same = same_handlers;
        marshal_flags = [ Marshal.Closures ];
        original = None;
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
  free_back_to_back : float * float;  (** mean and max, in s *)
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

(* Read once before its free, as a program reads what it copies: the free of a copy
   whose value no [get] returned takes a shorter path (src/release.rs; [small_values]
   times both). *)
let read h = ignore (Sys.opaque_identity (Offheap.get h))

(* One run: the copy, its free, a Marshal round trip (default flags: sharing kept) and the
   floor for the copy's byte count, side by side. *)
let run_once flags v =
  let h, t_copy = timed (fun () -> Offheap.copy v) in
  let run_stats = Offheap.stats h in
  read h;
  let (), t_free = timed (fun () -> Offheap.free h) in
  let (), t_marshal =
    timed (fun () ->
        let s = Marshal.to_string v flags in
        ignore (Sys.opaque_identity (Marshal.from_string s 0 : 'a)))
  in
  let t_floor = floor_memcpy run_stats.bytes in
  { run_stats; t_copy; t_free; t_marshal; t_floor }

(* A warm-up run, a check of the copy, then the timed runs. *)
let measure_copy cfg flags same v =
  ignore (run_once flags v : run);
  (let h = Offheap.copy v in
   if not (same v (Offheap.get h)) then failwith "the copy differs from the original";
   Offheap.free h);
  let runs = List.init cfg.runs (fun _ -> run_once flags v) in
  (* Back to back: rounds of a copy and its free with no GC forced between, as in a loop
     that allocates little; only the frees are timed. On OCaml 5 this is where frees pay
     the GC work that brings the copies' memory back (src/release.rs). *)
  Gc.full_major ();
  let back_to_back =
    List.init (2 * cfg.runs) (fun _ ->
        let h = Offheap.copy v in
        read h;
        let t0 = Unix.gettimeofday () in
        Offheap.free h;
        Unix.gettimeofday () -. t0)
  in
  let pick f = summarize (List.map f runs) in
  {
    stats = (List.hd runs).run_stats;
    copy = pick (fun r -> r.t_copy);
    free = pick (fun r -> r.t_free);
    free_back_to_back =
      ( List.fold_left ( +. ) 0. back_to_back /. float (List.length back_to_back),
        List.fold_left max 0. back_to_back );
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
  original : quoted option;
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
    let result = measure_copy cfg w.marshal_flags w.same v in
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

(* The original's copy time in the same run as ours, as a fraction of our Marshal round
   trip, from its quoted figure: a quoted ratio applies to our Marshal time directly; a
   quoted throughput was measured another day (issue 3), so it reads better than a
   side-by-side run does. *)
let original_ms r =
  let c = r.result in
  match r.original with
  | Some (Of_marshal f) -> Some (f *. c.marshal.median)
  | Some (Mb_per_s mbs) -> Some (float c.stats.bytes /. (mbs *. 1e6))
  | None -> None

let print_results cfg machine empty results =
  Printf.printf "Machine: %s. Scale %g: median (min-max) of %d runs after 1 warm-up; \
                 MB = 10^6 bytes.\n\n"
    machine cfg.scale cfg.runs;
  print_endline
    "Targets, measured side by side in one run: copy (`Offheap.copy`, default \
     allocator) against a Marshal round trip (`to_string` + `from_string`, default \
     flags; `Closures` for closures): at most 0.25; free at most 5% of the copy; flat \
     data (a float array, a big string) within 2x a warm memcpy of the copy's bytes; at \
     least 2x the original C library. The original was not run here: its columns are \
     computed from figures quoted from issues 3 (MB/s, another day) and 9 (copy / \
     Marshal round trip, measured beside Marshal):";
  print_newline ();
  table
    [
      "workload";
      "copy ms median (min-max)";
      "Marshal ms median (min-max)";
      "copy/Marshal";
      "free/copy";
      "copy/memcpy";
      "original, quoted";
      "original ms, from quoted";
      "speed-up vs original, from quoted";
    ]
    [ `L; `R; `R; `R; `R; `R; `R; `R; `R ]
    (List.map
       (fun r ->
         let c = r.result in
         let quoted, from_quoted, speedup =
           match (r.original, original_ms r) with
           | _ when cfg.scale <> 1. -> ("-", "-", "-")
           | Some q, Some o ->
               ( (match q with
                 | Mb_per_s m -> Printf.sprintf "%.0f MB/s (issue 3)" m
                 | Of_marshal f -> Printf.sprintf "%.2f of Marshal (issue 9)" f),
                 ms o,
                 Printf.sprintf "%.2fx" (o /. c.copy.median) )
           | _ -> ("-", "-", "-")
         in
         [
           r.label;
           ms_range c.copy;
           ms_range c.marshal;
           Printf.sprintf "%.2f" (c.copy.median /. c.marshal.median);
           Printf.sprintf "%.1f%%" (100. *. c.free.median /. c.copy.median);
           Printf.sprintf "%.1f" (c.copy.median /. c.floor.median);
           quoted;
           from_quoted;
           speedup;
         ])
       results);
  print_endline
    "Copy details: size, throughput, free times (after a full major; and back to back, \
     rounds of copy and free with no GC between: the mean, what a loop pays per free, \
     and the max), warm memcpy (floor) time, blocks copied and the traversal's peak \
     transient memory:";
  print_newline ();
  table
    [
      "workload";
      "bytes";
      "MB/s";
      "free ms";
      "free ms back to back, mean (max)";
      "floor ms";
      "blocks";
      "transient MB";
      "transient B/block";
    ]
    [ `L; `R; `R; `R; `R; `R; `R; `R; `R ]
    (List.map
       (fun r ->
         let c = r.result in
         [
           r.label;
           mb c.stats.bytes ^ " MB";
           Printf.sprintf "%.0f" (mb_per_s c.stats.bytes c.copy.median);
           ms_range c.free;
           (let mean, max = c.free_back_to_back in
            Printf.sprintf "%s (%s)" (ms mean) (ms max));
           ms_range c.floor;
           string_of_int c.stats.blocks;
           Printf.sprintf "%.2f" (float c.stats.transient_bytes /. 1e6);
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
  match List.filter (fun r -> not r.collected) results with
  | [] -> ()
  | l ->
      Printf.printf "WARNING: original still reachable when measured off-heap: %s\n\n"
        (String.concat ", " (List.map (fun r -> r.name) l))

(* {1 With a second domain (OCaml 5)} *)

type domains_result = {
  d_label : string;
  one : sample;  (** copy, one domain: header marks *)
  first : float;  (** the first copy once the second domain runs *)
  two : sample;  (** copy, two domains: side table *)
  copy_wait : sample;  (** the other domain's longest wait during a copy *)
  marshal_two : sample;
  marshal_wait : sample;
}

(* The copy with one domain, then with a second domain allocating meanwhile (so the copy
   stops it: these values have more than 1024 blocks, or are flat): times, and how long
   the copy kept the other domain waiting, against a Marshal round trip's. *)
let run_domains cfg (W w) =
  let n = max 1 (truncate ((cfg.scale *. float w.size) +. 0.5)) in
  let label = w.label n in
  progress "%s: building %s" w.name label;
  let v = w.build n in
  (* Only the copy is timed; its free (on OCaml 5 deferred, and measured by the main
     table) comes after. *)
  let copy_timed f =
    let h, t = f (fun () -> Offheap.copy v) in
    Offheap.free h;
    t
  in
  let one =
    ignore (copy_timed timed);
    summarize (List.init cfg.runs (fun _ -> copy_timed timed))
  in
  progress "%s: with a second domain" w.name;
  match Other_domain.start () with
  | None ->
      prerr_endline "bench.exe -domains needs OCaml 5";
      exit 2
  | Some d ->
      let waited f = Other_domain.longest_wait d (fun () -> timed f) in
      let copy_waited () =
        let (h, t), wait = waited (fun () -> Offheap.copy v) in
        Offheap.free h;
        (t, wait)
      in
      let first, _ = copy_waited () in
      let h = Offheap.copy v in
      if not (w.same v (Offheap.get h)) then failwith "the copy differs from the original";
      Offheap.free h;
      let copies = List.init cfg.runs (fun _ -> copy_waited ()) in
      let marshals =
        List.init cfg.runs (fun _ ->
            let ((), t), wait =
              waited (fun () ->
                  let s = Marshal.to_string v w.marshal_flags in
                  ignore (Sys.opaque_identity (Marshal.from_string s 0 : 'a)))
            in
            (t, wait))
      in
      Other_domain.stop d;
      {
        d_label = label;
        one;
        first;
        two = summarize (List.map fst copies);
        copy_wait = summarize (List.map snd copies);
        marshal_two = summarize (List.map fst marshals);
        marshal_wait = summarize (List.map snd marshals);
      }

let print_domains cfg machine results =
  Printf.printf "Machine: %s. Scale %g: median (min-max) of %d runs; MB = 10^6 bytes.\n\n"
    machine cfg.scale cfg.runs;
  print_endline
    "The copy with one domain (visited set: header marks) and with a second domain \
     running, which allocates without pause (values beyond 1024 blocks: the second \
     domain stopped for the copy, header marks); first: the first copy once the \
     second domain runs. Wait: the longest time the second domain stood still during \
     one copy or one Marshal round trip (its minor collections wait for every domain), \
     in ms:";
  print_newline ();
  table
    [
      "workload";
      "one domain";
      "two domains, first";
      "two domains";
      "two/one";
      "other domain's wait, copy";
      "Marshal, two domains";
      "other domain's wait, Marshal";
    ]
    [ `L; `R; `R; `R; `R; `R; `R; `R ]
    (List.map
       (fun r ->
         [
           r.d_label;
           ms_range r.one;
           ms r.first;
           ms_range r.two;
           Printf.sprintf "%.2f" (r.two.median /. r.one.median);
           ms_range r.copy_wait;
           ms_range r.marshal_two;
           ms_range r.marshal_wait;
         ])
       results)

(* {1 Small values: the per-call cost}

   Issue 9's workload: 100k records of 5 fields with a string (88 bytes each), copied
   one at a time. Per call: a copy alone (into an array of handles), a free alone, a
   copy and its free interleaved, and a Marshal round trip of one value; the free and
   the interleaved copy and free again with each copy read once ([get]) before its
   free, which on OCaml 5 makes the free wait for the end of a major cycle (a copy never
   read goes back at once: src/release.rs); and, as a
   floor, keeping a fresh block of a handle's size in the same array with no copy at
   all (what storing and promoting any handle costs in this pattern). The original's
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
  let read_all () = Array.iter read handles in
  let interleaved_read () =
    Array.iter
      (fun v ->
        let h = Offheap.copy v in
        read h;
        Offheap.free h)
      values
  in
  (* A block of a handle's fields (three), not a handle, in an array of its own. *)
  let kept = Array.make n (Obj.repr 0) in
  let keep_only () =
    Array.iteri (fun i v -> kept.(i) <- Obj.repr (Sys.opaque_identity (v, i, i))) values
  in
  let marshal () =
    Array.iter
      (fun v -> ignore (Sys.opaque_identity (Marshal.from_string (Marshal.to_string v []) 0 : small)))
      values
  in
  (* A warm-up of each, then the runs, interleaved. *)
  copy_all ();
  free_all ();
  interleaved ();
  interleaved_read ();
  marshal ();
  keep_only ();
  let runs =
    List.init cfg.runs (fun _ ->
        let c = per_call copy_all in
        let f = per_call free_all in
        copy_all ();
        read_all ();
        let fr = per_call free_all in
        let i = per_call interleaved in
        let ir = per_call interleaved_read in
        let m = per_call marshal in
        let k = per_call keep_only in
        Array.fill kept 0 n (Obj.repr 0);
        [| c; f; fr; i; ir; m; k |])
  in
  (* OCaml 5: the same with a second domain running (allocating without pause), which
     makes the general traversal use its side table. *)
  let beside =
    match Other_domain.start () with
    | None -> None
    | Some d ->
        let runs =
          List.init cfg.runs (fun _ ->
              let c = per_call copy_all in
              free_all ();
              (c, per_call interleaved))
        in
        Other_domain.stop d;
        Some (summarize (List.map fst runs), summarize (List.map snd runs))
  in
  let pick k = summarize (List.map (fun r -> r.(k)) runs) in
  let copy = pick 0
  and free = pick 1
  and free_read = pick 2
  and inter = pick 3
  and inter_read = pick 4
  and marshal = pick 5
  and keep = pick 6 in
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
      [ "free, each copy read once before"; ns free_read; ratio free_read; "-" ];
      [ "copy + get + free, interleaved"; ns inter_read; ratio inter_read; "-" ];
      [ "Marshal round trip"; ns marshal; "1.00"; "1.00" ];
      [
        "keeping a fresh 3-field block, no copy (floor of a kept copy)";
        ns keep;
        ratio keep;
        "-";
      ];
    ];
  match beside with
  | None -> ()
  | Some (c, i) ->
      Printf.printf
        "\nWith a second domain running and allocating (median copy / median with one \
         domain):\n\n";
      let vs s one = Printf.sprintf "%.2f" (s.median /. one.median) in
      table
        [ "operation"; "ns per call"; "/ one domain" ]
        [ `L; `R; `R ]
        [
          [ "copy, a second domain running"; ns c; vs c copy ];
          [ "copy + free, interleaved, a second domain running"; ns i; vs i inter ];
        ]

(* {1 Values of every size, one at a time}

   Lists of [n] pairs (2n blocks: n cells, n pairs), copied and freed one at a time: the per-call cost from the path of small values (on the stack up to 32 blocks) to the
   general traversal. On OCaml 5 the same with a second domain running and allocating:
   beyond the path of small values a copy then stops the other domains (a
   stop-the-world section) and marks headers as if alone. *)

let sizes_table cfg =
  let sizes = [ 4; 8; 12; 50; 500; 5000 ] in
  let per_call n f =
    let calls = max 20 (2_000_000 / (n * 2)) in
    let calls = max 10 (int_of_float (float calls *. max cfg.scale 0.1)) in
    let t0 = Unix.gettimeofday () in
    for _ = 1 to calls do
      f ()
    done;
    (Unix.gettimeofday () -. t0) *. 1e9 /. float calls
  in
  let measure () =
    List.map
      (fun n ->
        let v = List.init n (fun i -> (i, i)) in
        let copy_free () = Offheap.free (Offheap.copy v) in
        let marshal () =
          let back : (int * int) list = Marshal.from_string (Marshal.to_string v []) 0 in
          ignore (Sys.opaque_identity back)
        in
        copy_free ();
        let runs =
          List.init cfg.runs (fun _ -> (per_call n copy_free, per_call n marshal))
        in
        (n, summarize (List.map fst runs), summarize (List.map snd runs)))
      sizes
  in
  progress "values of every size, one domain";
  let one = measure () in
  let two =
    match Other_domain.start () with
    | None -> None
    | Some d ->
        progress "values of every size, a second domain running";
        let two = measure () in
        Other_domain.stop d;
        Some two
  in
  let ns s = Printf.sprintf "%.0f (%.0f-%.0f)" s.median s.min s.max in
  Printf.printf
    "\n### Values of every size, one at a time (OCaml %s)\n\nA list of n pairs (2n \
     blocks) copied and freed, per call in ns, median (min-max) of %d runs; a Marshal \
     round trip of the same list%s.\n\n"
    Sys.ocaml_version cfg.runs
    (if two = None then ""
     else "; then the same with a second domain running and allocating");
  let header =
    [ "pairs"; "blocks"; "copy + free"; "Marshal"; "copy / Marshal" ]
    @ if two = None then [] else [ "copy + free, two domains"; "two / one" ]
  in
  table header
    (List.map (fun _ -> `R) header)
    (List.mapi
       (fun k (n, c, m) ->
         [ string_of_int n; string_of_int (2 * n); ns c; ns m;
           Printf.sprintf "%.2f" (c.median /. m.median) ]
         @
         match two with
         | None -> []
         | Some two ->
             let _, c2, _ = List.nth two k in
             [ ns c2; Printf.sprintf "%.2f" (c2.median /. c.median) ])
       one)

(* Strings of [n] bytes, copied and freed one at a time: one block of every size, from
   the slab's classes (up to 8 KiB of copy) to the default allocator's [malloc] (with a
   page-table registration on OCaml 4), against a Marshal round trip of the string. *)
let strings_table cfg =
  let sizes = [ 100; 1000; 1100; 2000; 4000; 8000; 8300; 16000; 64000 ] in
  let per_call n f =
    let calls = max 20 (int_of_float (2e7 /. float (n + 400) *. max cfg.scale 0.1)) in
    let t0 = Unix.gettimeofday () in
    for _ = 1 to calls do
      f ()
    done;
    (Unix.gettimeofday () -. t0) *. 1e9 /. float calls
  in
  progress "strings of every size";
  let rows =
    List.map
      (fun n ->
        let v = String.init n (fun i -> Char.chr (97 + (i mod 26))) in
        let copy_free () = Offheap.free (Offheap.copy v) in
        let marshal () =
          let back : string = Marshal.from_string (Marshal.to_string v []) 0 in
          ignore (Sys.opaque_identity back)
        in
        copy_free ();
        let runs = List.init cfg.runs (fun _ -> (per_call n copy_free, per_call n marshal)) in
        (n, summarize (List.map fst runs), summarize (List.map snd runs)))
      sizes
  in
  let ns s = Printf.sprintf "%.0f (%.0f-%.0f)" s.median s.min s.max in
  Printf.printf
    "\n### Strings of every size, one at a time (OCaml %s)\n\nA string of n bytes copied \
     and freed, per call in ns, median (min-max) of %d runs; a Marshal round trip of the \
     same string.\n\n"
    Sys.ocaml_version cfg.runs;
  let header = [ "bytes"; "copy + free"; "Marshal"; "copy / Marshal" ] in
  table header
    (List.map (fun _ -> `R) header)
    (List.map
       (fun (n, c, m) ->
         [ string_of_int n; ns c; ns m; Printf.sprintf "%.2f" (c.median /. m.median) ])
       rows)

(* {1 Main} *)

let () =
  let quick = ref false in
  let scale = ref None in
  let runs = ref None in
  let only = ref [] in
  let small_only = ref false in
  let domains = ref false in
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
        ( "-domains",
          Arg.Set domains,
          " OCaml 5: the copy with one domain and with a second one running (side table)" );
        ( "-only",
          Arg.String (fun s -> only := !only @ String.split_on_char ',' s),
          "NAME Run only this workload (comma-separated list), one of: "
          ^ String.concat ", " names );
      ]
  in
  Arg.parse spec
    (fun a -> raise (Arg.Bad ("unexpected argument " ^ a)))
    "bench.exe [-quick] [-domains] [-scale F] [-runs N] [-only NAME[,NAME...]]";
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
    sizes_table cfg;
    strings_table cfg;
    exit 0
  end;
  let machine = machine () in
  let t0 = Unix.gettimeofday () in
  if !domains then begin
    let results = List.map (run_domains cfg) selected in
    progress "done in %.0f s" (Unix.gettimeofday () -. t0);
    print_domains cfg machine results;
    exit 0
  end;
  progress "empty heap: full major GC";
  let empty = gc_cost cfg in
  let results = List.map (run_workload cfg) selected in
  progress "done in %.0f s" (Unix.gettimeofday () -. t0);
  print_results cfg machine empty results;
  if !only = [] then begin
    small_values cfg;
    sizes_table cfg;
    strings_table cfg
  end
