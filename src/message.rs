//! Messages handed to OCaml, bounded in size so that their strings come from the minor
//! heap, whose allocation never raises (see [`MESSAGE_MAX`]).

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
