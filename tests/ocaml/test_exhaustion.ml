(* Running out of memory for real. The test re-runs itself as a child process under a
   lowered address-space limit ([ulimit -v]). The child copies values of growing size
   (lists, arrays, trees), keeping every copy, until a copy raises [Out_of_memory]
   (whether the copy's own allocation or the traversal's queue and tables failed); it
   checks that the value whose copy failed is intact, frees everything, and goes on:
   more copies succeed, the largest one included. The parent checks the child's exit
   status and what it printed. *)

type tree = Leaf | Node of tree * int * tree

let rec tree d = if d = 0 then Leaf else Node (tree (d - 1), d, tree (d - 1))

let rec tree_sum = function Leaf -> 0 | Node (l, x, r) -> tree_sum l + x + tree_sum r

type source = List of int list | Array of int array | Tree of tree

(* A source value and an independent checksum of it. *)
let make k =
  let n = 1000 lsl min k 9 in
  match k mod 3 with
  | 0 -> List (List.init n (fun i -> i * 7))
  | 1 -> Array (Array.init n (fun i -> i - 5))
  | _ -> Tree (tree (min (10 + k) 18))

let checksum = function
  | List l -> List.fold_left ( + ) (List.length l) l
  | Array a -> Array.fold_left ( + ) (Array.length a) a
  | Tree t -> tree_sum t

let settle = Probes.settle

let child () =
  (* The sources: growing sizes up to 512k elements (a tree of 2^18 nodes), built once;
     the last three (the largest) are copied again and again. *)
  let sources = Array.init 12 (fun k -> let s = make k in (s, checksum s)) in
  let held = ref [] and copies = ref 0 and held_bytes = ref 0 in
  let oom = ref None in
  (try
     while !oom = None && !copies < 100_000 do
       let k = if !copies < 12 then !copies else 9 + (!copies mod 3) in
       let s, sum = sources.(k) in
       match Offheap.copy s with
       | h ->
           incr copies;
           held_bytes := !held_bytes + (Offheap.stats h).bytes;
           held := (h, sum) :: !held
       | exception Out_of_memory -> oom := Some (k, s, sum)
     done
   with e -> Printf.printf "unexpected exception %s\n%!" (Printexc.to_string e); exit 3);
  (match !oom with
  | None ->
      Printf.printf "no Out_of_memory after %d copies\n%!" !copies;
      exit 2
  | Some (k, s, sum) ->
      if checksum s <> sum then begin
        Printf.printf "source %d changed by the failed copy\n%!" k;
        exit 4
      end;
      Printf.printf "Out_of_memory after %d copies (%d MB held)\n%!" !copies
        (!held_bytes lsr 20));
  (* The copies made before are intact. *)
  List.iter
    (fun (h, sum) -> if checksum (Offheap.get h) <> sum then (print_endline "a copy changed"; exit 5))
    !held;
  List.iter (fun (h, _) -> Offheap.free h) !held;
  held := [];
  settle ();
  (* The process goes on normally: every source copies again, the largest included. *)
  for round = 1 to 3 do
    Array.iteri
      (fun k (s, sum) ->
        let h = Offheap.copy s in
        if checksum (Offheap.get h) <> sum || Offheap.get h <> s then begin
          Printf.printf "copy of source %d (round %d) differs\n%!" k round;
          exit 6
        end;
        Offheap.free h)
      sources
  done;
  settle ();
  print_endline "recovered: later copies succeed";
  exit 0

let contains = Probes.contains

let parent () =
  (* The child is this very program ([Probes.run_self]). Its address space before it
     copies is about the parent's now; it gets 320 MB more. *)
  let limit_kb = Probes.status_kb "VmSize" + (320 * 1024) in
  let status, output =
    Probes.run_self ~shell:(Printf.sprintf "ulimit -v %d &&" limit_kb) [ "child" ]
  in
  print_string output;
  let ok = status = 0 && contains output "Out_of_memory after" && contains output "recovered" in
  if not ok then begin
    Printf.printf "FAILED: the child exited with %d\n%!" status;
    exit 1
  end;
  print_endline "test_exhaustion: ok"

let () = if Array.length Sys.argv > 1 && Sys.argv.(1) = "child" then child () else parent ()
