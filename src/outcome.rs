//! The one way every stub reports how it went: a value of the OCaml type
//! `Outcome.t` (`lib/outcome.ml`), built by [`StubOutcome::into_value`].
//!
//! Successes and the out-of-memory error are immediates, so that they allocate nothing
//! on the OCaml heap: `Done` (0), `No_memory` (1). Other errors are blocks that carry
//! what the OCaml side needs to raise the right exception: `Cannot_copy of reason` (tag
//! 0, `Not_copyable`), `Misuse of string` (tag 1, `Invalid_argument`), `System of
//! string` (tag 2, `Sys_error`), `Bad_image of check * string` (tag 3,
//! `Invalid_image`). The one success that is a block, `Done_slice of int` (tag 4: freed,
//! and the OCaml side should run a major slice of so many words), comes only from a
//! free that left many bytes waiting for the end of the major cycle (OCaml 5). One
//! OCaml function, `Outcome.fail`, turns an error into its exception. A stub whose
//! results are more than success (a copy, a loaded image, a header's fields) writes
//! them into values the OCaml side allocated before the call.

use std::borrow::Cow;

use ocaml_sys::{caml_alloc_initialized_string, caml_alloc_small};

use crate::bigarray::BadBigarray;
use crate::copy::CopyError;
use crate::image::CheckKind;
use crate::layout::{val_int, Word};
use crate::message;

/// Why a value cannot be copied or saved: the OCaml type `Outcome.reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `Abstract` (0).
    Abstract,
    /// `Unforced_lazy` (1).
    UnforcedLazy,
    /// `Forcing_lazy` (2).
    ForcingLazy,
    /// `Continuation` (3).
    Continuation,
    /// `Closure` (4): images only.
    Closure,
    /// `Outside_heap` (5): images only.
    OutsideHeap,
    /// `Custom of string` (tag 0): the custom operations' identifier.
    Custom(String),
    /// `Bad_bigarray of string` (tag 1): a Bigarray block the runtime could not have
    /// made; what is wrong with it.
    BadBigarray(BadBigarray),
}

/// How a stub went: the OCaml type `Outcome.t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StubOutcome {
    /// `Done`.
    Done,
    /// `Done_slice`: freed, and earlier frees owe so much GC work that the OCaml side
    /// should run a major slice of this many words (OCaml 5: see `release.rs`).
    DoneSlice(usize),
    /// `No_memory`: raise `Out_of_memory`.
    NoMemory,
    /// `Cannot_copy`: raise `Offheap.Not_copyable`.
    CannotCopy(Reason),
    /// `Misuse`: raise `Invalid_argument` with this message (a fixed one allocates
    /// nothing).
    Misuse(Cow<'static, str>),
    /// `System`: raise `Sys_error` with this message.
    System(String),
    /// `Bad_image`: raise `Offheap.Image.Invalid_image` with the check and message.
    BadImage(CheckKind, String),
}

impl From<CopyError> for StubOutcome {
    fn from(e: CopyError) -> StubOutcome {
        StubOutcome::of_copy_error(e, "Offheap.copy")
    }
}

impl StubOutcome {
    /// The outcome of the copy error `e` of the operation `op` (its name in the message
    /// of a misuse).
    pub fn of_copy_error(e: CopyError, op: &str) -> StubOutcome {
        match e {
            CopyError::Abstract => StubOutcome::CannotCopy(Reason::Abstract),
            CopyError::Custom(name) => StubOutcome::CannotCopy(Reason::Custom(name)),
            CopyError::Bigarray(what) => StubOutcome::CannotCopy(Reason::BadBigarray(what)),
            CopyError::UnforcedLazy => StubOutcome::CannotCopy(Reason::UnforcedLazy),
            CopyError::ForcingLazy => StubOutcome::CannotCopy(Reason::ForcingLazy),
            CopyError::Continuation => StubOutcome::CannotCopy(Reason::Continuation),
            CopyError::OutOfMemory(_) => StubOutcome::NoMemory,
            e @ CopyError::Misaligned => StubOutcome::misuse(format_args!("{op}: {}", e.what())),
        }
    }
}

