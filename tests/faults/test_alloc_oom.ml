(* Every operation of the library with memory failing at each point of it: malloc,
   calloc, realloc, memalign and mmap fail from their k-th call on (memory exhausted from
   then on), or at their k-th call only (one refusal, then memory again), for every k up
   to the number of calls the operation makes. The operation either works (its result
   checked) or raises Out_of_memory or Sys_error; then the source value is unchanged, no
   image file is left half written, and the same operation works once memory is back.
   Never a signal: an infallible allocation in the library (a Rust [Vec], [Box] or thread
   spawn whose failure aborts the process) shows up here as an abort at its k.

   Each k runs in a child process under a watchdog, two at a time. Before the children
   are made, the operation has run once (first-use allocations done), the OCaml heap has
   room and compaction is off, so that the runtime's own allocations (which end in a
   fatal error during a minor collection) do not fail in the window: what fails is what
   the library allocates. fail_malloc.c makes this program's allocation functions fail
   on demand. OOM_ONLY=TEXT runs the operations whose name holds TEXT, OOM_MODE=once or
   from one of the two ways of failing, OOM_K=k memory failing from k on in this process
   (for a debugger). *)

external arm : int -> unit = "fm_arm" [@@noalloc]
external arm_one : int -> unit = "fm_arm_one" [@@noalloc]
external disarm : unit -> int = "fm_disarm" [@@noalloc]
external calls : unit -> int = "fm_calls" [@@noalloc]

let dir = Filename.get_temp_dir_name ()
let path name =
  Filename.concat dir (Printf.sprintf "offheap_alloc_oom_%d_%s.img" (Unix.getpid ()) name)

(* {1 Values} *)

type record = { id : int; name : string; score : float; tags : string list }

let records n =
  List.init n (fun i ->
      { id = i; name = string_of_int i; score = float i; tags = [ "a"; string_of_int (i mod 7) ] })

(* Boxed numbers and Bigarrays: custom blocks, which images keep in a table of their own. *)
let customs n =
  Array.init n (fun i ->
      match i mod 4 with
      | 0 -> Obj.repr (Int32.of_int i)
      | 1 -> Obj.repr (Int64.of_int (-i))
      | 2 -> Obj.repr (Nativeint.of_int (3 * i))
      | _ -> Obj.repr (Bigarray.Array1.init Bigarray.int64 Bigarray.c_layout (1 + (i mod 3)) Int64.of_int))

let rec tree d = if d = 0 then `Leaf (string_of_int d) else `Node (tree (d - 1), d, tree (d - 1))

let adder n = fun x -> x + n

(* A mixed value: records, a float array, a long string, a cycle, a tree, custom
   blocks; and a closure when [closures] (images hold none). *)
let mixed ?(closures = false) () =
  let cyclic = ref [] in
  cyclic := [ Obj.repr cyclic ];
  Obj.repr
    ( records 3000,
      (if closures then Obj.repr (adder 5) else Obj.repr 5),
      Array.init 500 float,
      String.make 100_000 'x',
      cyclic,
      tree 10,
      customs 200 )

(* A value of some 3 MB: an image of it has several chunks (1 MiB each), which its
   checks and reads split over threads; its copy takes the paths of large copies. *)
let large () = Obj.repr (records 15_000, customs 5_000, Array.init 100_000 float)

(* A value of some 13 MB: its write hands full buffers (8 MiB each) to a writing thread. *)
let huge () = Obj.repr (records 60_000, customs 20_000, Array.init 300_000 float)

(* A deep clone on the heap, to compare the source with after a failure. *)
let clone (v : Obj.t) : Obj.t = Marshal.from_string (Marshal.to_string v [ Marshal.Closures ]) 0

(* Compares two values that may hold closures, Bigarrays and cycles: their
   serializations are equal when they have the same shape, sharing and contents. *)
let same (a : Obj.t) (b : Obj.t) =
  Marshal.to_string a [ Marshal.Closures ] = Marshal.to_string b [ Marshal.Closures ]

