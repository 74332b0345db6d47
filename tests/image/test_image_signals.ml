(* Signals during image writes and loads: a SIGALRM handler that raises fires every
   millisecond while a ~105 MB value is written and loaded again and again. The stubs run
   no handler inside (they release the runtime with
   caml_enter_blocking_section_no_pending), so nothing is raised through Rust frames:
   the process goes on, its memory stays flat (no copy or payload leaked), no temporary
   file is left, and the source value is intact.

   test_image_signals [writes|loads]: one phase, or both. *)

exception Tick

let armed = ref false
let ticks = ref 0
let raised = ref 0

let () =
  Sys.set_signal Sys.sigalrm
    (Sys.Signal_handle
       (fun _ ->
         incr ticks;
         if !armed then raise Tick))

let timer interval =
  ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = interval; it_value = interval })

let rss_kb () =
  let ic = open_in "/proc/self/status" in
  let rec find () =
    match input_line ic with
    | l when String.length l > 6 && String.sub l 0 6 = "VmRSS:" -> Scanf.sscanf l "VmRSS: %d kB" Fun.id
    | _ -> find ()
  in
  let kb = find () in
  close_in ic;
  kb

let dir =
  Filename.concat (Filename.get_temp_dir_name ())
    (Printf.sprintf "offheap-image-signals-%d" (Unix.getpid ()))

let path = Filename.concat dir "big.img"

(* About 105 MB in the heap: 1.2 million strings of 64 bytes and their array. *)
let build () = Array.init 1_200_000 (fun i -> Printf.sprintf "%064d" i)

(* Runs [f] with the handler raising; [Tick] is caught. *)
let interrupted f =
  armed := true;
  match f () with
  | () -> armed := false
  | exception Tick ->
      armed := false;
      incr raised

let check_flat what before =
  Gc.compact ();
  let after = rss_kb () in
  Printf.printf "%s: RSS %d kB before, %d kB after; %d ticks, %d raised\n%!" what before after
    !ticks !raised;
  if !ticks = 0 then failwith (what ^ ": the timer never fired");
  (* One leaked copy or payload is about 100 MB. *)
  if after - before > 16 * 1024 then
    failwith (Printf.sprintf "%s: RSS grew by %d kB" what (after - before))

let check_dir what =
  match Sys.readdir dir with
  | [| "big.img" |] | [||] -> ()
  | names -> failwith (what ^ ": left in the directory: " ^ String.concat " " (Array.to_list names))

let round_trip v =
  Offheap.Image.write path v;
  let h = Offheap.Image.load path in
  if Offheap.get h <> v then failwith "round trip";
  Offheap.free h

let writes v digest =
  round_trip v;
  Gc.compact ();
  let before = rss_kb () in
  ticks := 0;
  timer 0.001;
  for _ = 1 to 6 do
    interrupted (fun () -> Offheap.Image.write path v)
  done;
  timer 0.;
  check_dir "writes";
  check_flat "writes" before;
  if Digest.string (Marshal.to_string v []) <> digest then failwith "writes: the source changed"

let loads v =
  Offheap.Image.write path v;
  round_trip v;
  Gc.compact ();
  let before = rss_kb () in
  ticks := 0;
  timer 0.001;
  for _ = 1 to 6 do
    interrupted (fun () ->
        let h = Offheap.Image.load path in
        (* Disarmed before the handle is used: a Tick after [load] returned would be the
           test's own leak. *)
        armed := false;
        Offheap.free h)
  done;
  timer 0.;
  check_dir "loads";
  Gc.full_major ();
  check_flat "loads" before

let () =
  (try Unix.mkdir dir 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ());
  let v = build () in
  let digest = Digest.string (Marshal.to_string v []) in
  let phases = if Array.length Sys.argv > 1 then [ Sys.argv.(1) ] else [ "writes"; "loads" ] in
  Fun.protect
    ~finally:(fun () ->
      Array.iter (fun f -> Sys.remove (Filename.concat dir f)) (Sys.readdir dir);
      Unix.rmdir dir)
    (fun () ->
      List.iter
        (function
          | "writes" -> writes v digest | "loads" -> loads v | p -> failwith ("unknown phase " ^ p))
        phases)
