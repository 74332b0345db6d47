(* The guarded test allocator of guarded_alloc.c. *)

external make : unit -> Offheap.alloc = "guarded_alloc_make"
(** An allocator whose [free] makes the pages inaccessible instead of releasing them. *)

external plain : unit -> Offheap.alloc = "guarded_plain_make"
(** An allocator of [malloc] and [free] that is not the default one: the handles of its
    copies keep their record apart. *)

external counts : unit -> int * int = "guarded_alloc_counts"
(** Allocations and frees so far. *)

external header : 'a -> int = "guarded_header"
(** The header word of a block. *)
