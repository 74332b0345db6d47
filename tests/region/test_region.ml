(* The tests of Offheap.Region (issue 11): sharing, incremental building, persistent
   structures updated in batches, many small adds, failure atomicity, signals, region
   images across processes and bad region images. Native and bytecode, OCaml 4 and 5;
   the domain test is test_region_domains.ml5. *)

open OUnit2
open Region_support
module R = Offheap.Region

let pint = string_of_int
let o = Sys.opaque_identity

(* A fresh heap string: never static data. *)
let str s = Bytes.to_string (Bytes.of_string s)

(* The frees OCaml 5 defers to the end of a major cycle, handed back. *)
let settle = Probes.settle

let contains = Probes.contains

let raises_invalid ~sub f =
  match f () with
  | _ -> assert_failure (Printf.sprintf "no Invalid_argument naming %S" sub)
  | exception Invalid_argument msg ->
      if not (contains msg sub) then
        assert_failure (Printf.sprintf "Invalid_argument %S does not name %S" msg sub)

let raises_not_copyable reason f =
  match f () with
  | _ -> assert_failure "no Not_copyable"
  | exception Offheap.Not_copyable r ->
      assert_equal ~printer:(fun r -> Printexc.to_string (Offheap.Not_copyable r)) reason r

let raises_oom f =
  match f () with
  | _ -> assert_failure "no Out_of_memory"
  | exception Out_of_memory -> ()

(* Every byte the allocator handed out is a chunk of the region (or was given back). *)
let assert_chunks_accounted ~msg a r =
  let c = counts a and s = R.stats r in
  assert_equal ~msg:(msg ^ ": bytes held = bytes reserved") ~printer:pint s.reserved
    c.outstanding;
  assert_equal ~msg:(msg ^ ": frees of unknown pointers or sizes") ~printer:pint 0 c.bad_frees

let assert_freed_all ~msg a =
  settle ();
  let c = counts a in
  assert_equal ~msg:(msg ^ ": outstanding after free") ~printer:pint 0 c.outstanding;
  assert_equal ~msg:(msg ^ ": frees = successful allocs") ~printer:pint (c.allocs - c.nulls)
    c.frees;
  assert_equal ~msg:(msg ^ ": bad frees") ~printer:pint 0 c.bad_frees

(* On OCaml 5 no root may point into a region once it is freed (the GC would read
   the freed memory in a later cycle), and bytecode keeps every local of a function
   until it returns: so the tests use a region's values in a function that returns
   before the region is freed, as offheap.mli asks. *)
let using r f = f r

(* {1 Sharing} *)

type node = { v : int; mutable next : node }

