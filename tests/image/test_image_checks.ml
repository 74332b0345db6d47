(* Offheap.Image.Invalid_image: every check variant raised by a real damaged or forged
   file, by [load] and, for the header's own checks, by [info]; [info] on sound files;
   the reasons [write] refuses a value with. Native code and bytecode, OCaml 4.13 and
   5.3. *)

open OUnit2
module Image = Offheap.Image

let dir = Filename.get_temp_dir_name ()
let counter = ref 0

let fresh_path () =
  incr counter;
  Filename.concat dir (Printf.sprintf "offheap-checks-%d-%d.img" (Unix.getpid ()) !counter)

let read_file = Probes.read_file

let write_file = Probes.write_file

let ocaml5 = Scanf.sscanf Sys.ocaml_version "%d." (fun major -> major >= 5)
let flat_float_array = Obj.tag (Obj.repr (Array.make 1 0.0)) = Obj.double_array_tag
let key = "schema 1"

(* A value with strings, floats and Int64 blocks (entries of the fix-up table), built at
   run time (no static data). *)
let value () =
  List.init 100 (fun i -> (i, string_of_int i, Int64.of_int i, float_of_int i /. 3.))

(* A sound image of [value ()] and its bytes. *)
let good =
  lazy
    (let path = fresh_path () in
     Image.write ~key path (value ());
     let s = read_file path in
     Sys.remove path;
     s)

let contains = Probes.contains

let check_name c = Printexc.to_string (Image.Invalid_image (c, ""))

(* [bytes] as a file: [load] refuses it with [expected]. *)
let assert_load_refused ?(verify = true) ?(key = key) ~msg expected bytes =
  let path = fresh_path () in
  write_file path bytes;
  (match Image.load ~verify ~key path with
  | h ->
      Offheap.free h;
      assert_failure (msg ^ ": accepted")
  | exception Image.Invalid_image (c, m) ->
      assert_equal ~msg:(msg ^ ": " ^ m) ~printer:check_name expected c;
      assert_bool ("the message names the file: " ^ m)
        (String.length m > String.length path
        && contains m (Filename.basename path)));
  Sys.remove path

(* [bytes] as a file: [info] refuses it with [expected], or reads it when [None]. *)
let info_of bytes =
  let path = fresh_path () in
  write_file path bytes;
  Fun.protect ~finally:(fun () -> Sys.remove path) (fun () -> Image.info path)

let assert_info_refused ~msg expected bytes =
  match info_of bytes with
  | _ -> assert_failure (msg ^ ": info accepted it")
  | exception Image.Invalid_image (c, _) ->
      assert_equal ~msg:(msg ^ ": info") ~printer:check_name expected c

(* The good image with [f] applied to its bytes; [reseal]: its header checksum made right
   again, so that the later checks are reached. *)
let forged ?(reseal = false) f =
  let b = Bytes.of_string (Lazy.force good) in
  f b;
  if reseal then Image.reseal_header b;
  Bytes.to_string b

let set_u8 at v b = Bytes.set b at (Char.chr v)
let set_u64 at v b = Bytes.set_int64_le b at (Int64.of_int v)
let u64 s at = Int64.to_int (String.get_int64_le s at)

(* {1 Each check} *)

let test_header_checks _ =
  let both ~msg expected bytes =
    assert_load_refused ~msg expected bytes;
    assert_info_refused ~msg expected bytes
  in
  both ~msg:"magic" Not_an_image (forged (set_u8 0 (Char.code 'X')));
  both ~msg:"a text file" Not_an_image (String.make 5000 'a');
  both ~msg:"format version" Format_version (forged (set_u8 8 99));
  both ~msg:"word size" Word_size (forged (set_u8 12 4));
  both ~msg:"byte order" Byte_order (forged (set_u8 13 2));
  both ~msg:"damaged header" Damaged_header (forged (set_u8 50 0x7f));
  both ~msg:"payload offset" Bad_header (forged ~reseal:true (set_u64 16 8192));
  both ~msg:"address" Bad_header (forged ~reseal:true (set_u64 24 4096));
  both ~msg:"payload size" Bad_header (forged ~reseal:true (set_u64 32 12));
  both ~msg:"root" Bad_header (forged ~reseal:true (set_u64 40 4));
  both ~msg:"shorter than a header" Truncated (String.sub (Lazy.force good) 0 100);
  both ~msg:"empty" Truncated ""

