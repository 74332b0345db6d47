(* A second domain that allocates without pause, for [bench.exe -domains] (OCaml 5). *)

type t

val start : unit -> t option
(** Starts the domain; [None] on OCaml 4. *)

val longest_wait : t -> (unit -> 'a) -> 'a * float
(** [longest_wait t f] runs [f] and returns its result and the longest time, in seconds,
    the other domain waited between two of its iterations meanwhile (for a minor
    collection that needed this domain to reach a safe point). *)

val stop : t -> unit
(** Stops the domain and waits for it. *)
