(** Images: a value saved to a file, mapped back without deserializing.

    This module is exposed as {!Offheap.Image}; see there. It is a functor only because
    the handle type lives in [Offheap], which exposes this module. *)

(** Which check an image failed: see {!S.check}. *)
type check =
  | Not_an_image
  | Format_version
  | Word_size
  | Byte_order
  | Ocaml_family
  | Flat_float_arrays
  | Key_mismatch
  | Truncated
  | Damaged_header
  | Bad_header
  | Damaged_payload
  | Bad_structure

exception Invalid_image of check * string
(** Raised for a file that is not a sound image for this program: see
    {!S.Invalid_image}. *)

(** The header of an image: see {!S.val-info}. *)
type info = {
  format_version : int;
  ocaml_family : int;
  flat_float_array : bool;
  word_bytes : int;
  address : int;
  payload_bytes : int;
  blocks : int;
  custom_blocks : int;
  file_bytes : int;
  key : string;
}

(** What [Offheap] gives the functor. *)
module type HANDLE = sig
  type 'a t
  type alloc

  val fresh : alloc -> 'a t
  (** A handle that owns nothing yet, with allocator [alloc], for the load stub to
      fill (src/handle.rs): it then owns the payload and the word past it. *)

  val alloc_of : 'a t -> alloc
end

