//! The portable kernel: `u64::count_ones` (LLVM lowers it to `popcnt` where the target
//! has it and to NEON `CNT` on aarch64).

use super::super::{BITS, LANES};

#[inline(always)]
pub fn dot_generic(
    a: &[u64],
    starts: &[usize],
    row_len: usize,
    w: &[u64],
    _blocks: usize,
    acc: &mut [u32],
) {
    let block_words = starts.len() * row_len * LANES;
    for (b, out) in acc.chunks_exact_mut(LANES).enumerate() {
        let wb = &w[b * block_words..(b + 1) * block_words];
        let mut sum = [0u32; LANES];
        for (r, &st) in starts.iter().enumerate() {
            let wr = &wb[r * row_len * LANES..(r + 1) * row_len * LANES];
            for (av, wv) in a[st..st + row_len].iter().zip(wr.chunks_exact(LANES)) {
                for l in 0..LANES {
                    sum[l] += (av ^ wv[l]).count_ones();
                }
            }
        }
        out.copy_from_slice(&sum);
    }
}

/// Sign bits of `ch` packed 64 per word (see [`super::pack_signs`]); returns whether any
/// value is zero.
pub fn pack_signs(ch: &[f32], out: &mut [u64]) -> bool {
    let mut zero = false;
    for (part, word) in ch.chunks(BITS).zip(out.iter_mut()) {
        let mut bits = 0u64;
        for (b, &v) in part.iter().enumerate() {
            bits |= u64::from(v.to_bits() >> 31) << b;
            zero |= v == 0.0;
        }
        *word = bits;
    }
    zero
}
