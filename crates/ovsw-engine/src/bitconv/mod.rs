//! Binary convolution by XNOR and popcount (SPEC 1 in eval mode, bit-packed): the conv
//! driver. The popcount kernels, one per instruction set, are in `simd/`.
//!
//! Activations arrive as float NHWC. Each pixel's channels are binarized and packed in
//! the layout of [`super::bits`], 64 per `u64` word, bit set where the value is negative
//! (sign -1), as the weights were at export ([`super::lower`]). For a pixel and an
//! output channel the binary dot product over the valid taps is
//! `n_valid - 2 * popcount(a XOR w)`, summed over words, where `n_valid = taps inside
//! the image * channels per group`. Taps that fall into the zero padding are skipped,
//! so they contribute 0 exactly as in training (not -1). Unused bits of a group's last
//! word are 0 in both operands and never count.
//!
//! `torch.sign(0) == 0`: a zero activation or weight contributes 0. When the packed input
//! (or the layer's weight) holds an exact zero, the layer runs the masked kernel, which
//! also carries "non-zero" bit planes: `dot = popcount(m) - 2 * popcount((a ^ w) & m)`
//! with `m = m_a & m_w`.
//!
//! The driver walks each output row in tiles of up to [`TILE`] pixels whose windows
//! meet the image alike (all of the window inside, or the same columns cut off by the
//! padding), so that a kernel loads each weight register once for all of them. The
//! pixels read the packed input in place: one run of words per kernel row over the
//! columns inside the image (one run per tap for grouped or dilated convs), against
//! the matching weight steps; taps in the padding are never read. The per-channel
//! scale and shift, the residual and the activation follow in the same pass, compiled
//! with the kernel's instruction set.
//!
//! Convs with few channels and outputs per group (depthwise) take another route,
//! [`grouped`]: `i8` signs summed across output channels, the same epilogue.

mod grouped;
mod rows;
mod simd;

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use self::grouped::Grouped;
use self::rows::{epilogue, Output, Plan, Sums, PACK_CHUNK};
pub use self::simd::cpu::{avx2_usable, avx512f_usable, cpu_flags, DISABLE_ENV};
pub use self::simd::isa::LANES;
use self::simd::isa::{Isa, Job, Run, Runs, Tile};
pub use self::simd::Kernel;
use crate::bits::pack_channels;
pub use crate::bits::{words_for, BITS};
use crate::error::{value_err, Result};
use crate::geom::ConvGeom;
use crate::nhwc::{Act, Tensor4};
use crate::par;

/// Output pixels per register tile of the kernels (the least per kernel call).
pub const TILE: usize = 4;

/// Bits of word `j` that hold one of `cg` channels.
fn valid_bits(cg: usize, j: usize) -> u64 {
    let left = cg - j * BITS;
    if left >= BITS {
        u64::MAX
    } else {
        (1u64 << left) - 1
    }
}

/// A binary convolution with its per-channel affine epilogue
/// `y = scale[o] * dot + shift[o] (+ residual)`, then the activation.
pub struct BinaryConv {
    pub geom: ConvGeom,
    /// Channels per group, `u64` words per group, output channels per group, and blocks
    /// of [`LANES`] output channels per group.
    cg: usize,
    wpg: usize,
    og: usize,
    blocks: usize,
    /// `[groups][blocks][kh][kw][wpg][LANES]`, bit set where the weight is negative;
    /// the output channels past `og` of the last block are zero.
    weight: Vec<u64>,
    /// Same layout, bit set where the weight is non-zero; `None` when none is zero.
    weight_mask: Option<Vec<u64>>,
    /// Same layout, every channel's bits set: the weight mask of a layer without zero
    /// weights, for inputs that hold a zero (made on first need).
    valid_mask: OnceLock<Vec<u64>>,
    /// The weight as signs for the route of few channels and outputs per group
    /// ([`grouped`]), which runs instead when present (then `weight` is empty).
    grouped: Option<Grouped>,
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Act,
}

impl BinaryConv {
    /// From the file's weight bits `[O][kh][kw][wpg]` (and non-zero mask, same layout);
    /// on the route of few channels and outputs per group ([`grouped`]) where it fits.
    pub fn new(
        geom: ConvGeom,
        weight: Vec<u64>,
        weight_mask: Option<Vec<u64>>,
        scale: Vec<f32>,
        shift: Vec<f32>,
        act: Act,
    ) -> Self {
        let small = grouped::fits(&geom);
        Self::with_route(geom, weight, weight_mask, scale, shift, act, small)
    }

