//! AVX-512 kernels on 512-bit registers: one step of a block of 8 output channels is
//! one zmm (8 `u64` lanes), so a tile of `P` pixels and `G` blocks keeps `P * G`
//! accumulators in registers and loads each weight register once for all `P` pixels.
//!
//! - `avx512_vpopcntdq` (AVX-512F + VPOPCNTDQ): `VPXORQ`, `VPOPCNTQ`, `VPADDQ` per
//!   512 binary multiply-accumulates; the masked kernel adds a `VPTERNLOGQ` and a second
//!   popcount for the non-zero planes.
//! - `avx512bw` (AVX-512F + BW, for CPUs without VPOPCNTDQ): the popcount by a 16-entry
//!   nibble table (`VPSHUFB`) into byte counters, flushed to 64-bit sums by `VPSADBW`.
//!
//! The register tiles are `[P][G]` arrays indexed by both loop counters (hence
//! `needless_range_loop` is allowed here).
//!
//! Both pack signs with compare-to-mask: `VPTESTMD` against the sign bit and `VCMPPS`
//! for exact zeros, 16 floats per instruction, the tail by a masked load.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::cpu::Flag;
use super::isa::{sealed, Isa, Job, Tile, LANES};
use crate::bits::BITS;

/// Proof that the CPU has AVX-512F and VPOPCNTDQ: made only by
/// [`Avx512Vpopcnt::new`], which checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx512Vpopcnt(());

impl Avx512Vpopcnt {
    pub fn new() -> Option<Self> {
        (Flag::Avx512f.usable() && Flag::Avx512Vpopcntdq.usable()).then_some(Avx512Vpopcnt(()))
    }

    /// Runs `job` compiled for AVX-512F and VPOPCNTDQ.
    #[inline]
    pub fn enter<J: Job>(self, job: J) -> J::Out {
        #[target_feature(enable = "avx512f,avx512vpopcntdq")]
        unsafe fn enter<J: Job>(isa: Avx512Vpopcnt, job: J) -> J::Out {
            job.run(isa)
        }
        // SAFETY: `self` exists, so the CPU has both.
        unsafe { enter(self, job) }
    }
}

/// Proof that the CPU has AVX-512F and BW: made only by [`Avx512Bw::new`], which
/// checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx512Bw(());

impl Avx512Bw {
    pub fn new() -> Option<Self> {
        (Flag::Avx512f.usable() && Flag::Avx512bw.usable()).then_some(Avx512Bw(()))
    }

    /// Runs `job` compiled for AVX-512F and BW.
    #[inline]
    pub fn enter<J: Job>(self, job: J) -> J::Out {
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn enter<J: Job>(isa: Avx512Bw, job: J) -> J::Out {
            job.run(isa)
        }
        // SAFETY: `self` exists, so the CPU has both.
        unsafe { enter(self, job) }
    }
}

impl sealed::Sealed for Avx512Vpopcnt {}
impl sealed::Sealed for Avx512Bw {}

/// Calls `$f::<P>(tile, p0, args..)` over the tile's pixels: chunks of 4, then the
/// remainder, so that each register tile has a compile-time size.
macro_rules! by_pixels {
    ($t:expr, $f:ident $(, $arg:expr)*) => {{
        let t = $t;
        let mut p0 = 0;
        while p0 + 4 <= t.pixels {
            $f::<4>(t, p0 $(, $arg)*);
            p0 += 4;
        }
        match t.pixels - p0 {
            3 => $f::<3>(t, p0 $(, $arg)*),
            2 => $f::<2>(t, p0 $(, $arg)*),
            1 => $f::<1>(t, p0 $(, $arg)*),
            _ => {}
        }
    }};
}

impl Isa for Avx512Vpopcnt {
    #[inline(always)]
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool {
        assert_eq!(out.len(), ch.len().div_ceil(BITS));
        // SAFETY: `self` proves AVX-512F; lengths checked above.
        unsafe { pack(ch, out) }
    }

    #[inline(always)]
    unsafe fn dot(self, t: &Tile<'_>, acc: &mut [i32]) {
        by_pixels!(t, vpopcnt_pixels, acc.as_mut_ptr())
    }

    #[inline(always)]
    unsafe fn dot_masked(self, t: &Tile<'_>, acc: &mut [i32]) {
        by_pixels!(t, vpopcnt_masked_pixels, acc.as_mut_ptr())
    }
}

impl Isa for Avx512Bw {
    #[inline(always)]
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool {
        assert_eq!(out.len(), ch.len().div_ceil(BITS));
        // SAFETY: `self` proves AVX-512F; lengths checked above.
        unsafe { pack(ch, out) }
    }

