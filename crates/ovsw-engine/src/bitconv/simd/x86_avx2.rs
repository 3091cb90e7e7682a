//! AVX2 kernels: nibble-table popcount (`vpshufb`) on four 64-bit lanes, byte counters
//! flushed to 64-bit sums by `vpsadbw`, 32 output channels per pass (the masked kernel:
//! 8, with two counters, of the mask and of the masked difference); sign packing by
//! `movemask`.

use std::arch::x86_64::*;

use super::cpu::Flag;
use super::isa::{sealed, Isa, Job, Run, Tile, LANES};
use super::portable;
use crate::bits::BITS;

/// Proof that the CPU has AVX2: made only by [`Avx2::new`], which checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx2(());

impl Avx2 {
    pub fn new() -> Option<Self> {
        Flag::Avx2.usable().then_some(Avx2(()))
    }

    /// Runs `job` compiled for AVX2.
    #[inline]
    pub fn enter<J: Job>(self, job: J) -> J::Out {
        #[target_feature(enable = "avx2")]
        unsafe fn enter<J: Job>(isa: Avx2, job: J) -> J::Out {
            job.run(isa)
        }
        // SAFETY: `self` exists, so the CPU has AVX2.
        unsafe { enter(self, job) }
    }
}

impl sealed::Sealed for Avx2 {}

impl Isa for Avx2 {
    #[inline(always)]
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool {
        if !ch.len().is_multiple_of(8) {
            return portable::pack(ch, out);
        }
        assert_eq!(out.len(), ch.len().div_ceil(BITS));
        // SAFETY: `self` proves AVX2; the loads stay inside `ch` (whole groups of 8).
        unsafe { pack(ch, out) }
    }