    /// As [`BinaryConv::new`], on the grouped route when `small` (only where
    /// [`grouped::runs`]), else on the packed one (the tests force either).
    fn with_route(
        geom: ConvGeom,
        weight: Vec<u64>,
        weight_mask: Option<Vec<u64>>,
        scale: Vec<f32>,
        shift: Vec<f32>,
        act: Act,
        small: bool,
    ) -> Self {
        let cg = geom.cin / geom.groups;
        let og = geom.cout / geom.groups;
        let wpg = words_for(cg);
        // A mask is only needed when some in-range bit is clear.
        let weight_mask = weight_mask.filter(|m| {
            m.iter()
                .enumerate()
                .any(|(i, &w)| w & valid_bits(cg, i % wpg) != valid_bits(cg, i % wpg))
        });
        let mut conv = BinaryConv {
            geom,
            cg,
            wpg,
            og,
            blocks: og.div_ceil(LANES),
            weight: Vec::new(),
            weight_mask: None,
            valid_mask: OnceLock::new(),
            grouped: None,
            scale,
            shift,
            act,
        };
        if small {
            conv.grouped = Some(Grouped::new(&conv.geom, &weight, weight_mask.as_deref()));
            return conv;
        }
        conv.weight = conv.blocked(&weight);
        conv.weight_mask = weight_mask.map(|m| conv.blocked(&m));
        conv
    }

    /// The per-channel scale, shift and activation that turn sums into outputs.
    fn output(&self) -> Output<'_> {
        Output {
            scale: &self.scale,
            shift: &self.shift,
            act: &self.act,
        }
    }

    /// Words of one step of the window for all taps: `kh * kw * wpg`.
    fn steps(&self) -> usize {
        self.geom.kh * self.geom.kw * self.wpg
    }

    /// `[O][steps]` words in the blocked layout `[groups][blocks][steps][LANES]`.
    fn blocked(&self, words: &[u64]) -> Vec<u64> {
        let steps = self.steps();
        let mut out = vec![0u64; self.geom.groups * self.blocks * steps * LANES];
        for (o, src) in words.chunks_exact(steps).enumerate() {
            let (g, oi) = (o / self.og, o % self.og);
            let block = g * self.blocks + oi / LANES;
            for (s, &w) in src.iter().enumerate() {
                out[(block * steps + s) * LANES + oi % LANES] = w;
            }
        }
        out
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
        if let Some(small) = &self.grouped {
            return small.forward(&self.geom, self.output(), x, residual, kernel, (oh, ow));
        }
        let (bits, zero_mask) = self.pack(x, kernel);
        // Exact zeros anywhere: the masked kernel, with a mask on both sides.
        let masks = match (zero_mask, &self.weight_mask) {
            (None, None) => None,
            (a_mask, w_mask) => {
                let w_mask = match w_mask {
                    Some(m) => m.as_slice(),
                    None => self.valid_mask.get_or_init(|| self.all_valid()),
                };
                Some((
                    a_mask.unwrap_or_else(|| self.valid_plane(bits.len())),
                    w_mask,
                ))
            }
        };
        let plan = Plan::new(&self.geom, x, oh, ow);
        let mut out = Tensor4::scratch(x.n, oh, ow, g.cout)?;
        let row_len = ow * g.cout;
        // Work of one row: each output channel reads every word of its window.
        let row_work = ow * g.cout * g.kh * g.kw * self.wpg;
        out.data
            .par_chunks_mut(row_len)
            .with_min_len(par::min_len(row_work))
            .enumerate()
            .for_each(|(row, dst)| {
                kernel.run(RowJob {
                    conv: self,
                    plan: &plan,
                    a: &bits,
                    a_mask: masks.as_ref().map(|(a, _)| a.as_slice()),
                    w_mask: masks.as_ref().map(|&(_, w)| w),
                    row,
                    dst,
                    residual: residual.map(|r| &r.data[row * row_len..(row + 1) * row_len]),
                })
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
            .par_chunks_mut(pw * PACK_CHUNK)
            .zip(x.data.par_chunks(c * PACK_CHUNK))
            .with_min_len(par::min_len(c * PACK_CHUNK))
            .map(|(dst, src)| {
                kernel.run(PackJob {
                    conv: self,
                    src,
                    dst,
                })
            })
            .reduce(|| false, |a, b| a || b);
        if !any_zero {
            return (bits, None);
        }
        let mut mask = vec![0u64; pixels * pw];
        mask.par_chunks_mut(pw)
            .zip(x.data.par_chunks(c))
            .with_min_len(par::min_len(c))
            .for_each(|(out, px)| {
                for (ch, words) in px.chunks_exact(self.cg).zip(out.chunks_exact_mut(self.wpg)) {
                    pack_channels(ch, words, |v| v != 0.0);
                }
            });
        // A negative zero has its sign bit set: clear it, its weight is 0 anyway.
        for (b, m) in bits.iter_mut().zip(&mask) {
            *b &= m;
        }
        (bits, Some(mask))
    }

    /// The non-zero plane of an input without zeros: every channel's bit set.
    fn valid_plane(&self, len: usize) -> Vec<u64> {
        let pixel: Vec<u64> = (0..self.pixel_words())
            .map(|i| valid_bits(self.cg, i % self.wpg))
            .collect();
        pixel.iter().copied().cycle().take(len).collect()
    }

    /// The blocked weight mask with every channel's bits set.
    fn all_valid(&self) -> Vec<u64> {
        let words: Vec<u64> = (0..self.geom.cout * self.steps())
            .map(|i| valid_bits(self.cg, i % self.wpg))
            .collect();
        self.blocked(&words)
    }
}

/// Packs the signs of a chunk of pixels (see [`simd::isa::Isa::pack`]); returns whether
/// any value is zero.
struct PackJob<'a> {
    conv: &'a BinaryConv,
    src: &'a [f32],
    dst: &'a mut [u64],
}

