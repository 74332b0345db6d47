(** Deep copies of OCaml values outside the GC heap.

    Large, long-lived values (indexes, dictionaries, graphs, caches) cost time at every
    major GC cycle: the collector marks and sweeps all of them again and again. [copy]
    moves a deep copy of such a value out of the heap once; the GC never looks at it
    again, and the program frees it explicitly with [free] when done.

    {[
      let index : (string, int list) Hashtbl.t = build_index () in
      let h = Offheap.copy index in
      (* drop [index]: from now on only the off-heap copy is used *)
      let postings = Hashtbl.find (Offheap.get h) "ocaml" in
      ...
      Offheap.free h
    ]}

    {2 What is copied}

    Every block reachable from the value that lives in the OCaml heap (minor or major):
    tuples, records, variants, arrays, strings, floats and float arrays, closures
    (including mutually recursive ones), forced lazy values, objects, exceptions, and
    [Int32], [Int64] and [Nativeint] custom blocks. Sharing and cycles are preserved, and
    the copy takes one allocation of exactly the bytes it needs. Immediates and blocks
    outside the heap (static data, copies already off the heap) are shared, not copied.
    The traversal is iterative: lists of millions of elements and deeply nested trees do
    not grow any stack.

    Polymorphic comparison, [Hashtbl.hash] and [Marshal] work on copies and give the
    same answers as on the original (on OCaml 4 because copies are registered as static
    data in the runtime's page table).

    {2 Rules}

    - A copy must not be mutated to point into the OCaml heap: the GC does not see the
      copy, so it would not keep the pointed-to value alive. Mutating immediates,
      floats, bytes and pointers to other off-heap values is fine.
    - After [free], every reference into the copy is dangling, as after a C [free].
    - No root may still point into a copy when it is freed, nor any block reachable
      from one: the GC reads the blocks that roots point to, and the freed memory may
      be in other hands by then (on OCaml 4, memory handed back to [malloc] may become
      part of the GC heap, and the page table then sends the GC into it). Native code
      drops dead local variables, but bytecode keeps a local in its stack frame until
      the function returns, used or not: there, read [get h] in a function that
      returns before [free h], or use {!with_copy}.
    - A copied exception value carries a copy of its constructor, so it no longer matches
      the original constructor in a [try ... with] (as with [Marshal]).
    - Closures can be copied, and called, only within the same running program: their
      code pointers are those of this executable.
    - On OCaml 5, a value that other domains write while it is copied is copied all the
      same, never refused: the copy is well formed, every block of it is a copy of a
      block reachable during the copy, read once, and each field holds a value that
      field held at some moment during the copy.
    - On OCaml 5 with several domains, [copy] (and [measure], and [Image.write]) of a
      value of more than 1024 blocks stops the other domains for the time of the copy
      (a stop-the-world section, as a minor
      collection is; they would wait for the copy anyway at their next minor
      collection) and copies as fast as with one domain; smaller values are copied
      beside them. The [free] of a copy waits for the end of the running major cycle;
      past a limit (see {!free}), frees ask every domain for a share of the major GC
      work, as memory held by custom blocks does, so that cycles end even beside a
      domain that does no major work of its own (one that allocates only short-lived
      values). No [free] ever finishes a cycle itself.
    - [free] takes the copy from its handle atomically: of several threads or domains
      freeing one handle at once, exactly one succeeds and the others raise. A [get]
      racing with [free] returns the copy or raises; the copy it returned must not be
      used once the [free] has returned, as after any [free].
    - Exceptions raised by signal handlers (a [Sys.catch_break], a SIGALRM timeout) never
      come between a copy and its handle: [copy] either returns a handle that owns the
      copy or raises with nothing allocated, and [free] either frees or does nothing.
    - A panic of the Rust code (a bug) aborts the process with its message; it never
      turns into an OCaml exception. *)

type +'a t
(** A handle to one off-heap copy of a value of type ['a]. Covariant, like the value
    it holds: a [[ `A ] t] is a [[ `A | `B ] t]. A handle takes four words of the GC
    heap; one of a copy made with {!malloc} is an abstract block, which the GC
    neither scans nor marks through, so that handles kept by the million cost the
    collector little. A handle cannot be marshalled or copied ([Marshal] and {!copy}
    raise, as on any abstract value). Handles are not values to compare or hash:
    polymorphic comparison raises on them and [Hashtbl.hash] gives all of those of
    {!malloc} one hash; tell them apart with [==] and key tables by keys of your own.
    Never duplicate one ([Obj.dup], [Weak.get_copy], the [Ephemeron] copy functions):
    the duplicate owns the same copy, and freeing both frees it twice. *)

(** Why a value cannot be copied (or saved in an image): what {!Not_copyable}
    carries. *)
type reason =
  | Abstract  (** an [Abstract_tag] block: C data the runtime cannot look into *)
  | Unforced_lazy  (** a lazy value not forced yet: force it before copying *)
  | Forcing_lazy
      (** a lazy value being forced (OCaml 5): by another domain, or by the computation
          that is copying it (OCaml 4 says [Unforced_lazy] for the latter) *)
  | Continuation  (** a continuation, captured by an effect handler (OCaml 5) *)
  | Closure  (** a closure, in an image (a copy can hold closures, an image cannot) *)
  | Outside_heap
      (** a pointer outside the OCaml heap (C memory, OCaml 4), in an image *)
  | Custom of string
      (** a custom block other than [Int32], [Int64], [Nativeint] and a [Bigarray], with
          the identifier of its operations: ["_chan"] for a channel, ["_mutex"] for a
          [Mutex.t]... *)
  | Bad_bigarray of string
      (** a [Bigarray] block the runtime could not have made (from C code): what is
          wrong with it *)

exception Not_copyable of reason
(** Raised by {!copy}, {!measure}, {!with_copy} and {!Image.write} when the value
    reaches a block that cannot be copied; the value is then exactly as it was and
    nothing is allocated.

    {[
      match Offheap.copy (stdout, 1) with
      | _ -> assert false
      | exception Offheap.Not_copyable (Custom id) -> assert (id = "_chan")
    ]} *)

type alloc
(** An allocator: an [Abstract_tag] block whose field 0 is
    [void *alloc(value allocator, size_t size)] and field 1 is
    [void free(value allocator, void *ptr, size_t size)]; further fields may carry the
    allocator's data. The functions receive the block itself as [allocator], and [free]
    receives the [size] given to [alloc]. They must return word-aligned memory (or
    [NULL]) and must not call into OCaml or allocate on the OCaml heap. See [offheap.h]
    and the README for writing one in C; allocators written for the original C library
    of the same name work unchanged. *)

val malloc : alloc
(** The default allocator: copies of up to 8 KiB take slots of their size class in
    2 MiB regions that are registered with the runtime once (on OCaml 4) and kept for
    later small copies; larger ones [malloc] and [free], and copies of 4 MiB and more a
    private mapping backed by huge pages, which saves a page fault per 4 KiB.

    {[
      let h = Offheap.copy ~alloc:Offheap.malloc (Array.init 1000 string_of_int) in
      assert ((Offheap.get h).(999) = "999");
      Offheap.free h
    ]}

    A value, not a function: it raises nothing. {!copy} raises [Out_of_memory] when it
    cannot allocate. *)

val copy : ?alloc:alloc -> 'a -> 'a t
(** [copy ?alloc v] makes a deep copy of [v] outside the OCaml heap, in one allocation
    from [alloc] (default {!malloc}). [v] itself is unchanged and stays usable.

    {[
      let h = Offheap.copy [ 1; 2; 3 ] in
      assert (Offheap.get h = [ 1; 2; 3 ])
    ]}

    @raise Not_copyable when a block that cannot be copied is reachable from [v],
    with the {!reason}: an abstract block, a custom block other than [Int32], [Int64],
    [Nativeint] and Bigarrays (for example a channel), an unforced lazy value (force it
    first), or on OCaml 5 a continuation or a lazy value being forced (by another
    domain, or by the computation that copies it). A Bigarray is copied with its data (see {!section-bigarrays}). [v] is left
    exactly as it was and nothing is allocated.
    @raise Invalid_argument when the allocator returns memory that is not word aligned.
    @raise Out_of_memory when the allocator returns [NULL], or the traversal cannot get
    memory for its own queue and tables; [v] is left as it was and nothing stays
    allocated. *)

val get : 'a t -> 'a
(** [get h] is the off-heap copy. It is an ordinary value of type ['a]: read it, pass it
    around, compare it, hash it. When nothing was copied ([v] was an immediate or
    outside the heap), it is [v] itself.

    {[
      let h = Offheap.copy "hello" in
      assert (String.length (Offheap.get h) = 5)
    ]}

    @raise Invalid_argument ["Offheap.get: deleted"] after {!free}. *)

val free : 'a t -> unit
(** [free h] releases the copy. [get h] raises from now on, and every reference into
    the copy must be dead. On OCaml 4 the memory goes back to the allocator at once,
    unless the major GC is marking: then once that marking has ended; on OCaml 5 once
    the major GC cycle running at the time of [free] has finished. Until then the GC
    may still scan blocks that pointed into the copy when it reached them (dead since),
    and the memory, handed back, could have become part of the GC heap (OCaml 4) or be
    anything (OCaml 5). Pending frees are handed back at the end of later major cycles
    (OCaml 4: of the marking) and at the next [copy] or [free]. A copy whose value no
    [get] (or [with_copy]) ever returned goes back at once when no other domain runs
    (OCaml 4: always), and beside other domains after two minor collections if it is
    a copy of under 4 MiB made with {!malloc}: nothing but its handle pointed into
    it (a thread holds at most 4 MiB so, given back at its next [copy] or [free] or at
    its end; past that, such copies wait as others do). On OCaml 5, a copy of
    4 MiB or more made with {!malloc}, a region's chunks and a loaded image give their
    pages back to the system at the [free] itself once what waits passes a limit
    (8 MiB, or more on a larger heap): only their address range waits then.

    {[
      let h = Offheap.copy (Array.make 10 "x") in
      Offheap.free h;
      assert (try ignore (Offheap.get h); false with Invalid_argument _ -> true)
    ]}

    @raise Invalid_argument ["Offheap.free: deleted"] when [h] was freed already.
    @raise Out_of_memory on OCaml 5 when there is no memory to queue the free; [h] is
    then still live, and may be freed again later. *)

val delete : 'a t -> unit
  [@@ocaml.deprecated "Use Offheap.free."]
(** [delete] is {!free}, under the name of the original C library.

    {[
      let h = Offheap.copy "written for the C library" in
      (Offheap.delete [@alert "-deprecated"]) h
    ]}

    @raise Invalid_argument ["Offheap.free: deleted"] when the copy was freed already. *)

(** {1:bigarrays Bigarrays}

    A Bigarray is copied with its data, into the same allocation as the rest of the
    copy: the data after the blocks, starting on a 64-byte boundary. Every kind and
    layout, 0 to 16 dimensions, arrays made by [Unix.map_file] and sub-arrays and slices
    are copied; Bigarrays that share data in the source ([sub], [slice], [reshape],
    [change_layout], the same array twice) share it in the copy, so a [set] through one
    is seen through the others. The copy's data is unmanaged ([CAML_BA_EXTERNAL], no
    proxy): only {!free} releases it, with the rest of the copy. The source is untouched
    and stays its owner's. [get], [set], [blit], [sub], [slice], [dim], [kind],
    [layout], compare, [Hashtbl.hash], [Marshal] and the C API ([Caml_ba_data_val]) work
    on the copy; a sub-array or slice made from the copy shares its data and must not
    be used after {!free}, like any value read from it. {!val-stats} and {!val-measure} count the data. Images
    hold Bigarrays too, their data inside the file, used in place when loaded.

    {[
      let a = Bigarray.Array1.init Bigarray.float64 Bigarray.c_layout 4 float_of_int in
      let h = Offheap.copy (a, Bigarray.Array1.sub a 1 2) in
      let c, s = Offheap.get h in
      Bigarray.Array1.set s 0 10.;
      assert (Bigarray.Array1.get c 1 = 10. && Bigarray.Array1.get a 1 = 1.);
      Offheap.free h
    ]} *)

type stats = {
  bytes : int;  (** size of the copy's allocation; 0 when nothing was copied *)
  blocks : int;  (** blocks copied, and one data block per run of Bigarray data *)
  transient_bytes : int;
      (** peak memory the traversal used besides the copy (its queue and tables); 0
          for a value of a few blocks, copied through a buffer on the stack *)
}
(** What a copy cost. *)

val stats : 'a t -> stats
(** [stats h] describes the copy behind [h]; still available after {!free}.

    {[
      let h = Offheap.copy (1, 2) in
      assert ((Offheap.stats h).bytes = 24);
      Offheap.free h;
      assert ((Offheap.stats h).blocks = 1)
    ]}

    Raises nothing, also after {!free}. *)

val measure : 'a -> stats
(** [measure v] is what [copy v] would take, without copying: the bytes of the copy's
    allocation, its blocks, and the traversal's peak memory besides the copy. It runs
    the first pass of {!copy} alone: [v] is left as it was, and nothing is allocated
    but the traversal's own tables, freed on return (except the 1.3 MiB of buffers in
    which each thread walks values of 33 to 16384 blocks, kept for its next copies).
    The answer is that of the thread's next [copy v]. Use it to decide whether a copy
    fits, or to size an allocator (an arena) before copying.

    {[
      let l = List.init 3 Fun.id in
      let s = Offheap.measure l in
      assert (s.bytes = 3 * 3 * (Sys.word_size / 8) && s.blocks = 3);
      let h = Offheap.copy l in
      assert ((Offheap.stats h).bytes = s.bytes);
      Offheap.free h
    ]}

    @raise Not_copyable as {!copy} does, for the same values.
    @raise Out_of_memory when the traversal cannot get memory for its queue and
    tables. *)

val is_offheap : 'a -> bool
(** [is_offheap v] tells whether [v] is a block outside the GC heap: a copy (a part of
    one, or its root), a loaded image's value, or static data (constants the compiler
    laid out, such as a string literal in native code). Immediates ([int], [char],
    constant constructors) are not blocks: [false]. Copies and static data cannot be
    told apart: on OCaml 4 both are registered as static data in the runtime's page
    table (which also says [true] for a pointer to C memory); on OCaml 5 both have
    headers of the color the GC never marks ([NOT_MARKABLE]). A freed copy's pointer
    must not be asked about (its memory may be reused).

    {[
      let v = Array.make 3 "x" in
      assert (not (Offheap.is_offheap v));
      let h = Offheap.copy v in
      assert (Offheap.is_offheap (Offheap.get h));
      assert (Offheap.is_offheap (Offheap.get h).(0));
      Offheap.free h
    ]}

    Raises nothing. *)

val with_copy : ?alloc:alloc -> 'a -> ('a -> 'b) -> 'b
(** [with_copy ?alloc v f] copies [v] (as [copy ?alloc v]), calls [f] on the copy and
    frees it when [f] returns or raises, then returns [f]'s result or re-raises its
    exception (with its backtrace, [Out_of_memory] without: on OCaml 5.3 restoring a
    backtrace needs memory). The result, and an exception [f] raises, must not
    hold on to the copy or any part of it: they would dangle after the free. Copy out
    what must outlive the call (with [String.sub], [Array.copy], a fresh record...).

    This is also the safe pattern for the bytecode rule of {!free} (see the Rules
    above): the copy is passed straight to [f] and is in no local variable of
    [with_copy] when it frees it.

    {[
      let n = Offheap.with_copy (List.init 100 string_of_int) List.length in
      assert (n = 100)
    ]}

    @raise Not_copyable, Invalid_argument and Out_of_memory as {!copy}, before [f] is
    called; whatever [f] raises, after the copy is freed. *)

(**/**)

val pending_frees : unit -> int
(** Frees waiting for the end of a major cycle (OCaml 4: of its marking). For tests. *)

(**/**)

(** {1 Images}

    An image is a value saved to a file by {!Image.write} and loaded back by
    {!Image.load}: no deserialization, a handle like any other copy's. By default the
    payload is read into private memory, so later changes to the file cannot affect the
    loaded value; with [~share:true] the file is mapped and its pages are shared by
    every process that loads it (the file must then not be modified in place or
    truncated while loaded; replacing it by rename is safe). Loaded at the address it
    was written for, an image needs no relocation. Every image is checked before its
    value is handed out: the loader, the GC, compare, hash and Marshal never crash on a
    bad file, checksums catch damage and keys catch schema changes; a forged file can
    still hold a value of the wrong type, as with [Marshal].

    {[
      (* once *)
      Offheap.Image.write ~key:"index v3" "index.img" index;
      (* in every worker *)
      let h = Offheap.Image.load ~key:"index v3" "index.img" in
      let index : (string, int list) Hashtbl.t = Offheap.get h in
      ...
    ]} *)

module Image : Image.S with type 'a handle := 'a t

(** {1 Regions}

    A region is one off-heap area that values are added to one at a time, each add
    copying only what is on the GC heap: a large structure can be built off the heap
    batch by batch, without ever being whole on the heap. The region grows in chunks
    that never move, shares what it holds already, is freed all at once, and saves as
    one image with named roots.

    {[
      let r = Offheap.Region.create () in
      let index = ref (Offheap.Region.add r StringMap.empty) in
      List.iter (fun batch ->
          (* only the new paths of the map are copied *)
          index := Offheap.Region.add r (add_batch batch !index))
        batches;
      Offheap.Region.write_image ~key:"index v1" "index.img" r
        [ ("index", Obj.repr !index) ];
      Offheap.Region.free r
    ]} *)

module Region : Region.S with type alloc := alloc