/// A tree of OCaml values to allocate: what an error block is made of.
enum Node<'a> {
    Int(isize),
    Str(Cow<'a, str>),
    Block(u8, Vec<Node<'a>>),
}

/// A block of tag `tag` and `children`; `None` when there is no memory for its list
/// (`vec!` would abort).
fn block<const N: usize>(tag: u8, children: [Node<'_>; N]) -> Option<Node<'_>> {
    let mut v = Vec::new();
    v.try_reserve_exact(N).ok()?;
    v.extend(children);
    Some(Node::Block(tag, v))
}

impl Reason {
    fn node(&self) -> Option<Node<'_>> {
        Some(match self {
            Reason::Abstract => Node::Int(0),
            Reason::UnforcedLazy => Node::Int(1),
            Reason::ForcingLazy => Node::Int(2),
            Reason::Continuation => Node::Int(3),
            Reason::Closure => Node::Int(4),
            Reason::OutsideHeap => Node::Int(5),
            Reason::Custom(name) => block(0, [Node::Str(Cow::Borrowed(name))])?,
            Reason::BadBigarray(what) => block(
                1,
                [Node::Str(Cow::Owned(message::try_format(format_args!(
                    "{what}"
                ))?))],
            )?,
        })
    }
}

impl StubOutcome {
    /// [`StubOutcome::Misuse`] with the message `args`, or [`StubOutcome::NoMemory`] when
    /// there is no memory to format it.
    pub fn misuse(args: std::fmt::Arguments<'_>) -> StubOutcome {
        message::try_format(args).map_or(StubOutcome::NoMemory, |m| {
            StubOutcome::Misuse(Cow::Owned(m))
        })
    }

    /// The tree of the outcome; `None` when there is no memory for it.
    fn node(&self) -> Option<Node<'_>> {
        match self {
            StubOutcome::Done => Some(Node::Int(0)),
            StubOutcome::NoMemory => Some(Node::Int(1)),
            StubOutcome::CannotCopy(reason) => block(0, [reason.node()?]),
            StubOutcome::Misuse(m) => block(1, [Node::Str(Cow::Borrowed(m))]),
            StubOutcome::System(m) => block(2, [Node::Str(Cow::Borrowed(m))]),
            StubOutcome::BadImage(check, m) => {
                block(3, [Node::Int(*check as isize), Node::Str(Cow::Borrowed(m))])
            }
            StubOutcome::DoneSlice(words) => block(4, [Node::Int(*words as isize)]),
        }
    }

    /// The OCaml value. `Done` and [`StubOutcome::NoMemory`] allocate nothing; a slice or an
    /// error allocates its blocks on the OCaml heap, so call this last, holding no
    /// other OCaml value and nothing that must be released.
    #[inline(always)]
    pub fn into_value(self) -> Word {
        match self {
            // The immediates, without building a tree: the path of every success.
            StubOutcome::Done => val_int(0),
            StubOutcome::NoMemory => val_int(1),
            error => error.into_block(),
        }
    }

    /// [`StubOutcome::into_value`] for the outcomes that are blocks.
    #[cold]
    #[inline(never)]
    fn into_block(self) -> Word {
        // SAFETY: called from a stub holding the runtime, with no raw OCaml value kept
        // across the call.
        match self.node().and_then(|node| unsafe { build(&node) }) {
            Some(v) => v,
            None => val_int(1),
        }
    }
}

/// Allocates `node`; `None` when there is no memory for what keeps its parts alive
/// meanwhile (a part missing would make another outcome: the whole is then `No_memory`).
///
/// # Safety
/// Called holding the runtime; no raw OCaml value of the caller lives across it.
unsafe fn build(node: &Node) -> Option<Word> {
    Some(match node {
        Node::Int(i) => val_int(*i),
        Node::Str(s) => {
            let mut buffer = [0u8; message::MESSAGE_MAX];
            let bytes = message::bounded(s.as_bytes(), &mut buffer);
            // SAFETY: copies `bytes.len()` bytes into a fresh OCaml string, small enough
            // to come from the minor heap.
            unsafe {
                caml_alloc_initialized_string(bytes.len(), bytes.as_ptr() as *const ocaml_sys::Char)
                    as Word
            }
        }
        Node::Block(tag, children) => {
            // The children are allocated first and kept in slots that the GC scans
            // (`release::Rooted`: registering a runtime root allocates, and raises when
            // it cannot), since each allocation may move the ones before it. With no
            // memory for them, the outcome is `No_memory`.
            let mut slots = Vec::new();
            slots.try_reserve_exact(children.len()).ok()?;
            for child in children {
                // SAFETY: forwarded; the slots keep the children built so far.
                let built = unsafe { build(child) }?;
                // SAFETY: we hold the runtime; nothing is allocated between the two.
                slots.push(unsafe { crate::release::Rooted::value(built) }?);
            }
            // SAFETY: a fresh small block of `children.len()` (1 or 2) fields, each
            // initialised with a plain store before anything else is allocated.
            unsafe {
                let block = caml_alloc_small(children.len(), *tag);
                let fields = block as *mut ocaml_sys::Value;
                for (i, slot) in slots.iter().enumerate() {
                    *fields.add(i) = slot.block() as ocaml_sys::Value;
                }
                block as Word
            }
        }
    })
}
