(* The benchmark of images run by [make bench-image]: how long a fresh process takes to
   write a large value (Marshal.to_channel and Offheap.Image.write, with the peak memory
   the write adds to the process, from VmHWM), to make it usable (Marshal from a file and
   Offheap.Image.load: read into private memory, the default, or mapped with
   ~share:true; at the recorded address, and relocated; checks on every core and on one
   thread), and how much memory 4 processes holding it use (Pss, from
   /proc/self/smaps_rollup).

   image_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR] [-value NAME]

   Two values of about [scale] GB in the heap (default 1), each measured in turn (or the
   one -value names): "strings", an array of strings (16 to 112 bytes) and a Map from
   ints to strings of the array; and "mixed", the shape issue 14 was measured on (8M
   strings, a Map of 1M string keys to int lists, 10M floats), more and smaller blocks
   for its size. Markdown tables go to stdout, progress to stderr. The child processes
   are this executable, run with -child, -hold or -write. *)

open Child

(* A value the benchmark writes and loads. *)
module type VALUE = sig
  type t

  (* The name -value takes. *)
  val name : string

  (* A value of about [gb] GB in the heap. *)
  val build : float -> t

  (* What it holds, for the tables. *)
  val describe : t -> string

  (* Reads every block: all the pages of the value. *)
  val touch : t -> int

  (* Whether a loaded copy looks like what [build] made (a cheap check). *)
  val plausible : t -> bool

  (* A tiny value of the type, held by the processes that hold nothing. *)
  val tiny : t
end

(* Random strings of 16 to 112 bytes, cut from one random text. *)
let random_strings st n =
  let src = String.init 4096 (fun _ -> Char.chr (97 + Random.State.int st 26)) in
  Array.init n (fun _ ->
      let len = 16 + Random.State.int st 97 in
      String.sub src (Random.State.int st (4096 - len)) len)

(* Reads the last byte of every string: all their pages. *)
let touch_strings strings =
  Array.fold_left (fun total s -> total + Char.code s.[String.length s - 1]) 0 strings

module IM = Map.Make (Int)
module SM = Map.Make (String)

module Strings : VALUE = struct
  type t = string array * string IM.t

  let name = "strings"

  let build gb =
    (* A string block of 16 to 112 bytes takes 32 to 128 bytes; 88 on average with its
       array slot; a map entry 48 bytes plus a fifth of the strings. *)
    let n = int_of_float (gb *. 1e9 /. (88. +. (48. /. 5.))) in
    let strings = random_strings (Random.State.make [| 42 |]) n in
    let m = ref IM.empty in
    for i = 0 to (n / 5) - 1 do
      m := IM.add (i * 7919) strings.(i * 5) !m
    done;
    (strings, !m)

  let describe (strings, m) =
    Printf.sprintf "%d strings and a map of %d entries" (Array.length strings) (IM.cardinal m)

  let touch (strings, m) =
    IM.fold (fun k s total -> total + k + String.length s) m (touch_strings strings)

  let plausible (strings, m) = Array.length strings > 0 && IM.find 0 m == strings.(0)
  let tiny = ([| "x" |], IM.singleton 0 "x")
end

module Mixed : VALUE = struct
  type t = string array * int list SM.t * float array

  let name = "mixed"

  let build gb =
    (* At 1 GB: 8M strings (88 bytes each with their slot), 1M map entries (48 bytes,
       a key of 24 to 32 and 4.5 list cells of 24 on average), 10M floats (8 bytes). *)
    let strings = random_strings (Random.State.make [| 42 |]) (int_of_float (gb *. 8e6)) in
    let st = Random.State.make [| 43 |] in
    let m = ref SM.empty in
    for i = 0 to int_of_float (gb *. 1e6) - 1 do
      let key = Printf.sprintf "key-%d" (Random.State.bits st) in
      m := SM.add key (List.init (1 + Random.State.int st 8) (fun j -> i + j)) !m
    done;
    (strings, !m, Array.init (int_of_float (gb *. 1e7)) float_of_int)

  let describe (strings, m, floats) =
    Printf.sprintf "%d strings, a map of %d string keys to int lists, %d floats"
      (Array.length strings) (SM.cardinal m) (Array.length floats)

  let touch (strings, m, floats) =
    SM.fold (fun k l total -> total + String.length k + List.fold_left ( + ) 0 l) m
      (touch_strings strings + int_of_float (Array.fold_left ( +. ) 0. floats))

  let plausible (strings, m, floats) =
    Array.length strings > 0 && (not (SM.is_empty m)) && floats.(Array.length floats - 1)
    = float (Array.length floats - 1)

  let tiny = ([| "x" |], SM.singleton "x" [ 1 ], [| 0. |])
