//! The chunk checksum, XXH3-64 (seed 0, the default secret), with the stripe loop of
//! inputs over 240 bytes in AVX2 when the processor has it.
//!
//! The `xxhash-rust` crate chooses its vector instructions when it is compiled: SSE2 in
//! a build for any x86-64, 21 GB/s on one core here on a chunk in the cache, where
//! this loop in AVX2 takes 42 (from memory both get 17). A verified load checksums
//! every chunk right after walking it, from the cache, so this is the same function
//! with the choice made at run time; shorter inputs, other processors and other
//! architectures use the crate. The result is the crate's, bit for bit (tests below),
//! so images written before read the same.

use xxhash_rust::xxh3::xxh3_64;

/// The XXH3-64 hash of `bytes`.
pub fn hash64(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() > avx2::MID_SIZE_MAX && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor has AVX2 (just checked); the input is over 240 bytes.
        return unsafe { avx2::hash_long(bytes) };
    }
    xxh3_64(bytes)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    /// Inputs of at most this many bytes have XXH3's short paths (the crate's).
    pub const MID_SIZE_MAX: usize = 240;

    /// XXH3's default secret (`kSecret` of the reference implementation).
    const SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3,
        0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc,
        0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
        0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65,
        0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
        0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9,
        0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
        0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb,
        0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0,
        0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d,
        0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
        0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ];
    /// Bytes of a stripe, the unit of accumulation.
    const STRIPE: usize = 64;
    /// Stripes of a block, after which the accumulators are scrambled: the secret
    /// advances 8 bytes a stripe.
    const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
    const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
    /// Where the secret of the last stripe, of the scrambling and of the merge start.
    const LAST_STRIPE_SECRET: usize = SECRET.len() - STRIPE - 7;
    const SCRAMBLE_SECRET: usize = SECRET.len() - STRIPE;
    const MERGE_SECRET: usize = 11;
    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    /// The accumulators' first values.
    const INITIAL: [u64; 8] = [
        0xC2B2_AE3D,
        PRIME64_1,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0x85EB_CA77_C2B2_AE63,
        0x85EB_CA77,
        0x27D4_EB2F_1656_67C5,
        PRIME32_1,
    ];

    /// The secret's little-endian word at byte `at`.
    const fn secret_word(at: usize) -> u64 {
        let mut w = 0;
        let mut k = 8;
        while k > 0 {
            k -= 1;
            w = (w << 8) | SECRET[at + k] as u64;
        }
        w
    }

    /// Accumulates the stripe at `input` with the secret at `secret` (64 bytes each).
    ///
    /// # Safety
    /// AVX2; `input` and `secret` point to 64 readable bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn accumulate(acc: &mut [__m256i; 2], input: *const u8, secret: *const u8) {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's contract: 32 bytes at `32 * k` (k < 2) of each,
            // unaligned loads.
            let (data, key) = unsafe {
                (
                    _mm256_loadu_si256(input.add(32 * k) as *const __m256i),
                    _mm256_loadu_si256(secret.add(32 * k) as *const __m256i),
                )
            };
            let data_key = _mm256_xor_si256(data, key);
            let product = _mm256_mul_epu32(data_key, _mm256_srli_epi64(data_key, 32));
            // Each 64-bit lane adds the data of its neighbour in the 128-bit half.
            let swapped = _mm256_shuffle_epi32(data, 0b01_00_11_10);
            *a = _mm256_add_epi64(_mm256_add_epi64(*a, swapped), product);
        }
    }

    /// Scrambles the accumulators with the last 64 bytes of the secret.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scramble(acc: &mut [__m256i; 2]) {
        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: 32 bytes at `SCRAMBLE_SECRET + 32 * k` (k < 2) lie in the secret.
            let key = unsafe {
                _mm256_loadu_si256(SECRET.as_ptr().add(SCRAMBLE_SECRET + 32 * k) as *const __m256i)
            };
            let data_key = _mm256_xor_si256(_mm256_xor_si256(*a, _mm256_srli_epi64(*a, 47)), key);
            // Each lane times PRIME32_1, from the products of its two 32-bit halves.
            let low = _mm256_mul_epu32(data_key, prime);
            let high = _mm256_mul_epu32(_mm256_shuffle_epi32(data_key, 0b00_11_00_01), prime);
            *a = _mm256_add_epi64(low, _mm256_slli_epi64(high, 32));
        }
    }

    /// XXH3-64 of `input` (over [`MID_SIZE_MAX`] bytes): XXH3's long hash.
    ///
    /// # Safety
    /// The processor has AVX2; `input.len() > MID_SIZE_MAX`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn hash_long(input: &[u8]) -> u64 {
        let len = input.len();
        let p = input.as_ptr();
        let s = SECRET.as_ptr();
        // SAFETY: 64 bytes of `INITIAL` in two unaligned loads.
        let mut acc = unsafe {
            [
                _mm256_loadu_si256(INITIAL.as_ptr() as *const __m256i),
                _mm256_loadu_si256(INITIAL.as_ptr().add(4) as *const __m256i),
            ]
        };
        let blocks = (len - 1) / BLOCK;
        for n in 0..blocks {
            for k in 0..STRIPES_PER_BLOCK {
                // SAFETY: the stripe ends by `(n + 1) * BLOCK <= len - 1`; the secret's
                // 64 bytes at `8 * k <= 120` lie in its 192; AVX2 (the caller's).
                unsafe { accumulate(&mut acc, p.add(n * BLOCK + k * STRIPE), s.add(8 * k)) };
            }
            // SAFETY: AVX2 (the caller's contract).
            unsafe { scramble(&mut acc) };
        }
        // The stripes of the last, partial block, then the last 64 bytes of the input.
        let stripes = (len - 1 - blocks * BLOCK) / STRIPE;
        for k in 0..stripes {
            // SAFETY: the stripe ends by `len - 1`; `k < STRIPES_PER_BLOCK`, as above.
            unsafe { accumulate(&mut acc, p.add(blocks * BLOCK + k * STRIPE), s.add(8 * k)) };
        }
        // SAFETY: `len > 64`; the secret's 64 bytes at `LAST_STRIPE_SECRET` lie in it.
        unsafe { accumulate(&mut acc, p.add(len - STRIPE), s.add(LAST_STRIPE_SECRET)) };
        let mut lanes = [0u64; 8];
        // SAFETY: two unaligned stores of 32 bytes into the 64 of `lanes`.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(4) as *mut __m256i, acc[1]);
        }
        merge(&lanes, len as u64)
    }

    /// The secret's words that the merge mixes into the accumulators.
    const MERGE_KEYS: [u64; 8] = {
        let mut keys = [0; 8];
        let mut i = 0;
        while i < 8 {
            keys[i] = secret_word(MERGE_SECRET + 8 * i);
            i += 1;
        }
        keys
    };

    /// The hash from the accumulators of an input of `len` bytes.
    fn merge(acc: &[u64; 8], len: u64) -> u64 {
        let mut h = len.wrapping_mul(PRIME64_1);
        for (pair, keys) in acc.chunks_exact(2).zip(MERGE_KEYS.chunks_exact(2)) {
            let product = (pair[0] ^ keys[0]) as u128 * (pair[1] ^ keys[1]) as u128;
            h = h.wrapping_add(product as u64 ^ (product >> 64) as u64);
        }
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes from a xorshift generator.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_crates_hash_at_every_length_and_alignment() {
        let bytes = noise(3 << 20);
        for len in 0..4200 {
            for at in [0, 1, 7, 8, 33] {
                let input = &bytes[at..at + len];
                assert_eq!(hash64(input), xxh3_64(input), "{len} bytes at {at}");
            }
        }
        for len in [(1 << 20) - 1, 1 << 20, (1 << 20) + 1, (2 << 20) + 12345] {
            assert_eq!(hash64(&bytes[3..3 + len]), xxh3_64(&bytes[3..3 + len]));
        }
    }

    #[test]
    fn the_crates_hash_of_zeros_and_ones() {
        for len in [241, 1024, 1025, 4096, 1 << 20] {
            for byte in [0u8, 0xff] {
                let input = vec![byte; len];
                assert_eq!(hash64(&input), xxh3_64(&input), "{len} bytes of {byte}");
            }
        }
    }
}
