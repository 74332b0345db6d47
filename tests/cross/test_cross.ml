(* Features together, where the other suites take them one at a time: regions holding
   Bigarrays (every kind, views sharing data, 0-d and empty arrays) through adds,
   mutation, compare/hash/Marshal, images written, loaded (both modes, at the recorded
   address and relocated), added to and written again; values that point into other
   off-heap memory (copies, loaded images, regions) copied, added and written; large
   values (past the 4 MiB from which pass 1 writes the copy) that meet a Bigarray or a
   refused block late; failures that must leave everything as it was, a thousand times
   over; every kind of handle used after its free; systhreads doing all of it at once;
   address-space limits. OCaml 4.13 and 5.3, native and bytecode.

   Every function here that reads values out of a copy, an image or a region returns
   before that memory is freed: no root may point into freed memory (see the Rules of
   offheap.mli), on OCaml 4 too, where the heap may grow into memory given back. *)

open OUnit2
open Bigarray
module R = Offheap.Region

let pint = string_of_int
let o = Sys.opaque_identity

let settle = Probes.settle

let temp () = Filename.temp_file "offheap_cross" ".img"

let with_file f =
  let p = temp () in
  Fun.protect ~finally:(fun () -> if Sys.file_exists p then Sys.remove p) (fun () -> f p)

(* [f r] on a fresh region, freed once [f] has returned: no frame of [f] holds its
   values then. *)
let in_region ?alloc ?chunk_bytes f =
  let r = R.create ?alloc ?chunk_bytes () in
  f r;
  R.free r

(* [f r roots] on a region loaded from [p], freed once [f] has returned. *)
let with_loaded ?key ?share p f =
  let r =
    (fun () ->
      let r, roots = R.load_image ?key ?share p in
      f r roots;
      r)
      ()
  in
  R.free r

let data a = Ba_support.data (genarray_of_array1 a)
let distance a b = Nativeint.to_int (Nativeint.sub (data a) (data b))

let status_kb = Probes.status_kb

(* {1 Regions holding Bigarrays} *)

