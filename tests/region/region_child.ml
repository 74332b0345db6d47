(* The second process of test_region's image test: loads the region image
   [Sys.argv.(1)] (key [Sys.argv.(3)]) holding the roots of step [Sys.argv.(4)], checks
   them, adds step + 1 to the loaded region and writes its roots to [Sys.argv.(2)].
   Exit code 0 when all went well, 2 when the loaded roots were not as expected. *)

open Region_support

let () =
  let step = int_of_string Sys.argv.(4) in
  let r, loaded = Offheap.Region.load_image ~key:Sys.argv.(3) Sys.argv.(1) in
  let names, index, pair = of_roots loaded in
  if not (check step (names, index, pair) && Offheap.Region.mem r names) then exit 2;
  let step' = next r (names, index) in
  Offheap.Region.write_image ~key:Sys.argv.(3) Sys.argv.(2) r (roots step');
  Offheap.Region.free r
