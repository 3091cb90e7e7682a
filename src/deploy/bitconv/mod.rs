//! Binary convolution by XNOR and popcount (SPEC 1 in eval mode, bit-packed).
//!
//! Activations arrive as float NHWC. Each pixel's channels are binarized and packed,
//! 64 per `u64` word, bit set where the value is negative (sign -1); weights were packed
//! the same way at export. For a pixel and an output channel the binary dot product over
//! the valid taps is `n_valid - 2 * popcount(a XOR w)`, summed over words, where
//! `n_valid = taps inside the image * channels per group`. Taps that fall into the zero
//! padding are skipped, so they contribute 0 exactly as in training (not -1). Unused bits
//! of a group's last word are 0 in both operands and never count.
//!
//! `torch.sign(0) == 0`: a zero activation or weight contributes 0. When the packed input
//! (or the layer's weight) holds an exact zero, the layer runs the masked kernel, which
//! also carries "non-zero" bit planes: `dot = popcount(m) - 2 * popcount((a ^ w) & m)`
//! with `m = m_a & m_w`. Otherwise one of the fast kernels runs, chosen at load time:
//! AVX2 (nibble-table popcount on four 64-bit lanes, 8 output channels per step), x86
//! `popcnt`, or the portable `count_ones` (which LLVM lowers to NEON `CNT` on aarch64).

mod kernels;

use rayon::prelude::*;

pub use self::kernels::Kernel;
use self::kernels::{dot_blocks, pack_signs};
use super::geom::ConvGeom;
use super::tensor::{Act, Tensor4};
use crate::error::{value_err, Result};

/// Output channels computed together by the fast kernels (weights are stored blocked so
/// that one tap-word of 8 channels is contiguous).
pub const LANES: usize = 8;
/// `u64` words per 64 channels.
pub const BITS: usize = 64;
/// A binary convolution with its per-channel affine epilogue
/// `y = scale[o] * dot + shift[o] (+ residual)`, then the activation.
pub struct BinaryConv {
    pub geom: ConvGeom,
    /// Channels per group and `u64` words per group.
    cg: usize,
    wpg: usize,
    og: usize,
    blocks: usize,
    /// `[O][kh][kw][wpg]`, bit set where the weight is negative.
    weight: Vec<u64>,
    /// Same layout, bit set where the weight is non-zero; `None` when none is zero.
    weight_mask: Option<Vec<u64>>,
    /// `[groups][blocks][kh][kw][wpg][LANES]`, zero-padded output channels.
    blocked: Vec<u64>,
    /// `[groups][kh*kw][og]`: popcount of each tap's weight words, subtracted for taps
    /// that fall in the padding (the fast kernels read a zero word there).
    tap_popcount: Vec<u32>,
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Act,
}

pub fn words_for(channels: usize) -> usize {
    channels.div_ceil(BITS)
}

impl BinaryConv {
    pub fn new(
        geom: ConvGeom,
        weight: Vec<u64>,
        weight_mask: Option<Vec<u64>>,
        scale: Vec<f32>,
        shift: Vec<f32>,
        act: Act,
    ) -> Self {
        let cg = geom.cin / geom.groups;
        let og = geom.cout / geom.groups;
        let wpg = words_for(cg);
        let blocks = og.div_ceil(LANES);
        let taps = geom.kh * geom.kw;
        let mut blocked = vec![0u64; geom.groups * blocks * taps * wpg * LANES];
        for g in 0..geom.groups {
            for oi in 0..og {
                let o = g * og + oi;
                let (b, lane) = (oi / LANES, oi % LANES);
                for t in 0..taps {
                    for j in 0..wpg {
                        let dst = ((((g * blocks + b) * taps + t) * wpg + j) * LANES) + lane;
                        blocked[dst] = weight[(o * taps + t) * wpg + j];
                    }
                }
            }
        }
        let mut tap_popcount = vec![0u32; geom.groups * taps * og];
        for g in 0..geom.groups {
            for oi in 0..og {
                for t in 0..taps {
                    let o = g * og + oi;
                    let words = &weight[(o * taps + t) * wpg..(o * taps + t + 1) * wpg];
                    tap_popcount[(g * taps + t) * og + oi] =
                        words.iter().map(|w| w.count_ones()).sum();
                }
            }
        }
        let weight_mask = weight_mask.filter(|m| {
            // A mask is only needed when some in-range bit is clear.
            (0..weight.len()).any(|i| {
                let j = i % wpg;
                let valid = valid_bits(cg, j);
                m[i] & valid != valid
            })
        });
        BinaryConv {
            geom,
            cg,
            wpg,
            og,
            blocks,
            weight,
            weight_mask,
            blocked,
            tap_popcount,
            scale,
            shift,
            act,
        }
    }

