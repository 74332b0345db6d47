(* Offheap.Image: round trips of every kind (closures refused), sharing and cycles, the
   recorded address and relocation, a second process, keys, and bad files. *)

open OUnit2
module Image = Offheap.Image

let main_pid = Unix.getpid ()

let dir =
  Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap-image-%d" main_pid)

let counter = ref 0

(* OUnit may run the tests in worker processes: each makes the directory if needed and
   numbers its files with its own pid. *)
let fresh_path () =
  (try Unix.mkdir dir 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ());
  incr counter;
  Filename.concat dir (Printf.sprintf "v%d-%d.img" (Unix.getpid ()) !counter)

let files_in_dir () = Array.to_list (Sys.readdir dir) |> List.sort compare

let contains = Probes.contains

let read_file = Probes.read_file

let same a b = compare (Obj.repr a) (Obj.repr b) = 0

(* Where the payload starts in the image file [file] (its header's field at byte 16). *)
let payload_at file = Int64.to_int (String.get_int64_le file 16)
let marshal v = Marshal.to_string v []

(* Writes [v], loads it back, checks it equals [v] (compare, Marshal, hash), frees it. *)
let round_trip ?(check = fun _ -> ()) v =
  let path = fresh_path () in
  Image.write path v;
  let h = Image.load path in
  let w = Offheap.get h in
  assert_bool "compare" (same v w);
  assert_equal ~msg:"Marshal" (marshal v) (marshal w);
  assert_equal ~msg:"hash" (Hashtbl.hash v) (Hashtbl.hash w);
  check w;
  Offheap.free h;
  Sys.remove path

module SM = Map.Make (String)
module IS = Set.Make (Int)

type variant = A | B of int | C of string * variant | D of { x : float; y : float }
type record = { name : string; mutable count : int; f : float; fs : float array }

let sample () =
  let shared = String.make 3 's' in
  let tbl = Hashtbl.create 16 in
  for i = 0 to 99 do
    Hashtbl.replace tbl (string_of_int i) [ i; i * i ]
  done;
  let m = List.fold_left (fun m i -> SM.add (string_of_int i) i m) SM.empty (List.init 500 Fun.id) in
  let forced = lazy (String.make 2 'z') in
  ignore (Lazy.force forced);
  ( ( [ 1; 2; 3 ], "hello", "", String.make 17 'x', 3.14, [| 1.0; nan; -0.0; infinity |] ),
    ( { name = "n"; count = 3; f = 2.5; fs = [| 1.; 2. |] },
      [| A; B 3; C ("x", B 4); D { x = 1.; y = 2. } |],
      (Int32.of_int (-7), Int64.max_int, Nativeint.min_int),
      (shared, shared),
      `Poly (1, "a"),
      Some (Bytes.of_string "bytes") ),
    (m, tbl, IS.of_list [ 5; 3; 8 ], Failure "boom", Not_found, [||], Lazy.force forced) )

let test_every_kind _ =
  round_trip (sample ());
  List.iter round_trip
    [ Obj.repr 42; Obj.repr true; Obj.repr (); Obj.repr 'c'; Obj.repr [] ];
  for n = 0 to 20 do
    round_trip (String.make n 'a')
  done;
  round_trip 1.5;
  round_trip [| 1.5; 2.5 |];
  round_trip (Array.init 100_000 (fun i -> i));
  round_trip (List.init 200_000 (fun i -> string_of_int i));
  round_trip (Array.make 3 (Array.make 2 0.5));
  round_trip "static string literal";
  round_trip ("static", [ 1; 2 ], `A);
  round_trip
    ~check:(fun (a, b, c) ->
      (* The custom operations are this process's: arithmetic, printing, compare, hash. *)
      assert_equal (Int32.add a 1l) (-6l);
      assert_equal (Int64.to_string b) (Int64.to_string Int64.max_int);
      assert_equal (Nativeint.compare c Nativeint.min_int) 0;
      assert_equal (Hashtbl.hash b) (Hashtbl.hash Int64.max_int))
    (Int32.of_int (-7), Int64.max_int, Nativeint.min_int);
  let q = Queue.create () in
  Queue.add "a" q;
  round_trip q;
  let b = Buffer.create 10 in
  Buffer.add_string b "buffer";
  round_trip b

let test_sharing_and_cycles _ =
  let rec cyc = 1 :: 2 :: cyc in
  let s = String.make 5 'q' in
  let path = fresh_path () in
  Image.write path (cyc, (s, s));
  let h = Image.load path in
  let l, (a, b) = Offheap.get h in
  assert_bool "sharing kept" (a == b);
  assert_equal "qqqqq" a;
  (match l with
  | 1 :: 2 :: rest -> assert_bool "cycle kept" (rest == l)
  | _ -> assert_failure "cycle");
  Offheap.free h;
  Sys.remove path

let assert_refused what v =
  let path = fresh_path () in
  (match Image.write path v with
  | () -> assert_failure ("accepted " ^ what)
  | exception Offheap.Not_copyable r ->
      let m = Printexc.to_string (Offheap.Not_copyable r) in
      assert_bool (Printf.sprintf "%s is %s" m what) (contains m what));
  let base = Filename.basename path in
  let left = List.filter (fun f -> contains f base) (files_in_dir ()) in
  assert_equal ~msg:"no file left, temporary or not" [] left

let test_refused _ =
  let f x = x + 1 in
  assert_refused "Closure" (1, f);
  assert_refused "Closure" (object method m = 1 end);
  assert_refused "Custom \"_chan\"" [ stdout ];
  assert_refused "Custom \"_chan\"" (Bigarray.Array1.create Bigarray.int Bigarray.c_layout 3, stdin);
  assert_refused "Unforced_lazy" (lazy (print_endline "no"));
  (* A failed write leaves an earlier file as it was. *)
  let path = fresh_path () in
  Image.write path [ 1; 2 ];
  let before = read_file path in
  (try Image.write path (fun x -> x) with Offheap.Not_copyable Offheap.Closure -> ());
  assert_equal before (read_file path);
  Sys.remove path;
  match Image.write "/nonexistent-dir/x.img" 1 with
  | () -> assert_failure "wrote to a missing directory"
  | exception Sys_error m -> assert_bool m (contains m "/nonexistent-dir/x.img")

let test_relocation _ =
  let v = sample () in
  let path = fresh_path () in
  Image.write path v;
  let h1 = Image.load path in
  assert_bool "first load at the recorded address" (not (Image.relocated h1));
  let h2 = Image.load path in
  assert_bool "second load relocated (the address is taken)" (Image.relocated h2);
  let h3 = Image.load_relocated path in
  assert_bool "forced relocation" (Image.relocated h3);
  List.iter (fun h -> assert_bool "same value" (same v (Offheap.get h))) [ h1; h2; h3 ];
  assert_equal (marshal (Offheap.get h1)) (marshal (Offheap.get h2));
  (* The GC leaves them alone. *)
  Gc.compact ();
  List.iter (fun h -> assert_bool "after GC" (same v (Offheap.get h))) [ h1; h2; h3 ];
  List.iter Offheap.free [ h1; h2; h3 ];
  Gc.full_major ();
  assert_equal ~msg:"pending frees" 0 (Offheap.pending_frees ());
  (* Unmapped: the address is free again. *)
  let h4 = Image.load ~trusted:true ~verify:false path in
  assert_bool "at the recorded address again" (not (Image.relocated h4));
  assert_bool "trusted load" (same v (Offheap.get h4));
  Offheap.free h4;
  assert_raises (Invalid_argument "Offheap.get: deleted") (fun () -> Offheap.get h4);
  assert_raises (Invalid_argument "Offheap.free: deleted") (fun () -> Offheap.free h4);
  Sys.remove path

let child () =
  match Sys.getenv_opt "OFFHEAP_IMAGE_CHILD" with
  | Some p when Filename.is_relative p -> Filename.concat (Sys.getcwd ()) p
  | Some p -> p
  | None -> Filename.concat (Filename.dirname Sys.executable_name) "image_child.exe"

let test_second_process _ =
  let v = sample () in
  let path = fresh_path () in
  Image.write ~key:"k1" path v;
  let h = Image.load ~key:"k1" path in
  let r, w = Unix.pipe () in
  let pid = Unix.create_process (child ()) [| "image_child"; path; "k1" |] Unix.stdin w Unix.stderr in
  Unix.close w;
  let ic = Unix.in_channel_of_descr r in
  let line = input_line ic in
  close_in ic;
  let _, status = Unix.waitpid [] pid in
  assert_equal ~msg:"child exit" (Unix.WEXITED 0) status;
  let expected = Digest.to_hex (Digest.string (marshal (Offheap.get h))) in
  assert_equal ~msg:"the child sees the same value, at the recorded address"
    ~printer:Fun.id ("false " ^ expected) line;
  assert_equal expected (Digest.to_hex (Digest.string (marshal v)));
  Offheap.free h;
  Sys.remove path

(* The kind of each check the messages name (src/image/validate.rs, format.rs, mod.rs). *)
let kind_of_check : string -> Image.check = function
  | "magic" -> Not_an_image
  | "format version" -> Format_version
  | "word size" -> Word_size
  | "byte order" -> Byte_order
  | "OCaml version" -> Ocaml_family
  | "flat float arrays" -> Flat_float_arrays
  | "key" -> Key_mismatch
  | "file size" -> Truncated
  | "header checksum" -> Damaged_header
  | "header" | "root" -> Bad_header
  | "payload checksum" | "padding" -> Damaged_payload
  | _ -> Bad_structure

let assert_invalid ?verify ?key check path =
  match Image.load ?verify ?key path with
  | h ->
      Offheap.free h;
      assert_failure ("accepted, expected " ^ check)
  | exception (Image.Invalid_image (kind, m) as e) ->
      assert_bool (Printf.sprintf "%S names %s" m check) (contains m (": " ^ check ^ ":"));
      assert_bool (Printexc.to_string e) (kind = kind_of_check check)

let test_key _ =
  let path = fresh_path () in
  Image.write ~key:"schema v1" path [ 1 ];
  assert_invalid ~key:"schema v2" "key" path;
  assert_invalid "key" path;
  let h = Image.load ~key:"schema v1" path in
  assert_equal [ 1 ] (Offheap.get h);
  Offheap.free h;
  Sys.remove path

let set_bytes path f =
  let s = Bytes.of_string (read_file path) in
  f s;
  let oc = open_out_bin path in
  output_bytes oc s;
  close_out oc

let test_bad_files _ =
  let v = sample () in
  let path = fresh_path () in
  Image.write path v;
  let good = read_file path in
  let bad = fresh_path () in
  let write s =
    let oc = open_out_bin bad in
    output_string oc s;
    close_out oc
  in
  let n = String.length good in
  for k = 0 to 15 do
    write (String.sub good 0 (n * k / 16));
    assert_invalid "file size" bad
  done;
  Random.init 5;
  for _ = 1 to 40 do
    let s = Bytes.of_string good in
    let at = Random.int n in
    Bytes.set s at (Char.chr (Char.code (Bytes.get s at) lxor (1 lsl Random.int 8)));
    write (Bytes.to_string s);
    match Image.load bad with
    | h ->
        Offheap.free h;
        assert_failure (Printf.sprintf "bit flip at %d accepted" at)
    | exception Image.Invalid_image _ -> ()
  done;
  let patched f check ?verify () =
    write good;
    set_bytes bad f;
    assert_invalid ?verify check bad
  in
  patched (fun s -> Bytes.set s 0 'X') "magic" ();
  (* The previous format: refused, naming both versions. *)
  patched (fun s -> Bytes.set s 8 '\001') "format version" ();
  write good;
  set_bytes bad (fun s -> Bytes.set s 8 '\001');
  (match Image.load bad with
  | _ -> assert_failure "a version 1 image loaded"
  | exception Image.Invalid_image (kind, m) ->
      assert_bool m (kind = Format_version);
      assert_bool m (contains m "version 1, this library reads version 2"));
  patched (fun s -> Bytes.set s 12 '\004') "word size" ();
  let root = Int64.to_int (Bytes.get_int64_le (Bytes.of_string good) 40) in
  let address = Int64.to_int (Bytes.get_int64_le (Bytes.of_string good) 24) in
  let payload = Int64.to_int (Bytes.get_int64_le (Bytes.of_string good) 32) in
  (* A pointer aimed outside the payload: caught by the checksum, and by the structural
     checks without it. *)
  let at = payload_at good in
  let outside s = Bytes.set_int64_le s (at + root) (Int64.of_int (address + payload + 4096)) in
  patched outside "payload checksum" ();
  patched outside "pointer" ~verify:false ();
  (* A block header that overruns the payload. *)
  let overrun s = Bytes.set_int64_le s at (Int64.of_int ((payload lsl 10) lor (3 lsl 8))) in
  patched overrun "block size" ~verify:false ();
  write "";
  assert_invalid "file size" bad;
  (match Image.load "/nonexistent.img" with
  | _ -> assert_failure "loaded a missing file"
  | exception Sys_error m -> assert_bool m (contains m "/nonexistent.img"));
  Sys.remove bad;
  Sys.remove path

(* A value of a few MB over many pages, so that some are never touched before the file
   changes. *)
let big () = (sample (), Array.init 50_000 (fun i -> String.make (i mod 61) 'b' ^ string_of_int i))

(* Reads the whole value: compare, Marshal and hash against the original. *)
let assert_same ~msg v w =
  assert_bool (msg ^ ": compare") (same v w);
  assert_equal ~msg:(msg ^ ": Marshal") (marshal v) (marshal w);
  assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash w)

let overwrite path contents =
  (* What [cp new.img path] does: truncate, then write in place. *)
  let oc = open_out_gen [ Open_wronly; Open_trunc; Open_binary ] 0 path in
  output_string oc contents;
  close_out oc

let test_file_changes_after_load _ =
  let v = big () in
  let other = fresh_path () in
  Image.write other (Array.init 80_000 (fun i -> (i, "other")));
  let changes =
    [
      ("rewritten in place", fun path -> overwrite path (read_file other));
      ("truncated to 0", fun path -> Unix.truncate path 0);
      ( "replaced by rename",
        fun path ->
          let tmp = fresh_path () in
          Image.write tmp [ "another"; "value" ];
          Unix.rename tmp path );
      ("deleted", fun path -> Sys.remove path);
    ]
  in
  let run ~share ~relocate (what, change) =
    let path = fresh_path () in
    Image.write path v;
    (* Trusted and unverified: a shared load touches as few pages as it can. *)
    let h =
      if relocate then Image.load_relocated ~share ~verify:false path
      else Image.load ~share ~trusted:true ~verify:false path
    in
    assert_equal ~msg:"where" relocate (Image.relocated h);
    change path;
    let msg = Printf.sprintf "%s (share %b, relocated %b)" what share relocate in
    assert_same ~msg v (Offheap.get h);
    Gc.full_major ();
    assert_same ~msg v (Offheap.get h);
    Offheap.free h;
    if Sys.file_exists path then Sys.remove path
  in
  (* The default: nothing done to the file reaches the value. *)
  List.iter
    (fun relocate -> List.iter (run ~share:false ~relocate) changes)
    [ false; true ];
  (* Shared: a rename or a deletion leaves the mapped file as it was (what it promises;
     the file must not be modified in place or truncated). *)
  List.iter
    (fun relocate ->
      List.iter (run ~share:true ~relocate)
        (List.filter (fun (w, _) -> w = "replaced by rename" || w = "deleted") changes))
    [ false; true ];
  Sys.remove other

(* An image whose last block has no fields (an empty array, copied with the static data),
   ending on a page boundary: the pointer to that block is the payload's end, and compare,
   hash and Marshal see it as a value all the same (OCaml 4: it is registered). *)
let test_last_block_of_no_fields _ =
  let hit = ref false in
  let check v =
    let path = fresh_path () in
    Image.write path v;
    let file = read_file path in
    let payload = Int64.to_int (String.get_int64_le file 32) in
    let last = Int64.to_int (String.get_int64_le file (payload_at file + payload - 8)) in
    if last lsr 10 = 0 && payload mod 4096 = 0 then hit := true;
    List.iter
      (fun (share, relocate) ->
        let h =
          if relocate then Image.load_relocated ~share path else Image.load ~share path
        in
        assert_same ~msg:"last block of no fields" v (Offheap.get h);
        Offheap.free h)
      [ (false, false); (false, true); (true, false); (true, true) ];
    Sys.remove path
  in
  check [||];
  check ([||], [||]);
  for n = 4040 to 4060 do
    check (String.make n 'x', [||])
  done;
  assert_bool "one of the images ends with a block of no fields on a page boundary" !hit

let test_not_regular_files _ =
  let fifo = fresh_path () in
  Unix.mkfifo fifo 0o600;
  List.iter
    (fun path ->
      match Image.load path with
      | _ -> assert_failure ("loaded " ^ path)
      | exception Sys_error m ->
          assert_bool m (contains m path && contains m "not a regular file"))
    [ fifo; dir ];
  Sys.remove fifo;
  (* Nor are they written: the rename would replace a FIFO, a socket or a device (as
     root, /dev/null) with the image. Through a symbolic link too; nothing is left
     beside them. *)
  let sub = fresh_path () ^ ".d" in
  Unix.mkdir sub 0o700;
  let fifo = Filename.concat sub "fifo" and link = Filename.concat sub "link" in
  let subdir = Filename.concat sub "dir" in
  Unix.mkfifo fifo 0o600;
  Unix.symlink fifo link;
  Unix.mkdir subdir 0o700;
  let r = Offheap.Region.create () in
  List.iter
    (fun (what, write) ->
      List.iter
        (fun path ->
          match write path with
          | () -> assert_failure (what ^ " wrote " ^ path)
          | exception Sys_error m ->
              let why = if path = subdir then "Is a directory" else "not a regular file" in
              assert_bool m (contains m path && contains m why))
        [ fifo; link; subdir ])
    [
      ("Image.write", fun path -> Image.write path [ 1; 2 ]);
      ("Region.write_image", fun path -> Offheap.Region.write_image path r []);
    ];
  Offheap.Region.free r;
  assert_equal ~msg:"the FIFO stays a FIFO" Unix.S_FIFO (Unix.lstat fifo).Unix.st_kind;
  assert_equal ~msg:"the link stays" Unix.S_LNK (Unix.lstat link).Unix.st_kind;
  let left = Sys.readdir sub in
  Array.sort compare left;
  assert_equal ~msg:"nothing else left" ~printer:(String.concat " ")
    [ "dir"; "fifo"; "link" ] (Array.to_list left);
  List.iter Sys.remove [ link; fifo ];
  Unix.rmdir subdir;
  Unix.rmdir sub

(* Messages are bounded (1024 bytes: a longer OCaml string would come from the major
   heap, whose allocation can raise through the stub): a path of 3 KiB is shortened in
   the middle, its start and its file name kept. *)
let test_long_path_message _ =
  let long = String.concat "/" (List.init 300 (fun i -> Printf.sprintf "dir%06d" i)) in
  let path = Filename.concat dir (long ^ "/missing.img") in
  assert_bool "the path is longer than the bound" (String.length path > 3000);
  List.iter
    (fun (what, f) ->
      match f () with
      | () -> assert_failure (what ^ " of a missing path")
      | exception Sys_error m ->
          assert_bool (what ^ ": at most 1024 bytes: " ^ string_of_int (String.length m))
            (String.length m <= 1024);
          assert_bool (what ^ ": starts with the path's start: " ^ m)
            (contains m (String.sub path 0 200));
          assert_bool (what ^ ": keeps the file name: " ^ m) (contains m "/missing.img")
      | exception e -> assert_failure (what ^ ": " ^ Printexc.to_string e))
    [
      ("Image.load", fun () -> ignore (Image.load path));
      ("Image.info", fun () -> ignore (Image.info path));
      ("Image.write", fun () -> Image.write path [ 1; 2 ]);
    ]

let test_names_modes_links _ =
  let sub = fresh_path () ^ ".d" in
  Unix.mkdir sub 0o700;
  let in_sub f = Filename.concat sub f in
  let v = [ "names"; "modes"; "links" ] in
  let loads path =
    let h = Image.load path in
    assert_same ~msg:path v (Offheap.get h);
    Offheap.free h
  in
  (* The longest legal name. *)
  let long = in_sub (String.make 255 'n') in
  Image.write long v;
  Image.write long v;
  loads long;
  (* A leftover temporary file of a killed writer of this pid (the old naming). *)
  let leftover = in_sub (Printf.sprintf "x.img.tmp.%d.0" (Unix.getpid ())) in
  close_out (open_out leftover);
  Image.write (in_sub "x.img") v;
  loads (in_sub "x.img");
  (* The mode of a replaced image is kept. *)
  Unix.chmod (in_sub "x.img") 0o600;
  Image.write (in_sub "x.img") v;
  assert_equal ~printer:(Printf.sprintf "%o") 0o600 (Unix.stat (in_sub "x.img")).Unix.st_perm;
  (* Through a symbolic link: the target is written, the link stays. *)
  Unix.symlink "x.img" (in_sub "link.img");
  Image.write (in_sub "link.img") [ "through"; "the"; "link" ];
  assert_equal Unix.S_LNK (Unix.lstat (in_sub "link.img")).Unix.st_kind;
  let h = Image.load (in_sub "x.img") in
  assert_same ~msg:"target" [ "through"; "the"; "link" ] (Offheap.get h);
  Offheap.free h;
  assert_equal ~printer:(Printf.sprintf "%o") 0o600 (Unix.stat (in_sub "x.img")).Unix.st_perm;
  (* Nothing else was left in the directory. *)
  let names = Array.to_list (Sys.readdir sub) |> List.sort compare in
  assert_equal ~printer:(String.concat " ")
    (List.sort compare [ String.make 255 'n'; Filename.basename leftover; "x.img"; "link.img" ])
    names;
  List.iter (fun f -> Sys.remove (in_sub f)) names;
  Unix.rmdir sub

(* Forged payloads that keep the tiling (~verify:false skips the payload checksum, so the
   structural checks are what stands): the root block's tag changed to one that needs a
   size it does not have, or a self-referencing block made a forward. Compare, hash and
   Marshal would read past the block or loop; the loader refuses them. *)
let test_forged_sizes _ =
  let forge v tag check =
    let path = fresh_path () in
    Image.write path v;
    let file = read_file path in
    let root = Int64.to_int (String.get_int64_le file 40) in
    let at = payload_at file + root - 8 in
    set_bytes path (fun b -> Bytes.set b at (Char.chr tag));
    assert_invalid ~verify:false check path;
    (* Genuine, the same image loads. *)
    set_bytes path (fun b -> Bytes.set b at file.[at]);
    let h = Image.load ~verify:false path in
    Offheap.free h;
    Sys.remove path
  in
  forge (Some 3) Obj.object_tag "block size";
  forge (1, 2) Obj.double_tag "block size";
  forge (1, 2) Obj.forward_tag "block size";
  forge [||] Obj.string_tag "block size";
  forge [||] Obj.object_tag "block size";
  forge [| 1; 2; 3 |] Obj.custom_tag "block size";
  let r = ref (Obj.repr 0) in
  r := Obj.repr r;
  forge r Obj.forward_tag "forward cycle"

(* [Image.load] and [Image.info] read the file with the runtime released: another thread
   (or, on OCaml 5, domain) may collect meanwhile and move the young values that they
   fill afterwards (the fresh handle; the int array and key buffer of [info]). A thread
   that allocates and collects takes the runtime at each of their reads here. *)
let test_loads_beside_collections _ =
  let path = fresh_path () in
  let v = List.init 20_000 string_of_int in
  Image.write ~key:"k" path v;
  let blocks = (Image.info path).Image.blocks in
  let stop = Atomic.make false and collections = Atomic.make 0 in
  let collector () =
    while not (Atomic.get stop) do
      ignore (Sys.opaque_identity (List.init 1000 (fun i -> ref i)));
      Gc.minor ();
      Atomic.incr collections;
      Thread.yield ()
    done
  in
  let t = Thread.create collector () in
  let rounds = 300 in
  Fun.protect
    ~finally:(fun () ->
      Atomic.set stop true;
      Thread.join t;
      Sys.remove path)
    (fun () ->
      for _ = 1 to rounds do
        let h = Image.load ~key:"k" path in
        assert_bool "the loaded value" (Offheap.get h = v);
        Offheap.free h;
        let info = Image.info path in
        assert_equal ~msg:"key" ~printer:Fun.id "k" info.Image.key;
        assert_equal ~msg:"blocks" ~printer:string_of_int blocks info.Image.blocks
      done);
  assert_bool "the other thread collected" (Atomic.get collections > 0)

(* What writing adds to the process's memory at its peak: VmHWM after the write less
   VmRSS before it (VmHWM reset to VmRSS through /proc/self/clear_refs). The writer's
   buffers are two of 8 MiB (its thread writes one while the traversal fills the
   other); the traversal's queue (8 bytes a block, 24-32 MB here) lives in a
   file beside the image, of which the process holds a few 2 MiB chunks at a time, and
   so does the fix-up table (8 bytes a custom block) past 512 KiB. *)
let test_write_memory _ =
  let shapes =
    [
      ("a list of 3M ints", Obj.repr (List.init 3_000_000 Fun.id));
      ( "an array of 1.5M pairs of an int and a string",
        Obj.repr (Array.init 1_500_000 (fun i -> (i, string_of_int i))) );
      (* 3M custom blocks: a fix-up table of 24 MB *)
      ("a list of 3M Int64", Obj.repr (List.init 3_000_000 Int64.of_int));
    ]
  in
  List.iter
    (fun (name, v) ->
      let path = fresh_path () in
      let added_kb = Probes.peak_added_kb (fun () -> Image.write path v) in
      assert_bool
        (Printf.sprintf "%s: the write added %d kB at its peak" name added_kb)
        (added_kb <= 28 * 1024);
      let h = Image.load path in
      assert_bool name (same (Offheap.get h) v);
      Offheap.free h;
      Sys.remove path)
    shapes;
  assert_equal ~msg:"files left" ~printer:(String.concat ",") [] (files_in_dir ())

(* A payload of 32 MiB or more starts 2 MiB into the file, after zeros, so that it maps
   with huge pages where the file system caches the file in them: it loads every way, and
   a damaged byte among the zeros is reported by a verified load (and changes nothing
   loaded without one). *)
let test_aligned_payload _ =
  let v = Array.init 400_000 (fun i -> (i, string_of_int i, [ float_of_int i ])) in
  let path = fresh_path () in
  Image.write path v;
  let file = read_file path in
  assert_equal ~msg:"payload offset" ~printer:string_of_int (2 lsl 20) (payload_at file);
  assert_bool "no other byte between header and payload"
    (String.for_all (fun c -> c = '\000') (String.sub file 4096 ((2 lsl 20) - 4096)));
  List.iter
    (fun (share, relocate) ->
      let h = if relocate then Image.load_relocated ~share path else Image.load ~share path in
      assert_bool "loaded" (same (Offheap.get h) v);
      Offheap.free h)
    [ (false, false); (false, true); (true, false); (true, true) ];
  set_bytes path (fun b -> Bytes.set b 1_000_000 '\001');
  assert_invalid "padding" path;
  let h = Image.load ~verify:false path in
  assert_bool "loaded without verifying" (same (Offheap.get h) v);
  Offheap.free h;
  Sys.remove path;
  (* Below 32 MiB, the payload follows the header page. *)
  let small = fresh_path () in
  Image.write small (Array.sub v 0 1000);
  assert_equal ~msg:"small payload offset" ~printer:string_of_int 4096
    (payload_at (read_file small));
  Sys.remove small

(* Bytes of this process's mappings of the file [path] (its inode, in /proc/self/maps). *)
let mapped_bytes path =
  let inode = string_of_int (Unix.stat path).Unix.st_ino in
  let ic = open_in "/proc/self/maps" in
  let total = ref 0 in
  (try
     while true do
       match String.split_on_char ' ' (input_line ic) |> List.filter (( <> ) "") with
       | range :: _ :: _ :: _ :: ino :: _ when ino = inode -> (
           match String.split_on_char '-' range with
           | [ a; b ] -> total := !total + (int_of_string ("0x" ^ b) - int_of_string ("0x" ^ a))
           | _ -> ())
       | _ -> ()
     done
   with End_of_file -> close_in ic);
  !total

(* A shared load that must relocate a payload of small blocks reads it (relocating in
   the mapping would copy nearly every page one fault at a time) and maps back the
   chunks that hold raw blocks only: a long string and a float array stay shared with
   the page cache, the chunks of pointers are private. A payload of large blocks is
   relocated in the mapping as before. Either way the value is intact, and writing to
   it never reaches the file. *)
let test_shared_relocated _ =
  let n = 400_000 in
  let v = (Array.init n (fun i -> (i, i + 1)), String.make (8 lsl 20) 's', Array.make (1 lsl 20) 1.5) in
  let path = fresh_path () in
  Image.write path v;
  (* Whether the copy is [v], after writing to its float array when [write]. In a
     function of its own: no local of the caller's frame points into the copy when it
     is freed (bytecode keeps locals until the function returns). *)
  let intact ~write h =
    let ((_, _, floats) as w) = Offheap.get h in
    if write then begin
      floats.(12345) <- 7.5;
      floats.((1 lsl 20) - 1) <- 8.5
    end;
    if write then floats.(12345) = 7.5 && floats.((1 lsl 20) - 1) = 8.5 else same w v
  in
  (* Loads the image, checks it, and says how many bytes of the file it maps. *)
  let load ?(write = false) ~share ~relocate () =
    let h = if relocate then Image.load_relocated ~share path else Image.load ~share path in
    assert_bool "intact" (intact ~write h);
    let mapped = mapped_bytes path in
    Offheap.free h;
    Probes.settle ();
    mapped
  in
  let payload = (Offheap.Image.info path).Offheap.Image.payload_bytes in
  (* At the recorded address: the whole payload mapped. *)
  let at_recorded = load ~share:true ~relocate:false () in
  assert_bool
    (Printf.sprintf "mapped at the recorded address: %d bytes of %d" at_recorded payload)
    (at_recorded >= payload - 4096);
  (* Relocated and read: nothing of the file stays mapped. *)
  assert_equal ~msg:"read, relocated: bytes mapped" ~printer:string_of_int 0
    (load ~share:false ~relocate:true ());
  (* Relocated and shared: the string's and the float array's chunks (all but the one
     or two each shares with other blocks), not the pairs'. *)
  let shared = load ~write:true ~share:true ~relocate:true () in
  assert_bool
    (Printf.sprintf "relocated, shared: %d bytes mapped, at least 12 MiB" shared)
    (shared >= 12 lsl 20);
  assert_bool
    (Printf.sprintf "relocated, shared: %d bytes mapped, not the pairs' %d" shared payload)
    (shared <= payload - (n * 4 * 8));
  (* The writes stayed in the process: the file holds [v]. *)
  ignore (load ~share:false ~relocate:true () : int);
  Sys.remove path;
  (* Large blocks: relocated in the mapping, which holds all of the payload. *)
  let big = (Array.make (2 lsl 20) 2.5, String.make (4 lsl 20) 'b', [ 1; 2; 3 ]) in
  Image.write path big;
  let h = Image.load_relocated ~share:true path in
  assert_bool "large blocks intact" (same (Offheap.get h) big);
  let mapped = mapped_bytes path in
  assert_bool
    (Printf.sprintf "large blocks, relocated: %d bytes mapped, the whole payload" mapped)
    (mapped >= (20 lsl 20) - 4096);
  Offheap.free h;
  Probes.settle ();
  Sys.remove path

let () =
  at_exit (fun () ->
      if Unix.getpid () = main_pid && Sys.file_exists dir then begin
        Array.iter (fun f -> Sys.remove (Filename.concat dir f)) (Sys.readdir dir);
        Unix.rmdir dir
      end);
  run_test_tt_main
    ("image"
    >::: [
           "every kind" >:: test_every_kind;
           "sharing and cycles" >:: test_sharing_and_cycles;
           "refused values" >:: test_refused;
           "recorded address and relocation" >:: test_relocation;
           "second process" >:: test_second_process;
           "key" >:: test_key;
           "bad files" >:: test_bad_files;
           "file changed after load" >:: test_file_changes_after_load;
           "last block of no fields" >:: test_last_block_of_no_fields;
           "not regular files" >:: test_not_regular_files;
           "long path in a message" >:: test_long_path_message;
           "names, modes, links" >:: test_names_modes_links;
           "forged sizes" >:: test_forged_sizes;
           "loads beside collections" >:: test_loads_beside_collections;
           "memory while writing" >:: test_write_memory;
           "payload at 2 MiB" >:: test_aligned_payload;
           "shared and relocated" >:: test_shared_relocated;
         ])
