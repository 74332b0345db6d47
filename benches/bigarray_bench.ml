(* The benchmark of Bigarrays run by [make bench-bigarray] (issue 13): a value holding a
   large float64 Bigarray and an index over it (an array of records naming slices of it,
   and sub-arrays of some of them).

   - copy: [Offheap.copy] of the value, against a warm [Bigarray.Array1.blit] of the same
     bytes (a memmove between two buffers already faulted in: the floor), and against a
     blit into a freshly made Bigarray (the same bytes into fresh memory, whose pages the
     kernel must zero on first touch, as it must for the copy's);
   - image load: fresh processes loading the image with [~share:true ~verify:false]
     (structure checked, data untouched) at two sizes of data: the time does not grow
     with the data; minor page faults of the load call show that no page of data is
     read;
   - memory: 4 processes holding the image mapped, each reading all the data: Pss total.

   bigarray_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR]

   Markdown to stdout, progress to stderr. Children are this executable with -child or
   -hold. *)

open Bigarray
open Child

type entry = { name : string; off : int; len : int }

type value = {
  data : (float, float64_elt, c_layout) Array1.t;
  index : entry array;
  views : (float, float64_elt, c_layout) Array1.t array;
}

let build bytes =
  let n = bytes / 8 in
  let data = Array1.create float64 c_layout n in
  for i = 0 to n - 1 do
    Array1.unsafe_set data i (float_of_int i)
  done;
  let entries = 100_000 in
  let index =
    Array.init entries (fun k ->
        let off = k * (n / entries) in
        { name = "series-" ^ string_of_int k; off; len = n / entries })
  in
  let views = Array.init 100 (fun k -> Array1.sub data index.(k).off index.(k).len) in
  { data; index; views }

let median xs =
  let a = Array.of_list xs in
  Array.sort compare a;
  a.(Array.length a / 2)

let time f =
  let t0 = Unix.gettimeofday () in
  let r = f () in
  (Unix.gettimeofday () -. t0, r)

(* Minor page faults of this process so far (/proc/self/stat, field 10). *)
let minor_faults () =
  let ic = open_in "/proc/self/stat" in
  let line = input_line ic in
  close_in ic;
  let after = String.sub line (String.rindex line ')' + 2) (String.length line - String.rindex line ')' - 2) in
  int_of_string (List.nth (String.split_on_char ' ' after) 7)

let load ?(trusted = false) path : value Offheap.t =
  Offheap.Image.load ~share:true ~verify:false ~trusted path

(* -child MODE PATH: prints the seconds and minor faults of the load ([trusted] or
   [checked]), then checks the value. *)
let child mode path =
  let f0 = minor_faults () in
  let t, h = time (fun () -> load ~trusted:(mode = "trusted") path) in
  let faults = minor_faults () - f0 in
  let v = Offheap.get h in
  assert (Array1.dim v.data > 0 && v.index.(1).off = Array1.dim v.views.(0));
  Printf.printf "%.6f %d\n%!" t faults

(* -hold PATH: loads, reads all the data, says "ready", waits, prints its Pss. *)
let hold path =
  let v = Offheap.get (load path) in
  let sum = ref 0. in
  for i = 0 to Array1.dim v.data - 1 do
    sum := !sum +. Array1.unsafe_get v.data i
  done;
  ignore (Sys.opaque_identity !sum);
  print_endline "ready";
  ignore (input_line stdin);
  Printf.printf "%d\n%!" (pss_kb ())

let load_in_child mode path =
  let ((_, ic, _) as c) = spawn [| "bigarray_bench"; "-child"; mode; path |] in
  let line = input_line ic in
  finish c;
  Scanf.sscanf line "%f %d" (fun t f -> (t, f))