    #[inline(always)]
    unsafe fn dot(self, t: &Tile<'_>, acc: &mut [i32]) {
        by_pixels!(t, nibble_pixels, acc.as_mut_ptr())
    }

    #[inline(always)]
    unsafe fn dot_masked(self, t: &Tile<'_>, acc: &mut [i32]) {
        by_pixels!(t, nibble_masked_pixels, acc.as_mut_ptr())
    }
}

/// Sign bits and zero flags of 16 floats at a time (see [`Isa::pack`]); the caller
/// checked `out.len() == ch.len().div_ceil(64)`.
#[inline(always)]
unsafe fn pack(ch: &[f32], out: &mut [u64]) -> bool {
    let sign = _mm512_set1_epi32(i32::MIN);
    let zero = _mm512_setzero_ps();
    let mut zeros: __mmask16 = 0;
    let full = ch.len() / BITS;
    let src = ch.as_ptr();
    for (i, word) in out[..full].iter_mut().enumerate() {
        let mut bits = 0u64;
        for k in 0..4 {
            let v = _mm512_loadu_ps(src.add(i * BITS + 16 * k));
            let negative = _mm512_test_epi32_mask(_mm512_castps_si512(v), sign);
            bits |= u64::from(negative) << (16 * k);
            zeros |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, zero);
        }
        *word = bits;
    }
    if let Some(word) = out.get_mut(full) {
        let mut bits = 0u64;
        for (k, part) in ch[full * BITS..].chunks(16).enumerate() {
            // Lanes past the slice are neither loaded (masked load) nor counted.
            let lanes: __mmask16 = ((1u32 << part.len()) - 1) as __mmask16;
            let v = _mm512_maskz_loadu_ps(lanes, part.as_ptr());
            let negative = _mm512_test_epi32_mask(_mm512_castps_si512(v), sign);
            bits |= u64::from(negative) << (16 * k);
            zeros |= _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(lanes, v, zero);
        }
        *word = bits;
    }
    zeros != 0
}

/// The 64-bit lane sums of `v` as 8 `i32` at `dst`.
#[inline(always)]
unsafe fn store8(dst: *mut i32, v: __m512i) {
    _mm256_storeu_si256(dst as *mut __m256i, _mm512_cvtepi64_epi32(v));
}

/// The word arrays of pixels `p0..p0 + P`.
#[inline(always)]
unsafe fn pixels<const P: usize>(t: &Tile<'_>, a: &[u64], p0: usize) -> [*const u64; P] {
    std::array::from_fn(|p| a.as_ptr().add(t.base(p0 + p)))
}

/// Where pixel `p`'s sums of blocks `b..` go.
#[inline(always)]
unsafe fn out(t: &Tile<'_>, acc: *mut i32, p: usize, b: usize) -> *mut i32 {
    acc.add((p * t.blocks + b) * LANES)
}

/// Pixels `p0..p0 + P`, every block, by VPOPCNTQ.
#[inline(always)]
unsafe fn vpopcnt_pixels<const P: usize>(t: &Tile<'_>, p0: usize, acc: *mut i32) {
    let mut b = 0;
    while b + 4 <= t.blocks {
        vpopcnt_blocks::<P, 4>(t, p0, b, acc);
        b += 4;
    }
    if b + 2 <= t.blocks {
        vpopcnt_blocks::<P, 2>(t, p0, b, acc);
        b += 2;
    }
    if b < t.blocks {
        vpopcnt_blocks::<P, 1>(t, p0, b, acc);
    }
}

/// Blocks `b0..b0 + G` of pixels `p0..p0 + P` by VPOPCNTQ.
#[inline(always)]
unsafe fn vpopcnt_blocks<const P: usize, const G: usize>(
    t: &Tile<'_>,
    p0: usize,
    b0: usize,
    acc: *mut i32,
) {
    let stride = t.steps * LANES;
    let w = t.w.as_ptr().add(b0 * stride);
    let a = pixels::<P>(t, t.a, p0);
    let mut sums = [[_mm512_setzero_si512(); G]; P];
    for r in t.runs {
        for j in 0..t.run_len {
            let s = r.w + j;
            let mut av = [_mm512_setzero_si512(); P];
            for p in 0..P {
                av[p] = _mm512_set1_epi64(*a[p].add(r.a + j) as i64);
            }
            for g in 0..G {
                let wv = _mm512_loadu_si512(w.add(g * stride + s * LANES) as *const __m512i);
                for p in 0..P {
                    let x = _mm512_xor_si512(av[p], wv);
                    sums[p][g] = _mm512_add_epi64(sums[p][g], _mm512_popcnt_epi64(x));
                }
            }
        }
    }
    for p in 0..P {
        for g in 0..G {
            store8(out(t, acc, p0 + p, b0 + g), sums[p][g]);
        }
    }
}

