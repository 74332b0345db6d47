(* What the image and Bigarray benchmarks share: child processes of the running
   benchmark, and this process's memory as /proc reports it. *)

(* The "KEY: N kB" line of /proc/self/FILE, in kB (0 when absent). *)
let proc_kb file key =
  let ic = open_in ("/proc/self/" ^ file) in
  let prefix = key ^ ":" in
  let n = String.length prefix in
  let rec find () =
    match input_line ic with
    | line when String.length line > n && String.sub line 0 n = prefix ->
        Scanf.sscanf (String.sub line n (String.length line - n)) " %d kB" Fun.id
    | _ -> find ()
    | exception End_of_file -> 0
  in
  let kb = find () in
  close_in ic;
  kb

(* Proportional set size: shared pages count for a share of each process mapping them. *)
let pss_kb () = proc_kb "smaps_rollup" "Pss"

(* Peak resident set size so far. *)
let vm_hwm_kb () = proc_kb "status" "VmHWM"

(* Resets the peak resident set size to the current one (Linux 4.0 and later), so that a
   peak measured from here on is not hidden by an earlier, higher one. *)
let reset_peak () =
  let oc = open_out "/proc/self/clear_refs" in
  output_string oc "5";
  close_out oc

(* Runs this executable with [args] (argv, the program name first): its pid, its
   standard output to read and its standard input to write. *)
let spawn args =
  let out_r, out_w = Unix.pipe () in
  let in_r, in_w = Unix.pipe () in
  let pid = Unix.create_process Sys.executable_name args in_r out_w Unix.stderr in
  Unix.close out_w;
  Unix.close in_r;
  (pid, Unix.in_channel_of_descr out_r, Unix.out_channel_of_descr in_w)

(* Closes a child's pipes and waits for it. *)
let finish (pid, ic, oc) =
  close_in ic;
  close_out oc;
  ignore (Unix.waitpid [] pid)

(* A duration for the tables: milliseconds below 10 ms, else seconds. *)
let seconds t = if t < 0.01 then Printf.sprintf "%.2f ms" (t *. 1e3) else Printf.sprintf "%.3f s" t
