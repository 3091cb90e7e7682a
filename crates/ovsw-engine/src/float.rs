//! The full-precision layers of a deployed network, on NHWC float32 tensors:
//! convolution (im2col + SGEMM from the `matrixmultiply` crate), linear, per-channel
//! affine (folded BatchNorm) with its activation, max and average pooling, global
//! average pooling, zero channel padding and flatten.

mod direct;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::{value_err, Result};
use crate::geom::ConvGeom;
use crate::nhwc::{Act, Tensor4};
use crate::par;

/// Output pixels per parallel task of the float convolution: large enough that the
/// GEMM's packing is amortised, small enough for four tasks per thread.
fn conv_tile(pixels: usize) -> usize {
    let per_task = pixels / (4 * rayon::current_num_threads()).max(1);
    per_task.clamp(64, 1024).next_multiple_of(8)
}

/// `C = A B` for row-major `A` [m, k] and `C` [m, n] (leading dimension `ldc`), with
/// `B` given by its strides.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    rsb: isize,
    csb: isize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(a.len() >= m * k && c.len() >= (m.max(1) - 1) * ldc + n);
    // SAFETY: the asserts above and the callers' weight-shape checks keep every index
    // of A, B and C inside its slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// `sum(a * b)` with 8 partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A float convolution (BatchNorm folded into weight and bias at export).
pub struct FloatConv {
    pub geom: ConvGeom,
    /// `[O][kh][kw][C/groups]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub act: Act,
    /// For a conv over few input channels: the weight by tap and how this CPU does
    /// multiply-adds (the direct path, `float/direct.rs`); `None` for im2col + GEMM.
    direct: Option<(Vec<f32>, direct::Fma)>,
}

impl FloatConv {
    pub fn new(geom: ConvGeom, weight: Vec<f32>, bias: Option<Vec<f32>>, act: Act) -> Self {
        let direct = direct::fits(&geom)
            .then(|| (direct::weight_by_tap(&weight, &geom), direct::Fma::detect()));
        FloatConv {
            geom,
            weight,
            bias,
            act,
            direct,
        }
    }

    /// `act(x conv W + b)`: bias and activation pixel by pixel after the sums.
    fn finish(&self, dst: &mut [f32]) {
        for px in dst.chunks_exact_mut(self.geom.cout) {
            if let Some(b) = &self.bias {
                for (v, b) in px.iter_mut().zip(b) {
                    *v += b;
                }
            }
            self.act.apply(px);
        }
    }

    pub fn forward(&self, x: &Tensor4, name: &str) -> Result<Tensor4> {
        let g = &self.geom;
        let (oh, ow) = g.output_hw(x, name)?;
        if let Some((wt, fma)) = &self.direct {
            let mut out = Tensor4::scratch(x.n, oh, ow, g.cout)?;
            let row_work = ow * g.cout * g.kh * g.kw * g.cin;
            out.data
                .par_chunks_mut(ow * g.cout)
                .with_min_len(par::min_len(row_work))
                .enumerate()
                .for_each(|(r, dst)| {
                    direct::row(*fma, g, wt, &x.data, (x.h, x.w), (r / oh, r % oh), dst);
                    self.finish(dst);
                });
            return Ok(out);
        }
        let cg = g.cin / g.groups;
        let og = g.cout / g.groups;
        let k = g.kh * g.kw * cg;
        // Every element is written by the GEMM (beta = 0 never reads C).
        let mut out = Tensor4::scratch(x.n, oh, ow, g.cout)?;
        let pixels = x.n * oh * ow;
        let direct =
            g.kh == 1 && g.kw == 1 && g.stride == (1, 1) && g.padding == (0, 0) && g.groups == 1;
        let tile_pixels = conv_tile(pixels);
        out.data
            .par_chunks_mut(tile_pixels * g.cout)
            .with_min_len(par::min_len(tile_pixels * k * g.cout))
            .enumerate()
            .for_each(|(tile, dst)| {
                let p0 = tile * tile_pixels;
                let m = dst.len() / g.cout;
                // The im2col rows, kept per thread: a fresh buffer per tile would cost
                // a page fault per 4 KiB, more than filling it.
                thread_local! {
                    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
                }
                let mut cols = COLS.take();
                for gi in 0..g.groups {
                    let a: &[f32] = if direct {
                        &x.data[p0 * k..(p0 + m) * k]
                    } else {
                        im2col(x, g, gi, p0, m, (oh, ow), &mut cols);
                        &cols[..m * k]
                    };
                    let w = &self.weight[gi * og * k..];
                    sgemm(m, k, og, a, w, 1, k as isize, &mut dst[gi * og..], g.cout);
                }
                COLS.set(cols);
                self.finish(dst);
            });
        debug_assert_eq!(pixels * g.cout, out.data.len());
        Ok(out)
    }
}

