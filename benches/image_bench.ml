(* The benchmark of images run by [make bench-image]: how long a fresh process takes to
   write a large value (Marshal.to_channel and Offheap.Image.write, with the peak memory
   the write adds to the process, from VmHWM), to make it usable (Marshal from a file and
   Offheap.Image.load: read into private memory, the default, or mapped with
   ~share:true; at the recorded address, and relocated; checks on every core and on one
   thread), and how much memory 4 processes holding it use (Pss, from
   /proc/self/smaps_rollup).

   image_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR]

   The value: an array of strings (16 to 112 bytes) and a Map from ints to strings of
   the array, about [scale] GB in the heap (default 1). Markdown tables go to stdout,
   progress to stderr. The child processes are this executable, run with -child or
   -hold. *)

module IM = Map.Make (Int)

type value = string array * string IM.t

open Child

let build gb =
  (* A string block of 16 to 112 bytes takes 32 to 128 bytes; 88 on average with its
     array slot; a map entry 48 bytes plus a fifth of the strings. *)
  let n = int_of_float (gb *. 1e9 /. (88. +. (48. /. 5.))) in
  let st = Random.State.make [| 42 |] in
  let src = String.init 4096 (fun _ -> Char.chr (97 + Random.State.int st 26)) in
  let strings =
    Array.init n (fun _ ->
        let len = 16 + Random.State.int st 97 in
        String.sub src (Random.State.int st (4096 - len)) len)
  in
  let m = ref IM.empty in
  for i = 0 to (n / 5) - 1 do
    m := IM.add (i * 7919) strings.(i * 5) !m
  done;
  ((strings, !m) : value)

(* Reads every string and every map entry: all the pages of the value. *)
let touch ((strings, m) : value) =
  let total = ref 0 in
  Array.iter (fun s -> total := !total + Char.code s.[String.length s - 1]) strings;
  IM.iter (fun k s -> total := !total + k + String.length s) m;
  !total

(* How each child mode makes the value usable. *)
let load mode path : value =
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
  | "nothing" -> ([| "x" |], IM.singleton 0 "x")
  | m -> failwith ("unknown mode " ^ m)

(* -child MODE PATH: prints the seconds [load] took, and checks the value is usable. *)
let child mode path =
  let t0 = Unix.gettimeofday () in
  let ((strings, m) as v) = load mode path in
  let t = Unix.gettimeofday () -. t0 in
  assert (Array.length strings > 0 && (mode = "nothing" || IM.find 0 m == strings.(0)));
  ignore (Sys.opaque_identity v);
  Printf.printf "%.6f\n%!" t

(* -hold MODE PATH: loads, touches everything, says "ready", waits for a line, prints
   its Pss in kB. *)
let hold mode path =
  let v = load mode path in
  ignore (Sys.opaque_identity (touch v));
  print_endline "ready";
  ignore (input_line stdin);
  Printf.printf "%d\n%!" (pss_kb ());
  ignore (Sys.opaque_identity v)

(* -write MODE PATH GB: builds the value, writes it with Marshal or as an image, prints
   the seconds the write took and the peak memory it added (VmHWM after the write less
   VmHWM before it, in kB). *)
let write_child build mode path gb =
  let v = build (float_of_string gb) in
  Gc.compact ();
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
  Printf.printf "%.6f\n%d\n%!" t (vm_hwm_kb () - before);
  ignore (Sys.opaque_identity v)

let time_child mode path =
  let (_, ic, _) as c = spawn [| "image_bench"; "-child"; mode; path |] in
  let t = float_of_string (input_line ic) in
  finish c;
  t

let best runs f =
  let rec go k acc = if k = 0 then acc else go (k - 1) (min acc (f ())) in
  go runs infinity

let processes = 4

let pss_total mode path =
  let children = List.init processes (fun _ -> spawn [| "image_bench"; "-hold"; mode; path |]) in
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

