//! What the binary conv's two routes (the packed one in `mod.rs`, the grouped one in
//! `grouped.rs`) share: the per-row plan of taps inside the image, the sums'
//! epilogue (scale, shift, residual, activation) and the packing chunk. Kept apart from
//! both so that neither route's file reads the other's.

use crate::geom::ConvGeom;
use crate::nhwc::{hardtanh, prelu, Act, Tensor4};

/// Pixels packed (or binarized) per parallel task.
pub const PACK_CHUNK: usize = 64;

/// The per-channel map from a layer's sums to its outputs.
pub struct Output<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub act: &'a Act,
}

/// What every row of one forward shares: the input's size, the output size and the
/// range of kernel columns inside the image per output column.
pub struct Plan {
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub cols: Vec<(usize, usize)>,
}

impl Plan {
    pub fn new(g: &ConvGeom, x: &Tensor4, oh: usize, ow: usize) -> Plan {
        let cols = (0..ow)
            .map(|ox| ConvGeom::valid_taps(ox, x.w, g.kw, g.stride.1, g.padding.1, g.dilation.1))
            .collect();
        Plan {
            h: x.h,
            w: x.w,
            oh,
            ow,
            cols,
        }
    }
}

/// What the kernel's sums are: popcounts of `a ^ w` over `n_valid` inputs (the fast
/// kernels), or dot products (the masked kernels).
#[derive(Clone, Copy)]
pub enum Sums {
    Popcounts { n_valid: i32 },
    Dots,
}

/// `out = act(scale * dot + shift (+ residual))` in one pass, `dot = n_valid - 2 * acc`
/// for popcounts, `dot = acc` for dot products; `channel0` is `out[0]`'s channel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn epilogue(
    out: &mut [f32],
    acc: &[i32],
    sums: Sums,
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    act: &Act,
    channel0: usize,
) {
    let n = out.len();
    // The match on the activation outside the loops, so that each loop vectorizes.
    match act {
        Act::None => affine(out, acc, sums, scale, shift, residual, |v, _| v),
        Act::Hardtanh(lo, hi) => {
            let (lo, hi) = (*lo, *hi);
            affine(out, acc, sums, scale, shift, residual, |v, _| {
                hardtanh(v, lo, hi)
            })
        }
        Act::Prelu(a) if a.len() == 1 => {
            let a = a[0];
            affine(out, acc, sums, scale, shift, residual, |v, _| prelu(v, a))
        }
        Act::Prelu(a) => {
            let a = &a[channel0..channel0 + n];
            affine(out, acc, sums, scale, shift, residual, |v, i| {
                prelu(v, a[i])
            })
        }
    }
}

/// `out[i] = act(scale[i] * dot(i) + shift[i] (+ residual[i]), i)`.
#[inline(always)]
fn affine(
    out: &mut [f32],
    acc: &[i32],
    sums: Sums,
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    act: impl Fn(f32, usize) -> f32,
) {
    // Every slice `n` long: the loops run without bounds checks and vectorize.
    let n = out.len();
    let (acc, scale, shift) = (&acc[..n], &scale[..n], &shift[..n]);
    let dot = |i: usize| match sums {
        Sums::Popcounts { n_valid } => (n_valid - (acc[i] + acc[i])) as f32,
        Sums::Dots => acc[i] as f32,
    };
    match (residual, sums) {
        (Some(r), Sums::Popcounts { .. }) => {
            let r = &r[..n];
            for i in 0..n {
                out[i] = act(scale[i] * dot(i) + shift[i] + r[i], i);
            }
        }
        (None, Sums::Popcounts { .. }) => {
            for i in 0..n {
                out[i] = act(scale[i] * dot(i) + shift[i], i);
            }
        }
        (Some(r), Sums::Dots) => {
            let r = &r[..n];
            for i in 0..n {
                out[i] = act(scale[i] * dot(i) + shift[i] + r[i], i);
            }
        }
        (None, Sums::Dots) => {
            for i in 0..n {
                out[i] = act(scale[i] * dot(i) + shift[i], i);
            }
        }
    }
}