    /// Words of one packed pixel (all groups).
    fn pixel_words(&self) -> usize {
        self.geom.groups * self.wpg
    }

    pub fn forward(
        &self,
        x: &Tensor4,
        residual: Option<&Tensor4>,
        kernel: Kernel,
        name: &str,
    ) -> Result<Tensor4> {
        let g = &self.geom;
        let (oh, ow) = g.output_hw(x, name)?;
        if let Some(r) = residual {
            if (r.n, r.h, r.w, r.c) != (x.n, oh, ow, g.cout) {
                return value_err!(
                    "layer '{name}': residual of shape {:?} does not match the output {:?}",
                    r.nchw(),
                    [x.n, g.cout, oh, ow]
                );
            }
        }
        let (packed, mask) = self.pack(x, kernel);
        let masked = mask.is_some() || self.weight_mask.is_some();
        let mut out = Tensor4::scratch(x.n, oh, ow, g.cout)?;
        let row_len = ow * g.cout;
        out.data
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(row, dst)| {
                let (n, y) = (row / oh, row % oh);
                let res = residual.map(|r| &r.data[row * row_len..(row + 1) * row_len]);
                if masked {
                    self.row_masked(&packed, mask.as_deref(), x, n, y, dst);
                    self.epilogue(dst, res);
                } else {
                    self.row_fast(&packed, x, n, y, dst, res, kernel);
                }
            });
        Ok(out)
    }

    /// Binarizes and packs `x` to `[N][H][W][groups][wpg]` words, plus the non-zero
    /// plane when any value is exactly zero.
    fn pack(&self, x: &Tensor4, kernel: Kernel) -> (Vec<u64>, Option<Vec<u64>>) {
        let pw = self.pixel_words();
        let pixels = x.n * x.h * x.w;
        let mut bits = vec![0u64; pixels * pw];
        let c = x.c;
        let any_zero = bits
            .par_chunks_mut(pw * 64)
            .zip(x.data.par_chunks(c * 64))
            .map(|(dst, src)| {
                let mut zero = false;
                for (px, out) in src.chunks_exact(c).zip(dst.chunks_exact_mut(pw)) {
                    for gi in 0..self.geom.groups {
                        let ch = &px[gi * self.cg..(gi + 1) * self.cg];
                        let out = &mut out[gi * self.wpg..(gi + 1) * self.wpg];
                        zero |= pack_signs(ch, out, kernel);
                    }
                }
                zero
            })
            .reduce(|| false, |a, b| a || b);
        if !any_zero {
            return (bits, None);
        }
        let mut mask = vec![0u64; pixels * pw];
        for (p, px) in x.data.chunks_exact(c).enumerate() {
            for gi in 0..self.geom.groups {
                let ch = &px[gi * self.cg..(gi + 1) * self.cg];
                for (j, part) in ch.chunks(BITS).enumerate() {
                    let mut word = 0u64;
                    for (b, &v) in part.iter().enumerate() {
                        word |= u64::from(v != 0.0) << b;
                    }
                    mask[p * pw + gi * self.wpg + j] = word;
                }
            }
        }
        // A negative zero has its sign bit set: clear it, its weight is 0 anyway.
        for (b, m) in bits.iter_mut().zip(&mask) {
            *b &= m;
        }
        (bits, Some(mask))
    }

    /// Valid taps of output pixel (y, x) as (packed pixel offset, tap index).
    fn taps(&self, x: &Tensor4, n: usize, oy: usize, ox: usize, out: &mut Vec<(usize, usize)>) {
        let g = &self.geom;
        out.clear();
        let (ky0, ky1) = ConvGeom::valid_taps(oy, x.h, g.kh, g.stride.0, g.padding.0, g.dilation.0);
        let (kx0, kx1) = ConvGeom::valid_taps(ox, x.w, g.kw, g.stride.1, g.padding.1, g.dilation.1);
        let pw = self.pixel_words();
        for ky in ky0..ky1 {
            let iy = oy * g.stride.0 + ky * g.dilation.0 - g.padding.0;
            for kx in kx0..kx1 {
                let ix = ox * g.stride.1 + kx * g.dilation.1 - g.padding.1;
                out.push((((n * x.h + iy) * x.w + ix) * pw, ky * g.kw + kx));
            }
        }
    }

    /// One output row by the fast kernels (see [`Self::row_fast_impl`]); with AVX2 the
    /// whole row loop, epilogue included, is compiled for AVX2.
    #[allow(clippy::too_many_arguments)]
    fn row_fast(
        &self,
        packed: &[u64],
        x: &Tensor4,
        n: usize,
        oy: usize,
        dst: &mut [f32],
        residual: Option<&[f32]>,
        kernel: Kernel,
    ) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 {
            // SAFETY: the AVX2 kernel is chosen only when the CPU reports AVX2.
            return unsafe { self.row_fast_avx2(packed, x, n, oy, dst, residual) };
        }
        self.row_fast_impl(packed, x, n, oy, dst, residual, kernel)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_fast_avx2(
        &self,
        packed: &[u64],
        x: &Tensor4,
        n: usize,
        oy: usize,
        dst: &mut [f32],
        residual: Option<&[f32]>,
    ) {
        self.row_fast_impl(packed, x, n, oy, dst, residual, Kernel::Avx2)
    }

    /// One output row by the fast kernels, epilogue fused. Interior pixels of a dense
    /// conv read each kernel row as one run of packed words; other pixels gather their
    /// taps (a zero word for a tap in the padding, whose weight popcount is then taken
    /// back out), so the kernel runs flat loops per 8 output channels.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn row_fast_impl(
        &self,
        packed: &[u64],
        x: &Tensor4,
        n: usize,
        oy: usize,
        dst: &mut [f32],
        residual: Option<&[f32]>,
        kernel: Kernel,
    ) {
        let g = &self.geom;
        let taps_n = g.kh * g.kw;
        let steps = taps_n * self.wpg;
        let group_words = self.blocks * steps * LANES;
        let pw = self.pixel_words();
        let mut gathered = vec![0u64; steps];
        let mut starts = vec![0usize; g.kh];
        let row_len = g.kw * self.wpg;
        let mut acc = vec![0u32; self.blocks * LANES];
        let (ky0, ky1) = ConvGeom::valid_taps(oy, x.h, g.kh, g.stride.0, g.padding.0, g.dilation.0);
        // Interior pixels of a dense conv read each kernel row as one contiguous run of
        // packed words; other pixels gather their taps first.
        let direct_rows = g.groups == 1 && g.dilation.1 == 1;
        for (ox, px) in dst.chunks_exact_mut(g.cout).enumerate() {
            let (kx0, kx1) =
                ConvGeom::valid_taps(ox, x.w, g.kw, g.stride.1, g.padding.1, g.dilation.1);
            let interior = ky1 - ky0 == g.kh && kx1 - kx0 == g.kw;
            let n_valid = ((ky1 - ky0) * (kx1 - kx0) * self.cg) as i32;
            for gi in 0..g.groups {
                let w = &self.blocked[gi * group_words..(gi + 1) * group_words];
                if interior && direct_rows {
                    let ix = ox * g.stride.1 - g.padding.1;
                    for (ky, st) in starts.iter_mut().enumerate() {
                        let iy = oy * g.stride.0 + ky * g.dilation.0 - g.padding.0;
                        *st = ((n * x.h + iy) * x.w + ix) * pw;
                    }
                    dot_blocks(kernel, packed, &starts, row_len, w, self.blocks, &mut acc);
                } else {
                    gathered.fill(0);
                    for ky in ky0..ky1 {
                        let iy = oy * g.stride.0 + ky * g.dilation.0 - g.padding.0;
                        for kx in kx0..kx1 {
                            let ix = ox * g.stride.1 + kx * g.dilation.1 - g.padding.1;
                            let src = ((n * x.h + iy) * x.w + ix) * pw + gi * self.wpg;
                            let t = ky * g.kw + kx;
                            for j in 0..self.wpg {
                                gathered[t * self.wpg + j] = packed[src + j];
                            }
                        }
                    }
                    for (ky, st) in starts.iter_mut().enumerate() {
                        *st = ky * row_len;
                    }
                    dot_blocks(
                        kernel,
                        &gathered,
                        &starts,
                        row_len,
                        w,
                        self.blocks,
                        &mut acc,
                    );
                }
                let o0 = gi * self.og;
                if !interior {
                    // Taps in the padding read a zero word: take their weights' popcount
                    // back out so that they contribute nothing.
                    let pc = &self.tap_popcount[gi * taps_n * self.og..(gi + 1) * taps_n * self.og];
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            if (ky0..ky1).contains(&ky) && (kx0..kx1).contains(&kx) {
                                continue;
                            }
                            let t = ky * g.kw + kx;
                            for (a, &c) in acc.iter_mut().zip(&pc[t * self.og..(t + 1) * self.og]) {
                                *a -= c;
                            }
                        }
                    }
                }
                let out = &mut px[o0..o0 + self.og];
                let scale = &self.scale[o0..o0 + self.og];
                let shift = &self.shift[o0..o0 + self.og];
                let res = residual.map(|r| &r[ox * g.cout + o0..ox * g.cout + o0 + self.og]);
                epilogue(out, &acc[..self.og], n_valid, scale, shift, res, &self.act);
            }
        }
    }

    fn row_masked(
        &self,
        packed: &[u64],
        mask: Option<&[u64]>,
        x: &Tensor4,
        n: usize,
        oy: usize,
        dst: &mut [f32],
    ) {
        let g = &self.geom;
        let taps_n = g.kh * g.kw;
        let wpg = self.wpg;
        let mut taps = Vec::with_capacity(taps_n);
        for (ox, px) in dst.chunks_exact_mut(g.cout).enumerate() {
            self.taps(x, n, oy, ox, &mut taps);
            for (o, out) in px.iter_mut().enumerate() {
                let gi = o / self.og;
                let (mut valid, mut diff) = (0i64, 0i64);
                for &(a, t) in &taps {
                    for j in 0..wpg {
                        let ai = a + gi * wpg + j;
                        let wi = (o * taps_n + t) * wpg + j;
                        let m_a = mask.map_or(valid_bits(self.cg, j), |m| m[ai]);
                        let m_w = self
                            .weight_mask
                            .as_ref()
                            .map_or(valid_bits(self.cg, j), |m| m[wi]);
                        let m = m_a & m_w;
                        valid += i64::from(m.count_ones());
                        diff += i64::from(((packed[ai] ^ self.weight[wi]) & m).count_ones());
                    }
                }
                *out = (valid - 2 * diff) as f32;
            }
        }
    }

    fn epilogue(&self, dst: &mut [f32], residual: Option<&[f32]>) {
        let c = self.geom.cout;
        for (p, px) in dst.chunks_exact_mut(c).enumerate() {
            for (o, v) in px.iter_mut().enumerate() {
                *v = self.scale[o] * *v + self.shift[o];
            }
            if let Some(r) = residual {
                for (v, r) in px.iter_mut().zip(&r[p * c..(p + 1) * c]) {
                    *v += r;
                }
            }
            self.act.apply(px);
        }
    }
}

