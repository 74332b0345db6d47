(* OCaml 4's page table and Bigarray data (issue 13): a copy or an image registers the
   pages of its blocks, not those of its Bigarray data; free gives back exactly what was
   registered (4.13's caml_page_table_remove of a page it never saw inserts an entry, so
   the table would grow with every cycle); everything still works on the copy. A copy of
   few large blocks registers the pages where blocks start, not the pages inside them
   (issue 9). On OCaml 5 (no page table) the same values are copied, used and freed. *)

open OUnit2
open Bigarray

external page_kind : nativeint -> int = "test_page_kind"
external address : Obj.t -> nativeint = "test_address"
external occupancy : unit -> int = "test_page_table_occupancy"

let ocaml5 = Scanf.sscanf Sys.ocaml_version "%d." (fun major -> major >= 5)
let in_static_data = 4
let page = 4096n

(* A value of blocks around Bigarrays: [pages] pages of float64 data, a sub-array and a
   slice of it, a small int Bigarray, and blocks after them in the traversal. *)
let make pages =
  let n = pages * 512 in
  let data = Array1.init float64 c_layout n float_of_int in
  let small = Array1.init int c_layout 10 (fun i -> i * i) in
  let m = reshape_2 (genarray_of_array1 data) (n / 8) 8 in
  (List.init 50 string_of_int, data, Array1.sub data 1000 500, Array2.slice_left m 3, small,
   Array.init 100 (fun i -> (i, float_of_int i)))

let data_of a = Ba_support.data (genarray_of_array1 a)

(* The page-aligned addresses inside [data, data + bytes) that lie past the page of
   [blocks_end]: pages holding data only. *)
let data_pages data bytes =
  let first = Nativeint.(mul (add (div data page) 1n) page) in
  let last = Nativeint.(add data (of_int bytes)) in
  let rec go a acc = if a >= last then List.rev acc else go (Nativeint.add a page) (a :: acc) in
  go first []

(* The addresses of the copy's blocks that [check] probes: the root, the string list's
   last cell, the Bigarrays' custom blocks, the array's last pair. *)
let block_addresses c =
  let (l, d, s, r, sm, a) = c in
  List.map address
    [ Obj.repr c; Obj.repr (List.nth l 49); Obj.repr d; Obj.repr s; Obj.repr r; Obj.repr sm;
      Obj.repr a.(99) ]

(* On OCaml 4: the pages of the addresses [blocks] are registered as static data, the
   pages [pages] are not ([unregistered] names one of them in a failure). *)
let assert_pages ~msg ~(unregistered : (string -> nativeint -> string, unit, string) format)
    blocks pages =
  if not ocaml5 then begin
    List.iter
      (fun b ->
        assert_equal ~msg:(Printf.sprintf "%s: block at %nx registered" msg b) ~printer:string_of_int
          in_static_data (page_kind b land in_static_data))
      blocks;
    List.iter
      (fun p ->
        assert_equal ~msg:(Printf.sprintf unregistered msg p) ~printer:string_of_int 0 (page_kind p))
      pages
  end

(* Checks the copy [c] of [v] in place: equal, usable, its blocks registered, its data
   not. Returns the probed addresses (blocks, data pages) for checking after free. *)
let check ~msg v c =
  let (l, d, s, r, sm, a) = c in
  let (_, vd, _, vr, vsm, _) = v in
  assert_bool (msg ^ ": compare") (compare v c = 0);
  assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
  assert_bool (msg ^ ": Marshal") (compare v (Marshal.from_string (Marshal.to_string c []) 0) = 0);
  assert_equal ~msg:(msg ^ ": C API") (Ba_support.byte_sum (genarray_of_array1 vsm))
    (Ba_support.byte_sum (genarray_of_array1 sm));
  assert_equal ~msg:(msg ^ ": list") "49" (List.nth l 49);
  assert_equal ~msg:(msg ^ ": array") (99, 99.) a.(99);
  (* get, set, blit, sub through the copy and its aliases *)
  assert_equal ~msg:(msg ^ ": get") vd.{Array1.dim vd - 1} d.{Array1.dim d - 1};
  s.{0} <- -1.;
  assert_equal ~msg:(msg ^ ": set through a sub-array") (-1.) d.{1000};
  r.{0} <- -2.;
  assert_equal ~msg:(msg ^ ": set through a slice") (-2.) d.{24};
  let part = Array1.sub d 1500 100 in
  Array1.blit (Array1.sub vd 0 100) part;
  assert_equal ~msg:(msg ^ ": blit") 99. d.{1599};
  d.{1000} <- vd.{1000};
  d.{24} <- vd.{24};
  Array1.blit (Array1.sub vd 1500 100) part;
  ignore vr;
  assert_bool (msg ^ ": equal again") (compare v c = 0);
  let blocks = block_addresses c in
  let pages = data_pages (data_of d) (Array1.size_in_bytes d) in
  assert_pages ~msg ~unregistered:"%s: data page %nx not registered" blocks pages;
  (blocks, pages)

