(* The docstring check of `make test-doc`, run as a script by the OCaml toplevel:

     ocaml tests/packaging/check_doc.ml lib/offheap.mli [EXAMPLES.ml]

   Parses the interface with the compiler's own parser (compiler-libs) and fails when
   - a documentation comment is attached to nothing (warning 50, unexpected docstring,
     here an error): it would silently be missing from the generated documentation;
   - a value has no documentation comment, or one without an example ({[ ... ]});
   - a function documents no exception: it needs @raise, or the words "Raises nothing"
     when it raises none.
   Values after a stop comment (**/**) are hidden from the documentation and not
   checked. The whole file is checked, nested modules included.

   With a second argument, writes the examples of the values there, each as a toplevel
   phrase [let _ = begin ... end;;], for the toplevel test to run (tests/packaging/
   install.sh), so that the examples keep compiling and their assertions keep holding. *)

#directory "+compiler-libs"

#load "ocamlcommon.cma"

open Parsetree

let path, examples_file =
  match Sys.argv with
  | [| _; path |] -> (path, None)
  | [| _; path; examples |] -> (path, Some examples)
  | _ ->
      prerr_endline "usage: ocaml check_doc.ml FILE.mli [EXAMPLES.ml]";
      exit 2

let errors = ref 0

let error loc fmt =
  incr errors;
  Format.eprintf ("%a:@ " ^^ fmt ^^ "@.") Location.print_loc loc

let contains s sub =
  let n = String.length s and m = String.length sub in
  let rec at i = i + m <= n && (String.sub s i m = sub || at (i + 1)) in
  at 0

(* The source text, for the documentation comments: an [ocaml.doc] attribute's location
   is its comment's, which is read back from the file (this works with the parse trees
   of every OCaml version, unlike the payload's string constant). *)
let source =
  let ic = open_in_bin path in
  let s = really_input_string ic (in_channel_length ic) in
  close_in ic;
  s

let comment_text (a : attribute) =
  let start = a.attr_loc.loc_start.pos_cnum and stop = a.attr_loc.loc_end.pos_cnum in
  let raw = String.sub source start (stop - start) in
  let n = String.length raw in
  if n >= 5 && String.sub raw 0 3 = "(**" && String.sub raw (n - 2) 2 = "*)" then
    String.sub raw 3 (n - 5)
  else raw

let doc_of attrs =
  List.find_map
    (fun a ->
      match a.attr_name.txt with "ocaml.doc" | "doc" -> Some (comment_text a) | _ -> None)
    attrs

let rec is_function t =
  match t.ptyp_desc with
  | Ptyp_arrow _ -> true
  | Ptyp_poly (_, t) -> is_function t
  | _ -> false

(* (**/**) toggles between documented and hidden items. *)
let is_stop item =
  match item.psig_desc with
  | Psig_attribute a -> a.attr_name.txt = "ocaml.text" && String.trim (comment_text a) = "/*"
  | _ -> false

let checked = ref 0

(* The code of every {[ ... ]} in a comment, with the value's name. *)
let examples = ref []

let rec collect_examples name doc from =
  let find sub from =
    let n = String.length doc and m = String.length sub in
    let rec at i = if i + m > n then None else if String.sub doc i m = sub then Some i else at (i + 1) in
    at from
  in
  match find "{[" from with
  | None -> ()
  | Some i -> (
      match find "]}" (i + 2) with
      | None -> ()
      | Some j ->
          examples := (name, String.sub doc (i + 2) (j - i - 2)) :: !examples;
          collect_examples name doc (j + 2))

let check_value (v : value_description) =
  incr checked;
  let name = v.pval_name.txt in
  match doc_of v.pval_attributes with
  | None -> error v.pval_loc "val %s has no documentation comment" name
  | Some doc ->
      collect_examples name doc 0;
      if not (contains doc "{[") then
        error v.pval_loc "val %s: its documentation has no example ({[ ... ]})" name;
      if is_function v.pval_type
         && not (contains doc "@raise" || contains doc "Raises nothing")
      then
        error v.pval_loc
          "val %s: its documentation names no exception (@raise, or \"Raises nothing\")"
          name

let rec check_signature items =
  ignore
    (List.fold_left
       (fun hidden item ->
         if is_stop item then not hidden
         else (
           if not hidden then check_item item;
           hidden))
       false items)

and check_item item =
  match item.psig_desc with
  | Psig_value v -> check_value v
  | Psig_module { pmd_type; _ } -> check_module_type pmd_type
  | Psig_recmodule ms -> List.iter (fun m -> check_module_type m.pmd_type) ms
  | Psig_modtype { pmtd_type = Some mt; _ } -> check_module_type mt
  | _ -> ()

and check_module_type mt =
  match mt.pmty_desc with
  | Pmty_signature items -> check_signature items
  | Pmty_functor (_, mt) -> check_module_type mt
  | _ -> ()

let () =
  (* Warning 50 as an error: the parser reports unattached docstrings itself. *)
  ignore (Warnings.parse_options false "+50");
  ignore (Warnings.parse_options true "+50");
  let lexbuf = Lexing.from_string source in
  Location.init lexbuf path;
  (match Parse.interface lexbuf with
  | items -> check_signature items
  | exception e ->
      Location.report_exception Format.err_formatter e;
      exit 1);
  (match Warnings.check_fatal () with
  | () -> ()
  | exception Warnings.Errors -> incr errors);
  Option.iter
    (fun file ->
      let oc = open_out_bin file in
      List.iter
        (fun (name, code) ->
          Printf.fprintf oc "(* the example of %s *)\nlet _ = begin%send;;\n\n" name code)
        (List.rev !examples);
      close_out oc)
    examples_file;
  if !errors > 0 then (
    Format.eprintf "%s: %d documentation error(s)@." path !errors;
    exit 1);
  Printf.printf "%s: %d documented values, each with an example and its exceptions\n"
    path !checked