/// `dst.copy_from_slice(src)` for short runs, inlined in blocks of 8 (a `memcpy` call
/// per kernel row would cost more than the copy).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let mut d8 = dst.chunks_exact_mut(8);
    let mut s8 = src.chunks_exact(8);
    for (d, s) in (&mut d8).zip(&mut s8) {
        d.copy_from_slice(s);
    }
    for (d, s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d = *s;
    }
}

/// Rows `p0..p0 + m` of the im2col matrix of group `gi`: one row per output pixel,
/// `(ky, kx, c)` along it, zeros for padded taps. Every element is written (taps inside
/// the image copied, the others zeroed), so `cols` is never cleared first.
fn im2col(
    x: &Tensor4,
    g: &ConvGeom,
    gi: usize,
    p0: usize,
    m: usize,
    (oh, ow): (usize, usize),
    cols: &mut Vec<f32>,
) {
    let cg = g.cin / g.groups;
    let k = g.kh * g.kw * cg;
    cols.resize(m * k, 0.0);
    // (n, oy, ox) of row p0, then stepped along (no division per row).
    let (mut n, rest) = (p0 / (oh * ow), p0 % (oh * ow));
    let (mut oy, mut ox) = (rest / ow, rest % ow);
    for row_out in cols[..m * k].chunks_exact_mut(k) {
        let x0 = (ox * g.stride.1) as isize - g.padding.1 as isize;
        for (ky, seg) in row_out.chunks_exact_mut(g.kw * cg).enumerate() {
            let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize - g.padding.0 as isize;
            if iy < 0 || iy >= x.h as isize {
                seg.fill(0.0);
                continue;
            }
            let row = (n * x.h + iy as usize) * x.w;
            if g.dilation.1 == 1 && x0 >= 0 && x0 as usize + g.kw <= x.w && g.groups == 1 {
                // The whole kernel row is one contiguous run of pixels.
                let src = (row + x0 as usize) * x.c;
                copy_short(seg, &x.data[src..src + g.kw * cg]);
                continue;
            }
            for (kx, tap) in seg.chunks_exact_mut(cg).enumerate() {
                let ix = x0 + (kx * g.dilation.1) as isize;
                if ix < 0 || ix >= x.w as isize {
                    tap.fill(0.0);
                } else {
                    let src = (row + ix as usize) * x.c + gi * cg;
                    copy_short(tap, &x.data[src..src + cg]);
                }
            }
        }
        ox += 1;
        if ox == ow {
            ox = 0;
            oy += 1;
            if oy == oh {
                oy = 0;
                n += 1;
            }
        }
    }
}

/// `y = x W^T + b` on `[N, 1, 1, in]` inputs (nn.Linear, or a 1x1 conv head).
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
    /// `[outputs][inputs]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor4, name: &str) -> Result<Tensor4> {
        let features = x.h * x.w * x.c;
        if x.h * x.w != 1 || features != self.inputs {
            return value_err!(
                "layer '{name}' expects {} features, got {} ({}x{}x{}); check the input size",
                self.inputs,
                features,
                x.c,
                x.h,
                x.w
            );
        }
        let mut out = Tensor4::zeros(x.n, 1, 1, self.outputs)?;
        // Few rows: one dot product per output (GEMM packing would cost more).
        for (xs, ys) in x
            .data
            .chunks_exact(self.inputs)
            .zip(out.data.chunks_exact_mut(self.outputs))
        {
            ys.par_iter_mut()
                .zip(self.weight.par_chunks_exact(self.inputs))
                .with_min_len(par::min_len(self.inputs))
                .enumerate()
                .for_each(|(o, (y, w))| {
                    *y = dot(xs, w) + self.bias.as_ref().map_or(0.0, |b| b[o]);
                });
        }
        Ok(out)
    }
}

/// `y = scale[c] * x + shift[c]`, then the activation (BatchNorm in eval mode).
pub struct Affine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Act,
}

impl Affine {
    pub fn forward(&self, mut x: Tensor4, name: &str) -> Result<Tensor4> {
        if x.c != self.scale.len() {
            return value_err!(
                "layer '{name}' expects {} channels, got {}",
                self.scale.len(),
                x.c
            );
        }
        let c = x.c;
        let chunks = x.data.par_chunks_mut(c * 64);
        chunks.with_min_len(par::min_len(c * 64)).for_each(|chunk| {
            for px in chunk.chunks_exact_mut(c) {
                for ((v, s), t) in px.iter_mut().zip(&self.scale).zip(&self.shift) {
                    *v = *v * s + t;
                }
                self.act.apply(px);
            }
        });
        Ok(x)
    }
}

