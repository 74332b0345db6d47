(* Generated from the #[ocaml::sig] of the stubs in src/ by tests/externals.rs
   (OFFHEAP_BLESS=1 cargo test --test externals): do not edit. The handle,
   allocator and region types are parameters: lib/image.ml has the handle type only
   as one, lib/region.ml defines the region's. *)

module Make (T : sig
  type 'a handle
  type alloc
  type region
  type region_cell
end) =
struct
  open T

  (* src/region_stubs.rs *)
  external offheap_region_add : region -> 'a -> Obj.t -> bool -> Obj.t = "offheap_region_add" [@@noalloc]
  external offheap_region_add_stopped : region -> 'a -> Obj.t -> bool -> Obj.t = "offheap_region_add_stopped"
  external offheap_region_adopt : region -> 'a handle -> Obj.t -> Obj.t = "offheap_region_adopt"
  external offheap_region_cell : int -> alloc -> region_cell = "offheap_region_cell"
  external offheap_region_count_loaded : region -> int -> unit = "offheap_region_count_loaded" [@@noalloc]
  external offheap_region_error : unit -> Outcome.t = "offheap_region_error"
  external offheap_region_free : region -> Outcome.t = "offheap_region_free"
  external offheap_region_mem : region -> 'a -> bool = "offheap_region_mem" [@@noalloc]
  external offheap_region_stat : region -> int -> int = "offheap_region_stat" [@@noalloc]
  external offheap_region_stats : region -> int array -> unit = "offheap_region_stats" [@@noalloc]

  (* src/stubs.rs *)
  external offheap_stub_bytecode : unit -> unit = "offheap_stub_bytecode"
  external offheap_stub_copy : 'a handle -> bool -> 'a -> Outcome.t = "offheap_stub_copy"
  external offheap_stub_defers_free : unit -> bool = "offheap_stub_defers_free"
  external offheap_stub_drain : unit -> unit = "offheap_stub_drain"
  external offheap_stub_free : 'a handle -> Outcome.t = "offheap_stub_free"
  external offheap_stub_get : 'a handle -> Obj.t -> Obj.t = "offheap_stub_get" [@@noalloc]
  external offheap_stub_image_info : string -> int array -> bytes -> Outcome.t = "offheap_stub_image_info"
  external offheap_stub_image_load : 'a handle -> alloc -> string -> string -> int -> Outcome.t = "offheap_stub_image_load"
  external offheap_stub_image_max_key : unit -> int = "offheap_stub_image_max_key"
  external offheap_stub_image_owner : int -> alloc = "offheap_stub_image_owner"
  external offheap_stub_image_reseal : bytes -> unit = "offheap_stub_image_reseal"
  external offheap_stub_image_write : string -> string -> bool -> 'a -> Outcome.t = "offheap_stub_image_write"
  external offheap_stub_is_offheap : 'a -> bool = "offheap_stub_is_offheap" [@@noalloc]
  external offheap_stub_malloc : unit -> alloc = "offheap_stub_malloc"
  external offheap_stub_measure : 'a -> int array -> Outcome.t = "offheap_stub_measure"
  external offheap_stub_pending_frees : unit -> int = "offheap_stub_pending_frees"
  external offheap_stub_stat : 'a handle -> int -> int = "offheap_stub_stat" [@@noalloc]
end