let test_program_checks _ =
  let other_family = if ocaml5 then 4 else 5 in
  let family = forged ~reseal:true (set_u8 14 other_family) in
  assert_load_refused ~msg:"OCaml family" Ocaml_family family;
  assert_equal ~msg:"info reads the family" other_family (info_of family).ocaml_family;
  let flat = forged ~reseal:true (set_u8 15 (if flat_float_array then 0 else 1)) in
  assert_load_refused ~msg:"flat float arrays" Flat_float_arrays flat;
  assert_equal ~msg:"info reads the flag" (not flat_float_array) (info_of flat).flat_float_array;
  let g = Lazy.force good in
  assert_load_refused ~msg:"key" ~key:"schema 2" Key_mismatch g;
  assert_load_refused ~msg:"no key" ~key:"" Key_mismatch g;
  assert_equal ~msg:"info reads the key" key (info_of g).key;
  (* Long keys are cut in the message: two keys of 3992 bytes made one of 8 KB. *)
  let path = fresh_path () in
  let long c = String.make 3992 c in
  Image.write ~key:(long 'w') path [ 1 ];
  (match Image.load ~key:(long 'e') path with
  | h ->
      Offheap.free h;
      assert_failure "long key: accepted"
  | exception Image.Invalid_image (Key_mismatch, m) ->
      assert_bool ("a short message: " ^ m) (String.length m < 400 + String.length path);
      assert_bool ("both keys named: " ^ m)
        (contains m (String.make 64 'w') && contains m (String.make 64 'e')
        && contains m "3992 bytes")
  | exception Image.Invalid_image (_, m) -> assert_failure ("long key: " ^ m));
  Sys.remove path

let test_file_checks _ =
  let g = Lazy.force good in
  let n = String.length g in
  (* Where the payload starts (2 MiB in the files written now). *)
  let header = u64 g 16 in
  let cut = String.sub g 0 (n - 8) in
  assert_load_refused ~msg:"truncated" Truncated cut;
  assert_load_refused ~msg:"extended" Truncated (g ^ "\000\000\000\000\000\000\000\000");
  (* The header alone is sound: info reads it, and says how long the file should be. *)
  assert_equal ~msg:"info of a truncated file" n (info_of cut).file_bytes;
  let at = header + ((n - header) / 2) in
  let flipped = forged (fun b -> set_u8 at (Char.code (Bytes.get b at) lxor 0x10) b) in
  assert_load_refused ~msg:"payload bit flip" Damaged_payload flipped;
  (* Without the checksum, a block header that overruns the payload is caught by the
     structural checks. *)
  let payload = u64 g 32 in
  let overrun = forged (set_u64 header ((payload lsl 10) lor (3 lsl 8))) in
  assert_load_refused ~msg:"overrun, checksum" Damaged_payload overrun;
  assert_load_refused ~verify:false ~msg:"overrun" Bad_structure overrun;
  (* A fix-up table entry that points at no custom block. *)
  let table = header + payload in
  let bad_table = forged (set_u64 table 8) in
  assert_load_refused ~verify:false ~msg:"fix-up table" Bad_structure bad_table;
  (* Sound again, it loads. *)
  let path = fresh_path () in
  write_file path g;
  let h = Image.load ~key path in
  assert_equal (value ()) (Offheap.get h);
  Offheap.free h;
  Sys.remove path

(* {1 info on sound images} *)