/// Max or average pooling with PyTorch's output-size rule (`ceil_mode` included).
#[derive(Clone, Debug)]
pub struct Pool {
    pub max: bool,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub ceil_mode: bool,
    pub count_include_pad: bool,
}

fn pool_out(size: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> Option<usize> {
    let span = d * (k - 1) + 1;
    let room = (size + 2 * p).checked_sub(span)?;
    let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
    if ceil && (out - 1) * s >= size + p {
        out -= 1;
    }
    Some(out)
}

impl Pool {
    /// Output height and width for an input of `h` x `w`, or an error naming the layer
    /// (used by [`Pool::forward`] and by shape inference, `crate::shapes`).
    pub fn out_hw(&self, h: usize, w: usize, name: &str) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let oh = pool_out(
            h,
            kh,
            self.stride.0,
            self.padding.0,
            self.dilation.0,
            self.ceil_mode,
        );
        let ow = pool_out(
            w,
            kw,
            self.stride.1,
            self.padding.1,
            self.dilation.1,
            self.ceil_mode,
        );
        match (oh, ow) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => value_err!("input of {h}x{w} is too small for pooling layer '{name}' ({kh}x{kw})"),
        }
    }

    pub fn forward(&self, x: &Tensor4, name: &str) -> Result<Tensor4> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let (dh, dw) = self.dilation;
        let (oh, ow) = self.out_hw(x.h, x.w, name)?;
        let c = x.c;
        let mut out = Tensor4::zeros(x.n, oh, ow, c)?;
        out.data
            .par_chunks_mut(ow * c)
            .with_min_len(par::min_len(ow * c * kh * kw))
            .enumerate()
            .for_each(|(row, dst)| {
                let (n, oy) = (row / oh, row % oh);
                let y0 = (oy * sh) as isize - ph as isize;
                for (ox, px) in dst.chunks_exact_mut(c).enumerate() {
                    let x0 = (ox * sw) as isize - pw as isize;
                    if self.max {
                        px.fill(f32::NEG_INFINITY);
                    }
                    let mut count = 0usize;
                    for ky in 0..kh {
                        let iy = y0 + (ky * dh) as isize;
                        if iy < 0 || iy >= x.h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = x0 + (kx * dw) as isize;
                            if ix < 0 || ix >= x.w as isize {
                                continue;
                            }
                            count += 1;
                            let s = ((n * x.h + iy as usize) * x.w + ix as usize) * c;
                            let src = &x.data[s..s + c];
                            if self.max {
                                for (v, &u) in px.iter_mut().zip(src) {
                                    *v = if u > *v { u } else { *v };
                                }
                            } else {
                                for (v, &u) in px.iter_mut().zip(src) {
                                    *v += u;
                                }
                            }
                        }
                    }
                    if !self.max {
                        let divisor = if self.count_include_pad {
                            // Window clipped to the padded input, as torch counts it.
                            let ye = (y0 + kh as isize).min((x.h + ph) as isize);
                            let xe = (x0 + kw as isize).min((x.w + pw) as isize);
                            ((ye - y0) * (xe - x0)) as f32
                        } else {
                            count as f32
                        };
                        for v in px.iter_mut() {
                            *v /= divisor;
                        }
                    }
                }
            });
        Ok(out)
    }
}

/// Mean over height and width: `[N, H, W, C] -> [N, 1, 1, C]`.
pub fn global_avgpool(x: &Tensor4) -> Result<Tensor4> {
    let mut out = Tensor4::zeros(x.n, 1, 1, x.c)?;
    let plane = x.h * x.w;
    for (n, dst) in out.data.chunks_exact_mut(x.c).enumerate() {
        for px in x.data[n * plane * x.c..(n + 1) * plane * x.c].chunks_exact(x.c) {
            for (v, &u) in dst.iter_mut().zip(px) {
                *v += u;
            }
        }
        for v in dst.iter_mut() {
            *v /= plane as f32;
        }
    }
    Ok(out)
}

/// Zero channels added before and after: `C -> before + C + after`.
pub fn pad_channels(x: &Tensor4, before: usize, after: usize) -> Result<Tensor4> {
    let c = before + x.c + after;
    let mut out = Tensor4::zeros(x.n, x.h, x.w, c)?;
    for (dst, src) in out.data.chunks_exact_mut(c).zip(x.data.chunks_exact(x.c)) {
        dst[before..before + x.c].copy_from_slice(src);
    }
    Ok(out)
}

/// `torch.flatten(x, 1)` of an NCHW tensor: `[N, 1, 1, C*H*W]` in (c, h, w) order.
pub fn flatten(x: &Tensor4) -> Tensor4 {
    let features = x.c * x.h * x.w;
    Tensor4 {
        n: x.n,
        h: 1,
        w: 1,
        c: features,
        data: x.to_nchw(),
    }
}
