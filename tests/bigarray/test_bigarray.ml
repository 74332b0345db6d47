(* Bigarrays in copies and images (issue 13): every kind and layout, 0 to 16 dimensions,
   zero-length dimensions, sub-arrays and slices sharing data, mapped files, mutation
   through the copy, compare/hash/Marshal/the C API on the copy, images. *)

open OUnit2
open Bigarray

type kind = K : string * ('a, 'b) Bigarray.kind * (int -> 'a) -> kind

let kinds =
  [
    K ("float32", float32, fun i -> float_of_int (i mod 1000) *. 0.5);
    K ("float64", float64, fun i -> float_of_int i *. 1.25);
    K ("int8_signed", int8_signed, fun i -> (i mod 256) - 128);
    K ("int8_unsigned", int8_unsigned, fun i -> i land 255);
    K ("int16_signed", int16_signed, fun i -> (i * 131 mod 65536) - 32768);
    K ("int16_unsigned", int16_unsigned, fun i -> i * 131 land 65535);
    K ("int32", int32, fun i -> Int32.of_int (i * 7919));
    K ("int64", int64, fun i -> Int64.(mul (of_int i) 0x1_0000_0001L));
    K ("int", int, fun i -> i * 1_000_003);
    K ("nativeint", nativeint, fun i -> Nativeint.of_int (-i));
    K ("complex32", complex32, fun i -> { Complex.re = float_of_int i; im = 0.5 });
    K ("complex64", complex64, fun i -> { Complex.re = 1.5; im = float_of_int (-i) });
    K ("char", char, fun i -> Char.chr (i * 7 land 255));
  ]

type layout_ = L : string * 'c Bigarray.layout -> layout_

let layouts = [ L ("c", c_layout); L ("fortran", fortran_layout) ]

(* Dimension lists of 0 to 16 dimensions: small ones, one with a 3, one with a 0; and
   empty arrays whose other dimensions multiply past the address space, which the
   runtime makes. *)
let shapes =
  List.concat_map
    (fun n ->
      let small = Array.init n (fun i -> if i < 3 then 2 else 1) in
      let three = Array.init n (fun i -> if i = n - 1 then 3 else 1) in
      let zero = Array.init n (fun i -> if i = n / 2 then 0 else 2) in
      if n = 0 then [ small ] else [ small; three; zero ])
    (List.init 17 Fun.id)
  @ [ [| 1 lsl 60; 0 |]; [| 0; 1 lsl 60 |]; [| max_int; 2; 0; 5 |] ]

let elements a = Array.fold_left ( * ) 1 (Genarray.dims a)

(* A one-dimensional view sharing [a]'s data. *)
let flat a = reshape_1 a (elements a)
let first (type c) (l : c layout) : int = match l with C_layout -> 0 | Fortran_layout -> 1

let filled k f l dims seed =
  let a = Genarray.create k l dims in
  let v = flat a in
  for i = 0 to elements a - 1 do
    Array1.unsafe_set v (i + first l) (f (i + seed))
  done;
  a

(* A fresh heap copy of [a]'s contents. *)
let duplicate a =
  let b = Genarray.create (Genarray.kind a) (Genarray.layout a) (Genarray.dims a) in
  Genarray.blit a b;
  b

let external_flags a = Ba_support.flags a land 0x600 = 0

let check_same ~msg a c =
  assert_equal ~msg:(msg ^ ": dims") (Genarray.dims a) (Genarray.dims c);
  assert_bool (msg ^ ": kind") (Genarray.kind a = Genarray.kind c);
  assert_bool (msg ^ ": layout") (Genarray.layout a = Genarray.layout c);
  assert_bool (msg ^ ": compare") (compare a c = 0 && a = c);
  assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash a) (Hashtbl.hash c);
  assert_equal ~msg:(msg ^ ": C API") (Ba_support.byte_sum a) (Ba_support.byte_sum c);
  let m = Marshal.from_string (Marshal.to_string c []) 0 in
  assert_bool (msg ^ ": Marshal") (compare a m = 0)

let one_case (K (kname, k, f)) (L (lname, l)) dims =
  let msg = Printf.sprintf "%s %s [%s]" kname lname
      (String.concat ";" (Array.to_list (Array.map string_of_int dims))) in
  let a = filled k f l dims 17 in
  let before = duplicate a in
  let h = Offheap.copy (a, [ 1; 2 ]) in
  let c, _ = Offheap.get h in
  check_same ~msg a c;
  assert_bool (msg ^ ": external") (external_flags c);
  assert_bool (msg ^ ": own data") (Ba_support.data a <> Ba_support.data c);
  assert_equal ~msg:(msg ^ ": aligned") 0L
    (Int64.rem (Int64.of_nativeint (Ba_support.data c)) 64L);
  assert_bool (msg ^ ": counted") ((Offheap.stats h).bytes >= elements a * Genarray.size_in_bytes a / max 1 (elements a));
  let n = elements a in
  if n > 0 then begin
    (* set through the copy: seen by the copy, not by the source *)
    let v = flat c in
    let i = first l + (n - 1) in
    Array1.set v i (f 5);
    assert_bool (msg ^ ": set") (Array1.get (flat c) i = f 5);
    assert_bool (msg ^ ": source untouched") (compare a before = 0);
    (* blit, sub and slice of the copy *)
    let b = duplicate c in
    assert_bool (msg ^ ": blit") (compare b c = 0);
    let nd = Genarray.num_dims c in
    if nd > 0 then
    (match l with
    | C_layout ->
        let sa = Genarray.slice_left a [| 0 |] and sc = Genarray.slice_left c [| 0 |] in
        assert_equal ~msg:(msg ^ ": slice dims") (Genarray.dims sa) (Genarray.dims sc);
        let d0 = (Genarray.dims c).(0) in
        let sub = Genarray.sub_left c (d0 - 1) 1 in
        assert_equal ~msg:(msg ^ ": sub") (nd) (Genarray.num_dims sub)
    | Fortran_layout ->
        let sa = Genarray.slice_right a [| 1 |] and sc = Genarray.slice_right c [| 1 |] in
        assert_equal ~msg:(msg ^ ": slice dims") (Genarray.dims sa) (Genarray.dims sc);
        let dl = (Genarray.dims c).(nd - 1) in
        let sub = Genarray.sub_right c dl 1 in
        assert_equal ~msg:(msg ^ ": sub") nd (Genarray.num_dims sub))
  end;
  Offheap.free h;
  assert_bool (msg ^ ": source intact after free") (compare a before = 0)

let test_every_kind_layout_shape _ =
  List.iter
    (fun k -> List.iter (fun l -> List.iter (one_case k l) shapes) layouts)
    kinds

(* Views sharing data: a parent, sub-arrays overlapping in part, a nested one, the same
   array twice, a reshape of it (identical range), a matrix and its slices, and a
   disjoint array. *)
let shared_value () =
  let base = Array1.init float64 c_layout 100 float_of_int in
  let s1 = Array1.sub base 10 20 (* 10..29 *) in
  let s2 = Array1.sub base 25 30 (* 25..54: overlaps s1 in part *) in
  let s3 = Array1.sub s1 5 5 (* 15..19: nested *) in
  let m = Array2.init int c_layout 10 10 (fun i j -> (10 * i) + j) in
  let row = Array2.slice_left m 3 in
  let cell = Array1.sub row 2 5 in
  let far = Array1.init float64 c_layout 100 (fun i -> -.float_of_int i) in
  (base, s1, s2, s3, base, reshape_2 (genarray_of_array1 base) 10 10, m, row, cell, far)

let test_shared_data _ =
  let ((base, s1, s2, s3, _, _, m, row, cell, far) as v) = shared_value () in
  let h = Offheap.copy v in
  let (cb, c1, c2, c3, cb', cr, cm, crow, ccell, cfar) = Offheap.get h in
  assert_bool "same block kept shared" (cb == cb');
  assert_bool "equal" (compare v (Offheap.get h) = 0);
  let d x = Ba_support.data (genarray_of_array1 x) in
  let dist a b = Nativeint.to_int (Nativeint.sub (d a) (d b)) in
  assert_equal ~msg:"s1 inside base" (dist s1 base) (dist c1 cb);
  assert_equal ~msg:"s2 inside base" (dist s2 base) (dist c2 cb);
  assert_equal ~msg:"s3 inside base" (dist s3 base) (dist c3 cb);
  assert_equal ~msg:"row inside m" (dist row cell) (dist crow ccell);
  (* set through one alias, read through every other *)
  c1.{10} <- 1000.;
  assert_equal 1000. cb.{20};
  c2.{0} <- 2000.;
  assert_equal 2000. c1.{15};
  assert_equal 2000. cb.{25};
  c3.{0} <- 3000.;
  assert_equal 3000. c1.{5};
  assert_equal 3000. cb.{15};
  cr.{9, 9} <- 4000.;
  assert_equal 4000. cb.{99};
  ccell.{0} <- -1;
  assert_equal (-1) crow.{2};
  assert_equal (-1) cm.{3, 2};
  assert_equal (-99.) cfar.{99};
  (* the source saw none of it *)
  assert_equal 20. base.{20};
  assert_equal 25. base.{25};
  assert_equal 32 m.{3, 2};
  assert_equal (-99.) far.{99};
  (* data counted once: 100 floats, 100 ints, 100 floats, plus blocks *)
  let bytes = (Offheap.stats h).bytes in
  assert_bool (Printf.sprintf "shared data counted once (%d bytes)" bytes)
    (bytes >= 2400 && bytes < 2400 + 1500);
  Offheap.free h

let test_mapped _ =
  let path = Filename.temp_file "offheap_ba" ".map" in
  let fd = Unix.openfile path [ Unix.O_RDWR ] 0o600 in
  Unix.ftruncate fd 8192;
  let a = array1_of_genarray (Unix.map_file fd char c_layout true [| 8192 |]) in
  for i = 0 to 8191 do a.{i} <- Char.chr (i land 255) done;
  let sub = Array1.sub a 4000 100 in
  let h = Offheap.copy (a, sub) in
  let ca, csub = Offheap.get h in
  assert_bool "mapped copied" (compare a ca = 0 && compare sub csub = 0);
  assert_bool "external" (external_flags (genarray_of_array1 ca));
  (* The copy is an array in memory, marshalled as one, which reads back. *)
  let m : (char, int8_unsigned_elt, c_layout) Array1.t * _ =
    Marshal.from_string (Marshal.to_string (ca, csub) []) 0
  in
  assert_bool "Marshal of the copy" (compare (a, sub) m = 0);
  a.{4000} <- 'z';
  assert_equal ~msg:"copy independent of the mapping" (Char.chr (4000 land 255)) ca.{4000};
  csub.{1} <- 'y';
  assert_equal ~msg:"alias of a mapped array" 'y' ca.{4001};
  assert_bool "file untouched" (a.{4001} = Char.chr (4001 land 255));
  Offheap.free h;
  Unix.close fd;
  Sys.remove path

let test_free_and_get _ =
  let a = Array1.create float64 c_layout 1000 in
  Array1.fill a 1.5;
  let h = Offheap.copy a in
  let s = Offheap.stats h in
  assert_bool "data counted" (s.bytes >= 8000);
  assert_equal ~msg:"custom block and data block" 2 s.blocks;
  Offheap.free h;
  assert_raises (Invalid_argument "Offheap.get: deleted") (fun () -> Offheap.get h) |> ignore

let with_image v f =
  let path = Filename.temp_file "offheap_ba" ".img" in
  Offheap.Image.write path v;
  Fun.protect ~finally:(fun () -> Sys.remove path) (fun () -> f path)

let test_image _ =
  let v = shared_value () in
  let ((base, _, _, _, _, _, _, _, _, _)) = v in
  with_image v (fun path ->
      List.iter
        (fun (name, load) ->
          let h = load path in
          let (cb, c1, c2, _, cb', cr, _, _, _, _) as c = Offheap.get h in
          assert_bool (name ^ ": equal") (compare v c = 0);
          assert_bool (name ^ ": shared block") (cb == cb');
          assert_equal ~msg:(name ^ ": aligned") 0L
            (Int64.rem (Int64.of_nativeint (Ba_support.data (genarray_of_array1 cb))) 64L);
          assert_bool (name ^ ": external") (external_flags (genarray_of_array1 cb));
          assert_equal ~msg:(name ^ ": hash") (Hashtbl.hash base) (Hashtbl.hash cb);
          c1.{10} <- 7.;
          assert_equal 7. cb.{20};
          c2.{0} <- 8.;
          assert_equal 8. cr.{2, 5};
          assert_equal 20. base.{20};
          Offheap.free h)
        [
          ("load", fun p -> Offheap.Image.load p);
          ("share", fun p -> Offheap.Image.load ~share:true p);
          ("verify", fun p -> Offheap.Image.load ~verify:true p);
          ("relocated", fun p -> Offheap.Image.load_relocated p);
        ])

let test_image_every_kind _ =
  List.iter
    (fun (K (kname, k, f)) ->
      List.iter
        (fun (L (_, l)) ->
          let arrays = List.map (fun dims -> filled k f l dims 3) shapes in
          with_image arrays (fun path ->
              let h = Offheap.Image.load ~verify:true path in
              assert_bool (kname ^ ": image") (compare arrays (Offheap.get h) = 0);
              List.iter2
                (fun a c -> check_same ~msg:kname a c)
                arrays (Offheap.get h);
              Offheap.free h))
        layouts)
    kinds

let () =
  run_test_tt_main
    ("bigarray"
    >::: [
           "every kind, layout and shape" >:: test_every_kind_layout_shape;
           "shared data" >:: test_shared_data;
           "mapped files" >:: test_mapped;
           "free and stats" >:: test_free_and_get;
           "images" >:: test_image;
           "images of every kind" >:: test_image_every_kind;
         ])
