(* Instruction counts per call for small copies, under valgrind (make profile-small):
   [small_profile.exe MODE N] makes N calls of MODE on records of 5 fields with a string
   (issue 9's small values). MODE: base (the loop alone), copy (copies kept, then freed
   outside the measured part is not possible under callgrind, so the frees are counted
   apart), interleaved (copy then free), marshal. Divide the difference of two runs'
   instruction counts by the difference of their N to get the cost of one call. *)

type small = { sa : int; sb : string; sc : float; sd : int; se : int }

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
  | "base" -> Array.iteri (fun i v -> handles.(i) <- Sys.opaque_identity h0; ignore (Sys.opaque_identity v)) values
  | "copy" -> Array.iteri (fun i v -> handles.(i) <- Offheap.copy v) values
  | "copyfree" ->
      Array.iteri (fun i v -> handles.(i) <- Offheap.copy v) values;
      Array.iter Offheap.free handles
  | "interleaved" -> Array.iter (fun v -> Offheap.free (Offheap.copy v)) values
  | "marshal" ->
      Array.iter
        (fun v -> ignore (Sys.opaque_identity (Marshal.from_string (Marshal.to_string v []) 0 : small)))
        values
  | _ -> failwith "mode")