let test_info _ =
  let v = value () in
  let path = fresh_path () in
  Image.write ~key path v;
  let s = read_file path in
  let i = Image.info path in
  let m = Offheap.measure v in
  assert_equal ~msg:"key" ~printer:Fun.id key i.key;
  assert_equal ~msg:"family" ~printer:string_of_int (if ocaml5 then 5 else 4) i.ocaml_family;
  assert_equal ~msg:"flat float arrays" flat_float_array i.flat_float_array;
  assert_equal ~msg:"word bytes" ~printer:string_of_int (Sys.word_size / 8) i.word_bytes;
  assert_equal ~msg:"version" ~printer:string_of_int
    (Int32.to_int (String.get_int32_le s 8))
    i.format_version;
  assert_equal ~msg:"payload = what a copy takes" ~printer:string_of_int m.bytes i.payload_bytes;
  assert_equal ~msg:"blocks = what a copy has" ~printer:string_of_int m.blocks i.blocks;
  assert_equal ~msg:"custom blocks: the Int64s" ~printer:string_of_int 100 i.custom_blocks;
  assert_equal ~msg:"file size" ~printer:string_of_int (String.length s) i.file_bytes;
  assert_equal ~msg:"address" ~printer:string_of_int (u64 s 24) i.address;
  assert_bool "address page aligned" (i.address mod 4096 = 0);
  (* An image of an immediate: no payload. *)
  let p2 = fresh_path () in
  Image.write ~key:"" p2 42;
  let j = Image.info p2 in
  assert_equal ~printer:string_of_int 0 j.payload_bytes;
  assert_equal ~printer:string_of_int 0 j.blocks;
  assert_equal "" j.key;
  (* info maps nothing: the file loads afterwards as before *)
  let h = Image.load ~key path in
  assert_equal v (Offheap.get h);
  Offheap.free h;
  List.iter Sys.remove [ path; p2 ];
  match Image.info (fresh_path ()) with
  | _ -> assert_failure "info of a missing file"
  | exception Sys_error m -> assert_bool m (contains m "No such file")

let test_printer _ =
  assert_equal ~printer:Fun.id "Offheap.Image.Invalid_image(Key_mismatch, \"m\")"
    (Printexc.to_string (Image.Invalid_image (Key_mismatch, "m")))

(* {1 What write refuses} *)

let refused v =
  let path = fresh_path () in
  match Image.write path v with
  | () ->
      Sys.remove path;
      assert_failure "accepted"
  | exception Offheap.Not_copyable r ->
      assert_bool "no file" (not (Sys.file_exists path));
      r

let test_write_reasons _ =
  let printer r = Printexc.to_string (Offheap.Not_copyable r) in
  assert_equal ~printer Offheap.Closure (refused (1, fun x -> x + 1));
  assert_equal ~printer (Offheap.Custom "_chan") (refused [ stdin ]);
  assert_equal ~printer Offheap.Abstract (refused (Obj.new_block Obj.abstract_tag 2));
  assert_equal ~printer Offheap.Unforced_lazy (refused (lazy (print_string "no")));
  (* OCaml 4 allows naked pointers: here, a Bigarray's data pointer. *)
  if not ocaml5 then begin
    let ba = Bigarray.Array1.create Bigarray.int Bigarray.c_layout 2 in
    let naked = Obj.field (Obj.repr ba) 1 in
    assert_equal ~printer Offheap.Outside_heap (refused [ naked ]);
    ignore (Sys.opaque_identity ba)
  end;
  match Image.write ~key:(String.make 5000 'k') (fresh_path ()) 1 with
  | () -> assert_failure "a long key accepted"
  | exception Invalid_argument m -> assert_bool m (contains m "key")

let () =
  run_test_tt_main
    ("image checks"
    >::: [
           "header checks (load and info)" >:: test_header_checks;
           "checks against the program" >:: test_program_checks;
           "file and payload checks" >:: test_file_checks;
           "info of sound images" >:: test_info;
           "Invalid_image printer" >:: test_printer;
           "what write refuses" >:: test_write_reasons;
         ])
