(* Instruction counts per call for small values, under valgrind's callgrind:
   [small_profile.exe MODE N] makes N calls of MODE on records of 5 fields with a string
   (issue 9's small values, 88 bytes off the heap). MODE: base (the loop alone), copy
   (copies kept), copyfree (copies kept, then all freed), interleaved (copy then free),
   marshal (a round trip), region (Region.add to one region); interleaved1 and
   interleaved10 copy and free a fresh ref or a fresh list of 10 immediates instead,
   strings7list and list2strings a tuple of 7 strings and a list of one, and of such a
   list and 2 strings (shapes the shallow path gives up on: fields read before the walk
   starts over), whose making base7 and base2 measure alone; and
   interleaved100 and interleaved1000 a list of 50 or 500 pairs (100 or 1000 blocks, in
   the walk's own buffers), whose making base1, base10, base100 and base1000 measure
   alone; pairs:N and basepairs:N the same for a list of N pairs. The cost of one call
   is the difference of two
   runs' instruction counts (N and 2N) divided by N, less the matching base's; e.g.
   valgrind --tool=callgrind ./_build/default/benches/small_profile.exe copy 20000
   (the machine's wall times are too noisy for per-call differences of 10%). *)

type small = { sa : int; sb : string; sc : float; sd : int; se : int }

(* A fresh list of [n] pairs: 2n blocks (from 17 pairs on, beyond the stack's share of
   the path of small values, src/copy/small.rs: in the walk's own buffers). *)
let pairs n v = List.init n (fun i -> (i, v.sa))

let () =
  let mode = Sys.argv.(1) and n = int_of_string Sys.argv.(2) in
  let values =
    Array.init n (fun i ->
        { sa = i; sb = Printf.sprintf "name-%010d" i; sc = float i; sd = i; se = -i })
  in
  let h0 = Offheap.copy values.(0) in
  Offheap.free h0;
  let handles = Array.make n h0 in
  (match mode with
  | "base" ->
      Array.iteri
        (fun i v ->
          handles.(i) <- Sys.opaque_identity h0;
          ignore (Sys.opaque_identity v))
        values
  | "copy" -> Array.iteri (fun i v -> handles.(i) <- Offheap.copy v) values
  | "copyfree" ->
      Array.iteri (fun i v -> handles.(i) <- Offheap.copy v) values;
      Array.iter Offheap.free handles
  | "interleaved" -> Array.iter (fun v -> Offheap.free (Offheap.copy v)) values
  | "interleaved1" ->
      (* One block: the fixed cost of a copy and a free. *)
      Array.iter (fun v -> Offheap.free (Offheap.copy (ref v.sa))) values
  | "interleaved10" ->
      (* A list of 10 immediates: 10 blocks, for the cost of one more block. *)
      Array.iter
        (fun v -> Offheap.free (Offheap.copy (List.init 10 (fun i -> i + v.sa))))
        values
  | "base10" ->
      Array.iter
        (fun v -> ignore (Sys.opaque_identity (List.init 10 (fun i -> i + v.sa))))
        values
  | "base1" -> Array.iter (fun v -> ignore (Sys.opaque_identity (ref v.sa))) values
  | "strings7list" | "base7" ->
      let copy = mode = "strings7list" in
      Array.iter
        (fun v ->
          let s k = String.make 12 (Char.chr (97 + ((v.sa + k) land 15))) in
          let x = Sys.opaque_identity (s 1, s 2, s 3, s 4, s 5, s 6, s 7, [ s 8 ]) in
          if copy then Offheap.free (Offheap.copy x))
        values
  | "list2strings" | "base2" ->
      let copy = mode = "list2strings" in
      Array.iter
        (fun v ->
          let s k = String.make 12 (Char.chr (97 + ((v.sa + k) land 15))) in
          let x = Sys.opaque_identity ([ s 3 ], s 1, s 2) in
          if copy then Offheap.free (Offheap.copy x))
        values
  | "interleaved100" | "interleaved1000" ->
      let n = if mode = "interleaved100" then 50 else 500 in
      Array.iter (fun v -> Offheap.free (Offheap.copy (pairs n v))) values
  | "base100" | "base1000" ->
      let n = if mode = "base100" then 50 else 500 in
      Array.iter (fun v -> ignore (Sys.opaque_identity (pairs n v))) values
  | _ when String.starts_with ~prefix:"pairs:" mode ->
      let n = int_of_string (String.sub mode 6 (String.length mode - 6)) in
      Array.iter (fun v -> Offheap.free (Offheap.copy (pairs n v))) values
  | _ when String.starts_with ~prefix:"basepairs:" mode ->
      let n = int_of_string (String.sub mode 10 (String.length mode - 10)) in
      Array.iter (fun v -> ignore (Sys.opaque_identity (pairs n v))) values
  | "region" ->
      let r = Offheap.Region.create () in
      Array.iter (fun v -> ignore (Sys.opaque_identity (Offheap.Region.add r v))) values
  | "marshal" ->
      Array.iter
        (fun v ->
          ignore
            (Sys.opaque_identity (Marshal.from_string (Marshal.to_string v []) 0 : small)))
        values
  | _ -> failwith "mode")