(* A value of Bigarrays sharing data in every way, with ordinary blocks around them. *)
type views = {
  base : (float, float64_elt, c_layout) Array1.t;
  sub1 : (float, float64_elt, c_layout) Array1.t;  (* base.{10..29} *)
  sub2 : (float, float64_elt, c_layout) Array1.t;  (* base.{25..54}: overlaps sub1 *)
  grid : (float, float64_elt, c_layout) Array2.t;  (* base reshaped 10 x 10 *)
  row : (float, float64_elt, c_layout) Array1.t;  (* grid's row 3: base.{30..39} *)
  fortran : (float, float64_elt, fortran_layout) Array1.t;  (* base, other layout *)
  zero_d : (int32, int32_elt, c_layout) Genarray.t;
  empty : (char, int8_unsigned_elt, fortran_layout) Array2.t;  (* 0 x 5 *)
  bytes : (char, int8_unsigned_elt, c_layout) Array1.t;
  again : (float, float64_elt, c_layout) Array1.t;  (* base, the same block *)
  name : string;
  boxed : int64 list;
}

let views () =
  let base = Array1.init float64 c_layout 100 float_of_int in
  let grid = reshape_2 (genarray_of_array1 base) 10 10 in
  let zero_d = Genarray.create int32 c_layout [||] in
  Genarray.set zero_d [||] 42l;
  {
    base;
    sub1 = Array1.sub base 10 20;
    sub2 = Array1.sub base 25 30;
    grid;
    row = Array2.slice_left grid 3;
    fortran = array1_of_genarray (Genarray.change_layout (genarray_of_array1 base) fortran_layout);
    zero_d;
    empty = Array2.create char fortran_layout 0 5;
    bytes = Array1.init char c_layout 77 (fun i -> Char.chr (i * 3 land 255));
    again = base;
    name = "views";
    boxed = [ 1L; Int64.max_int ];
  }

(* [c] has [v]'s contents, shares data where [v] does, and its data is its own. *)
let check_views ~msg v c =
  assert_bool (msg ^ ": compare") (compare v c = 0);
  assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
  assert_bool (msg ^ ": Marshal") (compare v (Marshal.from_string (Marshal.to_string c []) 0) = 0);
  assert_bool (msg ^ ": the same block twice") (c.again == c.base);
  assert_equal ~msg:(msg ^ ": sub1 inside base") (distance v.sub1 v.base) (distance c.sub1 c.base);
  assert_equal ~msg:(msg ^ ": sub2 inside base") (distance v.sub2 v.base) (distance c.sub2 c.base);
  assert_equal ~msg:(msg ^ ": row inside base") (distance v.row v.base) (distance c.row c.base);
  assert_equal ~msg:(msg ^ ": other layout, same data") 0 (distance c.fortran c.base);
  assert_bool (msg ^ ": own data") (data c.base <> data v.base);
  assert_equal ~msg:(msg ^ ": aligned") 0 (Nativeint.to_int (data c.base) land 63);
  assert_equal ~msg:(msg ^ ": 0-d") 42l (Genarray.get c.zero_d [||]);
  assert_equal ~msg:(msg ^ ": empty") (0, 5) (Array2.dim1 c.empty, Array2.dim2 c.empty)

(* Sets through every view of [c], read back through the others; [v] sees none of it.
   Then undoes it, so that [c] equals [v] again. *)
let mutate_views ~msg v c =
  c.sub1.{10} <- -1.;
  assert_equal ~msg:(msg ^ ": sub1 -> base") (-1.) c.base.{20};
  c.sub2.{0} <- -2.;
  assert_equal ~msg:(msg ^ ": sub2 -> sub1") (-2.) c.sub1.{15};
  c.grid.{3, 4} <- -3.;
  assert_equal ~msg:(msg ^ ": grid -> row") (-3.) c.row.{4};
  c.fortran.{1} <- -4.;
  assert_equal ~msg:(msg ^ ": fortran -> base") (-4.) c.base.{0};
  Genarray.set c.zero_d [||] 7l;
  assert_bool (msg ^ ": the source untouched")
    (v.base.{20} = 20. && v.base.{25} = 25. && v.base.{34} = 34. && v.base.{0} = 0.
     && Genarray.get v.zero_d [||] = 42l);
  assert_bool (msg ^ ": now differs") (compare v c <> 0);
  List.iter (fun i -> c.base.{i} <- float_of_int i) [ 0; 20; 25; 34 ];
  Genarray.set c.zero_d [||] 42l;
  assert_bool (msg ^ ": equal again") (compare v c = 0)

let test_region_views _ =
  let v = views () in
  in_region (fun r ->
      let c = R.add r v in
      assert_bool "in the region" (R.mem r c && R.mem r c.base && R.mem r c.zero_d);
      check_views ~msg:"add" v c;
      mutate_views ~msg:"add" v c;
      (* Added again: a Bigarray already in the region is pointed to, its data shared. *)
      let before = R.stats r in
      let b2, s2, c' = R.add r (c.base, c.sub1, c) in
      assert_bool "region values kept" (b2 == c.base && s2 == c.sub1 && c' == c);
      assert_equal ~msg:"a tuple added" ~printer:pint (before.blocks + 1) (R.stats r).blocks;
      (* A view made from the region's array, added later: its own copy of the data (the
         data of one add is shared within that add only). *)
      let late = R.add r (Array1.sub c.base 50 10) in
      late.{0} <- 1000.;
      assert_equal ~msg:"a later view has its own data" 50. c.base.{50};
      (* A value holding both region Bigarrays and heap ones: the heap ones are copied. *)
      let heap = Array1.init int c_layout 10 (fun i -> i * i) in
      let ms2, mh, mhs, mc = R.add r (c.sub2, heap, Array1.sub heap 2 3, c) in
      assert_bool "region parts pointed to" (ms2 == c.sub2 && mc == c);
      assert_bool "heap parts copied" (R.mem r mh && R.mem r mhs);
      mhs.{0} <- -9;
      assert_equal ~msg:"the heap array and its view share data in the region" (-9) mh.{2};
      assert_equal ~msg:"the heap source untouched" 4 heap.{2})

(* What a region loaded from the image of [views] holds: checked, changed, added to and
   written again to [p2] under the key "again". *)
let exercise_loaded ~msg v p2 r roots =
  let c : views = Obj.obj (List.assoc "views" roots) in
  let (e, s) : (int, int16_signed_elt, c_layout) Array1.t * string =
    Obj.obj (List.assoc "extra" roots)
  in
  check_views ~msg v c;
  mutate_views ~msg v c;
  assert_equal ~msg:(msg ^ ": extra") (-4, "extra") (e.{4}, s);
  (* Added after the load: new chunks; the loaded values pointed to. *)
  let heap = Array1.init float32 fortran_layout 9 float_of_int in
  let ((a1, ah, ahs, ac) as added) = R.add r (c.sub1, heap, Array1.sub heap 2 3, c) in
  assert_bool (msg ^ ": loaded values pointed to") (a1 == c.sub1 && ac == c);
  assert_bool (msg ^ ": new values in new chunks") (R.mem r ah && R.mem r ahs);
  ahs.{1} <- -1.;
  assert_equal ~msg:(msg ^ ": new view shares") (-1.) ah.{2};
  R.write_image ~key:"again" p2 r [ ("added", Obj.repr added); ("extra", Obj.repr e) ]

let check_written_again ~msg v _r roots =
  let (b, h, hs, c) :
      (float, float64_elt, c_layout) Array1.t
      * (float, float32_elt, fortran_layout) Array1.t
      * (float, float32_elt, fortran_layout) Array1.t
      * views =
    Obj.obj (List.assoc "added" roots)
  in
  check_views ~msg v c;
  assert_bool (msg ^ ": sharing between parts kept") (b == c.sub1);
  assert_equal ~msg:(msg ^ ": sub1 inside base") (distance v.sub1 v.base) (distance b c.base);
  assert_equal ~msg:(msg ^ ": view kept") (-1.) h.{2};
  hs.{2} <- 5.;
  assert_equal ~msg:(msg ^ ": view still shares") 5. h.{3};
  mutate_views ~msg v c

(* Written; loaded in both modes, at the recorded address and (while that load holds
   it) relocated; each added to, written again and loaded again. *)
let test_region_views_images _ =
  let v = views () in
  with_file (fun p ->
      with_file (fun p2 ->
          in_region ~chunk_bytes:4096 (fun r ->
              let c = R.add r v in
              let extra = R.add r (Array1.init int16_signed c_layout 5 (fun i -> -i), "extra") in
              R.write_image ~key:"views" p r [ ("views", Obj.repr c); ("extra", Obj.repr extra) ]);
          List.iter
            (fun share ->
              let mode = if share then "mapped" else "read" in
              let round msg r roots =
                exercise_loaded ~msg v p2 r roots;
                with_loaded ~key:"again" ~share p2 (check_written_again ~msg:(msg ^ ", written again") v)
              in
              with_loaded ~key:"views" ~share p (fun r roots ->
                  with_loaded ~key:"views" ~share p (round (mode ^ ", relocated"));
                  round mode r roots))
            [ false; true ]));
  settle ()

(* Random values with Bigarrays of random kinds and shapes (0-d and empty ones among
   them) and views of them, added one by one to regions of small chunks, some of them
   changed through the region (and the source alike); each added value stays equal to
   its source; the whole written as one image and loaded three times at once (the last
   two relocated). *)
type any = A : ('a, 'b, c_layout) Genarray.t -> any
type random_value = string * any list * any list * int list

let random_ba st =
  let dims = Array.init (Random.State.int st 4) (fun _ -> Random.State.int st 9) in
  let fill (type a b) (k : (a, b) kind) (f : int -> a) =
    let a = Genarray.create k c_layout dims in
    let n = Array.fold_left ( * ) 1 dims in
    let v = reshape_1 a n in
    for i = 0 to n - 1 do v.{i} <- f (Random.State.bits st) done;
    A a
  in
  match Random.State.int st 6 with
  | 0 -> fill char (fun i -> Char.chr (i land 255))
  | 1 -> fill float64 float_of_int
  | 2 -> fill int8_unsigned (fun i -> i land 255)
  | 3 -> fill complex32 (fun i -> { Complex.re = float_of_int (i land 1023); im = 1. })
  | 4 -> fill int64 Int64.of_int
  | _ -> fill int16_signed (fun i -> (i land 65535) - 32768)

let random_value st : random_value =
  let arrays = List.init (Random.State.int st 6) (fun _ -> random_ba st) in
  let views =
    List.filter_map
      (fun (A a) ->
        if Genarray.num_dims a > 0 && (Genarray.dims a).(0) > 1 then
          Some (A (Genarray.sub_left a 1 1))
        else None)
      arrays
  in
  (String.make (Random.State.int st 40) 'x', arrays, views, List.init (Random.State.int st 50) Fun.id)

let snapshot (v : random_value) = Marshal.to_string v []

(* The same change to [c] and to its source [v]: every element set to the last one. *)
let change_both (_, ca, _, _) (_, va, _, _) =
  List.iter2
    (fun (A c) (A v) ->
      let n = Array.fold_left ( * ) 1 (Genarray.dims c) in
      if n > 0 then begin
        let x = (reshape_1 c n).{n - 1} in
        Genarray.fill c x;
        Genarray.fill (Obj.magic v : (_, _, c_layout) Genarray.t) x
      end)
    ca va

let build_random st chunk_bytes p =
  let snaps = ref [] in
  in_region ~chunk_bytes (fun r ->
  let added = ref [] in
  for i = 1 to 1500 do
    let v = random_value st in
    let c = R.add r v in
    let _, arrays, _, _ = c in
    List.iter
      (fun (A a) ->
        assert_equal ~msg:"data aligned in a shared chunk" 0
          (Nativeint.to_int (Ba_support.data a) land 63))
      arrays;
    if i mod 3 = 0 then change_both c v;
    added := (c, snapshot v) :: !added;
    if i mod 250 = 0 then
      List.iter (fun (c, s) -> assert_bool "an added value changed" (snapshot c = s)) !added
  done;
  R.write_image p r (List.mapi (fun i (c, _) -> (string_of_int i, Obj.repr c)) !added);
  snaps := List.map snd !added);
  !snaps

let check_random snaps _r roots =
  List.iter2
    (fun (_, c) s -> assert_bool "loaded differs" (snapshot (Obj.obj c : random_value) = s))
    roots snaps

let test_region_random _ =
  let st = Random.State.make [| 13 |] in
  List.iter
    (fun chunk_bytes ->
      with_file (fun p ->
          let snaps = build_random st chunk_bytes p in
          with_loaded p (fun _ roots ->
              check_random snaps () roots;
              with_loaded ~share:true p (fun _ roots ->
                  check_random snaps () roots;
                  with_loaded p (check_random snaps)))))
    [ 4096; 8192; 0 ];
  settle ()

(* add_deep copies Bigarrays of another region with their data: the old region can go. *)
let test_add_deep_bigarrays _ =
  let v = views () in
  in_region (fun fresh ->
      let deep = ref None in
      in_region (fun old ->
          let c = R.add old v in
          let d = R.add_deep fresh c in
          assert_bool "deep: in the fresh region" (R.mem fresh d.base && not (R.mem old d.base));
          assert_bool "deep: own data" (data d.base <> data c.base);
          deep := Some d);
      Gc.compact ();
      match !deep with
      | Some d ->
          check_views ~msg:"add_deep" v d;
          mutate_views ~msg:"add_deep" v d
      | None -> assert_failure "add_deep");
  settle ()

(* {1 Values pointing into other off-heap memory} *)

let image_value () =
  ( List.init 1000 (fun i -> (i, string_of_int i)),
    Array1.init int c_layout 50 (fun i -> i * 3),
    Int64.of_int 5,
    3.5,
    [| 1.0; 2.0 |] )

(* A value of heap blocks and blocks of [loaded] (a loaded image's value): copied,
   added to a region and written as an image, it equals itself through compare, hash
   and Marshal; the loaded parts are pointed to by the copy and the region, copied by
   the image, whose views share data. *)
let check_mixed ~msg ((l, a, _, _, fa) as loaded) =
  assert_bool (msg ^ ": loaded") (compare loaded (image_value ()) = 0);
  let mixed () = (l, [ a; Array1.sub a 1 2 ], ref fa, "heap", List.init 5 (fun i -> (i, List.nth l i))) in
  let m = mixed () in
  let same what v =
    assert_bool (msg ^ ": " ^ what ^ ": compare") (compare v m = 0);
    assert_equal ~msg:(msg ^ ": " ^ what ^ ": hash") (Hashtbl.hash m) (Hashtbl.hash v);
    assert_bool (msg ^ ": " ^ what ^ ": Marshal")
      (compare (Marshal.from_string (Marshal.to_string v []) 0) m = 0)
  in
  same "heap" m;
  let h = Offheap.copy m in
  (fun () ->
    let ((cl, _, _, _, _) as c) = Offheap.get h in
    same "copy" c;
    assert_bool (msg ^ ": copy points to the image") (cl == l))
    ();
  let r = R.create () in
  (fun () ->
    let ((rl, arrays, _, _, _) as c) = R.add r m in
    same "region" c;
    assert_bool (msg ^ ": region points to the image") (rl == l && List.hd arrays == a))
    ();
  with_file (fun p ->
      Offheap.Image.write p m;
      let hi = Offheap.Image.load p in
      (fun () ->
        let ((il, arrays, _, _, _) as c) = Offheap.get hi in
        same "image" c;
        assert_bool (msg ^ ": image copies") (il != l);
        match arrays with
        | [ ia; iv ] ->
            iv.{0} <- -1;
            assert_equal ~msg:(msg ^ ": image view shares") (-1) ia.{1};
            assert_equal ~msg:(msg ^ ": loaded untouched") 3 a.{1}
        | _ -> assert_failure "arrays")
        ();
      Offheap.free hi);
  R.free r;
  Offheap.free h

let test_mixed_with_images _ =
  with_file (fun p ->
      Offheap.Image.write p (image_value ());
      List.iter
        (fun (msg, load) ->
          let h = load p in
          check_mixed ~msg (Offheap.get h);
          Offheap.free h)
        [
          ("read", fun p -> Offheap.Image.load p);
          ("mapped", fun p -> Offheap.Image.load ~share:true p);
          ("mapped, trusted", fun p -> Offheap.Image.load ~share:true ~trusted:true p);
          ("read, relocated", fun p -> Offheap.Image.load_relocated p);
          ("mapped, relocated", fun p -> Offheap.Image.load_relocated ~share:true p);
        ]);
  settle ()

(* Copies of a region's values and of other copies, and images of them: the copy points
   to them, the image holds them whole (and the region or copy can then go). *)
let test_into_copies_and_regions _ =
  let v = views () in
  let inner = Offheap.copy v in
  let r = R.create () in
  with_file (fun p ->
      (fun () ->
        let c = Offheap.get inner in
        let rv = R.add r (c, Array1.sub c.base 40 2, [ 1; 2 ]) in
        let rc, _, _ = rv in
        assert_bool "the region points to the copy" (rc == c);
        let h = Offheap.copy (rv, c.sub2) in
        (fun () ->
          let (hc, _, _), hs = Offheap.get h in
          assert_bool "a copy points to both" (hc == c && hs == c.sub2))
          ();
        Offheap.free h;
        R.write_image p r [ ("rv", Obj.repr rv) ])
        ();
      R.free r;
      Offheap.free inner;
      Gc.compact ();
      with_loaded p (fun _ roots ->
          let (c, view, l) : views * (float, float64_elt, c_layout) Array1.t * int list =
            Obj.obj (List.assoc "rv" roots)
          in
          check_views ~msg:"image of a region pointing to a copy" v c;
          assert_equal ~msg:"the view" [ 40.; 41. ] [ view.{0}; view.{1} ];
          assert_equal [ 1; 2 ] l));
  settle ()

(* {1 Large values meeting Bigarrays and refused blocks late} *)

let big n = List.init n (fun i -> (i, string_of_int i))

let test_large_late_bigarray _ =
  let a = Array1.init float64 c_layout 100_000 float_of_int in
  let v = (big 300_000, a, Array1.sub a 10 10, Array1.sub a 5 20) in
  let h = Offheap.copy v in
  (fun () ->
    let ((_, ca, cs, ct) as c) = Offheap.get h in
    assert_bool "equal" (compare v c = 0);
    cs.{0} <- -5.;
    assert_equal ~msg:"views share" (-5.) ca.{10};
    assert_equal ~msg:"overlapping views share" (-5.) ct.{5};
    assert_equal ~msg:"source untouched" 10. a.{10})
    ();
  assert_bool "data counted" ((Offheap.stats h).bytes > 800_000 + 300_000 * 48);
  Offheap.free h;
  let r = R.create () in
  (fun () ->
    let ((_, ca, cs, _) as c) = R.add r v in
    assert_bool "region: equal" (compare v c = 0);
    cs.{1} <- -6.;
    assert_equal ~msg:"region: views share" (-6.) ca.{11})
    ();
  R.free r;
  with_file (fun p ->
      Offheap.Image.write p v;
      let h = Offheap.Image.load p in
      (fun () ->
        let ((_, ca, cs, _) as c) = Offheap.get h in
        assert_bool "image: equal" (compare v c = 0);
        cs.{2} <- -7.;
        assert_equal ~msg:"image: views share" (-7.) ca.{12})
        ();
      Offheap.free h);
  settle ()

(* Each refused block, deep in a large value that holds Bigarrays: copy, measure,
   Image.write and Region.add (default allocator and a C one) raise; the value is as it
   was (a Marshal snapshot, also after a compaction), no file is left, the region is
   unchanged and still takes adds. *)
let test_large_late_refusals _ =
  let refused =
    [
      ("abstract", fun () -> Obj.new_block Obj.abstract_tag 3);
      ("channel", fun () -> Obj.repr stdout);
      ("unforced lazy", fun () -> Obj.repr (lazy (print_string "x")));
      ("mutex", fun () -> Obj.repr (Mutex.create ()));
    ]
  in
  let a = Array1.init float64 c_layout 50_000 float_of_int in
  let list = big 300_000 in
  let snap = Marshal.to_string (list, a) [] in
  let ca = Region_support.budget_alloc (-1) in
  List.iter
    (fun (what, make) ->
      let v = (list, a, Array1.sub a 3 4, [| Obj.repr 1; make () |]) in
      let refused f =
        match f () with
        | _ -> assert_failure (what ^ ": not refused")
        | exception Offheap.Not_copyable _ -> ()
      in
      refused (fun () -> Offheap.copy v);
      refused (fun () -> Offheap.copy ~alloc:ca v);
      refused (fun () -> Offheap.measure v);
      with_file (fun p ->
          Sys.remove p;
          refused (fun () -> Offheap.Image.write p v);
          assert_bool (what ^ ": no file left") (not (Sys.file_exists p)));
      let in_it r =
        ignore (R.add r (Array1.create char c_layout 10));
        let before = R.stats r in
        refused (fun () -> R.add r v);
        refused (fun () -> R.add_deep r v);
        assert_bool (what ^ ": region unchanged") (R.stats r = before);
        let x = R.add r (Array1.init int c_layout 5 Fun.id, [ 1 ]) in
        assert_equal ~msg:(what ^ ": region usable") 4 (fst x).{4}
      in
      in_region in_it;
      in_region ~alloc:ca ~chunk_bytes:4096 in_it;
      Gc.compact ();
      assert_bool (what ^ ": source intact") (Marshal.to_string (list, a) [] = snap))
    refused;
  settle ();
  assert_equal ~msg:"C allocator: nothing outstanding" ~printer:pint 0
    (Region_support.counts ca).outstanding;
  assert_equal ~msg:"C allocator: bad frees" ~printer:pint 0 (Region_support.counts ca).bad_frees

(* {1 Failures, a thousand times} *)

let test_failed_adds_leak_nothing _ =
  let check_loop ~msg r v =
    (fun () ->
    ignore (R.add r (Array1.create float64 c_layout 10));
    let before = R.stats r in
    let fail () =
      match R.add r v with
      | _ -> assert_failure (msg ^ ": added")
      | exception (Offheap.Not_copyable _ | Out_of_memory) -> ()
    in
    for _ = 1 to 50 do fail () done;
    let vm = status_kb "VmSize" and rss = status_kb "VmRSS" in
    for _ = 1 to 1000 do fail () done;
    let vm' = status_kb "VmSize" and rss' = status_kb "VmRSS" in
    assert_bool (Printf.sprintf "%s: VmSize %d -> %d kB" msg vm vm') (vm' < vm + 8192);
    assert_bool (Printf.sprintf "%s: VmRSS %d -> %d kB" msg rss rss') (rss' < rss + 8192);
    assert_bool (msg ^ ": stats unchanged") (R.stats r = before);
    let x = R.add r (Array1.init int c_layout 5 Fun.id) in
    assert_equal ~msg:(msg ^ ": usable") 4 x.{4}) ();
    R.free r
  in
  let arrays () = (Array1.create float64 c_layout 200_000, Array1.create char c_layout 3_000_000) in
  check_loop ~msg:"abstract, small value" (R.create ()) (arrays (), Obj.new_block Obj.abstract_tag 1);
  check_loop ~msg:"abstract, large value" (R.create ())
    (List.init 300_000 Fun.id, arrays (), Obj.new_block Obj.abstract_tag 1);
  let a = Region_support.budget_alloc (-1) in
  let r = R.create ~alloc:a () in
  ignore (R.add r (Array1.create float64 c_layout 10));
  Region_support.set_budget a 0;
  check_loop ~msg:"allocator returning NULL" r (arrays ());
  settle ();
  let c = Region_support.counts a in
  assert_equal ~msg:"NULL allocator: outstanding" ~printer:pint 0 c.outstanding;
  assert_equal ~msg:"NULL allocator: bad frees" ~printer:pint 0 c.bad_frees;
  (* copies with an allocator that returns NULL *)
  let b = Region_support.budget_alloc 0 in
  let v = (List.init 300_000 Fun.id, Array1.create float64 c_layout 200_000) in
  let vm = status_kb "VmSize" in
  for _ = 1 to 1000 do
    match Offheap.copy ~alloc:b v with
    | _ -> assert_failure "copied"
    | exception Out_of_memory -> ()
  done;
  let vm' = status_kb "VmSize" in
  assert_bool (Printf.sprintf "copies: VmSize %d -> %d kB" vm vm') (vm' < vm + 8192)

(* A failed write leaves the earlier file as it was and no temporary file. *)
let test_failed_writes_keep_file _ =
  let dir = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap_cross_%d" (Unix.getpid ())) in
  Unix.mkdir dir 0o700;
  let p = Filename.concat dir "x.img" in
  let good = (Array1.init float64 c_layout 1000 float_of_int, "good") in
  Offheap.Image.write p good;
  let listing = Sys.readdir dir in
  let a = Array1.init float64 c_layout 300_000 float_of_int in
  List.iter
    (fun bad ->
      (match Offheap.Image.write p bad with
      | () -> assert_failure "written"
      | exception Offheap.Not_copyable _ -> ());
      assert_equal ~msg:"nothing left in the directory" listing (Sys.readdir dir);
      let h = Offheap.Image.load p in
      assert_bool "the earlier image" (compare (Offheap.get h) good = 0);
      Offheap.free h)
    [
      Obj.repr (a, Obj.new_block Obj.abstract_tag 1);
      Obj.repr (List.init 400_000 Fun.id, a, [ Obj.repr stdout ]);
      Obj.repr (a, Array1.sub a 3 4, fun x -> x + 1);
      Obj.repr (List.init 400_000 Fun.id, a, lazy (List.length []));
    ];
  (* a region whose image cannot be written (a closure) stays usable *)
  in_region (fun r ->
      let f = R.add r (a, fun x -> x + o 1) in
      (match R.write_image p r [ ("f", Obj.repr f) ] with
      | () -> assert_failure "closure written"
      | exception Offheap.Not_copyable Offheap.Closure -> ());
      assert_equal ~msg:"region: nothing left" listing (Sys.readdir dir);
      assert_equal ~msg:"region usable" 3 ((snd f) 2));
  Sys.remove p;
  Unix.rmdir dir;
  settle ()

(* {1 Handles after free} *)

let freed_handle ~msg h =
  assert_raises ~msg (Invalid_argument "Offheap.get: deleted") (fun () -> Offheap.get h);
  assert_raises ~msg (Invalid_argument "Offheap.free: deleted") (fun () -> Offheap.free h);
  ignore (Offheap.stats h : Offheap.stats)

let test_every_handle_after_free _ =
  with_file (fun p ->
      Offheap.Image.write p (List.init 10 string_of_int, Array1.create char c_layout 10);
      List.iter
        (fun (msg, make) ->
          let h : Obj.t Offheap.t = make () in
          ignore (o (Offheap.get h));
          Offheap.free h;
          freed_handle ~msg h;
          Offheap.with_copy 1 (fun _ -> freed_handle ~msg h))
        [
          ("copy", fun () -> Offheap.copy (Obj.repr [ o 1; 2 ]));
          ("immediate", fun () -> Offheap.copy (Obj.repr 1));
          ("large", fun () -> Offheap.copy (Obj.repr (List.init 300_000 Fun.id)));
          ("Bigarray", fun () -> Offheap.copy (Obj.repr (Array1.create char c_layout 10)));
          ( "C allocator",
            fun () -> Offheap.copy ~alloc:(Region_support.budget_alloc (-1)) (Obj.repr [ o 1 ]) );
          ("load", fun () -> Offheap.Image.load p);
          ("load, mapped", fun () -> Offheap.Image.load ~share:true p);
          ("load, trusted", fun () -> Offheap.Image.load ~share:true ~trusted:true p);
          ("load, relocated", fun () -> Offheap.Image.load_relocated p);
        ];
      let freed_region ~msg r =
        let invalid name f =
          match f () with
          | _ -> assert_failure (msg ^ ": " ^ name ^ " after free")
          | exception Invalid_argument _ -> ()
        in
        invalid "free" (fun () -> R.free r);
        invalid "add" (fun () -> R.add r [ o 3 ]);
        invalid "add of an immediate" (fun () -> R.add r 3);
        invalid "add_deep" (fun () -> R.add_deep r [ o 3 ]);
        invalid "write_image" (fun () -> R.write_image p r []);
        assert_bool (msg ^ ": mem") (not (R.mem r 1));
        assert_equal ~msg:(msg ^ ": chunks") ~printer:pint 0 (R.stats r).chunks
      in
      let r = R.create () in
      ignore (R.add r (Array1.create char c_layout 10));
      R.write_image p r [];
      R.free r;
      freed_region ~msg:"region" r;
      let r = R.create () in
      R.free r;
      freed_region ~msg:"empty region" r;
      List.iter
        (fun share ->
          let r, _ = R.load_image ~share p in
          R.free r;
          freed_region ~msg:"loaded region" r)
        [ false; true ]);
  settle ()

(* {1 Systhreads} *)

let worker r k () =
  for round = 1 to 6 do
    let a = Array1.init int c_layout 1000 (fun i -> i + k + round) in
    let v = (List.init 200_000 (fun i -> (i + k, string_of_int i)), a, Array1.sub a 10 10) in
    let snap = Marshal.to_string v [] in
    (match round mod 3 with
    | 0 ->
        let h = Offheap.copy v in
        (fun () ->
          let ((_, ca, cs) as c) = Offheap.get h in
          assert (compare c v = 0);
          cs.{0} <- -1;
          assert (ca.{10} = -1);
          Thread.yield ())
          ();
        Offheap.free h
    | 1 ->
        let ((_, ca, cs) as c) = R.add r v in
        assert (compare c v = 0);
        cs.{0} <- -1;
        assert (ca.{10} = -1)
    | _ ->
        let p = temp () in
        Offheap.Image.write p v;
        let h = Offheap.Image.load p in
        (fun () -> assert (compare (Offheap.get h) v = 0)) ();
        Offheap.free h;
        Sys.remove p);
    assert (Marshal.to_string v [] = snap)
  done

let test_threads _ =
  let r = R.create () in
  let errors = ref [] in
  let threads =
    List.init 4 (fun k ->
        Thread.create (fun () -> try worker r k () with e -> errors := e :: !errors) ())
  in
  for _ = 1 to 30 do
    ignore (o (List.init 10_000 Fun.id));
    Gc.minor ();
    Thread.yield ()
  done;
  List.iter Thread.join threads;
  List.iter (fun e -> assert_failure ("a thread: " ^ Printexc.to_string e)) !errors;
  assert_equal ~msg:"region adds" ~printer:pint 8 (R.stats r).values;
  R.free r;
  settle ()

(* {1 Memory given back, then taken by the heap} *)

(* Thousands of copies, regions of small chunks and a loaded image, each read in a
   function that returns before its free; then the heap grows, into the memory given
   back (malloc hands it out again): the heap and every live copy stay sound. *)
let test_memory_reused_by_the_heap _ =
  let keep = Offheap.copy (List.init 1000 string_of_int) in
  for k = 1 to 10 do
    let hs =
      Array.init 2000 (fun i -> Offheap.copy (String.make (2000 + (i mod 7 * 100)) (Char.chr (65 + (i mod 26)))))
    in
    let r = R.create ~chunk_bytes:4096 () in
    let total =
      (fun () ->
        let refs = Array.map (fun h -> Some (Offheap.get h)) hs in
        let added = Array.init 500 (fun i -> R.add r (String.make 3000 'r', Array1.create char c_layout i)) in
        Array.fold_left (fun n s -> match s with Some s -> n + String.length s | None -> n) 0 refs
        + Array.length added)
        ()
    in
    assert_bool "read" (total > 2000 * 2000);
    Array.iter Offheap.free hs;
    R.free r;
    let junk = Array.init 200 (fun i -> Array.make 5000 (i + k)) in
    Gc.full_major ();
    Array.iteri
      (fun i a -> Array.iter (fun x -> if x <> i + k then assert_failure "the heap changed") a)
      junk;
    assert_bool "a live copy" (Offheap.get keep = List.init 1000 string_of_int)
  done;
  Offheap.free keep;
  settle ()

(* Nothing live points into the copies when they are freed, but the major GC, in the
   middle of its marking, has reached an array that pointed into them (dead since) and
   has not scanned it yet: it scans it after a list of 3M cells. Meanwhile the heap
   grows, into the memory given back. The marker must not take the array's stale
   pointers for heap blocks: on OCaml 4 it did when the copies' memory had become a
   heap chunk, and blackened "headers" inside the new array (3 rounds of 6 corrupted
   it, some 340 words each, before frees waited for the end of the marking). *)
let stale = ref [||]
let busy = ref []

let test_free_while_marking _ =
  (* A heap chunk of 30 MB, given back by the compaction: malloc then serves requests
     of up to that size from its heap, where the copies below are made and freed
     (glibc's mmap threshold follows the largest mapped chunk freed). *)
  ignore (o (Bytes.create (30 lsl 20)));
  Gc.compact ();
  let corrupted = ref 0 in
  for k = 1 to 15 do
    let hs =
      Array.init 3000 (fun i -> Offheap.copy (String.make (20000 + (i mod 7 * 1000)) 'c'))
    in
    stale := Array.init 3000 (fun i -> Offheap.get hs.(i));
    busy := List.init 3_000_000 (fun i -> i + k);
    Gc.full_major ();
    (* a cycle begins; clearing the globals darkens their old values: the array is
       pushed on the mark stack, the long list on top of it *)
    ignore (Gc.major_slice 1 : int);
    stale := [||];
    busy := [];
    Array.iter Offheap.free hs;
    let fresh = Array.make 1_000_000 (k + 1) in
    Gc.full_major ();
    Array.iter (fun x -> if x <> k + 1 then incr corrupted) fresh
  done;
  settle ();
  assert_equal ~msg:"words of a live array changed by the GC" ~printer:pint 0 !corrupted

(* {1 Region images: roots of every shape} *)

let test_region_image_roots _ =
  let cases =
    [
      ("none", []);
      ("immediates", [ ("a", Obj.repr 1); ("b", Obj.repr 'c') ]);
      ("an empty name", [ ("", Obj.repr "") ]);
      ("an atom", [ ("arr", Obj.repr [||]) ]);
      ("constants", [ ("s", Obj.repr "static"); ("l", Obj.repr [ 1; 2 ]) ]);
      ("a float array", [ ("f", Obj.repr [| 1.0 |]) ]);
      ("one value twice", let v = Obj.repr (ref 3) in [ ("a", v); ("a", v) ]);
      ("a 0-d Bigarray", [ ("z", Obj.repr (Genarray.create int c_layout [||])) ]);
    ]
  in
  with_file (fun p ->
      List.iter
        (fun (msg, roots) ->
          List.iter
            (fun share ->
              let r = R.create () in
              R.write_image p r roots;
              R.free r;
              with_loaded ~share p (fun r loaded ->
                assert_equal ~msg:(msg ^ ": names") (List.map fst roots) (List.map fst loaded);
                assert_bool (msg ^ ": values") (compare (List.map snd roots) (List.map snd loaded) = 0);
                (match loaded with
                | [ (_, a); (_, b) ] when msg = "one value twice" ->
                    assert_bool (msg ^ ": shared") (a == b)
                | _ -> ());
                let x = R.add r [ 1; 2; 3 ] in
                R.write_image p r (("x", Obj.repr x) :: loaded));
              with_loaded ~share p (fun _ again ->
                assert_bool (msg ^ ": written again")
                  (compare (List.map snd again) (Obj.repr [ 1; 2; 3 ] :: List.map snd roots) = 0)))
            [ false; true ])
        cases);
  settle ()

(* {1 Under a limit on address space} *)

(* The child: under a limit on its address space (set on itself), adds of growing values holding Bigarrays to a region,
   copies and image writes, until some raise Out_of_memory: the region is as it was
   after each failed add and takes the next ones; every failed write leaves no file. *)
let limit_child () =
  let src = Array1.init float64 c_layout (8 lsl 20) float_of_int in
  (* about 130 MB of address space left *)
  let limit = (status_kb "VmSize" + (130 * 1024)) * 1024 in
  let cmd = Printf.sprintf "prlimit --pid %d --as=%d:unlimited" (Unix.getpid ()) limit in
  if Sys.command cmd <> 0 then failwith cmd;
  let ooms = ref 0 and added = ref 0 in
  in_region (fun r ->
  for i = 1 to 40 do
    let n = (i * 997 * 211) mod (8 lsl 20) + 1000 in
    let v = (Array1.sub src 0 n, List.init (i * 100) Fun.id, Array1.sub src (n / 2) (n / 4)) in
    let before = R.stats r in
    match R.add r v with
    | a, _, b ->
        incr added;
        b.{0} <- -1.;
        if a.{n / 2} <> -1. || a.{n - 1} <> float_of_int (n - 1) then failwith "region value"
    | exception Out_of_memory ->
        incr ooms;
        if R.stats r <> before then failwith "region changed by a failed add"
  done);
  let copies = ref [] and copy_ooms = ref 0 in
  for i = 1 to 40 do
    let n = (i * 997 * 211) mod (8 lsl 20) + 1000 in
    match Offheap.copy (Array1.sub src 0 n, List.init (i * 100) Fun.id) with
    | h -> copies := h :: !copies
    | exception Out_of_memory -> incr copy_ooms
  done;
  let kept = List.length !copies in
  List.iter Offheap.free !copies;
  let p = Printf.sprintf "%s.limit" (temp ()) in
  for i = 1 to 10 do
    let n = (i * 997 * 211) mod (8 lsl 20) + 1000 in
    match Offheap.Image.write p (Array1.sub src 0 n, List.init (i * 100) Fun.id) with
    | () -> Sys.remove p
    | exception Out_of_memory -> if Sys.file_exists p then failwith "a failed write left its file"
  done;
  settle ();
  Printf.printf "region: %d added, %d out of memory; copies: %d, %d out of memory\n%!" !added !ooms
    kept !copy_ooms;
  exit 0

let test_address_space_limit _ =
  let status, output = Probes.run_self [ "limit-child" ] in
  assert_equal ~msg:("the child: " ^ output) ~printer:pint 0 status;
  match
    Scanf.sscanf output "region: %d added, %d out of memory; copies: %d, %d out of memory"
      (fun a b c d -> (a, b, c, d))
  with
  | added, failed, copies, copy_failed ->
      assert_bool ("adds and copies, some of them failed: " ^ output)
        (added > 0 && failed > 0 && copies > 0 && copy_failed > 0)
  | exception (Scanf.Scan_failure _ | End_of_file | Failure _) ->
      assert_failure ("the child: " ^ output)

let () =
  if Array.length Sys.argv > 1 && Sys.argv.(1) = "limit-child" then limit_child ();
  run_test_tt_main
    ("features together"
    >::: [
           "a region holding Bigarrays that share data" >:: test_region_views;
           "region images of Bigarrays: loaded, added to, written again"
           >:: test_region_views_images;
           "random Bigarrays added to regions, written, loaded three times"
           >:: test_region_random;
           "add_deep of a region's Bigarrays" >:: test_add_deep_bigarrays;
           "values mixing heap blocks and a loaded image's" >:: test_mixed_with_images;
           "values pointing into copies and regions" >:: test_into_copies_and_regions;
           "a large value meeting Bigarrays late" >:: test_large_late_bigarray;
           "a large value meeting a refused block late" >:: test_large_late_refusals;
           "a thousand failed adds and copies leak nothing" >:: test_failed_adds_leak_nothing;
           "failed writes keep the earlier file" >:: test_failed_writes_keep_file;
           "every kind of handle after free" >:: test_every_handle_after_free;
           "systhreads copying, adding and writing" >:: test_threads;
           "memory given back, then taken by the heap" >:: test_memory_reused_by_the_heap;
           "frees while the major GC marks" >:: test_free_while_marking;
           "region images: roots of every shape" >:: test_region_image_roots;
           "under a limit on address space" >:: test_address_space_limit;
         ])