let test_sharing _ =
  let r = R.create () in
  let h = Offheap.copy (o [ str "x"; str "y" ]) in
  using r (fun r ->
  (* A list grown one cons at a time: each add copies the new cell only. *)
  let l = ref (R.add r (o [ 0 ])) in
  let blocks0 = (R.stats r).blocks in
  for i = 1 to 1000 do
    let before = !l in
    l := R.add r (i :: before);
    assert_bool "the tail is the region's list" (List.tl !l == before)
  done;
  assert_equal ~msg:"one block per add" ~printer:pint (blocks0 + 1000) (R.stats r).blocks;
  assert_equal ~msg:"values" ~printer:pint 1001 (R.stats r).values;
  assert_equal ~msg:"contents" (List.init 1000 (fun i -> 1000 - i)) (List.filteri (fun i _ -> i < 1000) !l);
  assert_bool "mem of a region block" (R.mem r !l && R.mem r (List.tl (List.tl !l)));
  assert_bool "not mem: heap, immediate" (not (R.mem r (ref 1)) && not (R.mem r 3));
  (* Sharing and cycles inside one added value. *)
  let s = str "shared" in
  let p = R.add r (s, [ s; s ]) in
  assert_bool "sharing inside a value" (fst p == List.hd (snd p) && fst p == List.nth (snd p) 1);
  let rec c = { v = 1; next = { v = 2; next = c } } in
  let c' = R.add r c in
  assert_bool "cycle kept" (c'.next.next == c' && c'.v = 1 && c'.next.v = 2 && c' != c);
  (* Another copy is shared, not copied. *)
  let with_copy = R.add r (str "z" :: Offheap.get h) in
  assert_bool "another copy is pointed to" (List.tl with_copy == Offheap.get h);
  assert_bool "and is not in the region" (not (R.mem r (List.tl with_copy)));
  (* An add of what is already in the region copies nothing. *)
  let before = R.stats r in
  assert_bool "a region value is returned as is" (R.add r !l == !l);
  assert_equal ~msg:"nothing copied" ~printer:pint before.bytes (R.stats r).bytes);
  let chunks = (R.stats r).chunks in
  R.free r;
  Offheap.free h;
  raises_invalid ~sub:"freed" (fun () -> R.add r [ 1 ]);
  raises_invalid ~sub:"freed" (fun () -> R.free r);
  assert_bool "chunks before free" (chunks = 1);
  assert_equal ~msg:"no chunks after free" ~printer:pint 0 (R.stats r).chunks

(* {1 Incremental building} *)

type record = { id : int; name : string }

let batch = 10_000
let records = 1_000_000

(* The batch [b] consed onto [tail]. *)
let cons_batch b tail =
  let l = ref tail in
  for i = b * batch to ((b + 1) * batch) - 1 do
    l := { id = i; name = string_of_int i } :: !l
  done;
  !l

(* Words the major heap grew by while [f] ran, at its peak (sampled by [f]). *)
let heap_growth f =
  Gc.compact ();
  let start = (Gc.stat ()).heap_words in
  let peak = ref start in
  let sample () = peak := max !peak (Gc.stat ()).heap_words in
  let v = f sample in
  sample ();
  (v, !peak - start)

let test_incremental _ =
  let a = budget_alloc (-1) in
  let r = R.create ~alloc:a () in
  let same, region_growth, s, one_copy, heap_growth = using r (fun r ->
  let in_region, region_growth =
    heap_growth (fun sample ->
        let l = ref [] in
        for b = 0 to (records / batch) - 1 do
          l := R.add r (cons_batch b !l);
          if b mod 10 = 0 then sample ()
        done;
        !l)
  in
  let on_heap, heap_growth =
    heap_growth (fun _ ->
        let l = ref [] in
        for b = 0 to (records / batch) - 1 do
          l := cons_batch b !l
        done;
        !l)
  in
  let h = Offheap.copy on_heap in
  let one_copy = (Offheap.stats h).bytes in
  let s = R.stats r in
  Printf.printf
    "incremental, 1M records in batches of 10k: region %d bytes (%.4fx one copy), reserved %d \
     (%.4fx), %d chunks; major heap growth %d words (built on the heap: %d words)\n%!"
    s.bytes (float s.bytes /. float one_copy) s.reserved
    (float s.reserved /. float one_copy)
    s.chunks region_growth heap_growth;
  let same = in_region = on_heap in
  Offheap.free h;
  (same, region_growth, s, one_copy, heap_growth)) in
  assert_bool "the same list" same;
  assert_bool "bytes within 1.05x of one copy" (float s.bytes <= 1.05 *. float one_copy);
  assert_bool "reserved within 1.05x of one copy" (float s.reserved <= 1.05 *. float one_copy);
  assert_bool "the heap stays small: under a tenth of building on the heap"
    (region_growth * 10 < heap_growth);
  assert_chunks_accounted ~msg:"incremental" a r;
  R.free r;
  assert_freed_all ~msg:"incremental" a

module IM = Map.Make (Int)

let test_map_batches _ =
  let r = R.create () and fresh = R.create () in
  let key i = i * 7919 mod 1_000_003 in
  let batches = 200 and per = 500 in
  let apply b m =
    let m = ref m in
    for i = b * per to ((b + 1) * per) - 1 do
      m := IM.add (key i) (str (string_of_int i)) !m
    done;
    !m
  in
  (* Built in [r], compacted into [fresh]; returns the compacted map. *)
  let build r =
    let m = ref (R.add r IM.empty) and reference = ref IM.empty in
    let last_add = ref 0 in
    for b = 0 to batches - 1 do
      let before = (R.stats r).bytes in
      m := R.add r (apply b !m);
      reference := apply b !reference;
      last_add := (R.stats r).bytes - before
    done;
    for i = 0 to (batches * per) - 1 do
      assert_equal ~msg:"lookup" (Some (string_of_int i)) (IM.find_opt (key i) !m)
    done;
    assert_equal ~msg:"absent key" None (IM.find_opt (-1) !m);
    assert_equal ~msg:"size" ~printer:pint (batches * per) (IM.cardinal !m);
    let h = Offheap.copy !reference in
    let one_copy = (Offheap.stats h).bytes in
    Offheap.free h;
    let grown = (R.stats r).bytes in
    Printf.printf
      "map of 100k keys in 200 batches of 500: region %d bytes, %.2fx one copy of the final \
       map (%d bytes); last batch added %d bytes (%.3f of one copy)\n%!"
      grown (float grown /. float one_copy) one_copy !last_add
      (float !last_add /. float one_copy);
    assert_bool "old paths stay in the region" (grown > one_copy);
    assert_bool "an add costs what is new, not the whole map" (!last_add * 4 < one_copy);
    (* Compaction: the live map into a fresh region. *)
    let live = R.add_deep fresh !m in
    assert_bool "the compacted map is apart" (R.mem fresh live && not (R.mem r live));
    assert_equal ~msg:"compacted: one copy" ~printer:pint one_copy (R.stats fresh).bytes;
    (live, !reference)
  in
  (* The old region freed, the compacted map stands alone. *)
  let check_compacted () =
    let live, reference = using r build in
    R.free r;
    Gc.full_major ();
    assert_bool "compacted map equal" (IM.equal String.equal live reference)
  in
  check_compacted ();
  R.free fresh

(* {1 Many small adds, free by chunks} *)

type small = { a : int; b : int }

let test_many_small _ =
  let a = budget_alloc (-1) in
  let r = R.create ~alloc:a () in
  let n = 1_000_000 in
  let s = using r (fun r ->
  let last = ref { a = 0; b = 0 } in
  for i = 1 to n do
    last := R.add r { a = i; b = o i }
  done;
  let s = R.stats r in
  assert_equal ~msg:"values" ~printer:pint n s.values;
  assert_equal ~msg:"blocks" ~printer:pint n s.blocks;
  assert_equal ~msg:"bytes" ~printer:pint (24 * n) s.bytes;
  assert_equal ~msg:"the last" { a = n; b = n } !last;
  let per_chunk = (R.chunk_bytes r - 8) / 24 in
  let expected_chunks = (n + per_chunk - 1) / per_chunk in
  assert_equal ~msg:"chunks: full ones" ~printer:pint expected_chunks s.chunks;
  assert_equal ~msg:"one allocation per chunk" ~printer:pint s.chunks (counts a).allocs;
  assert_chunks_accounted ~msg:"small" a r;
  s) in
  R.free r;
  settle ();
  assert_equal ~msg:"free: one call per chunk" ~printer:pint s.chunks (counts a).frees;
  assert_freed_all ~msg:"small" a

(* {1 Failure atomicity} *)

(* A list of [n] records whose [k]th holds [bad]. *)
let with_bad n k bad = List.init n (fun i -> if i = k then Obj.repr (i, bad) else Obj.repr (i, str "ok"))

let test_failure_abstract _ =
  let a = budget_alloc (-1) in
  let r = R.create ~alloc:a ~chunk_bytes:65536 () in
  using r (fun r ->
  let kept = List.init 100 (fun i -> R.add r (i, str (string_of_int i))) in
  let before = R.stats r and allocs = (counts a).allocs in
  let bad = Obj.new_block Obj.abstract_tag 2 in
  let v = with_bad 1000 900 bad in
  raises_not_copyable Offheap.Abstract (fun () -> R.add r v);
  let lazy_v = [ Obj.repr (lazy (print_endline "never")) ] in
  raises_not_copyable Offheap.Unforced_lazy (fun () -> R.add r lazy_v);
  assert_equal ~msg:"stats unchanged" before (R.stats r);
  assert_equal ~msg:"no allocation" ~printer:pint allocs (counts a).allocs;
  List.iteri (fun i x -> assert_equal ~msg:"kept values" (i, string_of_int i) x) kept;
  assert_bool "the source is as it was"
    (List.length v = 1000 && Obj.field (List.nth v 900) 1 == bad);
  (* The bump pointer did not move: the next add lands where the failed one would have. *)
  let x = R.add r (o (str "next")) in
  assert_equal ~msg:"next add's bytes" ~printer:pint (before.bytes + 16) (R.stats r).bytes;
  assert_bool "next add in the region" (R.mem r x);
  assert_chunks_accounted ~msg:"abstract" a r);
  R.free r;
  assert_freed_all ~msg:"abstract" a

let test_failure_null _ =
  let a = budget_alloc 1 in
  let r = R.create ~alloc:a ~chunk_bytes:65536 () in
  using r (fun r ->
  (* Fill the first chunk with 1 KB strings until the allocator is needed again. *)
  let kept = ref [] in
  let rec fill i =
    let s = String.make 1000 (Char.chr (65 + (i mod 26))) in
    let before = R.stats r in
    match R.add r s with
    | x ->
        kept := (x, s) :: !kept;
        fill (i + 1)
    | exception Out_of_memory -> (i, before)
  in
  let added, before = fill 0 in
  assert_bool "several adds fit in the first chunk" (added > 30);
  assert_equal ~msg:"stats unchanged by the failed add" before (R.stats r);
  assert_equal ~msg:"one chunk" ~printer:pint 1 (R.stats r).chunks;
  assert_equal ~msg:"the allocator said NULL once" ~printer:pint 1 (counts a).nulls;
  (* A large value (a chunk of its own) fails the same way. *)
  let big = Array.init 10_000 (fun i -> str (string_of_int i)) in
  raises_oom (fun () -> R.add r big);
  assert_equal ~msg:"stats unchanged by the failed large add" before (R.stats r);
  List.iter (fun (x, s) -> assert_equal ~msg:"contents" s x) !kept;
  assert_chunks_accounted ~msg:"null" a r;
  (* With memory again, the same adds succeed. *)
  set_budget a 2;
  let big' = R.add r big in
  let s' = R.add r (String.make 1000 'z') in
  assert_bool "added after the failures" (big' = big && s' = String.make 1000 'z');
  assert_equal ~msg:"three chunks" ~printer:pint 3 (R.stats r).chunks;
  assert_chunks_accounted ~msg:"null, after" a r);
  R.free r;
  assert_freed_all ~msg:"null" a

(* Memory off word alignment: the traversal gives it back at once, after the region
   took it as a chunk; the region forgets the chunk and its bump range. *)
let test_misaligned _ =
  let a = misaligned_alloc (-1) in
  let r = R.create ~alloc:a ~chunk_bytes:65536 () in
  for _ = 1 to 3 do
    raises_invalid ~sub:"aligned" (fun () -> R.add r (List.init 3 string_of_int));
    raises_invalid ~sub:"aligned" (fun () -> R.add r (Array.make 10_000 (str "x")))
  done;
  assert_equal ~msg:"empty" { R.bytes = 0; reserved = 0; blocks = 0; chunks = 0; values = 0 }
    (R.stats r);
  assert_equal ~msg:"every chunk given back" ~printer:pint 0 (counts a).outstanding;
  assert_equal ~msg:"one allocation per add" ~printer:pint 6 (counts a).allocs;
  R.free r;
  assert_freed_all ~msg:"misaligned" a

let test_null_first _ =
  let a = budget_alloc 0 in
  let r = R.create ~alloc:a () in
  raises_oom (fun () -> R.add r [ str "a" ]);
  assert_equal ~msg:"empty" { R.bytes = 0; reserved = 0; blocks = 0; chunks = 0; values = 0 }
    (R.stats r);
  R.free r;
  assert_freed_all ~msg:"null first" a

(* {1 Signals} *)

(* Stops the timer, then puts back the handler [old] (the default one: termination). A
   tick sent before the timer stopped can still be pending (blocked while a handler runs,
   or not yet taken by a thread): ignoring the signal first discards it, so [old] never
   receives it. *)
let stop_ticks old =
  ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = 0.0; it_value = 0.0 });
  Sys.set_signal Sys.sigalrm Sys.Signal_ignore;
  Sys.set_signal Sys.sigalrm old

