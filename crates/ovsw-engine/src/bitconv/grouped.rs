//! The binary convolution for few channels and outputs per group (depthwise and
//! narrow grouped convs): integer signs instead of bit packing.
//!
//! The packed route ([`super`]) puts each group's channels into `u64` words. With one
//! channel per group (a depthwise conv) a word carries one bit, and the driver calls a
//! kernel and an epilogue per group, pixel and block of 8 outputs: MobileNetV2's
//! depthwise convs took most of the network's time. Here, when [`fits`] says so,
//! signs are `i8` (`-1`, `0`, `+1`) and the sums run across the output channels, which
//! vectorize whatever the grouping:
//!
//! - the input is binarized once per call to `e[pixel][c][o] = sign(x[pixel][group(o)
//!   * cg + c])`: for each output channel `o` and each of the `cg` channels `c` of its
//!   group, the sign it reads (for a depthwise conv with one output per group, just
//!   `sign(x)`, NHWC); `sign(0) = sign(-0.0) = 0`, as `torch.sign`, and otherwise the
//!   sign bit decides (so NaN counts as on the packed route);
//! - the weight is `w[ky][kx][c][o]` signs, `0` where the file's mask says the weight
//!   is exactly zero;
//! - for an output pixel, `dot[o] = sum over the valid taps and c of e[tap's pixel][c]
//!   [o] * w[tap][c][o]`: products summed in `i16` over the taps ([`BLOCK`] lanes held
//!   in registers), then in `i32` over `c`; loops that LLVM vectorizes, compiled for
//!   the kernel's instruction set by [`Kernel::run`] (see `simd/`). Taps in the zero
//!   padding are skipped: they contribute 0.
//!
//! The dot products are the same integers as the packed route's, and the same epilogue
//! ([`super::rows::epilogue`]: scale, shift, residual, activation) turns them into floats, so
//! both routes give bit-identical outputs (tested in `tests.rs`).
//!
//! **Threshold.** The packed route costs about the same per group, pixel and block of
//! 8 outputs for 1 to 64 channels per group; this route costs `cg * og` lanes per
//! group, pixel and tap, plus the expansion of the input. It is taken for at most
//! [`MAX_PAIRS`] = 16 pairs `cg * og`. Against the packed route, 3x3 on 28x28, one
//! thread (`route_throughput` in `tests.rs`; a shared machine, indicative), the
//! packed route's time over this one's with the kernels avx512_vpopcntdq / avx512bw /
//! avx2:
//!
//! | cg x og | pairs | avx512_vpopcntdq | avx512bw | avx2 | route taken |
//! |---------|-------|------------------|----------|------|-------------|
//! | 1 x 1   | 1     | 17               | 31       | 38   | grouped     |
//! | 2 x 2   | 4     | 3.1              | 4.8      | 7.8  | grouped     |
//! | 4 x 4   | 16    | 0.9              | 1.4      | 2.3  | grouped     |
//! | 15 x 1  | 15    | 0.7              | 1.0      | 2.1  | grouped     |
//! | 16 x 1  | 16    | 0.7              | 1.0      | 1.4  | grouped     |
//! | 1 x 16  | 16    | 0.9              | 1.8      | 3.1  | grouped     |
//! | 8 x 8   | 64    | 0.2              | 0.4      | 0.5  | packed      |
//! | 32 x 1  | 32    | 0.3              | 0.5      | 0.6  | packed      |
//! | 2 x 32  | 64    | 0.4              | 0.8      | 1.2  | packed      |
//!
//! Above 16 pairs this route loses on every AVX-512 kernel; at 15 to 16 it loses a
//! little on avx512_vpopcntdq (whose token lacks AVX-512BW: `i16` lanes run in ymm)
//! and wins on the others. The expanded input takes `cg * cout <= 16 * groups` bytes
//! per pixel (padded to [`BLOCK`]), within 4 times the float input.

use std::cell::RefCell;

use rayon::prelude::*;

use super::rows::{epilogue, Output, Plan, Sums, PACK_CHUNK};
use super::simd::isa::{Isa, Job};
use super::simd::Kernel;
use crate::bits::BITS;
use crate::error::{value_err, Result};
use crate::geom::ConvGeom;
use crate::nhwc::Tensor4;
use crate::par;

/// The most `(channel, output)` pairs of a group, `cg * og`, for which a conv takes
/// this route (see the module docs).
pub const MAX_PAIRS: usize = 16;

/// Whether a conv of `geom` takes this route: few channels and outputs per group, and
/// [`runs`].
pub fn fits(geom: &ConvGeom) -> bool {
    let (cg, og) = (geom.cin / geom.groups, geom.cout / geom.groups);
    cg * og <= MAX_PAIRS && runs(geom)
}

/// Whether this route can run a conv of `geom`: one weight word per tap (`cg <= 64`)
/// and dot products that fit `i16`.
pub fn runs(geom: &ConvGeom) -> bool {
    let cg = geom.cin / geom.groups;
    cg <= BITS && geom.kh * geom.kw * cg <= i16::MAX as usize
}

