//! Messages handed to OCaml, bounded in size so that their strings come from the minor
//! heap, whose allocation never raises (see [`MESSAGE_MAX`]), and formatted without
//! aborting when memory runs out ([`try_format`]).

use std::fmt;

/// The longest message a stub hands to OCaml, in bytes. A string of more than
/// `Max_young_wosize` words (2 KiB on 64 bits) is allocated in the major heap, whose
/// allocation raises `Out_of_memory` when the heap cannot grow, an exception that would
/// cross the stub's Rust frames; one allocated in the minor heap never raises.
pub const MESSAGE_MAX: usize = 1024;
/// The bytes kept from the end of a shortened message (a path's file name, a check's
/// detail); its start fills the rest.
const MESSAGE_TAIL: usize = 256;
/// What stands for the bytes a shortened message leaves out.
const ELLIPSIS: &[u8] = b" [...] ";

/// `message` when it fits in [`MESSAGE_MAX`] bytes; else its start and its last
/// `MESSAGE_TAIL` bytes with `ELLIPSIS` between them, written into `buffer` (no
/// allocation: this runs on error paths, out of memory included). Bytes of a UTF-8
/// character cut in two are kept as they are: an OCaml string is bytes.
pub fn bounded<'a>(message: &'a [u8], buffer: &'a mut [u8; MESSAGE_MAX]) -> &'a [u8] {
    if message.len() <= MESSAGE_MAX {
        return message;
    }
    let head = MESSAGE_MAX - MESSAGE_TAIL - ELLIPSIS.len();
    let tail = &message[message.len() - MESSAGE_TAIL..];
    buffer[..head].copy_from_slice(&message[..head]);
    buffer[head..head + ELLIPSIS.len()].copy_from_slice(ELLIPSIS);
    buffer[head + ELLIPSIS.len()..].copy_from_slice(tail);
    &buffer[..]
}

/// `args` formatted into a fresh string; `None` when there is no memory for it (where
/// `format!` would abort the process): messages of errors that memory running out may
/// cause.
pub fn try_format(args: fmt::Arguments<'_>) -> Option<String> {
    struct Fallible(String);
    impl fmt::Write for Fallible {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.try_reserve(s.len()).map_err(|_| fmt::Error)?;
            self.0.push_str(s);
            Ok(())
        }
    }
    let mut out = Fallible(String::new());
    fmt::write(&mut out, args).ok()?;
    Some(out.0)
}

/// Bytes shown as text, as `String::from_utf8_lossy` shows them (each invalid sequence
/// as U+FFFD), without allocating.
pub struct Lossy<'a>(pub &'a [u8]);

impl fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_str("\u{FFFD}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_messages_are_kept_whole() {
        let mut buffer = [0u8; MESSAGE_MAX];
        let m = vec![b'x'; MESSAGE_MAX];
        assert_eq!(bounded(&m, &mut buffer), &m[..]);
        assert_eq!(bounded(b"", &mut buffer), b"");
    }

    #[test]
    fn formatting_and_lossy_bytes() {
        assert_eq!(
            try_format(format_args!("{}: {}", Lossy(b"a\xffb"), 7)).as_deref(),
            Some("a\u{FFFD}b: 7")
        );
        let bytes = b"ok \xe2\x82 \xc3\xa9 \xf0";
        assert_eq!(
            Lossy(bytes).to_string(),
            String::from_utf8_lossy(bytes).into_owned()
        );
    }

    #[test]
    fn long_messages_keep_their_start_and_end() {
        let mut buffer = [0u8; MESSAGE_MAX];
        let mut m = b"Offheap.Image.load: /".to_vec();
        m.extend(std::iter::repeat_n(b'd', 5000));
        m.extend(b"/index.img: bad image: header: magic");
        let short = bounded(&m, &mut buffer).to_vec();
        assert_eq!(short.len(), MESSAGE_MAX);
        assert!(short.starts_with(b"Offheap.Image.load: /ddd"));
        assert!(short.ends_with(b"ddd/index.img: bad image: header: magic"));
        let at = MESSAGE_MAX - MESSAGE_TAIL - ELLIPSIS.len();
        assert_eq!(&short[at..at + ELLIPSIS.len()], ELLIPSIS);
    }
}
