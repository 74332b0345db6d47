(* A 6 GB image: sizes and offsets past 4 GiB, written (streaming), loaded verified at
   the recorded address, relocated, trusted, read and mapped, with 1 thread and with
   every core. Run by [make test-image-large] (OFFHEAP_LARGE_TESTS=1); it needs about
   13 GB of memory and 6 GB of disk in the temp dir (or $OFFHEAP_LARGE_DIR). *)

module Image = Offheap.Image

(* A 5 GiB string first (one block across 5120 chunks of the index), then 1M small
   blocks whose offsets are all past 4 GiB, reached from an array, and a float array.
   About 6 GB. *)
let build () =
  let big = Bytes.make (5 lsl 30) 'a' in
  for k = 0 to (5 lsl 30) / 4096 - 1 do
    Bytes.set big (k * 4096) (Char.chr (k land 0xff))
  done;
  let big = Bytes.unsafe_to_string big in
  let small = Array.init 1_000_000 (fun i -> (i, string_of_int i, Int64.of_int (-i))) in
  let floats = Array.init (100 lsl 20) float_of_int in
  (big, small, floats)

let check_value what ((big, small, floats) as _v) =
  let fail m = failwith (Printf.sprintf "%s: %s" what m) in
  if String.length big <> 5 lsl 30 then fail "string length";
  for k = 0 to (5 lsl 30) / 4096 - 1 do
    if big.[k * 4096] <> Char.chr (k land 0xff) || big.[(k * 4096) + 1] <> 'a' then
      fail (Printf.sprintf "string byte %d" (k * 4096))
  done;
  Array.iteri
    (fun i (j, s, n) ->
      if i <> j || s <> string_of_int i || n <> Int64.of_int (-i) then
        fail (Printf.sprintf "small block %d" i))
    small;
  Array.iteri (fun i f -> if f <> float_of_int i then fail (Printf.sprintf "float %d" i)) floats

let contains = Probes.contains

let time what f =
  let t0 = Unix.gettimeofday () in
  let r = f () in
  Printf.printf "%s: %.2f s\n%!" what (Unix.gettimeofday () -. t0);
  r

let () =
  if Sys.getenv_opt "OFFHEAP_LARGE_TESTS" <> Some "1" then begin
    prerr_endline "test_image_large: set OFFHEAP_LARGE_TESTS=1 (make test-image-large)";
    exit 2
  end;
  let dir = Option.value (Sys.getenv_opt "OFFHEAP_LARGE_DIR") ~default:(Filename.get_temp_dir_name ()) in
  let path = Filename.concat dir (Printf.sprintf "offheap-large-%d.img" (Unix.getpid ())) in
  let v = time "build" build in
  time "write" (fun () -> Image.write path v);
  let size = (Unix.stat path).Unix.st_size in
  Printf.printf "image: %d bytes\n%!" size;
  assert (size > 6_000_000_000);
  let v_hash = Hashtbl.hash v in
  let loads =
    [
      ("verified, read", fun () -> Image.load path);
      ("verified, read, 1 thread", fun () -> Image.load ~threads:1 path);
      ("verified, mapped", fun () -> Image.load ~share:true path);
      ("relocated, read", fun () -> Image.load_relocated path);
      ("relocated, mapped", fun () -> Image.load_relocated ~share:true path);
      ("trusted, read", fun () -> Image.load ~trusted:true ~verify:false path);
      ("trusted, mapped", fun () -> Image.load ~share:true ~trusted:true ~verify:false path);
    ]
  in
  List.iter
    (fun (what, load) ->
      let h = time ("load " ^ what) load in
      let w = Offheap.get h in
      let relocated = Image.relocated h in
      if relocated <> (String.sub what 0 9 = "relocated") then
        failwith (what ^ ": loaded at the wrong address");
      check_value what w;
      if Hashtbl.hash w <> v_hash then failwith (what ^ ": hash");
      let _, small, _ = w and _, small0, _ = v in
      if compare small small0 <> 0 then failwith (what ^ ": compare");
      Offheap.free h;
      (* The free waits for the end of the running major cycle (OCaml 4: of its marking),
         and with it the recorded address the next load wants. *)
      let tries = ref 0 in
      while Offheap.pending_frees () > 0 && !tries < 20 do
        incr tries;
        Gc.full_major ();
        Offheap.free (Offheap.copy ())
      done)
    loads;
  (* Damage past 4 GiB, in the small blocks: located. *)
  let payload_at =
    let ic = open_in_bin path in
    seek_in ic 16;
    let field = really_input_string ic 8 in
    close_in ic;
    Int64.to_int (String.get_int64_le field 0)
  in
  let fd = Unix.openfile path [ Unix.O_RDWR ] 0 in
  let at = payload_at + (5 lsl 30) + 50_000_000 in
  ignore (Unix.lseek fd at Unix.SEEK_SET);
  let b = Bytes.create 1 in
  ignore (Unix.read fd b 0 1);
  Bytes.set b 0 (Char.chr (Char.code (Bytes.get b 0) lxor 1));
  ignore (Unix.lseek fd at Unix.SEEK_SET);
  ignore (Unix.write fd b 0 1);
  Unix.close fd;
  (match Image.load path with
  | _ -> failwith "a damaged 6 GB image loaded"
  | exception Image.Invalid_image (kind, m) ->
      print_endline m;
      if kind <> Image.Damaged_payload then failwith ("damage not classified: " ^ m);
      if not (contains m "payload checksum: chunk") then
        failwith ("damage not located: " ^ m));
  Sys.remove path;
  print_endline "large image: ok"
