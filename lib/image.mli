(** Images: a value saved to a file, mapped back without deserializing.

    This module is exposed as {!Offheap.Image}; see there. It is a functor only because
    the handle type lives in [Offheap], which exposes this module. *)

exception Invalid_image of string
(** Raised by [load] for a file that is not a sound image for this program. The
    message names the file and the check that failed, for example
    ["Offheap.Image.load: index.img: bad image: payload checksum: the payload is damaged"]. *)

(** What [Offheap] gives the functor. *)
module type HANDLE = sig
  type 'a t
  type alloc

  val make : root:Obj.t -> base:int -> bytes:int -> blocks:int -> alloc:alloc -> 'a t
  (** A live handle to a payload at [base] of [bytes] bytes, released through [alloc]. *)

  val alloc_of : 'a t -> alloc
end

module type S = sig
  type 'a handle

  exception Invalid_image of string
  (** The same as {!Image.Invalid_image}: a file that is not a sound image for this
      program. The message names the file and the check that failed ([magic],
      [format version], [word size], [byte order], [OCaml version], [flat float arrays],
      [header checksum], [header], [root], [key], [file size], [payload checksum],
      [block header], [block size], [tag], [string padding], [custom block], [pointer],
      [fix-up table], [block count]). *)

  val write : ?key:string -> string -> 'a -> unit
  (** [write ?key path v] saves a deep copy of [v] in the file [path]: everything [v]
      reaches, static data included, so the image stands on its own. The file is
      written under a temporary name in the same directory and renamed to [path] once
      complete: [path] is never a partial image, and a failure leaves nothing behind
      (an earlier file at [path] stays as it was). The file is not synced to disk.

      [key] (default [""], at most 4008 bytes) is stored in the image; [load] refuses
      an image whose key differs from the one it is given. Use it to tag the type or
      schema of [v], so that a program whose type changed does not load an old image.

      {[
        Offheap.Image.write ~key:"index v3" "index.img" index
      ]}

      @raise Invalid_argument when [v] reaches something an image cannot hold, with a
      message naming it: a closure (code pointers belong to one running program, and
      objects hold closures), an abstract block, a custom block other than [Int32],
      [Int64] and [Nativeint] (a [Bigarray], a channel, a mutex), an unforced lazy
      value, a pointer outside the OCaml heap; or when [key] is too long.
      @raise Sys_error when the file cannot be written.
      @raise Out_of_memory when there is no memory for the copy. *)

  val load : ?key:string -> ?verify:bool -> ?trusted:bool -> string -> 'a handle
  (** [load ?key ?verify ?trusted path] maps the image in [path] and returns a handle
      to its value, used like one from {!Offheap.copy}: {!Offheap.get} reads it, and
      {!Offheap.free} unmaps it (on OCaml 5 once the running major cycle has ended, as
      for every copy).

      The payload is mapped at the address it was written for when that address is
      free in this process: nothing is read or rewritten, pages are read from the page
      cache when first touched and shared with every other process that maps the same
      file. When the address is taken (the same image loaded twice, or something else
      there), the payload is read into private memory elsewhere and every pointer in it
      relocated. [Int32], [Int64] and [Nativeint] blocks get this program's operations
      back either way (the pages holding them become private).

      Before anything is returned the image is checked: its header (format, word size,
      byte order, OCaml version family, flat float arrays, sizes, [key]), the checksum
      of its payload, and its structure: blocks tile the payload exactly, every pointer
      leads to a block of the payload, tags and sizes are ones an image holds, string
      padding is consistent. [~verify:false] (default [true]) skips the checksum only;
      [~trusted:true] (default [false]) also skips the structural checks when the
      payload is mapped at its recorded address (they always run on a relocated
      payload). With both, a load costs a few system calls whatever the size of the
      image, and a damaged file is undefined behaviour.

      The type ['a] is the caller's promise, as with [Marshal]: nothing in the file
      says which OCaml type it holds. The key is the guard against loading an image of
      another type.

      {[
        let h : (string, int list) Hashtbl.t Offheap.t =
          Offheap.Image.load ~key:"index v3" "index.img"
        in
        let postings = Hashtbl.find (Offheap.get h) "ocaml" in
        ...
      ]}

      @raise Invalid_image when the file fails a check.
      @raise Sys_error when the file cannot be opened or read.
      @raise Out_of_memory when there is no memory for a relocated payload. *)

  (**/**)

  val load_relocated : ?key:string -> ?verify:bool -> string -> 'a handle
  (** [load] that never maps at the recorded address (tests and benchmarks). *)

  val relocated : 'a handle -> bool
  (** Whether the payload behind the handle was relocated. *)
end

module Make (H : HANDLE) : S with type 'a handle = 'a H.t
