(* Generated from the #[ocaml::sig] of the stubs in src/ by tests/externals.rs
   (OFFHEAP_BLESS=1 cargo test --test externals): do not edit. The handle and
   allocator types are parameters: lib/image.ml has the handle type only as one. *)

module Make (T : sig
  type 'a handle
  type alloc
end) =
struct
  open T

  (* src/stubs.rs *)
  external offheap_stub_copy : 'a handle -> bool -> 'a -> Outcome.t = "offheap_stub_copy"
  external offheap_stub_defers_free : unit -> bool = "offheap_stub_defers_free"
  external offheap_stub_drain : unit -> unit = "offheap_stub_drain"
  external offheap_stub_free : 'a handle -> Outcome.t = "offheap_stub_free"
  external offheap_stub_get : 'a handle -> Obj.t -> Obj.t = "offheap_stub_get" [@@noalloc]
  external offheap_stub_image_info : string -> int array -> bytes -> Outcome.t = "offheap_stub_image_info"
  external offheap_stub_image_load : 'a handle -> alloc -> string -> string -> int -> Outcome.t = "offheap_stub_image_load"
  external offheap_stub_image_owner : int -> alloc = "offheap_stub_image_owner"
  external offheap_stub_image_reseal : bytes -> unit = "offheap_stub_image_reseal"
  external offheap_stub_image_write : string -> string -> bool -> 'a -> Outcome.t = "offheap_stub_image_write"
  external offheap_stub_is_offheap : 'a -> bool = "offheap_stub_is_offheap" [@@noalloc]
  external offheap_stub_malloc : unit -> alloc = "offheap_stub_malloc"
  external offheap_stub_measure : 'a -> int array -> Outcome.t = "offheap_stub_measure"
  external offheap_stub_pending_frees : unit -> int = "offheap_stub_pending_frees"
end
