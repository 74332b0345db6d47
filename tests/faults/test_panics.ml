(* A panic inside a stub aborts the process with its message: it never unwinds through
   OCaml frames nor becomes an OCaml exception raised through Rust frames (which would
   skip the traversal's restore and leave marks in live headers).

   Needs the library built with the cargo feature fault-injection (make test-faults):
   the environment variable OFFHEAP_INJECT_PANIC then names the point that panics
   (src/fault.rs). Run without arguments, this program runs itself as a child once per
   point, and once with no point set (the child must then succeed, so a build without
   the feature, or a point never reached, fails the test). *)

open OUnit2

let image_path = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap-panics-%d.img" (Unix.getpid ()))

let value () = List.init 10_000 (fun i -> (i, string_of_int i))

(* What a child does: an operation that passes the injected point. *)
let child point path =
  (match point with
  | "measure" | "write" | "restore" | "none" ->
      let v = value () in
      let h = Offheap.copy v in
      assert (Offheap.get h = v);
      Offheap.free h
  | "image-write" -> Offheap.Image.write path (value ())
  | "image-load" ->
      let h = Offheap.Image.load path in
      assert (Offheap.get h = value ());
      Offheap.free h
  | p -> failwith ("unknown point " ^ p));
  print_string "child done";
  exit 0

let contains s sub =
  let n = String.length s and m = String.length sub in
  let rec at i = i + m <= n && (String.sub s i m = sub || at (i + 1)) in
  at 0

let read_file path =
  let ic = open_in_bin path in
  let s = really_input_string ic (in_channel_length ic) in
  close_in ic;
  s

(* Runs this program as a child doing [op] with OFFHEAP_INJECT_PANIC=[point] (unset when
   [point] is None); returns its status and what it wrote to stderr and stdout. *)
let run_child ~op point =
  let err = Filename.temp_file "offheap-panic" ".err" and out = Filename.temp_file "offheap-panic" ".out" in
  let env =
    Array.append
      (Array.of_list
         (List.filter
            (fun kv -> not (String.length kv >= 21 && String.sub kv 0 21 = "OFFHEAP_INJECT_PANIC="))
            (Array.to_list (Unix.environment ()))))
      (match point with Some p -> [| "OFFHEAP_INJECT_PANIC=" ^ p |] | None -> [||])
  in
  let fd_err = Unix.openfile err [ Unix.O_WRONLY; Unix.O_TRUNC ] 0o600 in
  let fd_out = Unix.openfile out [ Unix.O_WRONLY; Unix.O_TRUNC ] 0o600 in
  let prog = Sys.executable_name in
  let args = [| prog; "child"; op; image_path |] in
  let pid = Unix.create_process_env args.(0) args env Unix.stdin fd_out fd_err in
  Unix.close fd_err;
  Unix.close fd_out;
  let _, status = Unix.waitpid [] pid in
  let e = read_file err and o = read_file out in
  Sys.remove err;
  Sys.remove out;
  (status, e, o)

let check_abort ~op point _ =
  (match run_child ~op None with
  | Unix.WEXITED 0, _, out -> assert_bool "child without injection finished" (contains out "child done")
  | _, err, _ -> assert_failure ("child without injection failed: " ^ err));
  match run_child ~op (Some point) with
  | Unix.WSIGNALED s, err, out when s = Sys.sigabrt ->
      assert_bool ("stderr names the panic: " ^ err) (contains err ("panic injected at " ^ point));
      assert_bool "the child did not go on" (not (contains out "child done"))
  | Unix.WSIGNALED s, err, _ -> assert_failure (Printf.sprintf "killed by signal %d: %s" s err)
  | Unix.WEXITED n, err, _ -> assert_failure (Printf.sprintf "exited %d instead of aborting: %s" n err)
  | Unix.WSTOPPED _, _, _ -> assert_failure "stopped"

let () =
  match Sys.argv with
  | [| _; "child"; op; path |] -> child op path
  | _ ->
      Offheap.Image.write image_path (value ());
      let cases =
        [ ("measure", "measure"); ("write", "write"); ("restore", "restore");
          ("image-write", "image-write"); ("image-load", "image-load") ]
      in
      Fun.protect
        ~finally:(fun () -> try Sys.remove image_path with Sys_error _ -> ())
        (fun () ->
          run_test_tt_main
            ("panics abort"
            >::: List.map (fun (op, point) -> ("panic in " ^ point) >:: check_abort ~op point) cases))