(* After free: nothing of the copy is left in the page table. *)
let check_freed ~msg (blocks, pages) =
  if not ocaml5 then
    List.iter
      (fun a ->
        assert_equal ~msg:(Printf.sprintf "%s: %nx unregistered after free" msg a)
          ~printer:string_of_int 0 (page_kind a))
      (blocks @ pages)

let copy_check ?alloc ~msg v =
  let h = Offheap.copy ?alloc v in
  let probed = check ~msg v (Offheap.get h) in
  Offheap.free h;
  check_freed ~msg probed

let counting () = Support.counting_alloc (Support.fresh_id ())

let test_copy _ =
  let v = make 300 in
  copy_check ~msg:"default allocator" v;
  copy_check ~alloc:(counting ()) ~msg:"another allocator" v;
  (* little data: a few pages, the first shared with the blocks *)
  copy_check ~msg:"four pages of data" (make 4);
  copy_check ~alloc:(counting ()) ~msg:"four pages, another allocator" (make 4)

let with_image v f =
  let path = Filename.temp_file "offheap_ba_pages" ".img" in
  Offheap.Image.write path v;
  Fun.protect ~finally:(fun () -> Sys.remove path) (fun () -> f path)

let loads =
  [
    ("trusted mapped", fun p -> Offheap.Image.load ~share:true ~verify:false ~trusted:true p);
    ("mapped", fun p -> Offheap.Image.load ~share:true p);
    ("read, verified", fun p -> Offheap.Image.load ~verify:true p);
    ("relocated", fun p -> Offheap.Image.load_relocated p);
  ]

let test_image _ =
  let v = make 300 in
  with_image v (fun path ->
      List.iter
        (fun (name, load) ->
          let h = load path in
          let probed = check ~msg:name v (Offheap.get h) in
          Offheap.free h;
          check_freed ~msg:name probed)
        loads)

(* Adds to a region: a value with much data gets a chunk of its own, registered once
   the copy is made (its blocks only); small adds share a chunk registered whole. *)
let test_region_add _ =
  let v = make 300 in
  let r = Offheap.Region.create () in
  let small = Offheap.Region.add r (List.init 10 string_of_int) in
  let probed = check ~msg:"region add" v (Offheap.Region.add r v) in
  assert_equal ~msg:"small add" (List.init 10 string_of_int) small;
  if not ocaml5 then
    assert_equal ~msg:"small add's chunk registered" ~printer:string_of_int in_static_data
      (page_kind (address (Obj.repr small)));
  let probed' = check ~msg:"region add, again" v (Offheap.Region.add r v) in
  Offheap.Region.free r;
  check_freed ~msg:"region add" probed;
  check_freed ~msg:"region add, again" probed'

