(* Regression tests of two bugs found by test_image_adv (both fixed; run by `dune build
   @runtest`).

   1. "fix-up scratch file asked for at every custom block": where the image's directory
      has no O_TMPFILE (adv_shim.so with ADV_NO_TMPFILE=1 makes the kernel refuse them,
      EOPNOTSUPP), FixUps::push (src/image/fixups.rs) called spill at every push once 64
      Ki entries were in memory, and spill tried file::scratch_file again each time: one
      failing open(2) per custom block past the 65536th (234 466 for 300k, 1.93M for 2M;
      a write of 2M Int64 then took ~2.8 s instead of ~0.3 s). Now tried once.

   2. "load aborts under an address-space limit": Image.load of an image with many
      Bigarrays under `ulimit -v` aborted the process (Rust "memory allocation of 131072
      bytes failed", SIGABRT) instead of raising Out_of_memory: validate::check's tiling
      grew Vecs with infallible pushes (tiled.data_blocks / bigarrays / forwards,
      src/image/validate.rs) inside parallel(). Now fallible. *)

open OUnit2
module Image = Offheap.Image

let exe = Sys.executable_name
let shim = Filename.concat (Filename.dirname exe) "adv_shim.so"

let dir =
  Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap-image-adv-bugs-%d" (Unix.getpid ()))

let path name =
  (try Unix.mkdir dir 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ());
  Filename.concat dir name

(* As test_image_adv's [customs 300_000]: Int32, Int64, Nativeint and a Bigarray of
   1 to 3 int64 every 4th. *)
let bigarrays n =
  List.init n (fun i ->
      match i mod 4 with
      | 0 -> Obj.repr (Int32.of_int (i - 7))
      | 1 -> Obj.repr (Int64.of_int (-i * 3))
      | 2 -> Obj.repr (Nativeint.of_int (i * 5))
      | _ ->
          let a = Bigarray.(Array1.create int64 c_layout (1 + (i mod 3))) in
          for k = 0 to Bigarray.Array1.dim a - 1 do
            a.{k} <- Int64.of_int (i + k)
          done;
          Obj.repr a)

let child () =
  match Array.to_list Sys.argv with
  | [ _; "child"; "write-int64"; p; n ] ->
      let v = List.init (int_of_string n) Int64.of_int in
      Image.write p v;
      let h = Image.load p in
      if Offheap.get h <> v then exit 1;
      Offheap.free h;
      Sys.remove p;
      exit 0
  | [ _; "child"; "load"; p; n ] -> (
      (* The value in the heap too, as in a round trip, then the load. *)
      let v = bigarrays (int_of_string n) in
      match Image.load p with
      | h ->
          if compare (Obj.repr (Offheap.get h)) (Obj.repr v) <> 0 then exit 1;
          Offheap.free h;
          exit 0
      | exception Out_of_memory -> exit 4)
  | [ _; "child"; "write"; p; n ] ->
      Image.write p (bigarrays (int_of_string n));
      exit 0
  | _ -> exit 2

let test_scratch_retries _ =
  let report = path "report" in
  let p = path "int64.img" in
  let cmd =
    Printf.sprintf "env LD_PRELOAD=%s ADV_NO_TMPFILE=1 ADV_REPORT=%s %s child write-int64 %s 300000"
      (Filename.quote shim) (Filename.quote report) (Filename.quote exe) (Filename.quote p)
  in
  assert_equal ~msg:cmd ~printer:string_of_int 0 (Sys.command cmd);
  let ic = open_in report in
  let opens = Scanf.sscanf (input_line ic) "%d %d" (fun o _ -> o) in
  close_in ic;
  (* The image's own, the queue's, the fix-up table's: a few attempts, not one a block. *)
  assert_bool (Printf.sprintf "%d O_TMPFILE opens attempted for one write" opens) (opens <= 8)

let test_load_abort _ =
  let n = 300_000 in
  let p = path "bigarrays.img" in
  Image.write p (bigarrays n);
  let err = path "stderr" in
  List.iter
    (fun kb ->
      let cmd =
        Printf.sprintf "ulimit -v %d; exec %s child load %s %d 2>%s" kb (Filename.quote exe) (Filename.quote p) n
          (Filename.quote err)
      in
      let rc = Sys.command cmd in
      let ic = open_in_bin err in
      let stderr = really_input_string ic (in_channel_length ic) in
      close_in ic;
      (* Out of memory may end the child in the OCaml runtime (building the value):
         not this bug. Rust's handler of a failed allocation (an abort) is. *)
      let rust_abort =
        let k = String.length "memory allocation of" in
        let rec go i = i + k <= String.length stderr && (String.sub stderr i k = "memory allocation of" || go (i + 1)) in
        go 0
      in
      assert_bool
        (Printf.sprintf "load under ulimit -v %d: exit %d, %S" kb rc stderr)
        (not rust_abort))
    (List.init 16 (fun k -> 49152 + (k * 4096)));
  Sys.remove p

let () =
  if Array.length Sys.argv > 1 && Sys.argv.(1) = "child" then child ()
  else begin
    at_exit (fun () -> ignore (Sys.command ("rm -rf " ^ Filename.quote dir)));
    run_test_tt_main
      ("image-adv-bugs"
      >::: [
             "fix-up scratch file asked for at every custom block" >:: test_scratch_retries;
             "load aborts under an address-space limit" >:: test_load_abort;
           ])
  end