impl Job for PackJob<'_> {
    type Out = bool;

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) -> bool {
        let (cg, wpg) = (self.conv.cg, self.conv.wpg);
        if self.conv.geom.groups == 1 && cg.is_multiple_of(BITS) {
            // Pixels' words do not share bits: pack the chunk as one run of channels.
            return isa.pack(self.src, self.dst);
        }
        let pw = self.conv.pixel_words();
        let mut zero = false;
        for (px, out) in self
            .src
            .chunks_exact(self.conv.geom.cin)
            .zip(self.dst.chunks_exact_mut(pw))
        {
            for (ch, words) in px.chunks_exact(cg).zip(out.chunks_exact_mut(wpg)) {
                zero |= isa.pack(ch, words);
            }
        }
        zero
    }
}

/// One output row: `dst` is `[ow][cout]` of output row `row` (`n * oh + oy`).
struct RowJob<'a> {
    conv: &'a BinaryConv,
    plan: &'a Plan,
    a: &'a [u64],
    a_mask: Option<&'a [u64]>,
    w_mask: Option<&'a [u64]>,
    row: usize,
    dst: &'a mut [f32],
    residual: Option<&'a [f32]>,
}

/// The part of a window inside the image: kernel rows `ky0..ky1`, columns `kx0..kx1`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Window {
    ky: (usize, usize),
    kx: (usize, usize),
}

impl Job for RowJob<'_> {
    type Out = ();

    #[inline(always)]
    fn run<I: Isa>(mut self, isa: I) {
        let conv = self.conv;
        let g = &conv.geom;
        let plan = self.plan;
        let oy = self.row % plan.oh;
        let ky = ConvGeom::valid_taps(oy, plan.h, g.kh, g.stride.0, g.padding.0, g.dilation.0);
        let span = conv.span();
        // The kernels' sums: kept per thread (the kernels write every entry they use,
        // so the buffer is neither zeroed nor freed between rows).
        thread_local! {
            static ACC: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
        }
        let mut acc = ACC.take();
        acc.resize(acc.len().max(span * conv.blocks * LANES), 0);
        let mut runs = Vec::with_capacity(g.kh * g.kw);
        let mut last = None;
        let mut run_len = 0;
        let mut ox = 0;
        while ox < plan.ow {
            let window = Window {
                ky,
                kx: plan.cols[ox],
            };
            let mut count = 1;
            while count < span && ox + count < plan.ow && plan.cols[ox + count] == window.kx {
                count += 1;
            }
            if last != Some(window) {
                run_len = conv.runs(window, plan.w, &mut runs);
                last = Some(window);
            }
            let runs = Runs::new(&runs, run_len, conv.steps());
            self.span(isa, ox, count, window, &runs, &mut acc);
            ox += count;
        }
        ACC.set(acc);
    }
}

