//! The engine's activation tensor (float32, NHWC) and fused activations.
//!
//! Activation buffers are recycled through a small process-wide pool: a network runs
//! the same sequence of shapes every call, so after the first call no op touches
//! freshly mapped memory (whose page faults cost as much as a small layer).

use std::sync::Mutex;

use crate::error::{value_err, Result};

/// Recycled buffers (the smallest go first when the pool is full).
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// The most buffers kept for reuse, the most memory they may hold together, and the
/// smallest worth keeping (in elements).
const POOL_KEEP: usize = 32;
const POOL_BYTES: usize = 256 << 20;
const POOL_MIN: usize = 16 * 1024;

fn bytes(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

/// A buffer of `n` elements, reusing a pooled one when one is large enough; zeroed
/// when `zero`, otherwise holding stale values for the caller to overwrite.
fn buffer(n: usize, zero: bool) -> Result<Vec<f32>> {
    if n >= POOL_MIN {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut v = pool.swap_remove(i);
            drop(pool);
            if zero {
                v.clear();
            }
            v.resize(n, 0.0);
            v.truncate(n);
            return Ok(v);
        }
    }
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return value_err!(
            "not enough memory for a tensor of {n} floats ({} MiB)",
            n / (1 << 18)
        );
    }
    v.resize(n, 0.0);
    Ok(v)
}

/// `n * h * w * c`, or an error when it overflows.
pub(crate) fn elements(n: usize, h: usize, w: usize, c: usize) -> Result<usize> {
    match n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .and_then(|v| v.checked_mul(c))
    {
        Some(v) => Ok(v),
        None => value_err!("tensor shape {n}x{h}x{w}x{c} is too large"),
    }
}

fn recycle(v: Vec<f32>) {
    if v.capacity() < POOL_MIN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    admit(&mut pool, v, POOL_KEEP, POOL_BYTES);
}

/// Keeps `v` in `pool` while the pool stays within `max_count` buffers and `max_bytes`
/// bytes, dropping the smallest buffers first (large buffers are the expensive ones to
/// map again); a buffer larger than `max_bytes` on its own is freed at once.
fn admit(pool: &mut Vec<Vec<f32>>, v: Vec<f32>, max_count: usize, max_bytes: usize) {
    if bytes(&v) > max_bytes {
        return;
    }
    pool.push(v);
    let mut held: usize = pool.iter().map(bytes).sum();
    while pool.len() > max_count || held > max_bytes {
        let smallest = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        match smallest {
            Some(i) => held -= bytes(&pool.swap_remove(i)),
            None => break,
        }
    }
}

/// A float32 tensor in NHWC layout (batch, height, width, channels).
#[derive(Clone, Debug)]
pub struct Tensor4 {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Tensor4 {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Result<Self> {
        Ok(Tensor4 {
            n,
            h,
            w,
            c,
            data: buffer(elements(n, h, w, c)?, true)?,
        })
    }

    /// Like [`Tensor4::zeros`], but the values are unspecified: for ops that write
    /// every element.
    pub fn scratch(n: usize, h: usize, w: usize, c: usize) -> Result<Self> {
        Ok(Tensor4 {
            n,
            h,
            w,
            c,
            data: buffer(elements(n, h, w, c)?, false)?,
        })
    }

    /// From an NCHW buffer (the layout PyTorch and the Python API use).
    pub fn from_nchw(src: &[f32], n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let mut t = Tensor4::scratch(n, h, w, c)?;
        let plane = h * w;
        for b in 0..n {
            for ch in 0..c {
                let s = &src[(b * c + ch) * plane..(b * c + ch + 1) * plane];
                for (p, &v) in s.iter().enumerate() {
                    t.data[(b * plane + p) * c + ch] = v;
                }
            }
        }
        Ok(t)
    }

    /// The data in NCHW order.
    pub fn to_nchw(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut out = vec![0.0; self.data.len()];
        for b in 0..self.n {
            for p in 0..plane {
                let px = &self.data[(b * plane + p) * self.c..(b * plane + p + 1) * self.c];
                for (ch, &v) in px.iter().enumerate() {
                    out[(b * self.c + ch) * plane + p] = v;
                }
            }
        }
        out
    }

