(* Small copies (issue 9): the handle's size, statistics before and after free with
   every kind of record (in front of the copy, apart, image), the slab of the default
   allocator (every size class, slots reused, the copies registered with the runtime
   so that compare, hash and Marshal take them), and on OCaml 5 the memory of a program
   that frees much and allocates little coming back without Gc.major. *)

open OUnit2
open Support

(* A record whose string makes the copy [n] bytes and more: 8 + 8 * (1 + n / 8 + 1). *)
type r = { a : int; s : string; f : float }

let value_of_size k = { a = k; s = String.make k 'x'; f = float k }
let words_of_handle h = Obj.size (Obj.repr h) + 1

let test_handle_words _ =
  let check msg h =
    assert_equal ~msg ~printer:pint 4 (words_of_handle h);
    Offheap.free h;
    assert_equal ~msg:(msg ^ ", freed") ~printer:pint 4 (words_of_handle h)
  in
  check "default allocator" (Offheap.copy (value_of_size 10));
  check "immediate" (Offheap.copy 42);
  let a = counting_alloc (fresh_id ()) in
  check "counting allocator" (Offheap.copy ~alloc:a (value_of_size 10));
  assert_no_leak a

(* A handle is opaque to the GC, Marshal and copy: one of the default allocator is an
   abstract block (the GC neither scans nor marks through it), any other keeps its
   allocator block; no live one can be marshalled or copied (a duplicate of a live
   handle would free its copy twice), nor a freed abstract one. Many such handles survive
   collections and compactions with their copies intact. *)
let test_handles_opaque _ =
  let refused msg h =
    assert_raises ~msg:(msg ^ ": Marshal")
      (Invalid_argument "output_value: abstract value (Abstract)")
      (fun () -> Marshal.to_string h []);
    assert_raises ~msg:(msg ^ ": copy") (Offheap.Not_copyable Offheap.Abstract) (fun () ->
        Offheap.copy h)
  in
  let check msg ~unscanned h =
    (* A shallow copy of the handle, which the runtime makes word by word (OCaml 5 darkens
       each word: a raw zero in an unscanned handle crashed it). The duplicate is never
       freed: freeing both would free the copy twice. *)
    let w = Weak.create 1 in
    Weak.set w 0 (Some h);
    assert_bool (msg ^ ": Weak.get_copy") (Weak.get_copy w 0 <> None);
    if unscanned then
      assert_equal ~msg:(msg ^ ": tag") ~printer:pint Obj.abstract_tag
        (Obj.tag (Obj.repr h));
    refused msg h;
    Offheap.free h;
    (* A freed record holds integers only: a duplicate of it is a freed handle. *)
    if unscanned then refused (msg ^ ", freed") h
  in
  check "default allocator" ~unscanned:true (Offheap.copy (value_of_size 10));
  check "default allocator, immediate" ~unscanned:true (Offheap.copy 42);
  check "default allocator, shared root" ~unscanned:true (Offheap.copy "static");
  let a = counting_alloc (fresh_id ()) in
  check "counting allocator" ~unscanned:false (Offheap.copy ~alloc:a (value_of_size 10));
  assert_no_leak a;
  let n = 20_000 in
  let hs = Array.init n (fun k -> Offheap.copy (value_of_size (k mod 300))) in
  Gc.compact ();
  Gc.full_major ();
  Array.iteri
    (fun k h ->
      let v = Offheap.get h in
      if v.a <> k mod 300 || String.length v.s <> k mod 300 then
        assert_failure (Printf.sprintf "copy %d after compaction" k))
    hs;
  Array.iter Offheap.free hs

(* Statistics: those of a live copy agree with the heap's size of the value, and stay the
   same after free. *)
let check_stats msg h v =
  let s = Offheap.stats h in
  assert_equal ~msg:(msg ^ ": bytes") ~printer:pint (heap_bytes (Obj.repr v)) s.bytes;
  assert_equal ~msg:(msg ^ ": blocks") ~printer:pint 3 s.blocks;
  Offheap.free h;
  assert_equal ~msg:(msg ^ ": after free") s (Offheap.stats h)