module type S = sig
  type 'a handle

  (** Which check a file failed, so that a program can tell "rebuild the image" (the
      program changed: [Key_mismatch], [Ocaml_family], [Flat_float_arrays],
      [Format_version]) from "the file is corrupt" ([Truncated], [Damaged_header],
      [Damaged_payload], [Bad_header], [Bad_structure]) with one match. *)
  type nonrec check = check =
    | Not_an_image  (** no image magic: not written by {!write} *)
    | Format_version  (** written by a version of offheap with another image format *)
    | Word_size  (** written on a machine with another word size *)
    | Byte_order  (** written on a machine with another byte order *)
    | Ocaml_family  (** written by OCaml 4 and loaded by OCaml 5, or the reverse *)
    | Flat_float_arrays
        (** written by a program whose float arrays are flat and loaded by one whose are
            not ([-no-flat-float-array]), or the reverse *)
    | Key_mismatch  (** written with another [~key] than the one [load] was given *)
    | Truncated  (** the file is shorter (or longer) than its header says *)
    | Damaged_header
        (** the checksum of the header page, or of the tables that follow the payload
            (fix-up table, chunk index), does not match: a damaged header or tables *)
    | Bad_header
        (** header fields that contradict each other (sizes, address, root), with a
            valid checksum: a forged header *)
    | Damaged_payload  (** the payload's checksum does not match: a damaged payload *)
    | Bad_structure
        (** the payload's blocks are not well formed (block headers and sizes, tags,
            string padding, pointers, the custom blocks' table, the chunk index, a
            forward cycle): a forged file, or one damaged with [~verify:false] *)

  exception Invalid_image of check * string
  (** The same as {!Image.Invalid_image}: a file that is not a sound image for this
      program: which check failed, and a message naming the file and the check, for
      example
      ["Offheap.Image.load: index.img: bad image: payload checksum: the payload is damaged"].

      {[
        match Offheap.Image.load ~key:"index v3" "index.img" with
        | h -> use h
        | exception Offheap.Image.Invalid_image
            ((Key_mismatch | Ocaml_family | Flat_float_arrays | Format_version), _) ->
            rebuild_index ()
      ]} *)

  (** What {!val-info} reads from an image's header. *)
  type nonrec info = info = {
    format_version : int;  (** the image format's version *)
    ocaml_family : int;  (** the OCaml major version that wrote it: 4 or 5 *)
    flat_float_array : bool;  (** whether the writer had flat float arrays *)
    word_bytes : int;  (** the writer's word size in bytes *)
    address : int;  (** the address the payload was written for *)
    payload_bytes : int;  (** the payload's size: what a load holds in memory *)
    blocks : int;  (** blocks in the payload *)
    custom_blocks : int;
        (** custom blocks in the payload: [Int32], [Int64], [Nativeint] and Bigarrays *)
    file_bytes : int;  (** the size of the whole file the header describes *)
    key : string;  (** the key the image was written with *)
  }

  val write : ?key:string -> string -> 'a -> unit
  (** [write ?key path v] saves a deep copy of [v] in the file [path]: everything [v]
      reaches, static data included, so the image stands on its own. The file is
      written to a temporary file in the same directory (an unnamed [O_TMPFILE] where
      the file system has them, else a fresh random name) and renamed to [path] once
      complete: [path] is never a partial image, and a failure leaves nothing behind
      (an earlier file at [path] stays as it was). Any legal file name works. A file
      replaced keeps its permissions (a new one gets [0o666] less the umask). When
      [path] is a symbolic link, its target is written (created if the link dangles),
      the link stays. The file is not synced to disk. The file is written as the copy
      is made, through two buffers of 8 MiB (a thread of the writer's own writes one
      to the file while the copy fills the other): writing needs no copy of [v] in
      memory, nor
      tables that grow with it (the traversal's queue, 8 bytes a block, and the table
      of custom blocks go to unnamed files in the same directory, of which the process
      holds a few MiB at a time; where the file system has no [O_TMPFILE] or no room,
      they stay in memory). A payload of 32 MiB or more starts 2 MiB into the file,
      after zeros, so that [~share:true] maps it with huge pages where the file system
      caches the file in them.
      Other OCaml threads wait meanwhile (the copy reads the heap); on OCaml 5, other
      domains wait for the write of a value of more than 1024 blocks as they wait for
      a {!Offheap.copy} of it (the world is stopped).

      [key] (default [""], at most 3992 bytes) is stored in the image; [load] refuses
      an image whose key differs from the one it is given. Use it to tag the type or
      schema of [v], so that a program whose type changed does not load an old image.

      {[
        Offheap.Image.write ~key:"index v3" "index.img" index
      ]}

      @raise Offheap.Not_copyable when [v] reaches something an image cannot hold:
      [Closure] (code pointers belong to one running program, and objects hold
      closures), [Abstract], [Custom id] for a custom block other than [Int32], [Int64],
      [Nativeint] and Bigarrays (a channel, a mutex), [Unforced_lazy], [Outside_heap]
      for a pointer outside the OCaml heap (OCaml 4); or any other reason
      {!Offheap.copy} gives.
      @raise Invalid_argument when [key] is too long.
      @raise Sys_error when the file cannot be written (a directory at [path]: "Is a
      directory"), or [path] (or the target of its link) is a FIFO, a socket or a
      device ("not a regular file": never replaced).
      @raise Out_of_memory when there is no memory for the copy. *)

  val load :
    ?key:string ->
    ?verify:bool ->
    ?trusted:bool ->
    ?share:bool ->
    ?threads:int ->
    string ->
    'a handle
  (** [load ?key ?verify ?trusted ?share ?threads path] loads the image in [path] and returns a
      handle to its value, used like one from {!Offheap.copy}: {!Offheap.get} reads it,
      and {!Offheap.free} releases it (on OCaml 5 once the running major cycle has
      ended, as for every copy).

      By default the payload is read into private memory of this process, at the
      address it was written for when that address is free here, else elsewhere with
      every pointer relocated. The loaded value is then independent of the file:
      rewriting the file in place, truncating it, replacing or deleting it after [load]
      changes nothing in the value and cannot make reading it fault.

      [~share:true] (default [false]) maps the file instead: a load reads only what the
      checks read, pages come from the page cache when first touched and are shared
      with every other process that maps the same file, so that N processes hold one
      copy of the data. What this does not protect against: pages not yet written
      (relocation and the [Int32], [Int64] and [Nativeint] fix-ups write some) still
      read the file, so {b the file must not be modified in place or truncated while the
      value is loaded}: a value of another shape or a crash (SIGBUS, SIGSEGV) would
      follow. Writing [cp new.img index.img] modifies in place. Replacing the file by a
      rename (what {!write} does, or [mv]) and deleting it are safe: the mapping keeps
      the old file. A shared load that must relocate (its address is taken here, say by
      an earlier load of the same image) writes every pointer, which makes the pages
      holding pointers private: when the payload is made of small blocks it is read
      instead (into huge pages, faster than copying each page at its first write), and
      only the MiB chunks of raw blocks (long strings, float arrays, Bigarray data) are
      mapped back from the file and shared.

      A path that is not a regular file (a directory, a FIFO, a device) is refused with
      [Sys_error] ("not a regular file"), without blocking.

      Before anything is returned the image is checked: its header (format, word size,
      byte order, OCaml version family, flat float arrays, sizes, the address range,
      [key]), the checksum of its payload, and its structure: blocks tile the payload
      exactly, every pointer leads to a block of the payload, tags are ones an image
      holds and each block is at least as large as its tag requires, string padding is
      consistent, no forward block leads back to itself, every Bigarray has a kind,
      layout, dimensions and flags the runtime makes and its data lies inside a data
      block of the payload (Bigarrays are usable at once, their data used in place).
      [~verify:false] (default [true]) skips the checksum only; [~trusted:true] (default [false]) also skips the
      structural checks when the payload is at its recorded address (they always run
      on a relocated payload). With both, a shared load costs a few system calls
      whatever the size of the image, and a damaged file is undefined behaviour.

      The checks and the relocation run on [~threads] threads (default [0]: one per
      core the process may run on; at most 64), chunk by chunk (the image holds a checksum and the first block of every
      MiB of payload), without the runtime lock: other OCaml threads run meanwhile.
      The result and the error reported are the same whatever the number of threads; a
      damaged chunk is named ("payload checksum: chunk 3 (bytes 3145728 to 4194304) is
      damaged"). Images of an older format version are refused, naming both versions
      (write them again).

      What is guaranteed for a file that is damaged or forged, without [~trusted:true]:
      [load] either refuses it with [Invalid_image] or returns a well-formed value, so
      that the loader, the GC, polymorphic compare, [Hashtbl.hash] and [Marshal] never
      crash on it. The checksum catches accidental damage (a bit flip, a truncated or
      overwritten part). The key catches a schema change between writer and reader. A
      forged file, with its checksums recomputed, can still hold a well-formed value of
      another shape than the type ['a] the caller expects, and break the type promise
      as a forged [Marshal] string does: the program may then crash where it uses the
      value at that type. Load images from trusted sources only.

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
      @raise Sys_error when the file cannot be opened or read, or is not a regular file.
      @raise Out_of_memory when there is no memory for the payload.
      @raise Invalid_argument when [threads] is negative. *)

  val info : string -> info
  (** [info path] reads the header of the image in [path], without reading, mapping or
      checking its payload, and without the checks that depend on the loading program
      (key, OCaml family, float arrays): only the header's own (magic, format version,
      word size, byte order, header checksum, consistent sizes). It costs one read of
      one page.

      {[
        let i = Offheap.Image.info "index.img" in
        if i.key <> "index v3" then rebuild_index ()
        else Printf.printf "%d bytes in %d blocks\n" i.payload_bytes i.blocks
      ]}

      @raise Invalid_image when the header fails one of its checks ([Not_an_image],
      [Format_version], [Word_size], [Byte_order], [Damaged_header], [Bad_header],
      [Truncated] for a file shorter than a header).
      @raise Sys_error when the file cannot be opened or read, or is not a regular file. *)

  (**/**)

  val load_relocated :
    ?key:string -> ?verify:bool -> ?share:bool -> ?threads:int -> string -> 'a handle
  (** [load] that never loads at the recorded address (tests and benchmarks). *)

  val relocated : 'a handle -> bool
  (** Whether the payload behind the handle was relocated. *)

  val reseal_header : bytes -> unit
  (** Recomputes the header checksum of an image held in memory (tests that forge
      headers). *)
end

module Make (H : HANDLE) : S with type 'a handle = 'a H.t
