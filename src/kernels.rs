//! Fused loops over contiguous float32 CPU memory for the elementwise parts of the
//! binary convolution: per-sample standard deviation, `sign(x / std)` and the Bi-Real
//! backward. libtorch needs a reduction (Welford `var`) plus three to seven elementwise
//! ops with temporaries for the same work; these do it in one pass each, split across
//! libtorch's own intra-op threads ([`parallel_for`]). `conv.rs` picks them when
//! [`eligible`] holds and falls back to libtorch ops (any device, any dtype) otherwise.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::ffi::parallel_for;

/// Elements per task: below this a loop runs on the calling thread.
pub const GRAIN: usize = 1 << 15;

/// Whether `t` can be read as one contiguous `f32` slice on the CPU.
pub fn eligible(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.f_kind().ok() == Some(Kind::Float) && t.is_contiguous()
}

/// A raw pointer that tasks share; each task touches a disjoint range.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: users write disjoint index ranges only (see each call site).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Pointer to element `i` (a method, so closures capture the Sync wrapper).
    ///
    /// # Safety
    /// `i` must be in bounds of the allocation.
    #[inline]
    pub unsafe fn at(&self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

/// The elements of an eligible tensor.
///
/// # Safety
/// `t` must satisfy [`eligible`] and outlive the slice, with no concurrent writer.
pub unsafe fn as_slice(t: &Tensor) -> &[f32] {
    std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
}

#[inline]
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        v // +-0 stays 0, NaN stays NaN, as torch.sign
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

/// Calls `f(sample, lo, hi)` for the parts of the flat range `[begin, end)` that fall in
/// each sample of `per` elements.
#[inline]
fn segments(begin: usize, end: usize, per: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut i = begin;
    while i < end {
        let sample = i / per;
        let hi = end.min((sample + 1) * per);
        f(sample, i, hi);
        i = hi;
    }
}

/// Per-sample `sqrt(Var(x_n) + eps)` (unbiased, over everything but dim 0) in f32,
/// accumulated in f64 in two passes, shape `[N, 1, 1, 1]`. It may differ from
/// `torch.var` in the last bit.
pub fn sample_std(x: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.size()[0] as usize;
    // SAFETY: caller checked `eligible(x)`; x is only read.
    let data = unsafe { as_slice(x) };
    let per = data.len() / n.max(1);
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
    Ok(Tensor::f_from_slice(&stds)?.f_reshape([n as i64, 1, 1, 1])?)
}

/// `sign(x / std_n)` (or `sign(x)` without `std`), as f32 `{-1, 0, +1}`.
pub fn sign_normalized(x: &Tensor, std: Option<&[f32]>) -> Result<Tensor> {
    let n = x.size()[0] as usize;
    let out = x.f_empty_like()?;
    // SAFETY: caller checked `eligible(x)`; `out` is fresh, contiguous f32, like x.
    let src = unsafe { as_slice(x) };
    let dst = SharedMut(out.data_ptr() as *mut f32);
    let per = (src.len() / n.max(1)).max(1);
    parallel_for(src.len(), GRAIN, |begin, end| {
        segments(begin, end, per, |sample, lo, hi| {
            // SAFETY: [lo, hi) lies in this task's range.
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
    })?;
    Ok(out)
}

/// Bi-Real backward through `x_hat = x / std`:
/// `grad_x = grad_a * max(0, 2 - 2 |x_hat|) / std` (no `/ std` in eval mode).
pub fn bireal_backward(grad_a: &Tensor, x: &Tensor, std: Option<&[f32]>) -> Result<Tensor> {
    let n = x.size()[0] as usize;
    let out = x.f_empty_like()?;
    // SAFETY: caller checked both eligible and of x's shape; `out` is fresh.
    let (g, xs) = unsafe { (as_slice(grad_a), as_slice(x)) };
    let dst = SharedMut(out.data_ptr() as *mut f32);
    let per = (xs.len() / n.max(1)).max(1);
    parallel_for(xs.len(), GRAIN, |begin, end| {
        segments(begin, end, per, |sample, lo, hi| {
            // SAFETY: [lo, hi) lies in this task's range.
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
    })?;
    Ok(out)
}

/// The values of a small tensor (the per-sample stds) as f32 on the host.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.f_copy_data(&mut v, n)?;
    Ok(v)
}
