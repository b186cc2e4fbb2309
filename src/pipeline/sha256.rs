//! SHA-256 that can hash the same bytes into two digests for little more than the cost of one.
//!
//! The documents target needs two digests of every file's content: the file's own (for the
//! index) and the raw tar stream's, whose blocks are the same bytes (file content starts on a
//! 512-byte record boundary, so both messages are at a 64-byte block boundary there). With the
//! x86 SHA extensions the message schedule is computed once for both, and the two chains of
//! rounds interleave: each round instruction waits on its predecessor's result, so a second,
//! independent chain fills the gaps instead of doubling the time. Everywhere else (other CPUs,
//! unaligned stretches) the two digests are updated one after the other with `sha2`.
//!
//! Why not `sha2` alone: two digests of 512 MiB took 0.69 s with `sha2` (two updates, SHA-NI)
//! and 0.41 s with this kernel on an AMD EPYC with SHA-NI. End to end, a documents backup of
//! 20,000 files (2.2 GB) to the local directory on an Intel Xeon with SHA-NI took a median
//! 5.08 s with `sha2` and 4.65 s with this kernel (8.87 and 7.88 machine CPU-seconds): the
//! kernel is 8.5% faster. That is an A/B in one run of two builds that differ only in this
//! kernel (the other one with `shani::available` false), 7 rotated rounds:
//! `BENCH_TARGETS=documents BENCH_ROUNDS=7 BENCH_BASELINE_BIN=… scripts/bench-targets.sh`.

use sha2::compress256;
use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

const INITIAL: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    buffer: [u8; BLOCK],
    buffered: usize,
    length: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            state: INITIAL,
            buffer: [0; BLOCK],
            buffered: 0,
            length: 0,
        }
    }
}

/// The SHA-256 of the file at `path`, as 64 lowercase hex digits.
pub fn of_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        match file.read(&mut buffer)? {
            0 => return Ok(hasher.finish_hex()),
            n => hasher.update(&buffer[..n]),
        }
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.length += data.len() as u64;
        let rest = self.fill(data);
        let whole = rest.len() / BLOCK * BLOCK;
        compress(&mut self.state, &rest[..whole]);
        self.keep(&rest[whole..]);
    }

    /// The digest, as 64 lowercase hex digits.
    pub fn finish_hex(self) -> String {
        hex::encode(self.finish())
    }

    pub fn finish(mut self) -> [u8; 32] {
        let bits = self.length.wrapping_mul(8);
        let mut tail = [0u8; 2 * BLOCK];
        tail[..self.buffered].copy_from_slice(&self.buffer[..self.buffered]);
        tail[self.buffered] = 0x80;
        let end = if self.buffered < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &tail[..end]);
        let mut digest = [0u8; 32];
        for (out, word) in digest.chunks_exact_mut(4).zip(self.state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    /// Completes a partly filled block from the front of `data`; returns what is left.
    fn fill<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.buffered == 0 {
            return data;
        }
        let n = data.len().min(BLOCK - self.buffered);
        self.buffer[self.buffered..self.buffered + n].copy_from_slice(&data[..n]);
        self.buffered += n;
        if self.buffered == BLOCK {
            let block = self.buffer;
            compress(&mut self.state, &block);
            self.buffered = 0;
        }
        &data[n..]
    }

    /// Buffers what is left after the whole blocks of what [`Sha256::fill`] returned: less
    /// than a block, and nothing when `fill` took all the data into a partial block.
    fn keep(&mut self, tail: &[u8]) {
        if !tail.is_empty() {
            self.buffer[..tail.len()].copy_from_slice(tail);
            self.buffered = tail.len();
        }
    }
}

/// Hashes `data` into both `a` and `b`, as `a.update(data); b.update(data)` would.
pub fn update_both(a: &mut Sha256, b: &mut Sha256, data: &[u8]) {
    if a.buffered != b.buffered {
        a.update(data);
        b.update(data);
        return;
    }
    a.length += data.len() as u64;
    b.length += data.len() as u64;
    let rest = a.fill(data);
    b.fill(data);
    let whole = rest.len() / BLOCK * BLOCK;
    compress_both(&mut a.state, &mut b.state, &rest[..whole]);
    a.keep(&rest[whole..]);
    b.keep(&rest[whole..]);
}

/// Runs the compression function over whole 64-byte blocks.
fn compress(state: &mut [u32; 8], blocks: &[u8]) {
    compress256(state, as_blocks(blocks));
}

fn as_blocks(bytes: &[u8]) -> &[GenericArray<u8, U64>] {
    let (blocks, rest) = bytes.as_chunks::<BLOCK>();
    debug_assert!(rest.is_empty());
    // SAFETY: GenericArray<u8, U64> has the layout of [u8; 64] (it is `repr(transparent)`).
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len()) }
}

fn compress_both(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        // SAFETY: the CPU has the instructions the kernel is compiled for.
        unsafe { shani::compress_both(a, b, blocks) };
        return;
    }
    compress(a, blocks);
    compress(b, blocks);
}