/// Lanes of `i16` sums the kernel keeps in registers over all taps (one zmm, two ymm);
/// each pixel's expanded signs and each tap's weights are padded with zeros to a
/// multiple of it.
const BLOCK: usize = 32;

/// A binary conv's weight as signs, `[kh][kw][stride]`: each tap's `[cg][cout]`, then
/// zeros up to `stride`; and where each of a pixel's expanded signs comes from.
pub struct Grouped {
    weight: Vec<i8>,
    stride: usize,
    /// `source[c * cout + o] = group(o) * cg + c`: the input channel of each expanded
    /// sign (empty for a depthwise conv with one output per group: the identity).
    source: Vec<u32>,
}

impl Grouped {
    /// From the file's weight bits `[O][kh][kw][1]` (one word per tap: `cg < 64`) and
    /// non-zero mask, same layout (`None`: no weight is zero).
    pub fn new(geom: &ConvGeom, bits: &[u64], mask: Option<&[u64]>) -> Grouped {
        let (cg, taps, cout) = (geom.cin / geom.groups, geom.kh * geom.kw, geom.cout);
        debug_assert!(cg <= BITS && bits.len() == cout * taps);
        let stride = (cg * cout).next_multiple_of(BLOCK);
        let mut weight = vec![0i8; taps * stride];
        for (o, words) in bits.chunks_exact(taps).enumerate() {
            for (t, &word) in words.iter().enumerate() {
                let nonzero = mask.map_or(u64::MAX, |m| m[o * taps + t]);
                for c in 0..cg {
                    weight[t * stride + c * cout + o] =
                        match ((nonzero >> c) & 1 == 1, (word >> c) & 1 == 1) {
                            (false, _) => 0,
                            (true, true) => -1,
                            (true, false) => 1,
                        };
                }
            }
        }
        let og = cout / geom.groups;
        let source = if cg == 1 && og == 1 {
            Vec::new()
        } else {
            (0..cg * cout)
                .map(|j| ((j % cout) / og * cg + j / cout) as u32)
                .collect()
        };
        Grouped {
            weight,
            stride,
            source,
        }
    }

    /// The conv of geometry `g` (whose weight this is) on `x`, its sums turned into
    /// outputs by `output`, into an output of `oh` x `ow` (checked by the caller, as the
    /// residual's shape).
    pub fn forward(
        &self,
        g: &ConvGeom,
        output: Output<'_>,
        x: &Tensor4,
        residual: Option<&Tensor4>,
        kernel: Kernel,
        (oh, ow): (usize, usize),
    ) -> Result<Tensor4> {
        let cout = g.cout;
        let signs = self.signs(g, x, kernel)?;
        let plan = Plan::new(g, x, oh, ow);
        let mut out = Tensor4::scratch(x.n, oh, ow, cout)?;
        let row_len = ow * cout;
        // Work of one row: each output channel sums its group's channels over the taps.
        let row_work = ow * cout * g.kh * g.kw * (g.cin / g.groups);
        out.data
            .par_chunks_mut(row_len)
            .with_min_len(par::min_len(row_work))
            .enumerate()
            .for_each(|(row, dst)| {
                kernel.run(RowJob {
                    g,
                    output: &output,
                    grouped: self,
                    plan: &plan,
                    signs: &signs,
                    row,
                    dst,
                    residual: residual.map(|r| &r.data[row * row_len..(row + 1) * row_len]),
                })
            });
        Ok(out)
    }

    /// The expanded signs of `x`, `[N][H][W][stride]` (see the module docs), zero past
    /// each pixel's `cg * cout`.
    fn signs(&self, g: &ConvGeom, x: &Tensor4, kernel: Kernel) -> Result<Vec<i8>> {
        let mut e = Vec::new();
        match (x.n * x.h * x.w).checked_mul(self.stride) {
            Some(len) if e.try_reserve_exact(len).is_ok() => e.resize(len, 0i8),
            _ => {
                return value_err!(
                    "not enough memory for the signs of an input of shape {:?}",
                    x.nchw()
                )
            }
        }
        e.par_chunks_mut(self.stride * PACK_CHUNK)
            .zip(x.data.par_chunks(x.c * PACK_CHUNK))
            .with_min_len(par::min_len(self.stride * PACK_CHUNK))
            .for_each(|(dst, src)| {
                kernel.run(SignJob {
                    cin: g.cin,
                    stride: self.stride,
                    source: &self.source,
                    src,
                    dst,
                })
            });
        Ok(e)
    }
}

/// `0` for a zero (either sign), else `-1` where the sign bit is set, `+1` elsewhere.
#[inline(always)]
fn sign(v: f32) -> i8 {
    let nonzero = i8::from(v != 0.0);
    let negative = (v.to_bits() >> 31) as i8;
    nonzero - 2 * (negative & nonzero)
}