    #[inline(always)]
    unsafe fn dot(self, t: &Tile<'_>, acc: &mut [i32]) {
        let steps = t.steps;
        for p in 0..t.pixels {
            let ap = t.a.as_ptr().add(t.base(p));
            let acc = acc.as_mut_ptr().add(p * t.blocks * LANES);
            let mut b = 0;
            while b + 4 <= t.blocks {
                let wb = t.w.as_ptr().add(b * steps * LANES);
                block_group::<4>(ap, t.runs, t.run_len, wb, steps, acc.add(b * LANES));
                b += 4;
            }
            while b < t.blocks {
                let wb = t.w.as_ptr().add(b * steps * LANES);
                block_group::<1>(ap, t.runs, t.run_len, wb, steps, acc.add(b * LANES));
                b += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn dot_masked(self, t: &Tile<'_>, acc: &mut [i32]) {
        let (Some(a_mask), Some(w_mask)) = (t.a_mask, t.w_mask) else {
            unreachable!("Tile::dot runs the masked kernel only with both masks")
        };
        let stride = t.steps * LANES;
        for p in 0..t.pixels {
            let base = t.base(p);
            let (ap, mp) = (t.a.as_ptr().add(base), a_mask.as_ptr().add(base));
            let acc = acc.as_mut_ptr().add(p * t.blocks * LANES);
            for b in 0..t.blocks {
                let (wb, mb) = (
                    t.w.as_ptr().add(b * stride),
                    w_mask.as_ptr().add(b * stride),
                );
                masked_block(ap, mp, t.runs, t.run_len, (wb, mb), acc.add(b * LANES));
            }
        }
    }
}

/// Per-byte popcount of four 64-bit lanes by a 16-entry nibble table.
#[inline(always)]
unsafe fn popcount_bytes(v: __m256i, table: __m256i, low: __m256i) -> __m256i {
    let lo = _mm256_and_si256(v, low);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    _mm256_add_epi8(
        _mm256_shuffle_epi8(table, lo),
        _mm256_shuffle_epi8(table, hi),
    )
}

/// Sign bits of 8 floats at a time by `movemask`; `ch.len()` is a multiple of 8.
#[inline(always)]
unsafe fn pack(ch: &[f32], out: &mut [u64]) -> bool {
    let zero = _mm256_setzero_ps();
    let mut zeros = 0;
    for (part, word) in ch.chunks(BITS).zip(out.iter_mut()) {
        let mut bits = 0u64;
        for (k, eight) in part.chunks_exact(8).enumerate() {
            let v = _mm256_loadu_ps(eight.as_ptr());
            bits |= (_mm256_movemask_ps(v) as u32 as u64) << (8 * k);
            zeros |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, zero));
        }
        *word = bits;
    }
    zeros != 0
}

/// Bytes add at most 8 per step: flush them to 64-bit sums every 31 steps.
const FLUSH: usize = 31;

/// Stores the low 32 bits of the four 64-bit lanes of each register as 8 i32.
#[inline(always)]
unsafe fn store_sums(dst: *mut i32, sum0: __m256i, sum1: __m256i) {
    // Four 64-bit values per register, each within an i32: gather the low halves.
    let idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
    let lo0 = _mm256_permutevar8x32_epi32(sum0, idx);
    let lo1 = _mm256_permutevar8x32_epi32(sum1, idx);
    let both = _mm256_permute2x128_si256::<0x20>(lo0, lo1);
    _mm256_storeu_si256(dst as *mut __m256i, both);
}

/// `GROUP` blocks of 8 channels in one pass over the runs of one pixel (words at
/// `ap`): the activation word is broadcast once per step for all of them. Byte
/// counters are flushed to 64-bit sums every `FLUSH` steps.
#[inline(always)]
unsafe fn block_group<const GROUP: usize>(
    ap: *const u64,
    runs: &[Run],
    run_len: usize,
    w: *const u64,
    steps: usize,
    acc: *mut i32,
) {
    let table = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut bytes = [[zero; 2]; GROUP];
    let mut sums = [[zero; 2]; GROUP];
    let block_stride = steps * LANES / 4; // in __m256i
    let wp = w as *const __m256i;
    let mut pending = 0;
    for r in runs {
        let row = ap.add(r.a);
        let mut j = 0;
        while j < run_len {
            if pending == FLUSH {
                for (b, t) in bytes.iter_mut().zip(sums.iter_mut()) {
                    t[0] = _mm256_add_epi64(t[0], _mm256_sad_epu8(b[0], zero));
                    t[1] = _mm256_add_epi64(t[1], _mm256_sad_epu8(b[1], zero));
                    *b = [zero; 2];
                }
                pending = 0;
            }
            let end = run_len.min(j + FLUSH - pending);
            for jj in j..end {
                let av = _mm256_set1_epi64x(*row.add(jj) as i64);
                let s = r.w + jj;
                for (g, pair) in bytes.iter_mut().enumerate() {
                    let wv = wp.add(g * block_stride + 2 * s);
                    let x0 = _mm256_xor_si256(av, _mm256_loadu_si256(wv));
                    let x1 = _mm256_xor_si256(av, _mm256_loadu_si256(wv.add(1)));
                    pair[0] = _mm256_add_epi8(pair[0], popcount_bytes(x0, table, low));
                    pair[1] = _mm256_add_epi8(pair[1], popcount_bytes(x1, table, low));
                }
            }
            pending += end - j;
            j = end;
        }
    }
    for (g, (b, t)) in bytes.iter().zip(sums.iter()).enumerate() {
        let sum0 = _mm256_add_epi64(t[0], _mm256_sad_epu8(b[0], zero));
        let sum1 = _mm256_add_epi64(t[1], _mm256_sad_epu8(b[1], zero));
        store_sums(acc.add(g * LANES), sum0, sum1);
    }
}

/// One block of 8 channels of one pixel, masked: `popcount(m) - 2 popcount((a ^ w) & m)`
/// with `m = m_a & m_w`, over the runs of the pixel's words (`ap`, mask `mp`) against
/// the block's weight words and mask (`w`). Byte counters are flushed every `FLUSH`
/// steps, as in [`block_group`].
#[inline(always)]
unsafe fn masked_block(
    ap: *const u64,
    mp: *const u64,
    runs: &[Run],
    run_len: usize,
    w: (*const u64, *const u64),
    acc: *mut i32,
) {
    let table = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let (wp, wmp) = (w.0 as *const __m256i, w.1 as *const __m256i);
    // [half of the block][valid, diff]: byte counters and their 64-bit sums.
    let mut bytes = [[zero; 2]; 2];
    let mut sums = [[zero; 2]; 2];
    let mut pending = 0;
    for r in runs {
        for j in 0..run_len {
            if pending == FLUSH {
                for (b, t) in bytes.iter_mut().flatten().zip(sums.iter_mut().flatten()) {
                    *t = _mm256_add_epi64(*t, _mm256_sad_epu8(*b, zero));
                    *b = zero;
                }
                pending = 0;
            }
            let av = _mm256_set1_epi64x(*ap.add(r.a + j) as i64);
            let mv = _mm256_set1_epi64x(*mp.add(r.a + j) as i64);
            let s = r.w + j;
            for (h, pair) in bytes.iter_mut().enumerate() {
                let m = _mm256_and_si256(mv, _mm256_loadu_si256(wmp.add(2 * s + h)));
                let x = _mm256_xor_si256(av, _mm256_loadu_si256(wp.add(2 * s + h)));
                let d = _mm256_and_si256(x, m);
                pair[0] = _mm256_add_epi8(pair[0], popcount_bytes(m, table, low));
                pair[1] = _mm256_add_epi8(pair[1], popcount_bytes(d, table, low));
            }
            pending += 1;
        }
    }
    let mut dots = [zero; 2];
    for (h, dot) in dots.iter_mut().enumerate() {
        let valid = _mm256_add_epi64(sums[h][0], _mm256_sad_epu8(bytes[h][0], zero));
        let diff = _mm256_add_epi64(sums[h][1], _mm256_sad_epu8(bytes[h][1], zero));
        *dot = _mm256_sub_epi64(valid, _mm256_add_epi64(diff, diff));
    }
    // Each dot fits in an i32: its low half is the value.
    store_sums(acc, dots[0], dots[1]);
}
