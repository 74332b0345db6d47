(* Image.write and load pressed where the writer keeps its tables in scratch files, puts
   large payloads 2 MiB into the file and populates shared loads on several threads:
   file systems that fill up mid-write (tmpfs), that give no O_TMPFILE or no fallocate
   (an LD_PRELOAD shim, tests/image/adv_shim.c), many custom blocks (the fix-up table
   spilt past 64 Ki entries), payloads around 32 MiB, damage in the padding and at its
   edges, writes from several threads, a raising SIGALRM handler, an address-space limit,
   and wide and deep values whose queue spans many 2 MiB chunks.

   test_image_adv.exe runs the OUnit tests; with "child MODE ARGS" it is the second
   process some tests start (under a shim or a ulimit). *)

open OUnit2
module Image = Offheap.Image

let main_pid = Unix.getpid ()
let exe = Sys.executable_name

let dir =
  Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap-image-adv-%d" main_pid)

let counter = ref 0

(* OUnit may run the tests in worker processes at once: each has a directory of its
   own in [dir], so that a test sees no file of another. *)
let fresh_path () =
  let mine = Filename.concat dir (string_of_int (Unix.getpid ())) in
  List.iter (fun d -> try Unix.mkdir d 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ()) [ dir; mine ];
  incr counter;
  Filename.concat mine (Printf.sprintf "a%d.img" !counter)

let read_file = Probes.read_file

let write_file = Probes.write_file

let contains = Probes.contains

let same a b = compare (Obj.repr a) (Obj.repr b) = 0
let payload_at file = Int64.to_int (String.get_int64_le file 16)
let mib = 1 lsl 20
let open_fds () = Array.length (Sys.readdir "/proc/self/fd")

(* Every way of loading: each must give back a value equal to [v]. *)
let loads =
  [
    ("load", fun p -> Image.load p);
    ("relocated", fun p -> Image.load_relocated p);
    ("shared", fun p -> Image.load ~share:true p);
    ("shared relocated", fun p -> Image.load_relocated ~share:true p);
    ("unverified", fun p -> Image.load ~verify:false p);
    ("unverified shared", fun p -> Image.load ~verify:false ~share:true p);
    ("trusted", fun p -> Image.load ~verify:false ~trusted:true p);
    ("trusted shared", fun p -> Image.load ~verify:false ~trusted:true ~share:true p);
    ("one thread, shared", fun p -> Image.load ~share:true ~threads:1 p);
  ]

let assert_loads_every_way ~msg path v =
  List.iter
    (fun (how, load) ->
      let h = load path in
      assert_bool (Printf.sprintf "%s: %s" msg how) (same (Offheap.get h) v);
      Offheap.free h)
    loads

(* A value of [n] custom blocks of every kind the images hold (Int32, Int64, Nativeint, a
   Bigarray every 4th), each distinct, in a list (so the queue also grows). *)
let customs n =
  List.init n (fun i ->
      match i mod 4 with
      | 0 -> Obj.repr (Int32.of_int (i - 7))
      | 1 -> Obj.repr (Int64.of_int (-i * 3))
      | 2 -> Obj.repr (Nativeint.of_int (i * 5))
      | _ ->
          let a = Bigarray.(Array1.create int64 c_layout (1 + (i mod 3))) in
          for k = 0 to Bigarray.Array1.dim a - 1 do
            a.{k} <- Int64.of_int (i + k)
          done;
          Obj.repr a)

(* {1 Fix-up table} *)

(* Counts of custom blocks around the 64 Ki entries kept in memory (and twice that): the
   table read back from its scratch file must list every custom block, in order. *)
let test_fixup_spill _ =
  List.iter
    (fun n ->
      let v = customs n in
      let path = fresh_path () in
      Image.write path v;
      let i = Image.info path in
      (* Bigarrays count as the custom blocks they are. *)
      assert_equal ~msg:"info's custom blocks" ~printer:string_of_int n i.custom_blocks;
      assert_loads_every_way ~msg:(Printf.sprintf "%d custom blocks" n) path v;
      Sys.remove path)
    [ 65535; 65536; 65537; 131072; 131073; 262147 ]

(* 1.5M Int64 and 500k Int32 in one array (no list cells): 2M fix-ups, a 16 MB table. *)
let test_fixup_many _ =
  let v = Array.init 2_000_000 (fun i -> if i mod 4 = 3 then Obj.repr (Int32.of_int i) else Obj.repr (Int64.of_int (i * 7919))) in
  let path = fresh_path () in
  Image.write path v;
  assert_equal ~printer:string_of_int 2_000_000 (Image.info path).custom_blocks;
  List.iter
    (fun (how, load) ->
      let h = load path in
      let w : Obj.t array = Offheap.get h in
      assert_equal ~msg:how ~printer:string_of_int (Array.length v) (Array.length w);
      Array.iteri
        (fun i x -> if not (same x w.(i)) then assert_failure (Printf.sprintf "%s: element %d" how i))
        v;
      (* The custom operations are back: hashing and Marshal work on every element. *)
      assert_equal ~msg:how (Hashtbl.hash (Array.sub v 1_999_000 1000)) (Hashtbl.hash (Array.sub w 1_999_000 1000));
      assert_equal ~msg:how (Marshal.to_string (Array.sub v 0 1000) []) (Marshal.to_string (Array.sub w 0 1000) []);
      Offheap.free h)
    [ List.hd loads; List.nth loads 3; List.nth loads 6 ];
  Sys.remove path

