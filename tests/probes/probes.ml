(* Probes the OCaml test suites share: the process's memory as the kernel reports it, the
   frees that wait for the end of a major cycle handed back, this program run again as a
   child, files read and written whole, substrings. Plain OCaml, so that native and
   bytecode suites link it without a stub library. *)

(** [status_kb field]: the field [field] of /proc/self/status ("VmRSS", "VmHWM",
    "VmSize", "VmData", ...), in kB. *)
let status_kb field =
  let ic = open_in "/proc/self/status" in
  let rec find () =
    let line = input_line ic in
    match String.split_on_char ':' line with
    | [ name; v ] when name = field -> Scanf.sscanf v " %d kB" Fun.id
    | _ -> find ()
  in
  Fun.protect ~finally:(fun () -> close_in ic) find

(** [peak_added_kb f]: runs [f ()] and returns what it added to the process's memory at
    its peak, in kB: VmHWM after it less VmRSS before it, VmHWM first reset to VmRSS
    through /proc/self/clear_refs (after a compaction, so that the heap is as small as it
    gets). *)
let peak_added_kb f =
  Gc.compact ();
  let oc = open_out "/proc/self/clear_refs" in
  output_string oc "5";
  close_out oc;
  let before = status_kb "VmRSS" in
  f ();
  status_kb "VmHWM" - before

(** Hands back the frees that wait for the end of a major cycle (OCaml 5; OCaml 4: of
    its marking): completes major cycles and lets a [copy] and a [free] drain the
    pending list. Raises [Failure] if some still wait after 20 cycles. *)
let settle () =
  let tries = ref 0 in
  while Offheap.pending_frees () > 0 && !tries < 20 do
    incr tries;
    Gc.full_major ();
    Offheap.free (Offheap.copy ())
  done;
  let left = Offheap.pending_frees () in
  if left > 0 then failwith (Printf.sprintf "%d frees still pending" left)

(** [contains s sub]: whether [sub] occurs in [s]. *)
let contains s sub =
  let n = String.length s and m = String.length sub in
  let rec at i = i + m <= n && (String.sub s i m = sub || at (i + 1)) in
  at 0

(** [run_self ?shell args]: runs this very program again with [args] (the same
    executable, or in bytecode the same bytecode file under the same ocamlrun, which
    finds the stubs' DLLs through CAML_LD_LIBRARY_PATH), through [sh] after the shell
    commands [shell] (e.g. ["ulimit -v 65536 &&"]); returns its exit status and what it
    wrote to its standard output and error. *)
let run_self ?(shell = "") args =
  let program =
    match Sys.backend_type with
    | Sys.Native -> [ Sys.executable_name ]
    | _ -> [ Unix.readlink "/proc/self/exe"; Sys.executable_name ]
  in
  let out = Filename.temp_file "offheap_child" ".out" in
  let cmd =
    Printf.sprintf "%s exec %s > %s 2>&1" shell
      (String.concat " " (List.map Filename.quote (program @ args)))
      (Filename.quote out)
  in
  let status = Sys.command cmd in
  let ic = open_in_bin out in
  let output = really_input_string ic (in_channel_length ic) in
  close_in ic;
  Sys.remove out;
  (status, output)

(** The bytes of the file [path]. *)
let read_file path =
  let ic = open_in_bin path in
  let s = really_input_string ic (in_channel_length ic) in
  close_in ic;
  s

(** Makes [s] the contents of the file [path]. *)
let write_file path s =
  let oc = open_out_bin path in
  output_string oc s;
  close_out oc
