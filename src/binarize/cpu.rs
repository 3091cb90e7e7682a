//! The elementwise parts as fused loops over contiguous float32 CPU memory: per-sample
//! standard deviation, `sign(x / std)` and the Bi-Real backward. libtorch needs a
//! reduction (Welford `var`) plus three to seven elementwise ops with temporaries for
//! the same work; these do it in one pass each, split across libtorch's own intra-op
//! threads ([`parallel_for`]).

use tch::{Kind, Tensor};

use super::elementwise::{ActW, Elementwise, EPS};
use super::generic;
use crate::error::{value_err, Result};
use crate::facts::{self, HostF32};
use crate::parallel::{parallel_for, segments, SharedMut, GRAIN};

/// The [`Elementwise`] of the float32 CPU route. Every activation-side tensor it is given is
/// contiguous float32 CPU memory (the route's condition); `grad_a` is made so here.
pub struct Fused;

impl Elementwise for Fused {
    fn sample_std(&self, x: &Tensor) -> Result<Tensor> {
        let (n, per) = samples(x)?;
        let src = HostF32::of(x)?;
        // SAFETY: x is borrowed for the call and only read.
        let stds = sample_std(unsafe { src.as_slice() }, n, per, EPS)?;
        let mut shape = vec![1i64; facts::dim(x)?];
        shape[0] = n as i64;
        Ok(Tensor::f_from_slice(&stds)?.f_reshape(shape.as_slice())?)
    }

    fn sign(&self, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
        let (n, per) = samples(x)?;
        let stds = std.map(|s| stds_of(s, n)).transpose()?;
        let out = x.f_empty_like()?;
        let src = HostF32::of(x)?;
        let dst = HostF32::of(&out)?;
        // SAFETY: x is only read; `out` is fresh, of x's length, and written only here.
        unsafe { sign_normalized(src.as_slice(), dst.ptr(), per, stds) }?;
        Ok(out)
    }

    fn bireal_backward(&self, grad_a: &Tensor, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
        let (n, per) = samples(x)?;
        let stds = std.map(|s| stds_of(s, n)).transpose()?;
        // convolution_backward may hand back another dtype (autocast) or layout.
        let grad_a = grad_a.f_to_kind(Kind::Float)?.f_contiguous()?;
        let out = x.f_empty_like()?;
        let (g, xs, dst) = (HostF32::of(&grad_a)?, HostF32::of(x)?, HostF32::of(&out)?);
        if g.len() != xs.len() {
            return value_err!(
                "the activation gradient has {} elements, the input {}",
                g.len(),
                xs.len()
            );
        }
        // SAFETY: grad_a and x are only read; `out` is fresh and written only here.
        unsafe { bireal_backward(g.as_slice(), xs.as_slice(), dst.ptr(), per, stds) }?;
        Ok(out)
    }

    fn binarize_weight(&self, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        generic::binarize_weight(weight, act_w)
    }

    fn weight_grad(&self, grad_wb: &Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        generic::weight_grad(grad_wb, weight, act_w)
    }

    fn channel_alpha(&self, weight: &Tensor) -> Result<Tensor> {
        generic::channel_alpha(weight)
    }
}

/// `(N, elements per sample)` of an activation tensor.
fn samples(x: &Tensor) -> Result<(usize, usize)> {
    let f = facts::facts(x)?;
    let n = f.sizes.first().map_or(0, |&n| n.max(0) as usize);
    Ok((n, f.numel() / n.max(1)))
}

/// The per-sample stds (shape `[N, 1, ..]`) as a slice of N values.
fn stds_of(std: &Tensor, n: usize) -> Result<&[f32]> {
    let v = HostF32::of(std)?;
    if v.len() != n {
        return value_err!("std has {} elements for {n} samples", v.len());
    }
    // SAFETY: std is borrowed by the caller for the op and only read.
    Ok(unsafe { v.as_slice() })
}

#[inline]
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0 // +-0 and NaN give 0, as torch.sign (and so upstream) gives
    }
}

/// `max(0, 2 - 2|x|)`, NaN-propagating like `clamp_min`.
#[inline]
fn surrogate(x_hat: f32) -> f32 {
    let t = 2.0 - 2.0 * x_hat.abs();
    if t < 0.0 {
        0.0
    } else {
        t
    }
}

/// Per-sample `sqrt(Var(x_n) + eps)` (unbiased) of `n` samples of `per` elements each,
/// in f32, accumulated in f64 in two passes. It may differ from `torch.var` in the
/// last bit.
pub fn sample_std(data: &[f32], n: usize, per: usize, eps: f64) -> Result<Vec<f32>> {
    let mut stds = vec![0f32; n];
    let out = SharedMut(stds.as_mut_ptr());
    parallel_for(n, (GRAIN / per.max(1)).max(1), |lo, hi| {
        for s in lo..hi {
            let row = &data[s * per..(s + 1) * per];
            let count = row.len() as f64;
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
            let ss: f64 = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
            let var = (ss / (count - 1.0)) as f32;
            // SAFETY: sample s belongs to this task only.
            unsafe { *out.at(s) = (var + eps as f32).sqrt() };
        }
    })?;
    Ok(stds)
}

/// `dst = sign(src / std_n)` (or `sign(src)` without `std`), as f32 `{-1, 0, +1}`.
///
/// # Safety
/// `dst` must point to `src.len()` writable f32 that nothing else reads or writes
/// during the call.
pub unsafe fn sign_normalized(
    src: &[f32],
    dst: *mut f32,
    per: usize,
    std: Option<&[f32]>,
) -> Result<()> {
    let dst = SharedMut(dst);
    let per = per.max(1);
    parallel_for(src.len(), GRAIN, |begin, end| {
        segments(begin, end, per, |sample, lo, hi| {
            // SAFETY: [lo, hi) lies in this task's range of dst.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(lo), hi - lo) };
            let xs = &src[lo..hi];
            match std {
                Some(s) => {
                    let s = s[sample];
                    o.iter_mut().zip(xs).for_each(|(o, &v)| *o = sign(v / s));
                }
                None => o.iter_mut().zip(xs).for_each(|(o, &v)| *o = sign(v)),
            }
        })
    })
}

/// Bi-Real backward through `x_hat = x / std`:
/// `dst = grad_a * max(0, 2 - 2 |x_hat|) / std` (no `/ std` without it).
///
/// # Safety
/// As [`sign_normalized`]; `g` and `xs` have the same length.
pub unsafe fn bireal_backward(
    g: &[f32],
    xs: &[f32],
    dst: *mut f32,
    per: usize,
    std: Option<&[f32]>,
) -> Result<()> {
    let dst = SharedMut(dst);
    let per = per.max(1);
    parallel_for(xs.len(), GRAIN, |begin, end| {
        segments(begin, end, per, |sample, lo, hi| {
            // SAFETY: [lo, hi) lies in this task's range of dst.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(lo), hi - lo) };
            let (g, xs) = (&g[lo..hi], &xs[lo..hi]);
            match std {
                Some(s) => {
                    let s = s[sample];
                    for ((o, &gi), &xi) in o.iter_mut().zip(g).zip(xs) {
                        *o = gi * surrogate(xi / s) / s;
                    }
                }
                None => {
                    for ((o, &gi), &xi) in o.iter_mut().zip(g).zip(xs) {
                        *o = gi * surrogate(xi);
                    }
                }
            }
        })
    })
}