impl BinaryConv {
    /// Output pixels per kernel call: their sums (`[pixels][blocks * LANES]` i32) stay
    /// within 16 KiB, for L1.
    fn span(&self) -> usize {
        (4096 / (self.blocks * LANES)).clamp(TILE, 64)
    }

    /// The runs of words a window reads, relative to the packed pixel of its first
    /// tap inside the image, and their length: one run per kernel row for a dense
    /// conv, one per tap otherwise; none when the whole window is padding.
    #[inline(always)]
    fn runs(&self, win: Window, w: usize, runs: &mut Vec<Run>) -> usize {
        let g = &self.geom;
        let (pw, wpg) = (self.pixel_words(), self.wpg);
        let ((ky0, ky1), (kx0, kx1)) = (win.ky, win.kx);
        let row = g.dilation.0 * w * pw;
        runs.clear();
        if ky0 == ky1 || kx0 == kx1 {
            return 0;
        }
        if g.groups == 1 && g.dilation.1 == 1 {
            for ky in ky0..ky1 {
                runs.push(Run {
                    a: (ky - ky0) * row,
                    w: (ky * g.kw + kx0) * wpg,
                });
            }
            (kx1 - kx0) * wpg
        } else {
            for ky in ky0..ky1 {
                for kx in kx0..kx1 {
                    runs.push(Run {
                        a: (ky - ky0) * row + (kx - kx0) * g.dilation.1 * pw,
                        w: (ky * g.kw + kx) * wpg,
                    });
                }
            }
            wpg
        }
    }
}

impl RowJob<'_> {
    /// Output pixels `ox0..ox0 + count` of the row, which share `window`, every group:
    /// the kernel, then `act(scale * dot + shift (+ residual))` into `dst`.
    #[inline(always)]
    fn span<I: Isa>(
        &mut self,
        isa: I,
        ox0: usize,
        count: usize,
        window: Window,
        runs: &Runs<'_>,
        acc: &mut [i32],
    ) {
        let conv = self.conv;
        let g = &conv.geom;
        let plan = self.plan;
        let (n, oy) = (self.row / plan.oh, self.row % plan.oh);
        let pw = conv.pixel_words();
        let group_words = conv.blocks * conv.steps() * LANES;
        let ((ky0, ky1), (kx0, kx1)) = (window.ky, window.kx);
        let sums = match self.a_mask {
            Some(_) => Sums::Dots,
            None => Sums::Popcounts {
                n_valid: ((ky1 - ky0) * (kx1 - kx0) * conv.cg) as i32,
            },
        };
        let first = if ky0 == ky1 || kx0 == kx1 {
            0 // no runs: nothing is read
        } else {
            let iy = oy * g.stride.0 + ky0 * g.dilation.0 - g.padding.0;
            let ix = ox0 * g.stride.1 + kx0 * g.dilation.1 - g.padding.1;
            ((n * plan.h + iy) * plan.w + ix) * pw
        };
        let stride = g.stride.1 * pw;
        for gi in 0..g.groups {
            let weights = gi * group_words..(gi + 1) * group_words;
            let tile = Tile::new(
                self.a,
                self.a_mask,
                (first + gi * conv.wpg, stride, count),
                runs,
                &conv.weight[weights.clone()],
                self.w_mask.map(|m| &m[weights]),
                conv.blocks,
            );
            tile.dot(isa, acc);
            let o0 = gi * conv.og;
            let (scale, shift) = (&conv.scale[o0..o0 + conv.og], &conv.shift[o0..o0 + conv.og]);
            for (p, acc) in acc
                .chunks_exact(conv.blocks * LANES)
                .take(count)
                .enumerate()
            {
                let at = (ox0 + p) * g.cout + o0;
                let out = &mut self.dst[at..at + conv.og];
                let res = self.residual.map(|r| &r[at..at + conv.og]);
                epilogue(out, acc, sums, scale, shift, res, &conv.act, o0);
            }
        }
    }
}

#[cfg(test)]
mod tests;