let test_stats_kept _ =
  List.iter
    (fun k ->
      let v = value_of_size k in
      check_stats (Printf.sprintf "default, %d" k) (Offheap.copy v) v;
      let a = counting_alloc (fresh_id ()) in
      check_stats (Printf.sprintf "counting allocator, %d" k) (Offheap.copy ~alloc:a v) v;
      assert_no_leak a)
    [ 0; 7; 100; 980; 1000; 5000; 100_000 ];
  let path = Filename.temp_file "offheap_small" ".img" in
  let v = value_of_size 33 in
  Offheap.Image.write path v;
  let h = Offheap.Image.load path in
  let s = Offheap.stats h in
  assert_equal ~msg:"image blocks" ~printer:pint 3 s.blocks;
  assert_bool "image bytes" (s.bytes >= heap_bytes (Obj.repr v));
  Offheap.free h;
  assert_equal ~msg:"image: after free" s (Offheap.stats h);
  Sys.remove path;
  let h = Offheap.copy 7 in
  Offheap.free h;
  assert_equal ~msg:"immediate"
    { Offheap.bytes = 0; blocks = 0; transient_bytes = 0 }
    (Offheap.stats h)

(* Copies of every size up to past the slab's limit (8 KiB: classes 16 bytes apart up to
   1 KiB, then 8 a doubling), live at once, then half freed and copied again (the freed
   slots are reused): each is equal to its source for compare, hash and Marshal, which
   on OCaml 4 needs its memory registered in the page table. *)