/// `out = act(scale * (n_valid - 2 * acc) + shift (+ residual))`, in one pass.
#[inline(always)]
fn epilogue(
    out: &mut [f32],
    acc: &[u32],
    n_valid: i32,
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    act: &Act,
) {
    let n = out.len();
    let (acc, scale, shift) = (&acc[..n], &scale[..n], &shift[..n]);
    match residual {
        Some(r) => {
            let r = &r[..n];
            for i in 0..n {
                out[i] = scale[i] * (n_valid - 2 * acc[i] as i32) as f32 + shift[i] + r[i];
            }
        }
        None => {
            for i in 0..n {
                out[i] = scale[i] * (n_valid - 2 * acc[i] as i32) as f32 + shift[i];
            }
        }
    }
    act.apply(out);
}

/// Bits of word `j` that hold one of `cg` channels.
fn valid_bits(cg: usize, j: usize) -> u64 {
    let left = cg - j * BITS;
    if left >= BITS {
        u64::MAX
    } else {
        (1u64 << left) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift generator (no dependency for test data).
    fn words(n: usize, mut seed: u64) -> Vec<u64> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            })
            .collect()
    }

    fn reference(
        a: &[u64],
        starts: &[usize],
        row_len: usize,
        w: &[u64],
        blocks: usize,
    ) -> Vec<u32> {
        let steps = starts.len() * row_len;
        let mut out = vec![0u32; blocks * LANES];
        for b in 0..blocks {
            for l in 0..LANES {
                let mut sum = 0;
                for (r, &st) in starts.iter().enumerate() {
                    for s in 0..row_len {
                        let wi = (b * steps + r * row_len + s) * LANES + l;
                        sum += (a[st + s] ^ w[wi]).count_ones();
                    }
                }
                out[b * LANES + l] = sum;
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_reference() {
        // Row lengths around the byte-counter flush (31 steps) included.
        for &(rows, row_len, blocks) in &[(3, 3, 8), (3, 24, 2), (1, 31, 1), (2, 40, 3), (7, 7, 1)]
        {
            let a = words(200, 1);
            let starts: Vec<usize> = (0..rows).map(|r| r * 17 % (200 - row_len)).collect();
            let w = words(blocks * rows * row_len * LANES, 2);
            let want = reference(&a, &starts, row_len, &w, blocks);
            for name in Kernel::NAMES {
                let Ok(kernel) = Kernel::parse(name) else {
                    continue;
                };
                let mut acc = vec![0u32; blocks * LANES];
                dot_blocks(kernel, &a, &starts, row_len, &w, blocks, &mut acc);
                assert_eq!(acc, want, "kernel {name}, rows {rows} x {row_len}");
            }
        }
    }

    #[test]
    fn pack_signs_sets_negative_bits_and_reports_zeros() {
        let ch: Vec<f32> = (0..80)
            .map(|i| if i % 3 == 0 { -1.5 } else { 0.25 })
            .collect();
        for name in Kernel::NAMES {
            let Ok(kernel) = Kernel::parse(name) else {
                continue;
            };
            let mut out = vec![0u64; 2];
            assert!(!pack_signs(&ch, &mut out, kernel));
            for (c, v) in ch.iter().enumerate() {
                assert_eq!(
                    (out[c / 64] >> (c % 64)) & 1 == 1,
                    *v < 0.0,
                    "{name} channel {c}"
                );
            }
            let mut with_zero = ch.clone();
            with_zero[70] = 0.0;
            assert!(pack_signs(&with_zero, &mut out, kernel));
        }
    }

    /// sign() with sign(0) = 0, as torch.sign.
    fn sign(v: f32) -> f32 {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    /// Packs a float weight `[O][C/g][kh][kw]` as the exporter does.
    fn pack_weight(w: &[f32], o: usize, cg: usize, kh: usize, kw: usize) -> (Vec<u64>, Vec<u64>) {
        let wpg = words_for(cg);
        let mut bits = vec![0u64; o * kh * kw * wpg];
        let mut nonzero = vec![0u64; o * kh * kw * wpg];
        for oi in 0..o {
            for c in 0..cg {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let v = w[((oi * cg + c) * kh + ky) * kw + kx];
                        let i = ((oi * kh + ky) * kw + kx) * wpg + c / 64;
                        bits[i] |= u64::from(v < 0.0) << (c % 64);
                        nonzero[i] |= u64::from(v != 0.0) << (c % 64);
                    }
                }
            }
        }
        (bits, nonzero)
    }

    #[test]
    fn binary_conv_matches_a_direct_sum_over_geometries() {
        // (cin, cout, k, stride, padding, dilation, groups, h, w)
        let cases = [
            (70, 16, 3, 1, 1, 1, 1, 9, 7),
            (128, 24, 3, 2, 1, 1, 2, 8, 8),
            (12, 9, 3, 1, 2, 2, 3, 7, 6),
            (64, 8, 1, 2, 0, 1, 1, 5, 5),
            (16, 16, 5, 1, 2, 1, 4, 6, 6),
        ];
        for (case, &(cin, cout, k, s, p, d, groups, h, w)) in cases.iter().enumerate() {
            let cg = cin / groups;
            let og = cout / groups;
            let to_f = |x: u64| ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let mut wf: Vec<f32> = words(cout * cg * k * k, 10 + case as u64)
                .into_iter()
                .map(to_f)
                .collect();
            let mut xf: Vec<f32> = words(2 * h * w * cin, 20 + case as u64)
                .into_iter()
                .map(to_f)
                .collect();
            for zeroed in [false, true] {
                if zeroed {
                    // exact zeros in both operands: the masked kernel
                    wf[3] = 0.0;
                    xf[5] = 0.0;
                    xf[17] = -0.0;
                }
                let geom = ConvGeom {
                    cin,
                    cout,
                    kh: k,
                    kw: k,
                    stride: (s, s),
                    padding: (p, p),
                    dilation: (d, d),
                    groups,
                };
                let (bits, mask) = pack_weight(&wf, cout, cg, k, k);
                let scale: Vec<f32> = (0..cout).map(|o| 0.5 + o as f32 * 0.25).collect();
                let shift: Vec<f32> = (0..cout).map(|o| o as f32 - 3.0).collect();
                let conv = BinaryConv::new(
                    geom.clone(),
                    bits,
                    Some(mask),
                    scale.clone(),
                    shift.clone(),
                    Act::None,
                );
                let x = Tensor4 {
                    n: 2,
                    h,
                    w,
                    c: cin,
                    data: xf.clone(),
                };
                let (oh, ow) = geom.out_hw(h, w, "t").expect("fits");
                for name in Kernel::NAMES {
                    let Ok(kernel) = Kernel::parse(name) else {
                        continue;
                    };
                    let y = conv.forward(&x, None, kernel, "t").expect("runs");
                    for n in 0..2 {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                for o in 0..cout {
                                    let gi = o / og;
                                    let mut dot = 0.0f32;
                                    for c in 0..cg {
                                        for ky in 0..k {
                                            for kx in 0..k {
                                                let iy = (oy * s + ky * d) as isize - p as isize;
                                                let ix = (ox * s + kx * d) as isize - p as isize;
                                                if iy < 0
                                                    || ix < 0
                                                    || iy >= h as isize
                                                    || ix >= w as isize
                                                {
                                                    continue;
                                                }
                                                let xi = ((n * h + iy as usize) * w + ix as usize)
                                                    * cin
                                                    + gi * cg
                                                    + c;
                                                let wi = ((o * cg + c) * k + ky) * k + kx;
                                                dot += sign(xf[xi]) * sign(wf[wi]);
                                            }
                                        }
                                    }
                                    let want = scale[o] * dot + shift[o];
                                    let got = y.data[((n * oh + oy) * ow + ox) * cout + o];
                                    assert_eq!(got, want, "case {case} zeros {zeroed} kernel {name} at {n},{oy},{ox},{o}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Throughput of the kernels on a ResNet-18 layer1-sized problem (run by hand:
    /// `cargo test --release kernel_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn kernel_throughput() {
        // layer1 (64 channels: 1 word per tap) and layer4 (512: 8 words per tap).
        for (row_len, blocks, pixels) in [(3, 8, 3136), (24, 64, 49)] {
            let rows = 3;
            let a = words(4096, 3);
            let starts = [0, 1000, 2000];
            let w = words(blocks * rows * row_len * LANES, 4);
            for name in Kernel::NAMES {
                let Ok(kernel) = Kernel::parse(name) else {
                    continue;
                };
                let mut acc = vec![0u32; blocks * LANES];
                let t = std::time::Instant::now();
                for _ in 0..pixels {
                    dot_blocks(kernel, &a, &starts, row_len, &w, blocks, &mut acc);
                    std::hint::black_box(&acc);
                }
                let dt = t.elapsed().as_secs_f64();
                let words = (pixels * blocks * rows * row_len * LANES) as f64;
                println!(
                    "{name} {row_len}x{blocks}: {:.3} ms, {:.2} Gword/s",
                    dt * 1e3,
                    words / dt / 1e9
                );
            }
        }
    }
}