(* A signal handler raises during adds (and right after them, before their result is
   used): no chunk is ever lost or leaked. The handler raises only while [armed]: the
   loop's own code is not under test. *)
let test_signals _ =
  let a = budget_alloc (-1) in
  let armed = ref false and interrupted = ref 0 and done_ = ref 0 in
  let handler _ = if !armed then (armed := false; raise Exit) in
  let old = Sys.signal Sys.sigalrm (Sys.Signal_handle handler) in
  let tick = { Unix.it_interval = 0.0002; it_value = 0.0002 } in
  ignore (Unix.setitimer Unix.ITIMER_REAL tick);
  let regions = List.init 40 (fun _ -> R.create ~alloc:a ~chunk_bytes:8192 ()) in
  List.iteri
    (fun round r ->
      for i = 1 to 2000 do
        let v = Array.make (1 + (i mod 700)) (o round) in
        try
          armed := true;
          let x = R.add r v in
          (* A poll point (an allocation) before disarming: in native code, a signal
             that came during the add is handled here, right after it. *)
          ignore (o (ref x));
          armed := false;
          assert (Array.length x = Array.length v);
          incr done_
        with Exit -> incr interrupted
      done)
    regions;
  armed := false;
  stop_ticks old;
  Printf.printf "signals: %d adds, %d interrupted\n%!" !done_ !interrupted;
  assert_bool "some adds were interrupted" (!interrupted > 0);
  let values = List.fold_left (fun acc r -> acc + (R.stats r).values) 0 regions in
  assert_bool "every add that returned is counted" (values >= !done_ && values <= 80_000);
  let reserved = List.fold_left (fun acc r -> acc + (R.stats r).reserved) 0 regions in
  assert_equal ~msg:"every byte allocated is a chunk of a region" ~printer:pint reserved
    (counts a).outstanding;
  (* Frees interrupted too: each region is freed exactly once, whatever the handler. *)
  (* The handler first, then the timer: a tick before the handler would find the default
     action (termination). *)
  Sys.set_signal Sys.sigalrm (Sys.Signal_handle handler);
  ignore (Unix.setitimer Unix.ITIMER_REAL tick);
  List.iter
    (fun r ->
      try
        armed := true;
        R.free r;
        armed := false
      with Exit -> ())
    regions;
  armed := false;
  stop_ticks old;
  List.iter (fun r -> try R.free r with Invalid_argument _ -> ()) regions;
  assert_freed_all ~msg:"signals" a

(* A signal handler whose own adds fail, running between a failed add and the raise of
   its error: each add raises its own error. (Errors wait in a per-thread slot until the
   OCaml side asks for them: the handler's failed add took the interrupted add's error,
   which then found none and raised Invalid_argument "freed" for a live region.) *)
let test_signal_errors _ =
  let r = R.create () in
  let abstract = [ Obj.repr 1; Obj.new_block Obj.abstract_tag 1 ] in
  let lazy_v = [ Obj.repr (lazy (print_endline "never")) ] in
  let in_handler = ref 0 and handler_wrong = ref [] in
  let handler _ =
    match R.add r abstract with
    | _ -> handler_wrong := "added" :: !handler_wrong
    | exception Offheap.Not_copyable Offheap.Abstract -> incr in_handler
    | exception e -> handler_wrong := Printexc.to_string e :: !handler_wrong
  in
  let old = Sys.signal Sys.sigalrm (Sys.Signal_handle handler) in
  let tick = { Unix.it_interval = 0.0001; it_value = 0.0001 } in
  ignore (Unix.setitimer Unix.ITIMER_REAL tick);
  let right = ref 0 and wrong = ref [] and wrong_count = ref 0 in
  let start = Unix.gettimeofday () in
  while !in_handler < 5000 && Unix.gettimeofday () -. start < 5.0 do
    for _ = 1 to 100 do
      match R.add r lazy_v with
      | _ -> wrong := "added" :: !wrong
      | exception Offheap.Not_copyable Offheap.Unforced_lazy -> incr right
      | exception e ->
          incr wrong_count;
          if !wrong_count <= 3 then wrong := Printexc.to_string e :: !wrong
    done
  done;
  stop_ticks old;
  Printf.printf "signal errors: %d failed adds, %d in the handler\n%!" !right !in_handler;
  assert_bool "the handler ran" (!in_handler > 100);
  assert_equal ~msg:"adds interrupted by the handler (the first 3)" ~printer:(String.concat "; ") [] !wrong;
  assert_equal ~msg:"adds raising another error" ~printer:pint 0 !wrong_count;
  assert_equal ~msg:"adds of the handler" ~printer:(String.concat "; ") [] !handler_wrong;
  assert_equal ~msg:"nothing added" ~printer:pint 0 (R.stats r).values;
  (* A handler that raises: failed adds interrupted before their error was asked for
     leave it behind (more than the 8 kept); later failures still raise their own. *)
  let raised = ref 0 and armed = ref false in
  let raising _ = if !armed then (armed := false; incr raised; raise Exit) in
  Sys.set_signal Sys.sigalrm (Sys.Signal_handle raising);
  ignore (Unix.setitimer Unix.ITIMER_REAL tick);
  let start = Unix.gettimeofday () in
  while !raised < 200 && Unix.gettimeofday () -. start < 5.0 do
    (try
       armed := true;
       ignore (R.add r lazy_v)
     with Exit | Offheap.Not_copyable _ -> ());
    armed := false
  done;
  stop_ticks old;
  assert_bool "adds were interrupted" (!raised >= 20);
  for _ = 1 to 20 do
    raises_not_copyable Offheap.Abstract (fun () -> R.add r abstract);
    raises_not_copyable Offheap.Unforced_lazy (fun () -> R.add r lazy_v)
  done;
  assert_equal ~msg:"an add after the interruptions" [ 1 ] (R.add r [ 1 ]);
  R.free r

let vm_size_kb () =
  let ic = open_in "/proc/self/status" in
  let rec find () =
    match input_line ic with
    | l when String.length l > 7 && String.sub l 0 7 = "VmSize:" -> Scanf.sscanf l "VmSize: %d kB" Fun.id
    | _ -> find ()
  in
  let kb = find () in
  close_in ic;
  kb

(* A signal handler raising during load_image (both load modes): the payload of an
   interrupted load goes back, whatever point the exception comes from. A signal that
   comes during the load stub is handled at the first poll point after it: in the
   bytecode entry of the let-bound adopt external, which lost the handle, or in the
   allocations that made the roots, which lost the region, its payload leaked either
   way (250 KB a load). *)
let test_signals_load_image _ =
  let path = Filename.temp_file "region" ".img" in
  let r = R.create () in
  using r (fun r ->
      let v = R.add r (Array.init 4000 (fun i -> (str (string_of_int i), float i))) in
      R.write_image ~key:"s" path r [ ("v", Obj.repr v); ("n", Obj.repr 1) ]);
  R.free r;
  let payload_kb = (Offheap.Image.info path).payload_bytes / 1024 in
  let armed = ref false and interrupted = ref 0 and loaded = ref 0 in
  let handler _ = if !armed then (armed := false; raise Exit) in
  let old = Sys.signal Sys.sigalrm (Sys.Signal_handle handler) in
  let load i =
    armed := true;
    let r, _ = R.load_image ~key:"s" ~share:(i mod 2 = 0) path in
    armed := false;
    r
  in
  (* Until 200 loads were interrupted (50 MB leaked before the fix, far above the noise
     of the heap's growth), or 5 seconds. *)
  let before = vm_size_kb () and start = Unix.gettimeofday () and i = ref 0 in
  ignore (Unix.setitimer Unix.ITIMER_REAL { Unix.it_interval = 0.0002; it_value = 0.0002 });
  while !interrupted < 200 && Unix.gettimeofday () -. start < 5.0 do
    incr i;
    match load !i with
    | r ->
        incr loaded;
        R.free r
    | exception Exit -> incr interrupted
  done;
  armed := false;
  stop_ticks old;
  settle ();
  let grown = vm_size_kb () - before in
  Printf.printf "signals during load_image: %d loaded, %d interrupted, VmSize %+d kB (%d kB a load)\n%!"
    !loaded !interrupted grown payload_kb;
  assert_bool "loads were interrupted" (!interrupted >= 50);
  assert_bool "the interrupted loads' payloads went back"
    (grown < !interrupted * payload_kb / 4);
  (match R.load_image ~key:"s" path with
  | r, roots ->
      assert_equal ~msg:"the image still loads" 1 (Obj.obj (List.assoc "n" roots));
      R.free r);
  Sys.remove path

(* {1 Threads} *)

(* Threads adding to one region, each failing in its own way now and then: every add
   lands, and every failure reports its own cause (errors are kept per thread). *)
let test_threads _ =
  let r = R.create ~chunk_bytes:8192 () in
  let per = 3000 in
  let worker k =
    let bad =
      if k mod 2 = 0 then (Obj.new_block Obj.abstract_tag 1, Offheap.Abstract)
      else (Obj.repr (lazy (print_endline "never")), Offheap.Unforced_lazy)
    in
    let ok = ref 0 in
    for i = 1 to per do
      if i mod 7 = 0 then raises_not_copyable (snd bad) (fun () -> R.add r [ Obj.repr i; fst bad ])
      else (
        let v = R.add r (k, i, str (string_of_int i)) in
        assert (v = (k, i, string_of_int i) && R.mem r v);
        incr ok);
      if i mod 100 = 0 then Thread.yield ()
    done;
    !ok
  in
  let results = Array.make 4 0 in
  let threads = List.init 4 (fun k -> Thread.create (fun () -> results.(k) <- worker k) ()) in
  List.iter Thread.join threads;
  let ok = Array.fold_left ( + ) 0 results in
  assert_equal ~msg:"every add counted" ~printer:pint ok (R.stats r).values;
  assert_equal ~msg:"adds" ~printer:pint (4 * (per - (per / 7))) ok;
  R.free r

(* {1 Images} *)

let child () =
  match Sys.getenv_opt "OFFHEAP_REGION_CHILD" with
  | Some p when Filename.is_implicit p -> Filename.concat (Sys.getcwd ()) p
  | Some p -> p
  | None -> Filename.concat (Filename.dirname Sys.executable_name) "region_child.exe"

let run_child args =
  let pid = Unix.create_process (child ()) (Array.append [| "region_child" |] args) Unix.stdin Unix.stdout Unix.stderr in
  snd (Unix.waitpid [] pid)

let temp () = Filename.temp_file "region" ".img"

(* [f r roots] on the region image at [path]; the region, for freeing once [f] has
   returned and its frame holds no root into it. *)
let on_loaded_key key path f =
  let r, rs = R.load_image ~key path in
  (r, f r rs)

let on_loaded path f = on_loaded_key "k" path f

let test_image_round_trips _ =
  let p1 = temp () and p2 = temp () and p3 = temp () in
  (* Step 0, written here. *)
  let r = R.create () in
  using r (fun r ->
      let names0 = names 0 in
      let index0 = index_of names0 in
      let names, index, pair = R.add r (names0, index0, (names0, index0)) in
      assert_bool "step 0 built" (check 0 (names, index, pair));
      R.write_image ~key:"k" p1 r (roots (names, index, pair)));
  R.free r;
  (* Step 1, in another process: loaded, checked, added to, written again. *)
  assert_equal ~msg:"child" (Unix.WEXITED 0) (run_child [| p1; p2; "k"; "0" |]);
  (* Loaded again here: step 1, sharing between roots kept; one more step and round. *)
  let r, old_bytes =
    on_loaded p2 (fun r rs ->
        let names, index, pair = of_roots rs in
        assert_bool "step 1 loaded, roots equal and shared" (check 1 (names, index, pair));
        assert_bool "roots are in the region" (R.mem r names && R.mem r index && R.mem r pair);
        assert_equal ~msg:"root order" [ "names"; "index"; "pair" ] (List.map fst rs);
        let chunks = (R.stats r).chunks in
        let step2 = next r (names, index) in
        assert_bool "step 2 added" (check 2 step2);
        assert_bool "a new chunk for the adds" ((R.stats r).chunks = chunks + 1);
        R.write_image ~key:"k" p3 r (roots step2);
        (R.stats r).bytes)
  in
  R.free r;
  let r, () =
    on_loaded p3 (fun r rs ->
        assert_bool "step 2 loaded" (check 2 (of_roots rs));
        let st = R.stats r in
        assert_bool "stats of a loaded region: one chunk, its blocks"
          (st.chunks = 1 && st.blocks > 3 * 53 && st.bytes = st.reserved && st.values = 0);
        assert_bool "writing dropped the dead paths" ((R.stats r).bytes < old_bytes);
        (* Roots outside the region are written too. *)
        R.write_image ~key:"k" p1 r [ ("heap", Obj.repr (ref (str "h"))); ("n", Obj.repr 7) ])
  in
  R.free r;
  let r, () =
    on_loaded p1 (fun r rs ->
        assert_equal ~msg:"roots from the heap" (str "h") !(Obj.obj (List.assoc "heap" rs) : string ref);
        assert_equal ~msg:"immediate root" 7 (Obj.obj (List.assoc "n" rs));
        assert_bool "in the loaded region" (R.mem r (List.assoc "heap" rs)))
  in
  R.free r;
  raises_invalid ~sub:"freed" (fun () -> R.write_image p1 r []);
  (* The longest key, and one byte more: refused in the region's words, with the length
     the caller gave, nothing written. *)
  let r = R.create () in
  let longest = String.make 3977 'k' in
  R.write_image ~key:longest p1 r [ ("n", Obj.repr 1) ];
  let r', () = on_loaded_key longest p1 (fun _ rs -> assert_equal ~msg:"longest key" 1 (Obj.obj (List.assoc "n" rs))) in
  R.free r';
  let read p =
    let ic = open_in_bin p in
    let s = really_input_string ic (in_channel_length ic) in
    close_in ic;
    s
  in
  let before = read p1 in
  raises_invalid ~sub:"Offheap.Region.write_image: key of 3978 bytes (at most 3977)" (fun () ->
      R.write_image ~key:(longest ^ "k") p1 r []);
  assert_bool "nothing written" (String.equal before (read p1));
  R.free r;
  (* Bad files: the checks of Image apply. *)
  let invalid what f =
    match f () with
    | (r, _) ->
        R.free r;
        assert_failure (what ^ ": loaded")
    | exception Offheap.Image.Invalid_image _ -> ()
  in
  invalid "wrong key" (fun () -> R.load_image ~key:"other" p3);
  let plain = temp () in
  Offheap.Image.write ~key:"k" plain [| 1; 2 |];
  invalid "a plain image" (fun () -> R.load_image ~key:"k" plain);
  (match Offheap.Image.load ~key:"k" p3 with
  | h ->
      Offheap.free h;
      assert_failure "a region image loaded as a plain one"
  | exception Offheap.Image.Invalid_image _ -> ());
  Offheap.Image.write ~key:"offheap.region:k" plain [| 1; 2 |];
  invalid "not a list of roots" (fun () -> R.load_image ~key:"k" plain);
  let flip path offset =
    let fd = Unix.openfile path [ Unix.O_RDWR ] 0 in
    let b = Bytes.create 1 in
    ignore (Unix.lseek fd offset Unix.SEEK_SET);
    ignore (Unix.read fd b 0 1);
    Bytes.set b 0 (Char.chr (Char.code (Bytes.get b 0) lxor 0x40));
    ignore (Unix.lseek fd offset Unix.SEEK_SET);
    ignore (Unix.write fd b 0 1);
    Unix.close fd
  in
  let size = (Unix.stat p3).Unix.st_size in
  flip p3 (size - 100);
  invalid "a damaged payload" (fun () -> R.load_image ~key:"k" p3);
  Unix.truncate p2 ((Unix.stat p2).Unix.st_size / 2);
  invalid "a truncated file" (fun () -> R.load_image ~key:"k" p2);
  List.iter Sys.remove [ p1; p2; p3; plain ]

(* Half the address of a block, plus 1, as an int. [lor 1] sets the tag bit: the result
   is a genuine integer (a raw address, even, taken as an int and computed with, would
   be a word the GC reads as a pointer, e.g. into memory freed since). *)
let address v : int = (Obj.magic (Obj.repr v) : int) lor 1

(* Chunks of their own no larger than the slab's 8 KiB (adds of 136 to 8120 bytes into
   a region of 4 KiB chunks) come from the allocator. On OCaml 4 their free gave them
   to the slab that served copies of up to 1 KiB, chosen by size as for a copy: a chunk
   8 bytes short of its size class was then handed out whole to a later copy of that
   class, which wrote past it. Regions with such chunks are freed; copies of every size
   up to about 7950 bytes (slab copies: they never come from the allocator, whose later
   allocations may reuse the chunks), three of each, must then all lie outside the
   chunks freed, and be intact. *)
let test_own_chunks_freed_then_copies _ =
  let freed =
    List.init 175 (fun k ->
        let words = if k < 115 then 16 + k else 130 + ((k - 115) * 15) in
        let r = R.create ~chunk_bytes:4096 () in
        let v = (str (String.make (words * 8) 'r'), [| float words |], Int64.of_int words) in
        let c = R.add r v in
        assert_bool "added" (c = v);
        let start = address c and bytes = (R.stats r).R.reserved in
        R.free r;
        (start - (bytes / 2), start + (bytes / 2)))
  in
  settle ();
  let values =
    List.init 483 (fun i ->
        let n = if i < 333 then i / 3 * 8 else 1000 + ((i - 333) / 3 * 140) in
        (str (String.make n 'c'), [| float n |], Int64.of_int (n + i)))
  in
  let handles = List.map Offheap.copy values in
  List.iter2
    (fun v h ->
      let c = Offheap.get h in
      List.iter
        (fun (lo, hi) ->
          assert_bool
            (Printf.sprintf "a copy of %d bytes inside a freed chunk" (Offheap.stats h).bytes)
            (address c < lo || address c > hi))
        freed;
      assert_bool "a copy equal to its source" (compare c v = 0))
    values handles;
  List.iter Offheap.free handles;
  settle ()

let () =
  run_test_tt_main
    ("region"
    >::: [
           "sharing" >:: test_sharing;
           "incremental" >:: test_incremental;
           "map_batches" >:: test_map_batches;
           "many_small" >:: test_many_small;
           "failure_abstract" >:: test_failure_abstract;
           "failure_null" >:: test_failure_null;
           "null_first" >:: test_null_first;
           "misaligned" >:: test_misaligned;
           "signals" >:: test_signals;
           "signal errors" >:: test_signal_errors;
           "signals during load_image" >:: test_signals_load_image;
           "threads" >:: test_threads;
           "image_round_trips" >:: test_image_round_trips;
           "own chunks freed, then copies" >:: test_own_chunks_freed_then_copies;
         ])