let main () =
  let quick = ref false and scale = ref 1.0 and runs = ref 5 and dir = ref (Filename.get_temp_dir_name ()) in
  Arg.parse
    [
      ("-quick", Arg.Set quick, " 64 MB of data, 3 runs");
      ("-scale", Arg.Set_float scale, "GB of data (default 1)");
      ("-runs", Arg.Set_int runs, "N runs of each measure, the median is kept (default 5)");
      ("-dir", Arg.Set_string dir, "DIR where the images go (default the temp dir)");
    ]
    (fun _ -> raise (Arg.Bad "no arguments"))
    "bigarray_bench.exe [-quick] [-scale GB] [-runs N] [-dir DIR]";
  if !quick then (scale := 0.064; runs := 3);
  let bytes = int_of_float (!scale *. 1e9) in
  let small_bytes = bytes / 16 in
  Printf.eprintf "building %d MB of float64 data and an index...\n%!" (bytes lsr 20);
  let v = build bytes in
  (* copy vs warm memmove *)
  let warm = Array1.create float64 c_layout (Array1.dim v.data) in
  Array1.blit v.data warm;
  let floor = median (List.init !runs (fun _ -> fst (time (fun () -> Array1.blit v.data warm)))) in
  let fresh =
    median
      (List.init !runs (fun _ ->
           let t, b =
             time (fun () ->
                 let b = Array1.create float64 c_layout (Array1.dim v.data) in
                 Array1.blit v.data b;
                 b)
           in
           ignore (Sys.opaque_identity b);
           Gc.full_major ();
           t))
  in
  let copies =
    List.init !runs (fun _ ->
        let t, h = time (fun () -> Offheap.copy v) in
        Offheap.free h;
        t)
  in
  let t_copy = median copies in
  let alone =
    List.init !runs (fun _ ->
        let t, h = time (fun () -> Offheap.copy v.data) in
        Offheap.free h;
        t)
  in
  let t_alone = median alone in
  let h = Offheap.copy v in
  let copy_bytes = (Offheap.stats h).bytes in
  assert ((Offheap.get h).data = v.data);
  Offheap.free h;
  Printf.printf
    "A float64 Bigarray of %d MB, an index of %d records and %d sub-arrays over it; median \
     of %d runs.\n\n"
    (bytes lsr 20) (Array.length v.index) (Array.length v.views) !runs;
  Printf.printf "| | time | ratio to the warm memmove |\n|---|---:|---:|\n";
  Printf.printf "| warm `Array1.blit` of the data (floor) | %s | 1.00 |\n" (seconds floor);
  Printf.printf "| `Array1.create` and `blit`: the same bytes into fresh memory | %s | %.2f |\n"
    (seconds fresh) (fresh /. floor);
  Printf.printf "| `Offheap.copy` of the Bigarray alone | %s | %.2f |\n" (seconds t_alone)
    (t_alone /. floor);
  Printf.printf "| `Offheap.copy` of the value (%d MB copy) | %s | %.2f |\n%!" (copy_bytes lsr 20)
    (seconds t_copy) (t_copy /. floor);
  (* images at two sizes *)
  let path_big = Filename.concat !dir "offheap-ba-big.img" in
  let path_small = Filename.concat !dir "offheap-ba-small.img" in
  Offheap.Image.write path_big v;
  let small = build small_bytes in
  Offheap.Image.write path_small small;
  let measure mode path =
    let rs = List.init !runs (fun _ -> load_in_child mode path) in
    (median (List.map fst rs), median (List.map snd rs))
  in
  Printf.printf
    "\n| `Image.load ~share:true ~verify:false` in a fresh process | data | load time | minor page faults in the load |\n|---|---:|---:|---:|\n";
  List.iter
    (fun (mode, label) ->
      List.iter
        (fun (path, b) ->
          let t, f = measure mode path in
          Printf.printf "| %s | %d MB | %s | %d |\n%!" label (b lsr 20) (seconds t) f)
        [ (path_small, small_bytes); (path_big, bytes) ])
    [ ("checked", "structure checked"); ("trusted", "`~trusted:true`") ];
  (* Pss of 4 processes *)
  let n = 4 in
  let children = List.init n (fun _ -> spawn [| "bigarray_bench"; "-hold"; path_big |]) in
  List.iter (fun (_, ic, _) -> assert (input_line ic = "ready")) children;
  List.iter (fun (_, _, oc) -> output_string oc "go\n"; flush oc) children;
  let kbs = List.map (fun (_, ic, _) -> int_of_string (input_line ic)) children in
  List.iter finish children;
  let total = List.fold_left ( + ) 0 kbs in
  Printf.printf
    "\n| %d processes, each reading all %d MB of data (`~share:true`) | Pss total | Pss per process |\n|---|---:|---:|\n| mapped image | %d MB | %d MB |\n%!"
    n (bytes lsr 20) (total / 1024) (total / 1024 / n);
  Sys.remove path_big;
  Sys.remove path_small

let () =
  match Sys.argv with
  | [| _; "-child"; mode; path |] -> child mode path
  | [| _; "-hold"; path |] -> hold path
  | _ -> main ()