end

let values : (module VALUE) list = [ (module Strings); (module Mixed) ]

let value_named name =
  match List.find_opt (fun (module V : VALUE) -> V.name = name) values with
  | Some v -> v
  | None -> failwith ("unknown value " ^ name)

(* How each child mode makes the value usable. *)
let load (type a) (module V : VALUE with type t = a) mode path : a =
  match mode with
  | "marshal" ->
      let ic = open_in_bin path in
      let v = Marshal.from_channel ic in
      close_in ic;
      v
  | "private" -> Offheap.get (Offheap.Image.load path)
  | "private-trusted" -> Offheap.get (Offheap.Image.load ~trusted:true ~verify:false path)
  | "private-relocated" -> Offheap.get (Offheap.Image.load_relocated path)
  | "shared" -> Offheap.get (Offheap.Image.load ~share:true path)
  | "shared-trusted" ->
      Offheap.get (Offheap.Image.load ~share:true ~trusted:true ~verify:false path)
  | "shared-relocated" -> Offheap.get (Offheap.Image.load_relocated ~share:true path)
  | "private-1" -> Offheap.get (Offheap.Image.load ~threads:1 path)
  | "shared-1" -> Offheap.get (Offheap.Image.load ~share:true ~threads:1 path)
  | "shared-relocated-1" -> Offheap.get (Offheap.Image.load_relocated ~share:true ~threads:1 path)
  | "nothing" -> V.tiny
  | m -> failwith ("unknown mode " ^ m)

(* -child VALUE MODE PATH: prints the seconds [load] took, and checks the value is
   usable. *)
let child (module V : VALUE) mode path =
  let t0 = Unix.gettimeofday () in
  let v = load (module V) mode path in
  let t = Unix.gettimeofday () -. t0 in
  assert (V.plausible v);
  ignore (Sys.opaque_identity v);
  Printf.printf "%.6f\n%!" t

(* -hold VALUE MODE PATH: loads, touches everything, says "ready", waits for a line,
   prints its Pss in kB. *)
let hold (module V : VALUE) mode path =
  let v = load (module V) mode path in
  ignore (Sys.opaque_identity (V.touch v));
  print_endline "ready";
  ignore (input_line stdin);
  Printf.printf "%d\n%!" (pss_kb ());
  ignore (Sys.opaque_identity v)

(* -write VALUE MODE PATH GB: builds the value, writes it with Marshal or as an image,
   prints the seconds the write took, the peak memory it added (VmHWM after the write
   less VmHWM before it, the peak first reset to the resident size: building the value
   and the garbage it left went higher, in kB), the value's bytes in the heap and what
   it holds. *)
let write_child (module V : VALUE) mode path gb =
  let v = V.build (float_of_string gb) in
  Gc.compact ();
  reset_peak ();
  let before = vm_hwm_kb () in
  let t0 = Unix.gettimeofday () in
  (match mode with
  | "marshal" ->
      let oc = open_out_bin path in
      Marshal.to_channel oc v [];
      close_out oc
  | "image" -> Offheap.Image.write path v
  | m -> failwith ("unknown write mode " ^ m));
  let t = Unix.gettimeofday () -. t0 in
  let added_kb = vm_hwm_kb () - before in
  Printf.printf "%.6f\n%d\n%d\n%s\n%!" t added_kb
    (Obj.reachable_words (Obj.repr v) * 8)
    (V.describe v)

