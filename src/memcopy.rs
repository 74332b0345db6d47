//! Copies of memory that avoid a slow path of `rep movsb`.
//!
//! glibc's `memcpy` copies a few KiB and more with `rep movsb`, which on AMD EPYC
//! processors (this project's machines) runs many times slower when the destination
//! lies 1 to 63 bytes past the source modulo 4 KiB (measured with glibc 2.36, medians of
//! 20 000 copies: 4000 bytes 42 ns, or 1942 with the destination 8 bytes past the source
//! so; 100 000 bytes 1.9 us, or 50 us; 16 to 56 bytes past, 1.5 to 2 times slower). A
//! copy's blocks and their sources are both laid out from page-aligned memory with a
//! header or two in front, so that distance is common: a 4000-byte string copied and
//! freed in a loop took 2.3-3.3 us a copy instead of some 0.15. In that window the copy
//! goes by pieces of 1 KiB, which `memcpy` copies with vector loads and stores
//! instead.

/// Bytes of the window past a multiple of 4 KiB where `rep movsb` is slow.
const ALIAS_WINDOW: usize = 64;
/// The pieces of a copy in that window: below glibc's threshold for `rep movsb`.
const PIECE: usize = 1024;
const PAGE: usize = 4096;

/// Copies `bytes` bytes from `src` to `dst`, as [`std::ptr::copy_nonoverlapping`].
///
/// # Safety
/// As [`std::ptr::copy_nonoverlapping`] for `bytes` bytes.
#[inline(always)]
pub unsafe fn copy_nonoverlapping(src: *const u8, dst: *mut u8, bytes: usize) {
    let distance = (dst as usize).wrapping_sub(src as usize) % PAGE;
    if bytes <= PIECE || distance == 0 || distance >= ALIAS_WINDOW {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, bytes) };
    } else {
        // SAFETY: the caller's contract.
        unsafe { by_pieces(src, dst, bytes) };
    }
}

/// [`copy_nonoverlapping`] by pieces of [`PIECE`] bytes.
///
/// # Safety
/// As [`copy_nonoverlapping`].
#[cold]
#[inline(never)]
unsafe fn by_pieces(src: *const u8, dst: *mut u8, bytes: usize) {
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(PIECE);
        // SAFETY: `done + n <= bytes`: inside both ranges (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), n) };
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_at_every_distance() {
        let src: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut dst = vec![0u8; 5 * PAGE];
        for distance in [0, 1, 8, 63, 64, 65, 2048, PAGE - 8] {
            // The destination `distance` bytes past the source modulo a page (in the
            // window, by pieces).
            let at = (src.as_ptr() as usize + distance).wrapping_sub(dst.as_ptr() as usize) % PAGE;
            for bytes in [0, 1, PIECE, PIECE + 1, 2 * PIECE + 8, 3 * PAGE - 5] {
                dst.fill(0xAA);
                // SAFETY: `bytes <= src.len()` and `at + bytes <= dst.len()`; distinct
                // vectors.
                unsafe { copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().add(at), bytes) };
                assert_eq!(
                    &dst[at..at + bytes],
                    &src[..bytes],
                    "distance {distance}, {bytes} bytes"
                );
                assert!(dst[..at].iter().all(|&b| b == 0xAA), "nothing before");
                assert!(
                    dst[at + bytes..].iter().all(|&b| b == 0xAA),
                    "nothing after"
                );
            }
        }
    }
}
