(* Bigarrays the runtime makes in corners the other suites do not reach: views of a
   file mapped with no data (an empty file, whose [Unix.map_file] has a NULL data
   pointer). [Genarray.sub_left] and [Array1.sub] of such an array allocate a 0-byte
   buffer of their own ([caml_ba_alloc] given NULL data) and so carry both managed bits,
   [CAML_BA_MANAGED | CAML_BA_MAPPED_FILE] (0x600), on OCaml 4.13 and 5.3. They were
   refused as "a Bigarray with flags 0x601". Copied, added, written and loaded in every
   mode, they must come back empty, of the same kind and layout, with external data. *)

open OUnit2
open Bigarray
module R = Offheap.Region

let temp () = Filename.temp_file "offheap_ba_edges" ".img"

let with_file f =
  let p = temp () in
  Fun.protect ~finally:(fun () -> if Sys.file_exists p then Sys.remove p) (fun () -> f p)

let managed a = Ba_support.flags a land 0x600

(* Views of an empty mapped file: the file's array (NULL data), its empty views (0-byte
   buffers of their own, both managed bits), a 2-d mapping of 0 rows and its view, and
   an ordinary array beside them. *)
type views = {
  file : (float, float64_elt, c_layout) Genarray.t;
  sub : (float, float64_elt, c_layout) Genarray.t;
  sub1 : (float, float64_elt, c_layout) Array1.t;
  grid : (int32, int32_elt, fortran_layout) Genarray.t;
  grid_sub : (int32, int32_elt, fortran_layout) Genarray.t;
  plain : (int, int_elt, c_layout) Array1.t;
}

let views p =
  let fd = Unix.openfile p [ Unix.O_RDONLY ] 0 in
  Fun.protect
    ~finally:(fun () -> Unix.close fd)
    (fun () ->
      let file = Unix.map_file fd float64 c_layout false [| 0 |] in
      let grid = Unix.map_file fd int32 fortran_layout false [| 4; 0 |] in
      {
        file;
        sub = Genarray.sub_left file 0 0;
        sub1 = Array1.sub (array1_of_genarray file) 0 0;
        grid;
        grid_sub = Genarray.sub_right grid 1 0;
        plain = Array1.init int c_layout 5 (fun i -> i * i);
      })

let with_views f =
  let p = Filename.temp_file "offheap_ba_edges" ".empty" in
  Fun.protect ~finally:(fun () -> Sys.remove p) (fun () -> f (views p))

(* [c] is a copy of [v]: the same dimensions, kinds and layouts, contents, and external
   data (only its owner frees it). *)
let check ~msg v c =
  assert_equal ~msg:(msg ^ ": the source's views have both managed bits") 0x600 (managed v.sub);
  assert_equal ~msg:(msg ^ ": dims") [| 0 |] (Genarray.dims c.sub);
  assert_equal ~msg:(msg ^ ": dims 1") 0 (Array1.dim c.sub1);
  assert_equal ~msg:(msg ^ ": dims 2") [| 4; 0 |] (Genarray.dims c.grid);
  assert_equal ~msg:(msg ^ ": dims 3") [| 4; 0 |] (Genarray.dims c.grid_sub);
  assert_equal ~msg:(msg ^ ": layout") fortran_layout (Genarray.layout c.grid_sub);
  assert_equal ~msg:(msg ^ ": kind") int32 (Genarray.kind c.grid_sub);
  List.iter
    (fun (what, m) -> assert_equal ~msg:(msg ^ ": external data: " ^ what) 0 m)
    [
      ("file", managed c.file);
      ("sub", managed c.sub);
      ("sub1", managed (genarray_of_array1 c.sub1));
      ("grid", managed c.grid);
      ("grid_sub", managed c.grid_sub);
    ];
  assert_equal ~msg:(msg ^ ": plain") 16 c.plain.{4};
  assert_bool (msg ^ ": compare") (compare v c = 0);
  assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
  assert_bool (msg ^ ": Marshal") (compare v (Marshal.from_string (Marshal.to_string c []) 0) = 0)

let test_copy _ =
  with_views (fun v ->
      let h = Offheap.copy v in
      (fun () -> check ~msg:"copy" v (Offheap.get h)) ();
      Offheap.free h;
      Offheap.with_copy v (check ~msg:"with_copy" v);
      let h = Offheap.copy v in
      assert_equal ~msg:"measure" (Offheap.stats h).bytes (Offheap.measure v).bytes;
      Offheap.free h)

let test_region _ =
  with_views (fun v ->
      with_file (fun p ->
          let r = R.create ~chunk_bytes:4096 () in
          (fun () ->
            let c = R.add r v in
            check ~msg:"add" v c;
            let d = R.add_deep r c in
            check ~msg:"add_deep" v d;
            R.write_image ~key:"edges" p r [ ("c", Obj.repr c); ("v", Obj.repr v) ])
            ();
          R.free r;
          List.iter
            (fun share ->
              let r, roots = R.load_image ~key:"edges" ~share p in
              (fun () ->
                List.iter (fun (n, x) -> check ~msg:("load_image " ^ n) v (Obj.obj x)) roots;
                check ~msg:"added after load_image" v (R.add r v))
                ();
              R.free r)
            [ false; true ]))

let test_image _ =
  with_views (fun v ->
      with_file (fun p ->
          Offheap.Image.write ~key:"edges" p v;
          List.iter
            (fun (msg, load) ->
              let h = load p in
              (fun () -> check ~msg v (Offheap.get h)) ();
              Offheap.free h)
            [
              ("load", fun p -> Offheap.Image.load ~key:"edges" p);
              ("load ~share", fun p -> Offheap.Image.load ~key:"edges" ~share:true p);
              ( "load ~trusted",
                fun p -> Offheap.Image.load ~key:"edges" ~trusted:true ~verify:false p );
              ("load_relocated", fun p -> Offheap.Image.load_relocated ~key:"edges" p);
              ( "load_relocated ~share",
                fun p -> Offheap.Image.load_relocated ~key:"edges" ~share:true p );
            ]))

let () =
  run_test_tt_main
    ("Bigarray edges"
    >::: [
           "views of an empty mapped file, copied" >:: test_copy;
           "views of an empty mapped file, in a region and its image" >:: test_region;
           "views of an empty mapped file, in an image" >:: test_image;
         ]);
  Gc.full_major ()