(* {1 Around ALIGNED_FROM (32 MiB of payload)} *)

(* A Bytes of [words] words in all (header included): payload [8 * words]. *)
let bytes_of_words words = Bytes.init (8 * (words - 2)) (fun i -> Char.chr (i land 255))

let check_offset ~msg path payload =
  let i = Image.info path in
  assert_equal ~msg:(msg ^ ": payload bytes") ~printer:string_of_int payload i.payload_bytes;
  let expected = if payload >= 32 * mib then 2 * mib else 4096 in
  let fd = Unix.openfile path [ O_RDONLY ] 0 in
  let head = Bytes.create (max 4096 expected) in
  let rec fill at = if at < Bytes.length head then fill (at + Unix.read fd head at (Bytes.length head - at)) in
  fill 0;
  Unix.close fd;
  let head = Bytes.to_string head in
  assert_equal ~msg:(msg ^ ": payload offset") ~printer:string_of_int expected (payload_at head);
  assert_equal ~msg:(msg ^ ": file size") ~printer:string_of_int i.file_bytes (Unix.stat path).st_size;
  if expected > 4096 then
    assert_bool (msg ^ ": zeros before the payload")
      (String.for_all (fun c -> c = '\000') (String.sub head 4096 (expected - 4096)))

(* Payloads of 32 MiB less a word, 32 MiB, 32 MiB and a word: one block (a Bytes) and
   three blocks (a pair of a Bytes and a float array), the payload offset, the zeros and
   every way of loading; a shared load's value written again gives the same image. *)
let test_aligned_boundary _ =
  let words = 4 * mib in
  List.iter
    (fun delta ->
      List.iter
        (fun (shape, v) ->
          let msg = Printf.sprintf "%s, 32 MiB %+d words" shape delta in
          let path = fresh_path () in
          Image.write path v;
          check_offset ~msg path (8 * (words + delta));
          assert_loads_every_way ~msg path v;
          (* The value of a shared load written again (it lives in the file's pages). *)
          let h = Image.load ~share:true path in
          let again = fresh_path () in
          Image.write again (Offheap.get h);
          Offheap.free h;
          check_offset ~msg:(msg ^ ", written again") again (8 * (words + delta));
          let h = Image.load again in
          assert_bool (msg ^ ", written again") (same (Offheap.get h) v);
          Offheap.free h;
          Sys.remove again;
          Sys.remove path)
        [
          ("a Bytes", Obj.repr (bytes_of_words (words + delta)));
          ( "a pair",
            (* pair 3 words, float array 1001 words, the Bytes the rest *)
            Obj.repr (bytes_of_words (words + delta - 3 - 1001), Array.make 1000 1.5) );
        ];
      Gc.compact ())
    [ -1; 0; 1 ]

(* {1 Damage in and around the padding} *)

let kind_of_check : string -> Image.check = function
  | "file size" -> Truncated
  | "header checksum" -> Damaged_header
  | "header" | "root" -> Bad_header
  | "payload checksum" | "padding" -> Damaged_payload
  | _ -> Bad_structure

let expect_invalid ~msg ?(verify = true) ?(trusted = false) ?(share = false) check path =
  match Image.load ~verify ~trusted ~share path with
  | h ->
      Offheap.free h;
      assert_failure (msg ^ ": accepted, expected " ^ check)
  | exception (Image.Invalid_image (kind, m) as e) ->
      assert_bool (Printf.sprintf "%s: %S names %s" msg m check) (contains m (": " ^ check ^ ":"));
      assert_bool (msg ^ ": " ^ Printexc.to_string e) (kind = kind_of_check check)

(* Loaded without the checks that catch the damage: refused, or a sound value (compare,
   hash, Marshal and a GC over it do not crash). *)
let refused_or_sound ~msg load path =
  match load path with
  | h ->
      let w = Offheap.get h in
      ignore (Hashtbl.hash w);
      ignore (compare (Obj.repr w) (Obj.repr w));
      ignore (Marshal.to_string w []);
      Gc.full_major ();
      Offheap.free h
  | exception Image.Invalid_image _ -> ()
  | exception e -> assert_failure (msg ^ ": " ^ Printexc.to_string e)

let with_bytes good f =
  let b = Bytes.of_string good in
  f b;
  Bytes.to_string b

let test_padding_damage _ =
  let v = (Array.init 40_000 (fun i -> (i, string_of_int i)), bytes_of_words (4 * mib)) in
  let path = fresh_path () in
  Image.write path v;
  let good = read_file path in
  assert_equal ~printer:string_of_int (2 * mib) (payload_at good);
  let n = String.length good in
  let bad = fresh_path () in
  (* One byte among the zeros, at their first, second, last and middle places, and
     around the end of the first 64 KiB the loader reads. *)
  List.iter
    (fun at ->
      let msg = Printf.sprintf "byte %d set" at in
      write_file bad (with_bytes good (fun b -> Bytes.set b at '\128'));
      expect_invalid ~msg "padding" bad;
      expect_invalid ~msg ~share:true "padding" bad;
      (match Image.load bad with
      | _ -> ()
      | exception Image.Invalid_image (_, m) ->
          assert_bool (msg ^ ": the byte named: " ^ m) (contains m (Printf.sprintf "byte %d " at)));
      let h = Image.load ~verify:false ~share:true bad in
      assert_bool (msg ^ ", unverified") (same (Offheap.get h) v);
      Offheap.free h)
    [ 4096; 4097; 69631; 69632; 86021; mib; (2 * mib) - 8; (2 * mib) - 1 ];
  (* The first and last payload bytes: the payload's checksum. *)
  List.iter
    (fun at ->
      let msg = Printf.sprintf "payload byte %d flipped" at in
      write_file bad (with_bytes good (fun b -> Bytes.set b at (Char.chr (Char.code (Bytes.get b at) lxor 1))));
      expect_invalid ~msg "payload checksum" bad;
      expect_invalid ~msg ~share:true "payload checksum" bad;
      refused_or_sound ~msg (fun p -> Image.load ~verify:false p) bad;
      refused_or_sound ~msg (fun p -> Image.load ~verify:false ~share:true p) bad)
    [ 2 * mib; (2 * mib) + 7; (2 * mib) + (8 * 4 * mib) ];
  (* The header page's last byte (in the key's zeros): the header checksum. *)
  write_file bad (with_bytes good (fun b -> Bytes.set b 4095 '\001'));
  expect_invalid ~msg:"byte 4095" "header checksum" bad;
  (* Cut anywhere around the padding: the file's size, whatever the options. *)
  List.iter
    (fun len ->
      write_file bad (String.sub good 0 len);
      let msg = Printf.sprintf "cut at %d" len in
      expect_invalid ~msg "file size" bad;
      expect_invalid ~msg ~share:true "file size" bad;
      expect_invalid ~msg ~verify:false ~trusted:true ~share:true "file size" bad)
    [ 4097; 8192; mib; (2 * mib) - 1; 2 * mib; (2 * mib) + 1; (2 * mib) + 4096; n - 1 ];
  (* One byte more than the header says. *)
  write_file bad (good ^ "\000");
  expect_invalid ~msg:"a byte more" ~verify:false ~trusted:true ~share:true "file size" bad;
  (* The header's payload offset forged (checksum recomputed). *)
  let forged off =
    with_bytes good (fun b ->
        Bytes.set_int64_le b 16 (Int64.of_int off);
        Image.reseal_header b)
  in
  List.iter
    (fun off ->
      write_file bad (forged off);
      List.iter
        (fun (verify, trusted, share) ->
          match Image.load ~verify ~trusted ~share bad with
          | h ->
              Offheap.free h;
              assert_failure (Printf.sprintf "payload offset %d: accepted" off)
          | exception Image.Invalid_image _ -> ())
        [ (true, false, false); (false, false, true); (false, true, true); (false, true, false) ])
    [ 0; 4096; 8192; (2 * mib) - 4096; (2 * mib) + 4096; 4 * mib; max_int; -4096 ];
  Sys.remove bad;
  Sys.remove path

(* A small image moved to 2 MiB by hand (zeros inserted, offset set, header resealed)
   loads every way, as the format allows; with a byte of the zeros set it is refused. *)
let test_small_image_moved _ =
  let v = (List.init 1000 string_of_int, Int64.minus_one, [| 1.5; 2.5 |]) in
  let path = fresh_path () in
  Image.write path v;
  let good = read_file path in
  assert_equal ~printer:string_of_int 4096 (payload_at good);
  let moved =
    let b = Bytes.of_string (String.sub good 0 4096 ^ String.make ((2 * mib) - 4096) '\000' ^ String.sub good 4096 (String.length good - 4096)) in
    Bytes.set_int64_le b 16 (Int64.of_int (2 * mib));
    Image.reseal_header b;
    b
  in
  write_file path (Bytes.to_string moved);
  assert_loads_every_way ~msg:"moved to 2 MiB" path v;
  Bytes.set moved (mib + 3) '\255';
  write_file path (Bytes.to_string moved);
  expect_invalid ~msg:"moved, a padding byte set" "padding" path;
  Sys.remove path

(* {1 Full file systems} *)

(* A tmpfs of [size_mb] mounted on a new directory for [f]; the test is skipped where it
   cannot be mounted (not root, no mount). *)
let with_tmpfs size_mb f =
  let mnt = Filename.concat (Filename.get_temp_dir_name ()) (Printf.sprintf "offheap-adv-tmpfs-%d" (Unix.getpid ())) in
  (try Unix.mkdir mnt 0o700 with Unix.Unix_error (Unix.EEXIST, _, _) -> ());
  let mounted =
    Unix.geteuid () = 0
    && Sys.command (Printf.sprintf "mount -t tmpfs -o size=%dm tmpfs %s 2>/dev/null" size_mb (Filename.quote mnt)) = 0
  in
  if not mounted then (
    Unix.rmdir mnt;
    skip_if true "cannot mount a tmpfs (not root?)");
  let result = match f mnt with () -> Ok () | exception e -> Error (e, Printexc.get_raw_backtrace ()) in
  (* A shared load's mapping is released once the GC has finished its cycle. *)
  Gc.full_major ();
  Gc.full_major ();
  if Sys.command ("umount " ^ Filename.quote mnt ^ " 2>/dev/null") <> 0 then
    ignore (Sys.command ("umount -l " ^ Filename.quote mnt));
  (try Unix.rmdir mnt with Unix.Unix_error _ -> ());
  match result with Ok () -> () | Error (e, bt) -> Printexc.raise_with_backtrace e bt

let free_bytes mnt =
  let ic = Unix.open_process_in ("stat -f -c '%a %S' " ^ Filename.quote mnt) in
  let l = input_line ic in
  ignore (Unix.close_process_in ic);
  Scanf.sscanf l "%d %d" ( * )

(* Leaves [free] bytes free in [mnt] with one file, "filler". *)
let fill mnt free =
  let filler = Filename.concat mnt "filler" in
  (try Sys.remove filler with Sys_error _ -> ());
  let n = free_bytes mnt - free in
  let fd = Unix.openfile filler [ O_WRONLY; O_CREAT; O_TRUNC ] 0o600 in
  let b = Bytes.make 65536 'f' in
  let rec go n =
    if n > 0 then (
      ignore (Unix.write fd b 0 (min n 65536));
      go (n - 65536))
  in
  go n;
  Unix.close fd

(* Writes [v] into [mnt] with [free] bytes free, for each [free]: the write either
   succeeds (and the image loads back equal) or raises Sys_error (no space) or
   Out_of_memory; either way nothing is left in the directory, the space comes back,
   no descriptor is leaked. Returns how many writes succeeded. *)
let sweep mnt v frees =
  let fds = open_fds () in
  let path = Filename.concat mnt "v.img" in
  List.fold_left
    (fun ok free ->
      fill mnt free;
      let before = free_bytes mnt in
      let msg = Printf.sprintf "%d bytes free" free in
      let ok =
        match Image.write path v with
        | () ->
            (* Read, not mapped: a mapping would hold the file's space until the GC
               releases it. *)
            let h = Image.load path in
            assert_bool (msg ^ ": loaded") (same (Offheap.get h) v);
            Offheap.free h;
            Sys.remove path;
            ok + 1
        | exception Sys_error m ->
            assert_bool (msg ^ ": " ^ m) (contains m "No space left");
            ok
        | exception Out_of_memory -> ok
      in
      assert_equal ~msg:(msg ^ ": files") ~printer:(String.concat ",") [ "filler" ]
        (Array.to_list (Sys.readdir mnt));
      assert_equal ~msg:(msg ^ ": free space after") ~printer:string_of_int before (free_bytes mnt);
      assert_equal ~msg:(msg ^ ": descriptors") ~printer:string_of_int fds (open_fds ());
      ok)
    0 frees

let range from upto step = List.init (((upto - from) / step) + 1) (fun k -> from + (k * step))

(* A value of 300k Int64 in a list (fix-ups spilt, a queue of several chunks): 14.4 MB
   of payload. *)
let test_enospc_small _ =
  with_tmpfs 40 (fun mnt ->
      let v = List.init 300_000 (fun i -> Int64.of_int (i * 3)) in
      let ok = sweep mnt v ([ 0; 4096; 8192; 4095 + 4096 ] @ range mib (24 * mib) (mib / 2 + 4096)) in
      assert_bool "some writes succeeded" (ok > 0);
      assert_bool "some writes failed" (ok < 40))

(* A value of more than 32 MiB (payload 2 MiB into the file): no room for the zeros,
   room for them only, for part of the payload, for the payload but not its tables. *)
let test_enospc_padded _ =
  with_tmpfs 72 (fun mnt ->
      let v = (List.init 200_000 (fun i -> Int64.of_int i), bytes_of_words (4 * mib)) in
      let size =
        let p = fresh_path () in
        Image.write p v;
        let n = (Unix.stat p).st_size in
        Sys.remove p;
        n
      in
      let frees =
        [ 0; 4096; 8192; (2 * mib) - 4096; 2 * mib; (2 * mib) + 4096; 3 * mib; 16 * mib; 32 * mib ]
        @ range (size - (8 * 4096)) (size + (3 * mib)) (64 * 4096 + 4096)
      in
      let ok = sweep mnt v frees in
      assert_bool "some writes succeeded" (ok > 0);
      assert_bool "some writes failed" (ok < List.length frees);
      (* The process goes on: a write where there is room. *)
      let p = fresh_path () in
      Image.write p v;
      let h = Image.load p in
      assert_bool "after" (same (Offheap.get h) v);
      Offheap.free h;
      Sys.remove p)

(* {1 Threads and signals} *)

(* Four threads write different values to different files, three times each, while a
   fifth allocates: every image loads back equal to its value. *)
let test_threads _ =
  let values =
    Array.init 4 (fun t ->
        match t with
        | 0 -> Obj.repr (customs 150_000)
        | 1 -> Obj.repr (Array.init 300_000 (fun i -> (i, string_of_int (i * t))))
        | 2 -> Obj.repr (bytes_of_words ((4 * mib) + 3))
        | _ -> Obj.repr (List.init 400_000 (fun i -> [ i; -i ])))
  in
  let paths = Array.init 4 (fun _ -> Array.init 3 (fun _ -> fresh_path ())) in
  let errors = ref [] in
  let stop = Atomic.make false in
  let churn =
    Thread.create
      (fun () ->
        while not (Atomic.get stop) do
          ignore (Sys.opaque_identity (List.init 10_000 string_of_int));
          Thread.yield ()
        done)
      ()
  in
  let writers =
    Array.mapi
      (fun t v ->
        Thread.create
          (fun () ->
            try
              Array.iter
                (fun p ->
                  Image.write p v;
                  Thread.yield ())
                paths.(t)
            with e -> errors := Printexc.to_string e :: !errors)
          ())
      values
  in
  Array.iter Thread.join writers;
  Atomic.set stop true;
  Thread.join churn;
  assert_equal ~printer:(String.concat "; ") [] !errors;
  Array.iteri
    (fun t ps ->
      Array.iter
        (fun p ->
          let h = Image.load ~share:(t mod 2 = 0) p in
          assert_bool (Printf.sprintf "thread %d" t) (same (Offheap.get h) values.(t));
          Offheap.free h;
          Sys.remove p)
        ps)
    paths

exception Tick

(* A SIGALRM handler that raises (set before the timer) fires every millisecond while a
   value of many custom blocks and one of more than 32 MiB are written: each write
   either completes or raises Tick after it, and leaves no other file, no descriptor,
   no memory behind; the last image written loads back equal. *)
let test_sigalrm _ =
  let armed = ref false in
  let ticks = ref 0 in
  let old =
    Sys.signal Sys.sigalrm
      (Sys.Signal_handle
         (fun _ ->
           incr ticks;
           if !armed then raise Tick))
  in
  let timer t = ignore (Unix.setitimer ITIMER_REAL { it_interval = t; it_value = t }) in
  let rss () =
    let ic = open_in "/proc/self/status" in
    let rec find () =
      let l = input_line ic in
      if String.length l > 6 && String.sub l 0 6 = "VmRSS:" then Scanf.sscanf l "VmRSS: %d kB" Fun.id else find ()
    in
    Fun.protect ~finally:(fun () -> close_in ic) find
  in
  Fun.protect
    ~finally:(fun () ->
      timer 0.;
      Sys.set_signal Sys.sigalrm old)
    (fun () ->
      List.iter
        (fun (name, v) ->
          let path = fresh_path () in
          let d = Filename.dirname path in
          let others () = List.filter (fun f -> Filename.concat d f <> path) (Array.to_list (Sys.readdir d)) in
          let files = others () in
          Image.write path v;
          let interrupted_writes () =
            timer 0.001;
            for _ = 1 to 5 do
              armed := true;
              (try
                 Image.write path v;
                 armed := false
               with Tick -> armed := false)
            done;
            timer 0.;
            armed := false
          in
          (* A first round, so that what malloc keeps of the writer's buffers once they
             are freed (an 8 MiB buffer comes from the heap once the first one freed has
             raised glibc's mmap threshold) is in the baseline: a leak grows with the
             rounds, that does not (a loaded CI run read 16.5 MB after one round). *)
          interrupted_writes ();
          Gc.compact ();
          let fds = open_fds () and before = rss () in
          ticks := 0;
          interrupted_writes ();
          assert_bool (name ^ ": the timer fired") (!ticks > 0);
          assert_equal ~msg:(name ^ ": files") ~printer:(String.concat ",") files (others ());
          assert_equal ~msg:(name ^ ": descriptors") ~printer:string_of_int fds (open_fds ());
          Gc.compact ();
          let grew = rss () - before in
          assert_bool (Printf.sprintf "%s: RSS grew by %d kB" name grew) (grew < 16 * 1024);
          let h = Image.load path in
          assert_bool name (same (Offheap.get h) v);
          Offheap.free h;
          Sys.remove path)
        [
          ("customs", Obj.repr (customs 400_000));
          ("padded", Obj.repr (Array.init 600_000 (fun i -> (i, Printf.sprintf "%040d" i))));
        ])

(* {1 Shims and limits, in a second process} *)

let shim = Filename.concat (Filename.dirname exe) "adv_shim.so"

(* Runs this program as "child MODE ARGS" with [env] added; its exit status. An argument
   "2>FILE" sends the child's standard error to FILE. *)
let run_child ?(env = []) ?(prefix = "") args =
  let env = String.concat " " (List.map (fun (k, v) -> k ^ "=" ^ Filename.quote v) env) in
  let cmd =
    Printf.sprintf "%s env %s %s child %s" prefix env (Filename.quote exe)
      (String.concat " "
         (List.map (fun a -> if String.starts_with ~prefix:"2>" a then "2>" ^ Filename.quote (String.sub a 2 (String.length a - 2)) else Filename.quote a) args))
  in
  Sys.command cmd

(* The child: writes a value of [kind] to [path], loads it back every way, compares.
   Exits 0 when all is well, 3 when the write raised Out_of_memory or Sys_error and a
   small write then worked, 4 when a load raised Out_of_memory, 1 otherwise. *)
let child_roundtrip kind path =
  let v =
    match kind with
    | "customs" -> Obj.repr (customs 300_000)
    | "padded" -> Obj.repr (List.init 100_000 Int64.of_int, bytes_of_words (4 * mib))
    | "wide" -> Obj.repr (Array.init 600_000 (fun i -> ref (string_of_int i)))
    | k -> failwith k
  in
  match Image.write path v with
  | exception ((Out_of_memory | Sys_error _) as e) ->
      if Sys.getenv_opt "ADV_VERBOSE" <> None then prerr_endline ("write: " ^ Printexc.to_string e);
      if Sys.file_exists path then (prerr_endline "write failed, file left"; exit 1);
      Image.write path [ 1; 2 ];
      let h = Image.load path in
      if Offheap.get h <> [ 1; 2 ] then (prerr_endline "small write: a different value"; exit 1);
      Offheap.free h;
      Sys.remove path;
      exit 3
  | () -> (
      try
        List.iter
          (fun (how, load) ->
            if Sys.getenv_opt "ADV_VERBOSE" <> None then prerr_endline ("loading " ^ how);
            let h = load path in
            if not (same (Offheap.get h) v) then (prerr_endline (how ^ ": a different value"); exit 1);
            Offheap.free h)
          loads;
        Sys.remove path;
        exit 0
      with Out_of_memory ->
        Sys.remove path;
        exit 4)

let child () =
  match Array.to_list Sys.argv with
  | _ :: "child" :: "roundtrip" :: kind :: path :: _ -> child_roundtrip kind path
  | _ :: "child" :: "vmsize" :: _ ->
      (* The address space the child takes before it does anything. *)
      print_int (Probes.status_kb "VmSize");
      exit 0
  | [ _; "child"; "write-int64"; p; n ] ->
      let v = List.init (int_of_string n) Int64.of_int in
      Image.write p v;
      let h = Image.load p in
      if Offheap.get h <> v then exit 1;
      Offheap.free h;
      Sys.remove p;
      exit 0
  | [ _; "child"; "shrink-load"; p ] -> (
      (* adv_shim.so's ADV_SHRINK_AT_PREAD truncates the file at one of the load's reads. *)
      match Image.load ~threads:1 p with
      | h ->
          Offheap.free h;
          exit 0
      | exception Image.Invalid_image (Truncated, m) ->
          print_string m;
          exit 5
      | exception e ->
          print_string (Printexc.to_string e);
          exit 1)
  | [ _; "child"; "load"; p; n ] -> (
      (* The value in the heap too, as in a round trip, then the load. *)
      let v = customs (int_of_string n) in
      match Image.load p with
      | h ->
          if compare (Obj.repr (Offheap.get h)) (Obj.repr v) <> 0 then exit 1;
          Offheap.free h;
          exit 0
      | exception Out_of_memory -> exit 4)
  | _ -> exit 2

(* No O_TMPFILE: the image is written under a temporary name, its tables in memory; no
   fallocate; fallocate failing with ENOSPC from the first, second, ... chunk on (the
   queue's chunks then in anonymous memory, beside the earlier ones in the file). *)
let test_shims _ =
  if not (Sys.file_exists shim) then skip_if true "no adv_shim.so";
  List.iter
    (fun (env, kind) ->
      let path = fresh_path () in
      let env = ("LD_PRELOAD", shim) :: env in
      let msg = String.concat " " (List.map (fun (k, v) -> k ^ "=" ^ v) env) ^ " " ^ kind in
      assert_equal ~msg ~printer:string_of_int 0 (run_child ~env [ "roundtrip"; kind; path ]);
      assert_bool (msg ^ ": file left") (not (Sys.file_exists path)))
    [
      ([ ("ADV_NO_TMPFILE", "1") ], "wide");
      ([ ("ADV_NO_TMPFILE", "1") ], "padded");
      ([ ("ADV_NO_FALLOCATE", "1") ], "customs");
      ([ ("ADV_NO_FALLOCATE", "1") ], "padded");
      ([ ("ADV_ENOSPC_AFTER", "0") ], "customs");
      ([ ("ADV_ENOSPC_AFTER", "1") ], "wide");
      ([ ("ADV_ENOSPC_AFTER", "2") ], "customs");
      ([ ("ADV_NO_SHARED_MMAP", "1") ], "customs");
      ([ ("ADV_NO_SHARED_MMAP", "1") ], "wide");
    ];
  let d = Filename.dirname (fresh_path ()) in
  assert_equal ~msg:"files left" ~printer:(String.concat ",") [] (Array.to_list (Sys.readdir d))

(* Under an address-space limit (ulimit -v) from too small for anything to ample: the
   write and the loads either work or raise Out_of_memory (never a signal, never a
   mismatch, nothing left behind). A value with Bigarrays ("customs") made a load abort
   until the checks' lists became fallible: see test_load_abort below. *)
let test_ulimit _ =
  (* The limits are above what the child takes at its start (OCaml 5 reserves the minor
     heaps of every possible domain: some hundreds of MB; OCaml 4 some MB), which a limit
     below makes the runtime refuse to start. *)
  let base_kb =
    let ic = Unix.open_process_args_in exe [| exe; "child"; "vmsize" |] in
    let kb = int_of_string (input_line ic) in
    ignore (Unix.close_process_in ic);
    kb
  in
  let range lo hi step = List.map (fun kb -> base_kb + kb) (range lo hi step) in
  let results = Hashtbl.create 8 in
  List.iter
    (fun (kind, limits) ->
      List.iter
        (fun kb ->
          let path = fresh_path () in
          let err = Filename.temp_file "offheap_ulimit" ".err" in
          let rc =
            run_child ~prefix:(Printf.sprintf "ulimit -v %d;" kb) [ "roundtrip"; kind; path; "2>" ^ err ]
          in
          let stderr =
            let ic = open_in_bin err in
            Fun.protect ~finally:(fun () -> close_in ic) (fun () -> really_input_string ic (in_channel_length ic))
          in
          Sys.remove err;
          let msg = Printf.sprintf "%s under ulimit -v %d: exit %d, stderr: %s" kind kb rc stderr in
          (* 2: the runtime's own "out of memory" before the write. *)
          assert_bool msg (List.mem rc [ 0; 2; 3; 4 ]);
          Hashtbl.replace results rc ();
          let left = Sys.file_exists path in
          if left then Sys.remove path;
          assert_bool (msg ^ ": file left") (not left))
        limits)
    [
      ("wide", range (28 * 1024) (100 * 1024) (8 * 1024));
      ("padded", range (48 * 1024) (188 * 1024) (14 * 1024));
      ("customs", range (36 * 1024) (100 * 1024) (8 * 1024));
    ];
  assert_bool "some runs worked" (Hashtbl.mem results 0);
  assert_bool "some writes ran out of memory" (Hashtbl.mem results 3)

(* {1 Wide and deep values: their queue spans many chunks} *)

type r = { id : int; s : string }

let peak_of_write path v = Probes.peak_added_kb (fun () -> Image.write path v)

let test_wide_deep _ =
  let check name v =
    let path = fresh_path () in
    let added = peak_of_write path v in
    assert_bool (Printf.sprintf "%s: the write added %d kB at its peak" name added) (added <= 32 * 1024);
    List.iter
      (fun (how, load) ->
        let h = load path in
        assert_bool (name ^ ": " ^ how) (same (Offheap.get h) v);
        Offheap.free h)
      [ List.hd loads; List.nth loads 2; List.nth loads 3 ];
    Sys.remove path
  in
  check "an array of 2M records each with a string"
    (Array.init 2_000_000 (fun i -> { id = i; s = string_of_int i }));
  Gc.compact ();
  check "a list of 5M ints" (List.init 5_000_000 (fun i -> i lxor 0x5555));
  Gc.compact ();
  (* A tree: each node reached late in the traversal, children scattered over chunks. *)
  let rec tree d i = if d = 0 then `Leaf i else `Node (tree (d - 1) (2 * i), string_of_int i, tree (d - 1) ((2 * i) + 1)) in
  check "a tree of 2M nodes" (tree 20 1)

(* {1 Regressions} *)

(* The fix-up table's scratch file was asked for at every custom block past the 64 Ki
   kept in memory where the directory has no O_TMPFILE (adv_shim.so with ADV_NO_TMPFILE=1
   makes the kernel refuse them): one failing open(2) a block (234 466 for 300k, a write
   of 2M Int64 ~2.8 s instead of ~0.3 s). It is tried once. *)
let test_scratch_retries _ =
  let report = fresh_path () in
  let p = fresh_path () in
  let cmd =
    Printf.sprintf "env LD_PRELOAD=%s ADV_NO_TMPFILE=1 ADV_REPORT=%s %s child write-int64 %s 300000"
      (Filename.quote shim) (Filename.quote report) (Filename.quote exe) (Filename.quote p)
  in
  assert_equal ~msg:cmd ~printer:string_of_int 0 (Sys.command cmd);
  let ic = open_in report in
  let opens = Scanf.sscanf (input_line ic) "%d %d" (fun o _ -> o) in
  close_in ic;
  Sys.remove report;
  (* The image's own, the queue's, the fix-up table's: a few attempts, not one a block. *)
  assert_bool (Printf.sprintf "%d O_TMPFILE opens attempted for one write" opens) (opens <= 8)

(* Image.load of an image with many Bigarrays under `ulimit -v` aborted the process
   (Rust's "memory allocation of N bytes failed", SIGABRT) instead of raising
   Out_of_memory: the checks grew their lists with infallible pushes (and later
   gathered them so). *)
let test_load_abort _ =
  let n = 300_000 in
  let p = fresh_path () in
  Image.write p (customs n);
  let err = fresh_path () in
  List.iter
    (fun kb ->
      let cmd =
        Printf.sprintf "ulimit -v %d; exec %s child load %s %d 2>%s" kb (Filename.quote exe) (Filename.quote p) n
          (Filename.quote err)
      in
      let rc = Sys.command cmd in
      let stderr = read_file err in
      (* Out of memory may end the child in the OCaml runtime (building the value):
         not this bug. Rust's handler of a failed allocation (an abort) is. *)
      assert_bool
        (Printf.sprintf "load under ulimit -v %d: exit %d, %S" kb rc stderr)
        (not (contains stderr "memory allocation of")))
    (List.init 16 (fun k -> 49152 + (k * 4096)));
  Sys.remove err;
  Sys.remove p

(* A file rewritten in place while it is loaded (not a rename, which the load does not
   see) can end before the bytes its size promised when the load began: each read of the
   load in turn finds it truncated at its offset (adv_shim.so, ADV_SHRINK_AT_PREAD). The
   load refuses it as a truncated file, as it refuses a file truncated before; it raised
   Sys_error "...: failed to fill whole buffer", the message of a Rust library call. *)
let test_shrinks_while_loaded _ =
  if not (Sys.file_exists shim) then skip_if true "no adv_shim.so";
  let src = fresh_path () in
  Image.write src (Array.init 300_000 (fun i -> (i, string_of_int i)));
  let image = read_file src in
  let out = fresh_path () in
  let rec go n =
    let p = fresh_path () in
    write_file p image;
    let cmd =
      Printf.sprintf "env LD_PRELOAD=%s ADV_SHRINK_AT_PREAD=%d %s child shrink-load %s >%s"
        (Filename.quote shim) n (Filename.quote exe) (Filename.quote p) (Filename.quote out)
    in
    let rc = Sys.command cmd in
    let said = read_file out in
    Sys.remove p;
    match rc with
    | 0 -> n
    | 5 ->
        assert_bool (Printf.sprintf "read %d: %S" n said) (contains said "file size");
        go (n + 1)
    | rc -> assert_failure (Printf.sprintf "read %d: exit %d, %S" n rc said)
  in
  (* The header, the tables, the payload's pieces: then a read that comes too late. *)
  let reads = go 1 in
  assert_bool (Printf.sprintf "%d reads" reads) (reads >= 4);
  Sys.remove out;
  Sys.remove src

let () =
  if Array.length Sys.argv > 1 && Sys.argv.(1) = "child" then child ()
  else begin
    at_exit (fun () ->
        if Unix.getpid () = main_pid && Sys.file_exists dir then
          ignore (Sys.command ("rm -rf " ^ Filename.quote dir)));
    run_test_tt_main
      ("image-adv"
      >::: [
             "fix-up table spilt at its boundaries" >:: test_fixup_spill;
             "2M fix-ups" >:: test_fixup_many;
             "payloads around 32 MiB" >:: test_aligned_boundary;
             "damage in and around the padding" >:: test_padding_damage;
             "a small image moved to 2 MiB" >:: test_small_image_moved;
             "full tmpfs, small image" >:: test_enospc_small;
             "full tmpfs, padded image" >:: test_enospc_padded;
             "writes from four threads" >:: test_threads;
             "raising SIGALRM handler" >:: test_sigalrm;
             "no O_TMPFILE, no fallocate, ENOSPC" >:: test_shims;
             "address-space limits" >:: test_ulimit;
             "wide and deep values" >:: test_wide_deep;
             "fix-up scratch file asked for at every custom block" >:: test_scratch_retries;
             "load aborts under an address-space limit" >:: test_load_abort;
             "file shrinking while it is loaded" >:: test_shrinks_while_loaded;
           ])
  end