/// Binarizes a chunk of pixels into their expanded signs, `stride` apart.
struct SignJob<'a> {
    cin: usize,
    stride: usize,
    source: &'a [u32],
    src: &'a [f32],
    dst: &'a mut [i8],
}

impl Job for SignJob<'_> {
    type Out = ();

    #[inline(always)]
    fn run<I: Isa>(self, _isa: I) {
        let pixels = self.src.chunks_exact(self.cin);
        if self.source.is_empty() {
            // Depthwise: the signs as they are.
            for (px, e) in pixels.zip(self.dst.chunks_exact_mut(self.stride)) {
                for (d, &v) in e.iter_mut().zip(px) {
                    *d = sign(v);
                }
            }
            return;
        }
        // The pixel's signs (one vectorized pass), then gathered.
        thread_local! {
            static SIGNS: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
        }
        let mut signs = SIGNS.take();
        signs.resize(self.cin, 0);
        for (px, e) in pixels.zip(self.dst.chunks_exact_mut(self.stride)) {
            for (d, &v) in signs.iter_mut().zip(px) {
                *d = sign(v);
            }
            for (d, &from) in e.iter_mut().zip(self.source) {
                *d = signs[from as usize];
            }
        }
        SIGNS.set(signs);
    }
}

/// One output row: `dst` is `[ow][cout]` of output row `row` (`n * oh + oy`).
struct RowJob<'a> {
    g: &'a ConvGeom,
    output: &'a Output<'a>,
    grouped: &'a Grouped,
    plan: &'a Plan,
    signs: &'a [i8],
    row: usize,
    dst: &'a mut [f32],
    residual: Option<&'a [f32]>,
}

/// Per-thread scratch of the rows: the valid taps of a window (offsets of their signs
/// and weights), one pixel's sums per `(c, o)` and per output channel.
#[derive(Default)]
struct Scratch {
    taps: Vec<(usize, usize)>,
    sums: Vec<i16>,
    dots: Vec<i32>,
}

impl Job for RowJob<'_> {
    type Out = ();

    #[inline(always)]
    fn run<I: Isa>(self, _isa: I) {
        let g = self.g;
        let cg = g.cin / g.groups;
        let plan = self.plan;
        let (cout, stride) = (g.cout, self.grouped.stride);
        let (n, oy) = (self.row / plan.oh, self.row % plan.oh);
        let (ky0, ky1) =
            ConvGeom::valid_taps(oy, plan.h, g.kh, g.stride.0, g.padding.0, g.dilation.0);
        // Kept per thread: resized, never freed, between rows.
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
        }
        let mut scratch = SCRATCH.take();
        let Scratch { taps, sums, dots } = &mut scratch;
        sums.resize(stride, 0);
        dots.resize(cout, 0);
        for ox in 0..plan.ow {
            // The taps inside the image (`valid_taps`); those in the padding add 0.
            let (kx0, kx1) = plan.cols[ox];
            taps.clear();
            for ky in ky0..ky1 {
                let iy = oy * g.stride.0 + ky * g.dilation.0 - g.padding.0;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride.1 + kx * g.dilation.1 - g.padding.1;
                    let pixel = (n * plan.h + iy) * plan.w + ix;
                    taps.push((pixel * stride, (ky * g.kw + kx) * stride));
                }
            }
            // Sums per (c, o) over the taps, BLOCK lanes at a time held in registers.
            for (j, out) in (0..stride).step_by(BLOCK).zip(sums.chunks_exact_mut(BLOCK)) {
                let mut acc = [0i16; BLOCK];
                for &(a, w) in taps.iter() {
                    mac(
                        &mut acc,
                        &self.signs[a + j..a + j + BLOCK],
                        &self.grouped.weight[w + j..w + j + BLOCK],
                    );
                }
                out.copy_from_slice(&acc);
            }
            // Then over the cg channels of each output's group.
            let mut parts = sums[..cg * cout].chunks_exact(cout);
            if let Some(first) = parts.next() {
                for (d, &s) in dots.iter_mut().zip(first) {
                    *d = i32::from(s);
                }
            }
            for part in parts {
                for (d, &s) in dots.iter_mut().zip(part) {
                    *d += i32::from(s);
                }
            }
            let at = ox * cout;
            epilogue(
                &mut self.dst[at..at + cout],
                dots,
                Sums::Dots,
                self.output.scale,
                self.output.shift,
                self.residual.map(|r| &r[at..at + cout]),
                self.output.act,
                0,
            );
        }
        SCRATCH.set(scratch);
    }
}

/// `acc[i] += a[i] * w[i]` over one block (a loop LLVM unrolls into vector registers).
#[inline(always)]
fn mac(acc: &mut [i16; BLOCK], a: &[i8], w: &[i8]) {
    for ((s, &a), &w) in acc.iter_mut().zip(a).zip(w) {
        *s += i16::from(a) * i16::from(w);
    }
}