let time_child value mode path =
  let (_, ic, _) as c = spawn [| "image_bench"; "-child"; value; mode; path |] in
  let t = float_of_string (input_line ic) in
  finish c;
  t

let best runs f =
  let rec go k acc = if k = 0 then acc else go (k - 1) (min acc (f ())) in
  go runs infinity

let processes = 4

let pss_total value mode path =
  let children =
    List.init processes (fun _ -> spawn [| "image_bench"; "-hold"; value; mode; path |])
  in
  List.iter (fun (_, ic, _) -> assert (input_line ic = "ready")) children;
  List.iter (fun (_, _, oc) -> output_string oc "go\n"; flush oc) children;
  let kbs = List.map (fun (_, ic, _) -> int_of_string (input_line ic)) children in
  List.iter finish children;
  List.fold_left ( + ) 0 kbs

(* The cores online: the threads [Image.load] uses by default. *)
let cores =
  let ic = Unix.open_process_in "getconf _NPROCESSORS_ONLN" in
  let n = try int_of_string (input_line ic) with _ -> 1 in
  ignore (Unix.close_process_in ic);
  n

let mb kb = Printf.sprintf "%.0f MB" (float kb /. 1024.)

(* Writes and loads a value of shape [V] and prints its tables. *)
let measure (module V : VALUE) ~scale ~runs ~dir =
  let marshal_path = Filename.concat dir "offheap-bench.marshal" in
  let image_path = Filename.concat dir "offheap-bench.img" in
  let write_in_child mode path =
    Printf.eprintf "writing in a fresh process: %s...\n%!" mode;
    let (_, ic, _) as c =
      spawn [| "image_bench"; "-write"; V.name; mode; path; string_of_float scale |]
    in
    let t = float_of_string (input_line ic) in
    let extra_kb = int_of_string (input_line ic) in
    let heap_bytes = int_of_string (input_line ic) in
    let description = input_line ic in
    finish c;
    ((t, extra_kb), (heap_bytes, description))
  in
  let w_marshal, _ = write_in_child "marshal" marshal_path in
  let w_image, (heap_bytes, description) = write_in_child "image" image_path in
  let t_marshal_write = fst w_marshal and t_image_write = fst w_image in
  let size p = (Unix.stat p).Unix.st_size in
  Printf.eprintf "written (%s, %d MB in the heap): Marshal %d MB in %.1f s, image %d MB in %.1f s\n%!"
    description (heap_bytes lsr 20) (size marshal_path lsr 20) t_marshal_write
    (size image_path lsr 20) t_image_write;
  let modes =
    [
      ("marshal", "`Marshal.from_channel`");
      ("private", "`Image.load` (read; checksum and structure verified)");
      ("private-relocated", "`Image.load`, relocated (read; checksum and structure verified)");
      ("private-trusted", "`Image.load ~trusted:true ~verify:false` (read)");
      ("shared", "`Image.load ~share:true` (mapped; checksum and structure verified)");
      ( "shared-relocated",
        "`Image.load ~share:true`, relocated (read, raw chunks mapped back; checksum and \
         structure verified)" );
      ("shared-trusted", "`Image.load ~share:true ~trusted:true ~verify:false` (mapped)");
      ("private-1", "`Image.load ~threads:1` (read; checksum and structure verified)");
      ("shared-1", "`Image.load ~share:true ~threads:1` (mapped; checksum and structure verified)");
      ( "shared-relocated-1",
        "`Image.load ~share:true ~threads:1`, relocated (read, raw chunks mapped back; checksum \
         and structure verified)" );
    ]
  in
  let path_of mode = if mode = "marshal" then marshal_path else image_path in
  let times =
    List.map
      (fun (mode, label) ->
        Printf.eprintf "loading: %s...\n%!" mode;
        (mode, label, best runs (fun () -> time_child V.name mode (path_of mode))))
      modes
  in
  let t_marshal = match times with (_, _, t) :: _ -> t | [] -> nan in
  Printf.printf
    "The value \"%s\": %d MB in the heap (%s); Marshal file %d MB, image %d MB. Best of %d \
     fresh processes for loads; the time is the load call only, the file in the page cache; \
     %d threads for the checks (one per core) unless `~threads:1`.\n\n"
    V.name (heap_bytes lsr 20) description (size marshal_path lsr 20) (size image_path lsr 20)
    runs cores;
  Printf.printf
    "| writing it (a fresh process, one run) | time | speed vs Marshal | peak memory added \
     | added / value |\n|---|---:|---:|---:|---:|\n";
  List.iter
    (fun (label, (t, kb)) ->
      Printf.printf "| %s | %s | %.2fx | %s | %.1f%% |\n" label (seconds t) (t_marshal_write /. t)
        (mb kb)
        (100. *. float (kb * 1024) /. float heap_bytes))
    [ ("`Marshal.to_channel`", w_marshal); ("`Image.write`", w_image) ];
  Printf.printf "\n";
  Printf.printf "| making the value usable | time | speed-up over Marshal |\n|---|---:|---:|\n";
  List.iter
    (fun (_, label, t) -> Printf.printf "| %s | %s | %.1fx |\n" label (seconds t) (t_marshal /. t))
    times;
  let image_gb = float (size image_path) /. 1e9 in
  let time_of m = List.fold_left (fun acc (m', _, t) -> if m = m' then t else acc) nan times in
  Printf.printf
    "\n| validation throughput (checksum, structure; mapped, at the recorded address) | GB/s |\n\
     |---|---:|\n\
     | one thread | %.2f |\n| %d threads | %.2f |\n| one thread, relocated | %.2f |\n| %d threads, relocated | %.2f |\n"
    (image_gb /. time_of "shared-1") (cores) (image_gb /. time_of "shared")
    (image_gb /. time_of "shared-relocated-1") (cores)
    (image_gb /. time_of "shared-relocated");
  Printf.eprintf "memory of %d processes...\n%!" processes;
  let nothing = pss_total V.name "nothing" marshal_path in
  let marshalled = pss_total V.name "marshal" marshal_path in
  let private_ = pss_total V.name "private" image_path in
  let shared = pss_total V.name "shared" image_path in
  Printf.printf "\n| %d processes holding it (all of it touched) | Pss, total | Pss, per process |\n|---|---:|---:|\n"
    processes;
  Printf.printf "| holding nothing (the runtime alone) | %s | %s |\n" (mb nothing) (mb (nothing / processes));
  Printf.printf "| unmarshalled | %s | %s |\n" (mb marshalled) (mb (marshalled / processes));
  Printf.printf "| `Image.load` (read) | %s | %s |\n" (mb private_) (mb (private_ / processes));
  Printf.printf "| `Image.load ~share:true` (mapped) | %s | %s |\n%!" (mb shared)
    (mb (shared / processes));
  Printf.printf "\n%!";
  Sys.remove marshal_path;
  Sys.remove image_path

let main () =
  let quick = ref false
  and scale = ref 1.0
  and runs = ref 3
  and dir = ref (Filename.get_temp_dir_name ())
  and only = ref None in
  Arg.parse
    [
      ("-quick", Arg.Set quick, " a 50 MB value, one run");
      ("-scale", Arg.Set_float scale, "GB size of the value in the heap (default 1)");
      ("-runs", Arg.Set_int runs, "N runs of each load, the best is kept (default 3)");
      ("-dir", Arg.Set_string dir, "DIR where the files go (default the temp dir)");
      ("-value", Arg.String (fun v -> only := Some v), "NAME only this value (strings, mixed)");
    ]
    (fun _ -> raise (Arg.Bad "no arguments"))
    "image_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR] [-value NAME]";
  if !quick then (
    scale := 0.05;
    runs := 1);
  let chosen = match !only with None -> values | Some name -> [ value_named name ] in
  List.iter (fun v -> measure v ~scale:!scale ~runs:!runs ~dir:!dir) chosen

let () =
  match Sys.argv with
  | [| _; "-child"; value; mode; path |] -> child (value_named value) mode path
  | [| _; "-hold"; value; mode; path |] -> hold (value_named value) mode path
  | [| _; "-write"; value; mode; path; gb |] -> write_child (value_named value) mode path gb
  | _ -> main ()