(* A region image holding the value: loaded as a region, its payload (the region's
   first chunk) registers blocks only, and the region's free gives them back. *)
let test_region_image _ =
  let v = make 300 in
  let path = Filename.temp_file "offheap_ba_pages" ".rimg" in
  Fun.protect ~finally:(fun () -> Sys.remove path) (fun () ->
      let r = Offheap.Region.create () in
      Offheap.Region.write_image path r [ ("v", Obj.repr v) ];
      Offheap.Region.free r;
      List.iter
        (fun (name, share) ->
          let r, roots = Offheap.Region.load_image ~share path in
          let probed = check ~msg:name v (Obj.obj (List.assoc "v" roots)) in
          Offheap.Region.free r;
          check_freed ~msg:name probed)
        [ ("region image, mapped", true); ("region image, read", false) ])

external arena_alloc : unit -> Offheap.alloc = "test_arena_alloc"

(* Pages of the major heap: entries the runtime itself adds to the table as the heap
   grows (compaction is off in the tests below, so the heap never gives a chunk back). *)
let heap_pages () =
  let s = Gc.quick_stat () in
  (s.heap_words * (Sys.word_size / 8) / 4096) + (2 * s.heap_chunks)

let without_compaction f =
  let g = Gc.get () in
  Gc.set { g with max_overhead = 1_000_000 };
  Fun.protect ~finally:(fun () -> Gc.set g) f

(* [cycles] runs of [cycle] add at most [per_cycle] entries each, beyond the heap's, and
   [slack] entries in all. *)
let assert_growth ?(slack = 0) ~msg ~cycles ~per_cycle cycle =
  cycle 0;
  let before = occupancy () and heap_before = heap_pages () in
  for i = 1 to cycles do cycle i done;
  let grown = occupancy () - before and heap_grown = heap_pages () - heap_before in
  if not ocaml5 then
    assert_bool
      (Printf.sprintf "%s: %d entries more over %d cycles (the heap's: %d)" msg grown cycles
         heap_grown)
      (grown <= (cycles * per_cycle) + heap_grown + slack)

(* The table's entries do not grow over copy and free cycles of values with data in
   the same places, nor over image loads (always at the recorded address). On OCaml 4
   the frees made while the major GC marks wait for the end of the marking, and copies
   made meanwhile take other places: the first cycles grow the table by the pages of
   what waits during one marking (some 250 entries here, whether over 300 cycles or
   9000); then it stays flat but for a marking that lasts longer than any before, whose
   waiting copies take a few more places (one entry more in 1000 cycles, seen once in a
   loaded run): a slack of 16 entries, against the 1000 that one a cycle would add. *)
let test_occupancy_flat _ =
  without_compaction (fun () ->
      let v = make 64 in
      let alloc = counting () in
      let cycle _ =
        Offheap.free (Offheap.copy v);
        Offheap.free (Offheap.copy ~alloc v)
      in
      for i = 1 to 1000 do cycle i done;
      assert_growth ~slack:16 ~msg:"copy and free" ~cycles:1000 ~per_cycle:0 cycle;
      with_image v (fun path ->
          let load = snd (List.hd loads) in
          (* a load while the last one waits is relocated, to a place the kernel
             chooses: each free here is made with no marking running *)
          assert_growth ~msg:"image load and free" ~cycles:200 ~per_cycle:0 (fun _ ->
              Gc.full_major ();
              Offheap.free (load path))))


(* Copies where no copy was before: each cycle adds the entries of the blocks' one or
   two pages (removed pages stay in the table as entries of kind 0), never one per page
   of data: a removal of a data page that was never added would insert one. *)
let test_occupancy_fresh_places _ =
  without_compaction (fun () ->
      let data = Array1.init float64 c_layout (64 * 512) float_of_int in
      let v = (List.init 5 string_of_int, data, Array1.sub data 10 10) in
      let alloc = arena_alloc () in
      assert_growth ~msg:"copies at fresh places" ~cycles:1000 ~per_cycle:2 (fun _ ->
          let h = Offheap.copy ~alloc v in
          assert_bool "copied" (compare v (Offheap.get h) = 0);
          Offheap.free h);
      assert_growth ~msg:"region adds at fresh places" ~cycles:300 ~per_cycle:2 (fun _ ->
          let r = Offheap.Region.create ~alloc ~chunk_bytes:4096 () in
          assert_bool "added" (compare v (Offheap.Region.add r v) = 0);
          Offheap.Region.free r))

(* Large blocks (issue 9): a copy whose blocks are few and large registers the pages
   that hold a block's header or first field (a value's address), not the pages inside
   a block, which no value points into. Every block of the copy still works with
   compare, hash and Marshal, and free removes exactly what was registered. The shapes
   put large blocks first, last, between small ones, at odd offsets within pages, and
   one large block of pointers. *)
let large_shapes () =
  let sized i = String.init ((3 + (i * 5)) * 4096 + (i * 24) + 5) (fun k -> Char.chr ((k + i) land 255)) in
  [
    ("a string of 1 MiB", [ Obj.repr (sized 50) ]);
    ("a float array of 100k", [ Obj.repr (Array.init 100_000 float_of_int) ]);
    ("large strings between small blocks",
     List.concat (List.init 6 (fun i -> [ Obj.repr (sized i); Obj.repr (string_of_int i, [ i ]) ])));
    ("an array of 60k small ints, then strings",
     [ Obj.repr (Array.init 60_000 (fun i -> i land 255)); Obj.repr (sized 2); Obj.repr (String.make 1 (Char.chr 120)) ]);
  ]