    pub fn nchw(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// The batch cut into sub-batches of `size` images (the last may hold fewer).
    pub fn split_batch(&self, size: usize) -> Result<Vec<Tensor4>> {
        let image = self.h * self.w * self.c;
        let mut parts = Vec::with_capacity(self.n.div_ceil(size.max(1)));
        for images in self.data.chunks(size.max(1) * image.max(1)) {
            let mut t = Tensor4::scratch(images.len() / image.max(1), self.h, self.w, self.c)?;
            t.data.copy_from_slice(images);
            parts.push(t);
        }
        Ok(parts)
    }

    /// The sub-batches' images one after the other (they share a shape but the batch);
    /// the inverse of [`Tensor4::split_batch`].
    pub fn concat_batch(parts: Vec<Tensor4>) -> Result<Tensor4> {
        let Some(first) = parts.first() else {
            return value_err!("no sub-batch to join");
        };
        let (h, w, c) = (first.h, first.w, first.c);
        if parts.iter().any(|p| (p.h, p.w, p.c) != (h, w, c)) {
            return value_err!("sub-batches of different shapes cannot be joined");
        }
        let mut out = Tensor4::scratch(parts.iter().map(|p| p.n).sum(), h, w, c)?;
        let mut at = 0;
        for p in &parts {
            out.data[at..at + p.data.len()].copy_from_slice(&p.data);
            at += p.data.len();
        }
        Ok(out)
    }

    /// Moves the data out (the tensor is left empty).
    pub fn into_data(mut self) -> Vec<f32> {
        std::mem::take(&mut self.data)
    }
}

impl Drop for Tensor4 {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.data));
    }
}

/// An elementwise activation applied per pixel (channels last).
#[derive(Clone, Debug)]
pub enum Act {
    None,
    /// `clamp(x, min, max)` (nn.Hardtanh).
    Hardtanh(f32, f32),
    /// `x` where positive, `a[c] * x` elsewhere (nn.PReLU, one or per-channel slopes).
    Prelu(Vec<f32>),
}

impl Act {
    /// Applies the activation to one pixel's channels, in place.
    #[inline(always)]
    pub fn apply(&self, px: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Hardtanh(lo, hi) => {
                for v in px.iter_mut() {
                    *v = hardtanh(*v, *lo, *hi);
                }
            }
            Act::Prelu(a) if a.len() == 1 => {
                for v in px.iter_mut() {
                    *v = prelu(*v, a[0]);
                }
            }
            Act::Prelu(a) => {
                for (v, &a) in px.iter_mut().zip(a) {
                    *v = prelu(*v, a);
                }
            }
        }
    }
}

/// `clamp(v, lo, hi)` as two selects that compile to one `max` and one `min`
/// instruction (`lo <= hi` is checked when the file is read); NaN gives `lo`.
#[inline(always)]
pub fn hardtanh(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v > lo { v } else { lo };
    if v < hi {
        v
    } else {
        hi
    }
}

/// `v` where not negative, `a * v` elsewhere (one channel of nn.PReLU).
#[inline(always)]
pub fn prelu(v: f32, a: f32) -> f32 {
    if v < 0.0 {
        v * a
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacities(pool: &[Vec<f32>]) -> Vec<usize> {
        let mut c: Vec<usize> = pool.iter().map(Vec::capacity).collect();
        c.sort_unstable();
        c
    }

    #[test]
    fn a_batch_split_and_joined_is_unchanged() {
        let data: Vec<f32> = (0..5 * 2 * 3 * 4).map(|v| v as f32).collect();
        let t = Tensor4 {
            n: 5,
            h: 2,
            w: 3,
            c: 4,
            data: data.clone(),
        };
        let parts = t.split_batch(2).unwrap();
        assert_eq!(parts.iter().map(|p| p.n).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(parts[2].data, data[4 * 24..]);
        let joined = Tensor4::concat_batch(parts).unwrap();
        assert_eq!((joined.n, joined.h, joined.w, joined.c), (5, 2, 3, 4));
        assert_eq!(joined.data, data);
    }

    #[test]
    fn the_pool_is_capped_in_count_and_in_bytes() {
        let mut pool = Vec::new();
        // 4 bytes per element: a cap of 4000 bytes holds 1000 elements.
        for n in [100, 300, 200] {
            admit(&mut pool, Vec::with_capacity(n), 8, 4000);
        }
        assert_eq!(capacities(&pool), [100, 200, 300]);
        // 600 more elements exceed 4000 bytes: the smallest buffers go first.
        admit(&mut pool, Vec::with_capacity(600), 8, 4000);
        assert_eq!(capacities(&pool), [300, 600]);
        // A buffer over the whole cap is not kept, and evicts nothing.
        admit(&mut pool, Vec::with_capacity(1001), 8, 4000);
        assert_eq!(capacities(&pool), [300, 600]);
        // The count cap still holds.
        for _ in 0..3 {
            admit(&mut pool, Vec::with_capacity(10), 3, 4000);
        }
        assert_eq!(capacities(&pool), [10, 300, 600]);
    }
}
