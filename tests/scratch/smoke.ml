type r = { a : int; b : string; mutable c : r option; f : float }
let rec even n = if n = 0 then true else odd (n - 1)
and odd n = if n = 0 then false else even (n - 1)
let () =
  let l = List.init 1000 (fun i -> i) in
  let h = Offheap.copy l in
  assert (Offheap.get h = l);
  assert (Hashtbl.hash (Offheap.get h) = Hashtbl.hash l);
  let r = { a = 1; b = "x"; c = None; f = 3.5 } in
  r.c <- Some r;
  let h2 = Offheap.copy r in
  let r' = Offheap.get h2 in
  assert (r'.a = 1 && r'.b = "x" && r'.f = 3.5);
  (match r'.c with Some r'' -> assert (r'' == r') | None -> assert false);
  let fs = Offheap.copy (even, odd, 42L, 7l, 9n, lazy 3 |> fun l -> ignore (Lazy.force l); l) in
  let (e, o, i64, i32, ni, lz) = Offheap.get fs in
  assert (e 10 && o 11 && i64 = 42L && i32 = 7l && ni = 9n && Lazy.force lz = 3);
  let s = Marshal.to_string (Offheap.get h) [] in
  assert (Marshal.from_string s 0 = l);
  Gc.compact (); Gc.full_major ();
  assert (Offheap.get h = l);
  (try ignore (Offheap.copy (lazy (print_endline "x"))); assert false with Invalid_argument m -> print_endline m);
  (try ignore (Offheap.copy (ref stdout)); assert false with Invalid_argument m -> print_endline m);
  Offheap.free h; Offheap.free h2; Offheap.free fs;
  (try ignore (Offheap.get h); assert false with Invalid_argument m -> print_endline m);
  (try Offheap.free h; assert false with Invalid_argument m -> print_endline m);
  let big = List.init 10_000_000 (fun i -> i) in
  let t = Unix.gettimeofday () in
  let hb = Offheap.copy big in
  Printf.printf "10M list: %.1f ms, %d bytes\n" ((Unix.gettimeofday () -. t) *. 1000.) (Offheap.stats hb).bytes;
  assert (List.length (Offheap.get hb) = 10_000_000);
  Offheap.free hb;
  print_endline "smoke ok"