(* The page-aligned addresses strictly inside the block [b] of [bytes] bytes of fields,
   past its first field's page and before the page of the word after it. *)
let inside_pages b bytes =
  let first = Nativeint.(mul (add (div b page) 1n) page) in
  let stop = Nativeint.(mul (div (add b (of_int bytes)) page) page) in
  let rec go a acc = if a >= stop then List.rev acc else go (Nativeint.add a page) (a :: acc) in
  go first []

let block_bytes (o : Obj.t) =
  if Obj.tag o = Obj.string_tag then String.length (Obj.obj o) + 1 else Obj.size o * (Sys.word_size / 8)

(* Ways to make a copy: [(name, copy)], where [copy v] returns the copy and its free;
   images written and loaded among them. *)
let copiers () =
  [
    ("default allocator", fun v -> let h = Offheap.copy v in (Offheap.get h, fun () -> Offheap.free h));
    ("another allocator",
     fun v -> let h = Offheap.copy ~alloc:(counting ()) v in (Offheap.get h, fun () -> Offheap.free h));
    ("a region's own chunk",
     fun v -> let r = Offheap.Region.create () in (Offheap.Region.add r v, fun () -> Offheap.Region.free r));
  ]
  @ List.map
      (fun (how, load) ->
        ( "an image, " ^ how,
          fun v ->
            let path = Filename.temp_file "offheap_pages" ".img" in
            Offheap.Image.write path v;
            let h = load path in
            Sys.remove path;
            (Offheap.get h, fun () -> Offheap.free h) ))
      [
        ("loaded", fun p -> Offheap.Image.load p);
        ("relocated", fun p -> Offheap.Image.load_relocated p);
        ("mapped, trusted", fun p -> Offheap.Image.load ~share:true ~verify:false ~trusted:true p);
      ]

let test_large_blocks _ =
  List.iter
    (fun (shape, blocks) ->
      let v = Array.of_list blocks in
      List.iter
        (fun (how, copy) ->
          let msg = shape ^ ", " ^ how in
          let c, free = copy v in
          assert_bool (msg ^ ": compare") (compare v c = 0);
          assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
          assert_bool (msg ^ ": Marshal") (compare v (Marshal.from_string (Marshal.to_string c []) 0) = 0);
          Array.iteri
            (fun i b ->
              assert_bool (Printf.sprintf "%s: block %d, compare" msg i) (compare v.(i) b = 0);
              assert_equal ~msg:(Printf.sprintf "%s: block %d, hash" msg i)
                (Hashtbl.hash v.(i)) (Hashtbl.hash b))
            c;
          let starts = address (Obj.repr c) :: Array.to_list (Array.map address c) in
          let insides =
            List.concat_map (fun b -> inside_pages (address b) (block_bytes b)) (Array.to_list c)
          in
          assert_pages ~msg ~unregistered:"%s: page %nx inside a block registered" starts insides;
          free ();
          check_freed ~msg (starts, insides))
        (copiers ()))
    (large_shapes ())

(* Copies of large strings where no copy was before: each adds the entries of the pages
   where its blocks start (the first, the large string's first field, the word after
   it, the last), never one per page of the string. *)
let test_occupancy_large_blocks _ =
  without_compaction (fun () ->
      let v = (List.init 5 string_of_int, String.make (256 * 4096) 'x', [ 1; 2 ]) in
      let alloc = arena_alloc () in
      assert_growth ~msg:"large copies at fresh places" ~cycles:100 ~per_cycle:4 (fun _ ->
          let h = Offheap.copy ~alloc v in
          assert_bool "copied" (compare v (Offheap.get h) = 0);
          Offheap.free h))

let () =
  run_test_tt_main
    ("bigarray pages"
    >::: [
           "copies register blocks, not data" >:: test_copy;
           "images register blocks, not data" >:: test_image;
           "region adds register blocks, not data" >:: test_region_add;
           "region images register blocks, not data" >:: test_region_image;
           "occupancy flat over cycles" >:: test_occupancy_flat;
           "occupancy over copies at fresh places" >:: test_occupancy_fresh_places;
           "large blocks: the pages where blocks start" >:: test_large_blocks;
           "occupancy over copies of large blocks" >:: test_occupancy_large_blocks;
         ])