let main () =
  let quick = ref false and scale = ref 1.0 and runs = ref 3 and dir = ref (Filename.get_temp_dir_name ()) in
  Arg.parse
    [
      ("-quick", Arg.Set quick, " a 50 MB value, one run");
      ("-scale", Arg.Set_float scale, "GB size of the value in the heap (default 1)");
      ("-runs", Arg.Set_int runs, "N runs of each load, the best is kept (default 3)");
      ("-dir", Arg.Set_string dir, "DIR where the files go (default the temp dir)");
    ]
    (fun _ -> raise (Arg.Bad "no arguments"))
    "image_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR]";
  if !quick then (scale := 0.05; runs := 1);
  let marshal_path = Filename.concat !dir "offheap-bench.marshal" in
  let image_path = Filename.concat !dir "offheap-bench.img" in
  let write_in_child mode path =
    Printf.eprintf "writing in a fresh process: %s...\n%!" mode;
    let (_, ic, _) as c =
      spawn [| "image_bench"; "-write"; mode; path; string_of_float !scale |]
    in
    let t = float_of_string (input_line ic) in
    let extra_kb = int_of_string (input_line ic) in
    finish c;
    (t, extra_kb)
  in
  let w_marshal = write_in_child "marshal" marshal_path in
  let w_image = write_in_child "image" image_path in
  Printf.eprintf "building a %.2f GB value...\n%!" !scale;
  let t0 = Unix.gettimeofday () in
  let v = build !scale in
  let heap_bytes = Obj.reachable_words (Obj.repr v) * 8 in
  Printf.eprintf "built in %.1f s: %d strings, %d MB in the heap\n%!" (Unix.gettimeofday () -. t0)
    (Array.length (fst v)) (heap_bytes lsr 20);
  let t_marshal_write = fst w_marshal and t_image_write = fst w_image in
  let size p = (Unix.stat p).Unix.st_size in
  Printf.eprintf "written: Marshal %d MB in %.1f s, image %d MB in %.1f s\n%!"
    (size marshal_path lsr 20) t_marshal_write (size image_path lsr 20) t_image_write;
  ignore (Sys.opaque_identity v);
  Gc.compact ();
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
        (mode, label, best !runs (fun () -> time_child mode (path_of mode))))
      modes
  in
  let t_marshal = match times with (_, _, t) :: _ -> t | [] -> nan in
  Printf.printf
    "A value of %d MB in the heap (%d strings and a map of %d entries); Marshal file %d MB, \
     image %d MB. Best of %d fresh processes for loads; the time is the load call only, the \
     file in the page cache; %d threads for the checks (one per core) unless `~threads:1`.\n\n"
    (heap_bytes lsr 20) (Array.length (fst v)) (IM.cardinal (snd v)) (size marshal_path lsr 20)
    (size image_path lsr 20) !runs (cores);
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
  let nothing = pss_total "nothing" marshal_path in
  let marshalled = pss_total "marshal" marshal_path in
  let private_ = pss_total "private" image_path in
  let shared = pss_total "shared" image_path in
  Printf.printf "\n| %d processes holding it (all of it touched) | Pss, total | Pss, per process |\n|---|---:|---:|\n"
    processes;
  Printf.printf "| holding nothing (the runtime alone) | %s | %s |\n" (mb nothing) (mb (nothing / processes));
  Printf.printf "| unmarshalled | %s | %s |\n" (mb marshalled) (mb (marshalled / processes));
  Printf.printf "| `Image.load` (read) | %s | %s |\n" (mb private_) (mb (private_ / processes));
  Printf.printf "| `Image.load ~share:true` (mapped) | %s | %s |\n%!" (mb shared)
    (mb (shared / processes));
  Sys.remove marshal_path;
  Sys.remove image_path

let () =
  match Sys.argv with
  | [| _; "-child"; mode; path |] -> child mode path
  | [| _; "-hold"; mode; path |] -> hold mode path
  | [| _; "-write"; mode; path; gb |] -> write_child build mode path gb
  | _ -> main ()
