(* OCaml 5: a second domain for [bench.exe -domains]. It allocates without pause (so it
   needs a minor collection every so often, which waits for every domain, the copying
   one included) and records the longest gap between two of its iterations: how long it
   was kept waiting. *)

type t = { stop : bool Atomic.t; longest_ns : int Atomic.t; domain : unit Domain.t }

let now_ns () = int_of_float (Unix.gettimeofday () *. 1e9)

let start () =
  let stop = Atomic.make false and longest_ns = Atomic.make 0 in
  let run () =
    let last = ref (now_ns ()) in
    while not (Atomic.get stop) do
      ignore (Sys.opaque_identity (Array.make 8 0));
      let t = now_ns () in
      if t - !last > Atomic.get longest_ns then Atomic.set longest_ns (t - !last);
      last := t
    done
  in
  Some { stop; longest_ns; domain = Domain.spawn run }

(* The longest wait of the other domain while [f] runs, in seconds. *)
let longest_wait t f =
  Atomic.set t.longest_ns 0;
  let r = f () in
  (r, float (Atomic.get t.longest_ns) /. 1e9)

let stop t =
  Atomic.set t.stop true;
  Domain.join t.domain
