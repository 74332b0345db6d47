(* The second process of test_image: loads the image [Sys.argv.(1)] with key
   [Sys.argv.(2)] and prints whether it was relocated and the digest of the value
   marshalled (the same as the writer's when the value is the same). *)

let () =
  let h = Offheap.Image.load ~key:Sys.argv.(2) Sys.argv.(1) in
  let v : Obj.t = Offheap.get h in
  Printf.printf "%b %s\n" (Offheap.Image.relocated h)
    (Digest.to_hex (Digest.string (Marshal.to_string v [])));
  Offheap.free h