(* {1 Operations} *)

(* An operation: [setup] runs before memory fails (it makes the value and any file the
   operation reads), [run] is the operation, its result checked, run while memory fails;
   [writes] the file it writes (one per process: children run side by side). With
   [fresh_thread], memory fails in a thread made for the run, once it runs (the
   runtime's own making of a thread is not what is tested): its run is that thread's
   first, when what a thread keeps between copies is set up. *)
type op = {
  name : string;
  setup : unit -> Obj.t;
  run : Obj.t -> unit;
  writes : (unit -> string) option;
  fresh_thread : bool;
}

(* Whether the last write of a [write_op] returned: a failure after it (in the load that
   checks it) leaves its file, as it should. *)
let wrote = ref false

let check name ok = if not ok then failwith (name ^ ": a different value")

let copy_op name ?alloc value =
  {
    name;
    setup = value;
    run =
      (fun v ->
        let h = Offheap.copy ?alloc v in
        check name (same (Offheap.get h) v);
        Offheap.free h);
    writes = None;
    fresh_thread = false;
  }

let region_op name value =
  {
    name;
    setup = value;
    run =
      (fun v ->
        let r = Offheap.Region.create ~chunk_bytes:65536 () in
        let a = Offheap.Region.add r v in
        let b = Offheap.Region.add_deep r v in
        check name (same a v && same b v);
        Offheap.Region.free r);
    writes = None;
    fresh_thread = false;
  }

let write_op name ?key ?(path = path) value =
  let p () = path name in
  {
    name;
    setup = value;
    run =
      (fun v ->
        let p = p () in
        wrote := false;
        Offheap.Image.write ?key p v;
        wrote := true;
        let h = Offheap.Image.load ?key p in
        check name (same (Offheap.get h) v);
        Offheap.free h);
    writes = Some p;
    fresh_thread = false;
  }

let load_op name ?key ?(path = path) value load =
  let p = path name in
  {
    name;
    setup =
      (fun () ->
        let v = value () in
        Offheap.Image.write ?key p v;
        v);
    run =
      (fun v ->
        let h = load p in
        check name (same (Offheap.get h) v);
        Offheap.free h);
    writes = None;
    fresh_thread = false;
  }

(* A path of some 450 bytes (the standard library makes C strings of paths of 384 bytes
   and more on the heap, not on the stack), in a directory made for it. *)
let long_dir = Filename.concat dir (Printf.sprintf "offheap_alloc_oom_%s" (String.make 200 'd'))

let long_path name =
  let d = long_dir in
  if not (Sys.file_exists d) then Sys.mkdir d 0o755;
  Filename.concat d (Printf.sprintf "%s_%d_%s.img" (String.make 200 'f') (Unix.getpid ()) name)

(* [Offheap.measure], [Offheap.with_copy] and [Offheap.Image.info]: what they give is
   checked against what [copy] and [Image.write] made. *)
let others_op name value =
  let p = path name in
  {
    name;
    setup =
      (fun () ->
        let v = value () in
        Offheap.Image.write p v;
        v);
    run =
      (fun v ->
        let measured = Offheap.measure v in
        Offheap.with_copy v (fun c -> check name (same c v));
        let h = Offheap.copy v in
        let copied = (Offheap.stats h).blocks in
        Offheap.free h;
        let i = Offheap.Image.info p in
        check name (measured.blocks = copied && i.blocks > 0 && i.payload_bytes > 0));
    writes = None;
    fresh_thread = false;
  }

let region_image_op name value =
  let p () = path name in
  {
    name;
    setup = value;
    run =
      (fun v ->
        let p = p () in
        let r = Offheap.Region.create () in
        let a = Offheap.Region.add r v in
        wrote := false;
        Offheap.Region.write_image p r [ ("a", Obj.repr a) ];
        wrote := true;
        Offheap.Region.free r;
        let r, roots = Offheap.Region.load_image p in
        check name (match roots with [ ("a", b) ] -> same b v | _ -> false);
        Offheap.Region.free r);
    writes = Some p;
    fresh_thread = false;
  }

(* Files that operations made in their setup, removed at the end. *)
let scratch_files = ref []

(* A Bigarray whose flags hold a bit the runtime never sets: a block it could not have
   made, refused with [Bad_bigarray] (its finaliser reads only the managed bits). *)
let bad_bigarray () =
  let ba = Bigarray.Array1.create Bigarray.int8_unsigned Bigarray.c_layout 4 in
  let flags = Obj.raw_field (Obj.repr ba) 3 in
  Obj.set_raw_field (Obj.repr ba) 3 (Nativeint.logor flags 0x8000n);
  ba

(* [f ()] raises what [expected] accepts, or Out_of_memory (passed on). *)
let expect what f expected =
  match f () with
  | _ -> failwith (what ^ ": no error")
  | exception Out_of_memory -> raise Out_of_memory
  | exception e when expected e -> ()
  | exception e -> failwith (what ^ ": raised " ^ Printexc.to_string e)

(* The errors of misuse and bad input, each raised as documented (or Out_of_memory):
   what reports them allocates nothing that could abort the process. *)
let errors_op name =
  let fifo = path (name ^ "-fifo") and damaged = path (name ^ "-damaged") in
  let bad = ref None in
  let sys_error_with text = function
    | Sys_error m -> Support.contains m text
    | _ -> false
  in
  {
    name;
    setup =
      (fun () ->
        let v = mixed () in
        if not (Sys.file_exists fifo) then Unix.mkfifo fifo 0o600;
        Offheap.Image.write damaged v;
        let fd = Unix.openfile damaged [ Unix.O_WRONLY ] 0 in
        ignore (Unix.lseek fd 20_000 Unix.SEEK_SET);
        ignore (Unix.write_substring fd "damage" 0 6);
        Unix.close fd;
        scratch_files := fifo :: damaged :: !scratch_files;
        bad := Some (bad_bigarray ());
        v);
    run =
      (fun v ->
        let bad = Option.get !bad in
        let bad_bigarray = function
          | Offheap.Not_copyable (Offheap.Bad_bigarray m) -> m = "a Bigarray with flags 0x8203"
          | _ -> false
        and invalid = function Invalid_argument _ -> true | _ -> false in
        expect "copy of a bad Bigarray" (fun () -> Offheap.copy (v, bad)) bad_bigarray;
        expect "write of a bad Bigarray" (fun () -> Offheap.Image.write damaged bad) bad_bigarray;
        expect "load of a FIFO"
          (fun () -> Offheap.Image.load fifo)
          (sys_error_with "not a regular file");
        expect "write over a FIFO"
          (fun () -> Offheap.Image.write fifo v)
          (sys_error_with "not a regular file");
        expect "load of a damaged image"
          (fun () -> Offheap.Image.load damaged)
          (function Offheap.Image.Invalid_image _ -> true | _ -> false);
        let misaligned = Support.misaligned_alloc (Support.fresh_id ()) in
        expect "copy with a misaligned allocator" (fun () -> Offheap.copy ~alloc:misaligned v) invalid;
        let r = Offheap.Region.create ~alloc:misaligned () in
        expect "add with a misaligned allocator" (fun () -> Offheap.Region.add r v) invalid;
        Offheap.Region.free r;
        expect "add to a freed region" (fun () -> Offheap.Region.add r v) invalid;
        expect "free of a freed region" (fun () -> Offheap.Region.free r) invalid;
        let h = Offheap.copy (1, "x") in
        Offheap.free h;
        expect "free of a freed copy" (fun () -> Offheap.free h) invalid);
    writes = None;
    fresh_thread = false;
  }

let on_new_thread op = { op with name = op.name ^ " on a new thread"; fresh_thread = true }

let ops =
  let load = load_op "load" mixed (fun p -> Offheap.Image.load p)
  and load_relocated value tag =
    load_op ("load relocated" ^ tag) value (fun p -> Offheap.Image.load_relocated p)
  and load_shared = load_op "load shared" mixed (fun p -> Offheap.Image.load ~share:true p)
  and load_shared_relocated value tag =
    load_op ("load shared relocated" ^ tag) value (fun p -> Offheap.Image.load_relocated ~share:true p)
  and load_unverified = load_op "load unverified" mixed (fun p -> Offheap.Image.load ~verify:false p)
  and load_trusted value tag =
    load_op ("load trusted shared" ^ tag) value (fun p ->
        Offheap.Image.load ~verify:false ~trusted:true ~share:true p)
  in
  [
    copy_op "copy" (mixed ~closures:true);
    copy_op "copy of a large value" large;
    copy_op "copy with a C allocator"
      ~alloc:(Support.counting_alloc (Support.fresh_id ()))
      (mixed ~closures:true);
    region_op "region add" (mixed ~closures:true);
    write_op "write" mixed;
    write_op "write with a key" ~key:"k" mixed;
    write_op "write of a large value" huge;
    load_op "load with a key" ~key:"k" mixed (fun p -> Offheap.Image.load ~key:"k" p);
    region_image_op "region image" mixed;
    others_op "measure, with_copy, info" mixed;
    write_op "write to a long path" ~path:long_path mixed;
    load_op "load from a long path" ~path:long_path mixed (fun p -> Offheap.Image.load p);
    errors_op "errors";
    on_new_thread (copy_op "copy" (mixed ~closures:true));
    on_new_thread (region_op "region add" (mixed ~closures:true));
    on_new_thread (write_op "write" mixed);
  ]
  @ [
      load;
      load_relocated mixed "";
      load_shared;
      load_shared_relocated mixed "";
      load_unverified;
      load_trusted mixed "";
      load_op "load of a large value" large (fun p -> Offheap.Image.load p);
      load_relocated large " of a large value";
      load_shared_relocated large " of a large value";
      load_trusted large " of a large value";
    ]

(* {1 The child: one operation, memory failing at k} *)

(* [f ()], on a thread made for it when [op.fresh_thread]. *)
let in_thread op f =
  if not op.fresh_thread then f ()
  else begin
    let result = ref None in
    Thread.join (Thread.create (fun () -> result := Some (f ())) ());
    Option.get !result
  end

let child op v ~before ~once k =
  ignore (Unix.alarm 60);
  let outcome =
    in_thread op (fun () ->
        if once then arm_one k else arm k;
        let outcome =
          match op.run v with
          | () -> `Worked
          | exception (Out_of_memory | Sys_error _) -> `Failed
          | exception e -> `Raised (Printexc.to_string e)
        in
        ignore (disarm ());
        outcome)
  in
  let stop code why =
    Printf.printf "%s, %s k=%d: %s\n%!" op.name (if once then "failing once at" else "failing from") k why;
    exit code
  in
  (match outcome with `Raised e -> stop 3 ("raised " ^ e) | `Worked | `Failed -> ());
  if not (same v before) then stop 4 "the source value changed";
  (match op.writes with
  | Some p when outcome = `Failed && (not !wrote) && Sys.file_exists (p ()) ->
      stop 5 "a failed write left its file"
  | _ -> ());
  Gc.full_major ();
  Gc.compact ();
  (* Memory is back: the operation works. *)
  (match op.run v with
  | () -> ()
  | exception e -> stop 6 ("after the failure, raised " ^ Printexc.to_string e));
  Option.iter (fun p -> Sys.remove (p ())) op.writes;
  exit 0

(* The value of [op], once it has run (the first-use allocations of the runtime and of
   the library made), with room made in the major heap so that the runtime needs no
   memory while the operation runs; and the number of allocation calls [op.run] makes. *)
let prepare op =
  let v = op.setup () in
  op.run v;
  ignore (Sys.opaque_identity (Array.init 4_000 (fun _ -> Array.make 10_000 0)));
  Gc.full_major ();
  let n =
    in_thread op (fun () ->
        arm max_int;
        op.run v;
        let n = calls () in
        ignore (disarm ());
        n)
  in
  Gc.full_major ();
  (v, n)

(* The ks to try out of [n] calls: every one up to 100; else the first 40, then 61
   spread over the rest. *)
let ks n =
  if n <= 100 then List.init (n + 1) Fun.id
  else List.init 40 Fun.id @ List.init 61 (fun i -> 40 + (i * (n - 40) / 60))

let () =
  (* No compaction, a heap that grows in large steps: see [prepare]. *)
  Gc.set { (Gc.get ()) with max_overhead = 1_000_000; space_overhead = 1000 };
  let failures = ref [] and cases = ref 0 in
  let only = Sys.getenv_opt "OOM_ONLY" in
  let wanted op =
    match only with
    | None -> true
    | Some t ->
        let n = String.length t in
        let starts = List.init (max 0 (String.length op.name - n + 1)) Fun.id in
        List.exists (fun i -> String.sub op.name i n = t) starts
  in
  (* Children run two at a time: [running] maps their pids to what they test. *)
  let running = Hashtbl.create 2 in
  let wait_one () =
    let pid, status = Unix.wait () in
    let what = Hashtbl.find running pid in
    Hashtbl.remove running pid;
    let fail why = failures := Printf.sprintf "%s: %s" what why :: !failures in
    match status with
    | Unix.WEXITED 0 -> ()
    | Unix.WEXITED c -> fail (Printf.sprintf "exit %d" c)
    | Unix.WSIGNALED s | Unix.WSTOPPED s ->
        fail
          (if s = Sys.sigalrm then "hung (watchdog)"
           else if s = Sys.sigabrt then "aborted"
           else "killed by signal " ^ string_of_int s)
  in
  List.iter
    (fun op ->
      let t0 = Unix.gettimeofday () in
      let v, n = prepare op in
      let before = clone v in
      (* OOM_K=k: that k alone, failing from it on, in this process (for a debugger). *)
      Option.iter (fun k -> child op v ~before ~once:false (int_of_string k)) (Sys.getenv_opt "OOM_K");
      List.iter
        (fun once ->
          List.iter
            (fun k ->
              incr cases;
              if Hashtbl.length running >= 2 then wait_one ();
              match Unix.fork () with
              | 0 -> child op v ~before ~once k
              | pid ->
                  Hashtbl.replace running pid
                    (Printf.sprintf "%s, %s k=%d of %d" op.name
                       (if once then "failing once at" else "failing from")
                       k n))
            (ks n))
        (match Sys.getenv_opt "OOM_MODE" with
        | Some "once" -> [ true ]
        | Some "from" -> [ false ]
        | _ -> [ false; true ]);
      while Hashtbl.length running > 0 do
        wait_one ()
      done;
      Option.iter (fun p -> if Sys.file_exists (p ()) then Sys.remove (p ())) op.writes;
      Printf.printf "%s: %d allocation calls, %.1f s\n%!" op.name n (Unix.gettimeofday () -. t0))
    (List.filter wanted ops);
  List.iter (fun op -> let p = path op.name in if Sys.file_exists p then Sys.remove p) ops;
  List.iter (fun p -> if Sys.file_exists p then Sys.remove p) !scratch_files;
  if Sys.file_exists long_dir then begin
    Array.iter (fun f -> Sys.remove (Filename.concat long_dir f)) (Sys.readdir long_dir);
    Sys.rmdir long_dir
  end;
  match List.rev !failures with
  | [] -> Printf.printf "operations with memory failing: %d cases, none aborted, hung or lost data\n" !cases
  | l ->
      List.iter print_endline l;
      exit 1