/// `(a ^ w) & m` in one VPTERNLOGQ (truth table 0x28: true for a != w where m is set).
#[inline(always)]
unsafe fn xor_and(a: __m512i, w: __m512i, m: __m512i) -> __m512i {
    _mm512_ternarylogic_epi64::<0x28>(a, w, m)
}

/// Pixels `p0..p0 + P`, every block, masked, by VPOPCNTQ.
#[inline(always)]
unsafe fn vpopcnt_masked_pixels<const P: usize>(t: &Tile<'_>, p0: usize, acc: *mut i32) {
    let mut b = 0;
    while b + 2 <= t.blocks {
        vpopcnt_masked_blocks::<P, 2>(t, p0, b, acc);
        b += 2;
    }
    if b < t.blocks {
        vpopcnt_masked_blocks::<P, 1>(t, p0, b, acc);
    }
}

/// Blocks `b0..b0 + G` of pixels `p0..p0 + P` of the masked kernel by VPOPCNTQ.
#[inline(always)]
unsafe fn vpopcnt_masked_blocks<const P: usize, const G: usize>(
    t: &Tile<'_>,
    p0: usize,
    b0: usize,
    acc: *mut i32,
) {
    let (Some(a_mask), Some(w_mask)) = (t.a_mask, t.w_mask) else {
        unreachable!("Tile::dot runs the masked kernel only with both masks")
    };
    let stride = t.steps * LANES;
    let (w, wm) = (
        t.w.as_ptr().add(b0 * stride),
        w_mask.as_ptr().add(b0 * stride),
    );
    let (a, am) = (pixels::<P>(t, t.a, p0), pixels::<P>(t, a_mask, p0));
    let zero = _mm512_setzero_si512();
    let mut valid = [[zero; G]; P];
    let mut diff = [[zero; G]; P];
    for r in t.runs {
        for j in 0..t.run_len {
            let s = r.w + j;
            let mut av = [zero; P];
            let mut mv = [zero; P];
            for p in 0..P {
                av[p] = _mm512_set1_epi64(*a[p].add(r.a + j) as i64);
                mv[p] = _mm512_set1_epi64(*am[p].add(r.a + j) as i64);
            }
            for g in 0..G {
                let at = g * stride + s * LANES;
                let wv = _mm512_loadu_si512(w.add(at) as *const __m512i);
                let wmv = _mm512_loadu_si512(wm.add(at) as *const __m512i);
                for p in 0..P {
                    let m = _mm512_and_si512(mv[p], wmv);
                    let d = xor_and(av[p], wv, m);
                    valid[p][g] = _mm512_add_epi64(valid[p][g], _mm512_popcnt_epi64(m));
                    diff[p][g] = _mm512_add_epi64(diff[p][g], _mm512_popcnt_epi64(d));
                }
            }
        }
    }
    for p in 0..P {
        for g in 0..G {
            let twice = _mm512_add_epi64(diff[p][g], diff[p][g]);
            let dot = _mm512_sub_epi64(valid[p][g], twice);
            store8(out(t, acc, p0 + p, b0 + g), dot);
        }
    }
}

/// The nibble table: popcount of 0..16, in each 128-bit lane.
#[inline(always)]
unsafe fn nibble_table() -> __m512i {
    _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
    ))
}

/// Per-byte popcount of 512 bits by the nibble table.
#[inline(always)]
unsafe fn popcount_bytes(v: __m512i, table: __m512i, low: __m512i) -> __m512i {
    let lo = _mm512_and_si512(v, low);
    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
    _mm512_add_epi8(
        _mm512_shuffle_epi8(table, lo),
        _mm512_shuffle_epi8(table, hi),
    )
}

/// Byte counters grow by at most 8 per step: flush them every 31 steps.
const FLUSH: usize = 31;

/// Pixels `p0..p0 + P`, every block, by the nibble table.
#[inline(always)]
unsafe fn nibble_pixels<const P: usize>(t: &Tile<'_>, p0: usize, acc: *mut i32) {
    let mut b = 0;
    while b + 2 <= t.blocks {
        nibble_blocks::<P, 2>(t, p0, b, acc);
        b += 2;
    }
    if b < t.blocks {
        nibble_blocks::<P, 1>(t, p0, b, acc);
    }
}

