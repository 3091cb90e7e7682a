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

use rayon::prelude::*;

use super::tensor::{Act, Tensor4};
use crate::error::{value_err, Result};

/// Output channels computed together by the fast kernels (weights are stored blocked so
/// that one tap-word of 8 channels is contiguous).
pub const LANES: usize = 8;
/// `u64` words per 64 channels.
pub const BITS: usize = 64;

/// The popcount kernel family, chosen once per engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `u64::count_ones` compiled for the baseline target.
    Portable,
    /// x86-64 `popcnt` instruction.
    Popcnt,
    /// x86-64 AVX2.
    Avx2,
}

impl Kernel {
    pub const NAMES: [&'static str; 3] = ["portable", "popcnt", "avx2"];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Popcnt => "popcnt",
            Kernel::Avx2 => "avx2",
        }
    }

    fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Popcnt => std::arch::is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best kernel this CPU runs.
    pub fn detect() -> Kernel {
        [Kernel::Avx2, Kernel::Popcnt]
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Kernel::Portable)
    }

    /// `"auto"` or a kernel name; names the CPU cannot run are refused.
    pub fn parse(name: &str) -> Result<Kernel> {
        let kernel = match name {
            "auto" => return Ok(Kernel::detect()),
            "portable" => Kernel::Portable,
            "popcnt" => Kernel::Popcnt,
            "avx2" => Kernel::Avx2,
            other => {
                return value_err!(
                    "unknown kernel '{other}'; expected 'auto' or one of {}",
                    Kernel::NAMES.join(", ")
                )
            }
        };
        if kernel.supported() {
            Ok(kernel)
        } else {
            value_err!("this CPU cannot run the '{name}' kernel")
        }
    }
}

/// Geometry shared by the binary and the float convolution.
#[derive(Clone, Debug)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl ConvGeom {
    pub fn check(&self, name: &str) -> Result<()> {
        let positive = [
            self.cin,
            self.cout,
            self.kh,
            self.kw,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if positive.contains(&0) {
            return value_err!("corrupt deploy file: op '{name}' has a zero size in {self:?}");
        }
        if !self.cin.is_multiple_of(self.groups) || !self.cout.is_multiple_of(self.groups) {
            return value_err!(
                "corrupt deploy file: op '{name}': channels {}->{} are not divisible by groups {}",
                self.cin,
                self.cout,
                self.groups
            );
        }
        Ok(())
    }

    /// Output height and width for input `x`, or an error naming the layer when its
    /// channels or size do not fit.
    pub fn output_hw(&self, x: &Tensor4, name: &str) -> Result<(usize, usize)> {
        if x.c != self.cin {
            return value_err!(
                "layer '{name}' expects {} input channels, got {}",
                self.cin,
                x.c
            );
        }
        self.out_hw(x.h, x.w, name)
    }

    /// Output height and width for an input of `h` x `w`, or an error naming the layer.
    pub fn out_hw(&self, h: usize, w: usize, name: &str) -> Result<(usize, usize)> {
        let one = |size: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (size + 2 * p).checked_sub(span).map(|v| v / s + 1)
        };
        match (
            one(h, self.kh, self.stride.0, self.padding.0, self.dilation.0),
            one(w, self.kw, self.stride.1, self.padding.1, self.dilation.1),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => value_err!(
                "input of {h}x{w} is too small for layer '{name}' ({}x{} kernel, padding {:?}, dilation {:?})",
                self.kh,
                self.kw,
                self.padding,
                self.dilation
            ),
        }
    }

    /// The range of kernel offsets whose input row `o * s - p + k * d` lies in `0..size`.
    fn valid_taps(o: usize, size: usize, k: usize, s: usize, p: usize, d: usize) -> (usize, usize) {
        let base = (o * s) as isize - p as isize;
        let mut lo = 0;
        while lo < k && base + ((lo * d) as isize) < 0 {
            lo += 1;
        }
        let mut hi = k;
        while hi > lo && base + ((hi - 1) * d) as isize >= size as isize {
            hi -= 1;
        }
        (lo, hi)
    }
}

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