#[cfg(target_arch = "x86_64")]
mod shani {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("sha")
                && is_x86_feature_detected!("sse2")
                && is_x86_feature_detected!("ssse3")
                && is_x86_feature_detected!("sse4.1")
        })
    }

    /// The 64 round constants, four per group of four rounds.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// The state as the round instruction wants it: (ABEF, CDGH).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn load(state: &[u32; 8]) -> (__m128i, __m128i) {
        // SAFETY: `state` is 32 readable bytes; unaligned loads.
        let (dcba, hgfe) = unsafe {
            let words = state.as_ptr().cast::<__m128i>();
            (_mm_loadu_si128(words), _mm_loadu_si128(words.add(1)))
        };
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        (
            _mm_alignr_epi8(cdab, efgh, 8),
            _mm_blend_epi16(efgh, cdab, 0xF0),
        )
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn store(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        // SAFETY: `state` is 32 writable bytes; unaligned stores.
        unsafe {
            let words = state.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(words, _mm_blend_epi16(feba, dchg, 0xF0));
            _mm_storeu_si128(words.add(1), _mm_alignr_epi8(dchg, feba, 8));
        }
    }

    /// Two states over the same whole blocks: one message schedule, two interleaved chains.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub fn compress_both(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
        let big_endian = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
        let (mut a_abef, mut a_cdgh) = load(a);
        let (mut b_abef, mut b_cdgh) = load(b);
        for block in blocks.chunks_exact(64) {
            let saved = (a_abef, a_cdgh, b_abef, b_cdgh);
            // w[g % 4] holds message words 4g..4g+4 of the current group g.
            let mut w = [_mm_setzero_si128(); 4];
            for g in 0..16 {
                w[g % 4] = if g < 4 {
                    // SAFETY: the block has 64 bytes; unaligned load of bytes 16g..16g+16.
                    let words = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * g).cast()) };
                    _mm_shuffle_epi8(words, big_endian)
                } else {
                    let (w0, w1, w2, w3) =
                        (w[g % 4], w[(g + 1) % 4], w[(g + 2) % 4], w[(g + 3) % 4]);
                    let partial =
                        _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
                    _mm_sha256msg2_epu32(partial, w3)
                };
                // SAFETY: K has 64 words; unaligned load of words 4g..4g+4.
                let k = unsafe { _mm_loadu_si128(K.as_ptr().add(4 * g).cast()) };
                let low = _mm_add_epi32(w[g % 4], k);
                let high = _mm_shuffle_epi32(low, 0x0E);
                a_cdgh = _mm_sha256rnds2_epu32(a_cdgh, a_abef, low);
                b_cdgh = _mm_sha256rnds2_epu32(b_cdgh, b_abef, low);
                a_abef = _mm_sha256rnds2_epu32(a_abef, a_cdgh, high);
                b_abef = _mm_sha256rnds2_epu32(b_abef, b_cdgh, high);
            }
            a_abef = _mm_add_epi32(a_abef, saved.0);
            a_cdgh = _mm_add_epi32(a_cdgh, saved.1);
            b_abef = _mm_add_epi32(b_abef, saved.2);
            b_cdgh = _mm_add_epi32(b_cdgh, saved.3);
        }
        store(a, a_abef, a_cdgh);
        store(b, b_abef, b_cdgh);
    }
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    fn reference(data: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(data))
    }

    /// Deterministic bytes without a pattern that lines up with blocks.
    fn bytes(n: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn matches_sha2_for_every_length_around_the_padding_boundaries() {
        let data = bytes(300);
        for n in 0..=data.len() {
            let mut hasher = Sha256::new();
            hasher.update(&data[..n]);
            assert_eq!(hasher.finish_hex(), reference(&data[..n]), "length {n}");
        }
    }

    #[test]
    fn matches_sha2_when_fed_in_pieces() {
        let data = bytes(20_000);
        for piece in [1, 3, 63, 64, 65, 127, 1000, 4096] {
            let mut hasher = Sha256::new();
            for part in data.chunks(piece) {
                hasher.update(part);
            }
            assert_eq!(hasher.finish_hex(), reference(&data), "pieces of {piece}");
        }
    }

    #[test]
    fn known_answer() {
        let mut hasher = Sha256::new();
        hasher.update(b"abc");
        assert_eq!(
            hasher.finish_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn both_digests_match_separate_hashing_whatever_the_split() {
        let data = bytes(70_000);
        // (bytes hashed into `a` alone first, then the pieces fed to both)
        let cases: [(usize, &[usize]); 5] = [
            (0, &[64, 4096, 65_536]),
            (512, &[1, 63, 64, 65, 8191]),
            (3, &[61, 128, 1000]),
            (0, &[70_000]),
            (100, &[0, 7, 50_000]),
        ];
        for (alone, pieces) in cases {
            let mut a = Sha256::new();
            let mut b = Sha256::new();
            a.update(&data[..alone]);
            let mut at = alone;
            for &n in pieces.iter().cycle().take(40) {
                let end = (at + n).min(data.len());
                update_both(&mut a, &mut b, &data[at..end]);
                at = end;
            }
            assert_eq!(a.finish_hex(), reference(&data[..at]), "a, case {alone}");
            assert_eq!(
                b.finish_hex(),
                reference(&data[alone..at]),
                "b, case {alone}"
            );
        }
    }
}