/// Blocks `b0..b0 + G` of pixels `p0..p0 + P` by the nibble table.
#[inline(always)]
unsafe fn nibble_blocks<const P: usize, const G: usize>(
    t: &Tile<'_>,
    p0: usize,
    b0: usize,
    acc: *mut i32,
) {
    let stride = t.steps * LANES;
    let w = t.w.as_ptr().add(b0 * stride);
    let a = pixels::<P>(t, t.a, p0);
    let (table, low, zero) = (
        nibble_table(),
        _mm512_set1_epi8(0x0f),
        _mm512_setzero_si512(),
    );
    let mut bytes = [[zero; G]; P];
    let mut sums = [[zero; G]; P];
    let mut pending = 0;
    for r in t.runs {
        for j in 0..t.run_len {
            let s = r.w + j;
            if pending == FLUSH {
                for (b, t) in bytes.iter_mut().flatten().zip(sums.iter_mut().flatten()) {
                    *t = _mm512_add_epi64(*t, _mm512_sad_epu8(*b, zero));
                    *b = zero;
                }
                pending = 0;
            }
            let mut av = [zero; P];
            for p in 0..P {
                av[p] = _mm512_set1_epi64(*a[p].add(r.a + j) as i64);
            }
            for g in 0..G {
                let wv = _mm512_loadu_si512(w.add(g * stride + s * LANES) as *const __m512i);
                for p in 0..P {
                    let c = popcount_bytes(_mm512_xor_si512(av[p], wv), table, low);
                    bytes[p][g] = _mm512_add_epi8(bytes[p][g], c);
                }
            }
            pending += 1;
        }
    }
    for p in 0..P {
        for g in 0..G {
            let total = _mm512_add_epi64(sums[p][g], _mm512_sad_epu8(bytes[p][g], zero));
            store8(out(t, acc, p0 + p, b0 + g), total);
        }
    }
}

/// Pixels `p0..p0 + P`, every block, masked, by the nibble table.
#[inline(always)]
unsafe fn nibble_masked_pixels<const P: usize>(t: &Tile<'_>, p0: usize, acc: *mut i32) {
    for b in 0..t.blocks {
        nibble_masked_block::<P>(t, p0, b, acc);
    }
}

/// Block `b` of pixels `p0..p0 + P` of the masked kernel by the nibble table.
#[inline(always)]
unsafe fn nibble_masked_block<const P: usize>(t: &Tile<'_>, p0: usize, b: usize, acc: *mut i32) {
    let (Some(a_mask), Some(w_mask)) = (t.a_mask, t.w_mask) else {
        unreachable!("Tile::dot runs the masked kernel only with both masks")
    };
    let stride = t.steps * LANES;
    let (w, wm) = (
        t.w.as_ptr().add(b * stride),
        w_mask.as_ptr().add(b * stride),
    );
    let (a, am) = (pixels::<P>(t, t.a, p0), pixels::<P>(t, a_mask, p0));
    let (table, low, zero) = (
        nibble_table(),
        _mm512_set1_epi8(0x0f),
        _mm512_setzero_si512(),
    );
    let mut valid_bytes = [zero; P];
    let mut diff_bytes = [zero; P];
    let mut valid = [zero; P];
    let mut diff = [zero; P];
    let mut pending = 0;
    for r in t.runs {
        for j in 0..t.run_len {
            let s = r.w + j;
            if pending == FLUSH {
                for p in 0..P {
                    valid[p] = _mm512_add_epi64(valid[p], _mm512_sad_epu8(valid_bytes[p], zero));
                    diff[p] = _mm512_add_epi64(diff[p], _mm512_sad_epu8(diff_bytes[p], zero));
                    valid_bytes[p] = zero;
                    diff_bytes[p] = zero;
                }
                pending = 0;
            }
            let wv = _mm512_loadu_si512(w.add(s * LANES) as *const __m512i);
            let wmv = _mm512_loadu_si512(wm.add(s * LANES) as *const __m512i);
            for p in 0..P {
                let av = _mm512_set1_epi64(*a[p].add(r.a + j) as i64);
                let mv = _mm512_set1_epi64(*am[p].add(r.a + j) as i64);
                let m = _mm512_and_si512(mv, wmv);
                let d = xor_and(av, wv, m);
                valid_bytes[p] = _mm512_add_epi8(valid_bytes[p], popcount_bytes(m, table, low));
                diff_bytes[p] = _mm512_add_epi8(diff_bytes[p], popcount_bytes(d, table, low));
            }
            pending += 1;
        }
    }
    for p in 0..P {
        let v = _mm512_add_epi64(valid[p], _mm512_sad_epu8(valid_bytes[p], zero));
        let d = _mm512_add_epi64(diff[p], _mm512_sad_epu8(diff_bytes[p], zero));
        let dot = _mm512_sub_epi64(v, _mm512_add_epi64(d, d));
        store8(out(t, acc, p0 + p, b), dot);
    }
}