let test_slab_sizes _ =
  let sizes = List.init 140 (fun i -> i * 8) @ List.init 210 (fun i -> 1120 + (i * 40)) in
  let values = Array.of_list (List.map value_of_size sizes) in
  let check msg h v =
    let c = Offheap.get h in
    assert_equal ~msg:(msg ^ ": compare") 0 (compare c v);
    assert_equal ~msg:(msg ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
    assert_equal ~msg:(msg ^ ": Marshal") (Marshal.to_string v []) (Marshal.to_string c [])
  in
  let handles = Array.map Offheap.copy values in
  Array.iteri (fun i h -> check (Printf.sprintf "size %d" i) h values.(i)) handles;
  for round = 1 to 3 do
    Array.iteri
      (fun i h ->
        if (i + round) mod 2 = 0 then begin
          Offheap.free h;
          assert_freed h;
          handles.(i) <- Offheap.copy values.(i)
        end)
      handles;
    Array.iteri
      (fun i h -> check (Printf.sprintf "round %d, size %d" round i) h values.(i))
      handles
  done;
  Array.iter Offheap.free handles

(* Many small copies interleaved with frees, with a GC running: the copies stay intact
   (no slot is handed out twice) and the GC never trips on them. *)
let test_slab_churn _ =
  let live = Array.make 1000 None in
  for i = 0 to 50_000 do
    let k = i * 7919 mod 1000 in
    (match live.(k) with
    | Some (h, v) ->
        assert_equal ~msg:"intact" 0 (compare (Offheap.get h) v);
        Offheap.free h
    | None -> ());
    let v = value_of_size (i mod 120) in
    live.(k) <- Some (Offheap.copy v, v);
    if i mod 10_000 = 0 then Gc.full_major ()
  done;
  Array.iter (function Some (h, _) -> Offheap.free h | None -> ()) live

(* The free slots that each thread keeps (src/runtime/slab.rs): copies made on one
   thread and freed on others, which make new ones in their place, and threads that end
   holding slots of many size classes. Every copy stays intact (no slot is handed out
   twice), and the slots of ended threads go back to the slab: 300 threads that each
   keep some 120 KiB would otherwise leave 36 MB that no later copy reuses. *)
let test_slab_threads _ =
  let values = Array.init 3000 (fun i -> value_of_size (i mod 240)) in
  let handles = Array.map Offheap.copy values in
  let stripes = 6 in
  let swap t =
    for round = 1 to 20 do
      Array.iteri
        (fun i h ->
          if i mod stripes = t && (i / stripes + round) mod 3 = 0 then begin
            Offheap.free h;
            handles.(i) <- Offheap.copy values.(i)
          end;
          (* Let the other threads in between. *)
          if i mod 97 = 0 then Thread.yield ())
        handles
    done
  in
  List.iter Thread.join (List.init stripes (Thread.create swap));
  Array.iteri
    (fun i h ->
      let c = Offheap.get h in
      assert_equal ~msg:(Printf.sprintf "copy %d intact" i) 0 (compare c values.(i));
      assert_equal ~msg:(Printf.sprintf "copy %d, Marshal" i)
        (Marshal.to_string values.(i) [])
        (Marshal.to_string c []))
    handles;
  Array.iter Offheap.free handles;
  (* 34 size classes, 100 copies each, made then freed: each thread ends keeping 4 KiB
     of free slots of every class up to 1 KiB, and 2 slots of each larger one. *)
  let fill_and_end () =
    for k = 0 to 33 do
      let v = value_of_size (if k < 30 then 32 * k else 1000 * (2 * k - 59)) in
      let hs = Array.init 100 (fun _ -> Offheap.copy v) in
      Array.iter Offheap.free hs
    done
  in
  let threads n =
    for _ = 1 to n do
      Thread.join (Thread.create fill_and_end ())
    done
  in
  threads 20;
  Probes.settle ();
  let before = Probes.status_kb "VmRSS" in
  threads 300;
  Probes.settle ();
  let added = Probes.status_kb "VmRSS" - before in
  assert_bool
    (Printf.sprintf "300 threads that ended added %d kB (at most 8 MiB)" added)
    (added <= 8192)

(* A copy read once: its free waits for the GC (one never read goes back at once). *)
let copy_read v =
  let h = Offheap.copy v in
  ignore (Sys.opaque_identity (Offheap.get h));
  h

(* OCaml 5: copies and frees of 64 KiB values, 512 MB in all, in a loop that allocates
   almost nothing: past the limit the frees owe major GC work, which later frees pay
   with major slices that complete cycles, so the memory waiting stays bounded. Without
   them no cycle would end and all of it would wait. *)
let test_frees_come_back _ =
  let v = Array.init 8191 (fun i -> i) in
  let waiting_max = ref 0 in
  for _ = 1 to 8192 do
    Offheap.free (copy_read v);
    waiting_max := max !waiting_max (Offheap.pending_frees ())
  done;
  (* 64 MB of waiting copies: the limit (8 MiB on a small heap) and the debt of one
     cycle, with room. *)
  assert_bool
    (Printf.sprintf "at most 1024 copies waited at once (%d did)" !waiting_max)
    (!waiting_max <= 1024)

(* The same with a tiny value (a 24-byte copy) on this small heap: past the limit each
   free owes at least a word of GC work, so the debt reaches a slice and cycles end
   (what waits peaks at some 650 000 copies, 31 MB, then falls). Rounded down, such
   frees owed nothing on OCaml 5 where a cycle's work is less than the limit over the
   copy's size: no cycle ended, and after 1 million rounds 0.9 million copies waited (a
   helper's find). On OCaml 4 a free waits only while the GC marks. *)
let test_tiny_frees_come_back _ =
  Gc.full_major ();
  let v = Array.make 2 (Sys.opaque_identity 0) in
  let before = (Gc.quick_stat ()).major_collections and most = ref 0 in
  for i = 1 to 2_000_000 do
    Offheap.free (copy_read v);
    if i land 1023 = 0 then most := max !most (Offheap.pending_frees ())
  done;
  let ended = (Gc.quick_stat ()).major_collections - before in
  if Offheap.pending_frees () > 0 || !most > 0 then
    assert_bool (Printf.sprintf "%d cycles ended" ended) (ended >= 1);
  assert_bool
    (Printf.sprintf "at most %d copies waited (the limit: 8 MiB, some 170 000 of them)" !most)
    (!most < 1_000_000)

(* The path of small values (on the stack at most 32 blocks and 128 words; beyond, in
   buffers of its own, 16384 blocks and 65536 words, blocks told apart by their
   addresses one by one up to 16, then by an index: src/copy/small.rs) and the general
   traversal around its limits, with what it gives up on (infix pointers) and
   what it copies as raw or scannable blocks: every copy equal to its source for compare,
   hash and Marshal, sharing and cycles kept, closures callable, the source unchanged. *)
type tree = Leaf | Node of tree * int * tree

let rec tree d = if d = 0 then Leaf else Node (tree (d - 1), d, tree (d - 1))

let test_small_path_shapes _ =
  let shared = String.make 5 's' in
  (* Built at run time: constants are static data, shared by copies, not copied. *)
  let n = Sys.opaque_identity 7 in
  let record n =
    Obj.repr (Array.init n (fun i -> if i mod 3 = 0 then Obj.repr shared else Obj.repr i))
  in
  let plain =
    [
      ("a ref", Obj.repr (ref 1));
      ("a record and its string and float", Obj.repr (value_of_size 9));
      ("shared string", Obj.repr (shared, shared, [ shared ]));
      ( "boxed integers",
        Obj.repr (Int32.of_int n, Int64.of_int (-n), Nativeint.of_int n, float n) );
      ("float array", Obj.repr (Array.make 3 (float n)));
      ( "forced lazy",
        Obj.repr
          (let l = lazy (String.make 3 'l') in
           ignore (Lazy.force l);
           l) );
      ("list of 16 (16 blocks)", Obj.repr (List.init 16 Fun.id));
      ("list of 17 (17 blocks)", Obj.repr (List.init 17 Fun.id));
      ("list of 256 (256 blocks)", Obj.repr (List.init 256 Fun.id));
      ("list of 257 (257 blocks)", Obj.repr (List.init 257 Fun.id));
      ("block of 64 words", record 63);
      ("block of 128 words", record 127);
      ("block of 129 words", record 128);
      ("block of 2047 words", record 2046);
      ("block of 2048 words", record 2047);
      ("block of 2049 words", record 2048);
      ("tree of 15 nodes", Obj.repr (tree 4));
      ("tree of 255 nodes", Obj.repr (tree 8));
      ("tree of 511 nodes", Obj.repr (tree 9));
      ("list of 16384 (16384 blocks)", Obj.repr (List.init 16384 Fun.id));
      ("list of 16385 (16385 blocks)", Obj.repr (List.init 16385 Fun.id));
      ("block of 65535 words", record 65534);
      ("block of 65536 words", record 65535);
      ("tree of 16383 nodes", Obj.repr (tree 14));
      ("tree of 32767 nodes", Obj.repr (tree 15));
      ( "100 pairs sharing 3 strings",
        Obj.repr (List.init 100 (fun i -> (i, if i mod 3 = 0 then shared else string_of_int (i mod 3)))) );
    ]
  in
  List.iter
    (fun (what, v) ->
      let before = Marshal.to_string v [] in
      let h = Offheap.copy v in
      let c = Offheap.get h in
      assert_equal ~msg:(what ^ ": source unchanged") before (Marshal.to_string v []);
      assert_bool (what ^ ": a copy") (c != v);
      assert_equal ~msg:(what ^ ": compare") 0 (compare c v);
      assert_equal ~msg:(what ^ ": hash") (Hashtbl.hash v) (Hashtbl.hash c);
      assert_equal ~msg:(what ^ ": Marshal") before (Marshal.to_string c []);
      Offheap.free h)
    plain;
  (* Sharing and a cycle. *)
  let h = Offheap.copy (shared, shared) in
  let a, b = Offheap.get h in
  assert_bool "sharing kept" (a == b && a != shared && a = shared);
  Offheap.free h;
  let rec cycle = 1 :: 2 :: cycle in
  let h = Offheap.copy cycle in
  let c = Offheap.get h in
  assert_bool "cycle kept"
    (List.tl (List.tl c) == c && List.hd c = 1 && List.hd (List.tl c) = 2);
  Offheap.free h;
  (* Past the first 16 blocks: a ring of 100 cells, each pointing to one of 2 shared
     strings (102 blocks, told apart by the index). *)
  let a = String.make 3 'a' and b = String.make 3 'b' in
  let first = [ a ] in
  let ring = List.fold_left (fun l i -> (if i mod 2 = 0 then a else b) :: l) first (List.init 99 Fun.id) in
  Obj.set_field (Obj.repr first) 1 (Obj.repr ring);
  let h = Offheap.copy ring in
  assert_equal ~msg:"ring: blocks" ~printer:pint 102 (Offheap.stats h).blocks;
  let c = Offheap.get h in
  let rec nth l k = if k = 0 then l else nth (List.tl l) (k - 1) in
  assert_bool "ring: cycle kept" (nth c 100 == c);
  assert_bool "ring: strings shared" (List.hd c == List.hd (nth c 2) && List.hd c != List.hd (nth c 1));
  assert_bool "ring: copied" (List.hd c != a && List.hd c != b && c != ring);
  Offheap.free h;
  (* Closures: one (copied by the walk) and two mutually recursive (infix pointers: the
     general traversal). *)
  let greet = let s = String.make 2 'h' in fun x -> s ^ x in
  let rec even n = n = 0 || odd (n - 1) and odd n = n <> 0 && even (n - 1) in
  let h = Offheap.copy (greet, even, odd) in
  let g, e, o = Offheap.get h in
  assert_equal ~msg:"closure" "hhi" (g "i");
  assert_bool "mutually recursive closures" (e 10 && o 7 && not (e 3));
  Offheap.free h

let () =
  run_test_tt_main
    ("small copies"
    >::: [
           "a handle is four words" >:: test_handle_words;
           "handles are opaque" >:: test_handles_opaque;
           "statistics, kept after free" >:: test_stats_kept;
           "slab: every size, slots reused, registered" >:: test_slab_sizes;
           "slab: churn under the GC" >:: test_slab_churn;
           "slab: slots kept by threads" >:: test_slab_threads;
           "frees come back without Gc.major" >:: test_frees_come_back;
           "frees of tiny copies come back" >:: test_tiny_frees_come_back;
           "the path of small values, around its limits" >:: test_small_path_shapes;
         ])