/// Packs the signs of `ch` into `out` (bit set for negative values, including -0.0,
/// which the caller clears with the zero mask); returns whether any value is zero.
fn pack_signs(ch: &[f32], out: &mut [u64], kernel: Kernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && ch.len().is_multiple_of(8) {
        assert!(out.len() == ch.len().div_ceil(BITS));
        // SAFETY: AVX2 was detected before this kernel was chosen; lengths checked.
        return unsafe { x86::pack_avx2(ch, out) };
    }
    let _ = kernel;
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

/// For one output pixel and every output channel of a group: the popcount of
/// `a[s] ^ w[s]` summed over the steps `s` (tap-major, then word). The steps' words are
/// `a[start..start + row_len]` for each start in `starts` (one run per kernel row); `w`
/// is the group's blocked weight `[blocks][steps][LANES]`; `acc` receives
/// `blocks * LANES` sums.
fn dot_blocks(
    kernel: Kernel,
    a: &[u64],
    starts: &[usize],
    row_len: usize,
    w: &[u64],
    blocks: usize,
    acc: &mut [u32],
) {
    // The kernels index without bounds checks: every range is checked here.
    assert!(
        acc.len() == blocks * LANES
            && w.len() == blocks * starts.len() * row_len * LANES
            && starts.iter().all(|&s| s + row_len <= a.len()),
        "binary conv kernel called out of bounds"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was chosen only after the CPU reported AVX2 (Kernel::parse /
        // detect), and the assert above keeps every access in bounds.
        Kernel::Avx2 => unsafe { x86::dot_avx2(a, starts, row_len, w, blocks, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for popcnt.
        Kernel::Popcnt => unsafe { x86::dot_popcnt(a, starts, row_len, w, blocks, acc) },
        _ => dot_generic(a, starts, row_len, w, blocks, acc),
    }
}

#[inline(always)]
fn dot_generic(
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot_generic, LANES};
    use std::arch::x86_64::*;

    #[target_feature(enable = "popcnt")]
    pub unsafe fn dot_popcnt(
        a: &[u64],
        starts: &[usize],
        row_len: usize,
        w: &[u64],
        blocks: usize,
        acc: &mut [u32],
    ) {
        dot_generic(a, starts, row_len, w, blocks, acc)
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
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_avx2(ch: &[f32], out: &mut [u64]) -> bool {
        let zero = _mm256_setzero_ps();
        let mut zeros = 0;
        for (part, word) in ch.chunks(super::BITS).zip(out.iter_mut()) {
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

    /// Adds the 64-bit lane sums of two byte-count registers and stores them as 8 u32.
    #[inline(always)]
    unsafe fn store_sums(dst: *mut u32, sum0: __m256i, sum1: __m256i) {
        // Four 64-bit sums per register, each < 2^32: gather the low halves.
        let idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
        let lo0 = _mm256_permutevar8x32_epi32(sum0, idx);
        let lo1 = _mm256_permutevar8x32_epi32(sum1, idx);
        let both = _mm256_permute2x128_si256::<0x20>(lo0, lo1);
        _mm256_storeu_si256(dst as *mut __m256i, both);
    }

    /// `GROUP` blocks of 8 channels in one pass over the steps: the activation word is
    /// broadcast once per step for all of them. Byte counters are flushed to 64-bit sums
    /// every `FLUSH` steps.
    #[inline(always)]
    unsafe fn block_group<const GROUP: usize>(
        ap: *const u64,
        starts: &[usize],
        row_len: usize,
        w: *const u64,
        steps: usize,
        acc: *mut u32,
    ) {
        let table = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
            3, 3, 4,
        );
        let low = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        let mut bytes = [[zero; 2]; GROUP];
        let mut sums = [[zero; 2]; GROUP];
        let block_stride = steps * LANES / 4; // in __m256i
        let wp = w as *const __m256i;
        let mut s = 0;
        let mut pending = 0;
        for &st in starts {
            let row = ap.add(st);
            let mut j = 0;
            while j < row_len {
                if pending == FLUSH {
                    for (b, t) in bytes.iter_mut().zip(sums.iter_mut()) {
                        t[0] = _mm256_add_epi64(t[0], _mm256_sad_epu8(b[0], zero));
                        t[1] = _mm256_add_epi64(t[1], _mm256_sad_epu8(b[1], zero));
                        *b = [zero; 2];
                    }
                    pending = 0;
                }
                let end = row_len.min(j + FLUSH - pending);
                for jj in j..end {
                    let av = _mm256_set1_epi64x(*row.add(jj) as i64);
                    for (g, pair) in bytes.iter_mut().enumerate() {
                        let wv = wp.add(g * block_stride + 2 * s);
                        let x0 = _mm256_xor_si256(av, _mm256_loadu_si256(wv));
                        let x1 = _mm256_xor_si256(av, _mm256_loadu_si256(wv.add(1)));
                        pair[0] = _mm256_add_epi8(pair[0], popcount_bytes(x0, table, low));
                        pair[1] = _mm256_add_epi8(pair[1], popcount_bytes(x1, table, low));
                    }
                    s += 1;
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

    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_avx2(
        a: &[u64],
        starts: &[usize],
        row_len: usize,
        w: &[u64],
        blocks: usize,
        acc: &mut [u32],
    ) {
        let steps = starts.len() * row_len;
        let ap = a.as_ptr();
        let mut b = 0;
        while b + 4 <= blocks {
            let wb = w.as_ptr().add(b * steps * LANES);
            block_group::<4>(
                ap,
                starts,
                row_len,
                wb,
                steps,
                acc.as_mut_ptr().add(b * LANES),
            );
            b += 4;
        }
        while b < blocks {
            let wb = w.as_ptr().add(b * steps * LANES);
            block_group::<1>(
                ap,
                starts,
                row_len,
                wb,
                steps,
                acc.as_mut_ptr().add(b * LANES),
            );
            b += 1;
        }
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
