//! The monitoring step as one fused pass over contiguous CPU memory: float32 weights
//! and trackers, int8 signs, bool ever-flipped masks.

use tch::{Kind, Tensor};

use super::config::{MonitorConfig, MonitorLayer};
use crate::error::Result;
use crate::facts::{self, Place, Storage};
use crate::parallel::{parallel_for, SharedMut, GRAIN};

/// One layer as raw pointers. Built only by [`plan`], which checks that every tensor is
/// contiguous CPU memory of the right dtype, of `len` elements, and that the buffers
/// written do not overlap anything else.
pub struct RawLayer {
    weight: *const f32,
    sign: *mut i8,
    ever: *mut u8,
    tracker: *mut f32,
    len: usize,
}

// SAFETY: the buffers of a RawLayer are distinct and non-overlapping (checked in `plan`)
// and outlive the parallel section (the caller borrows the tensors); every element is
// touched by exactly one task.
unsafe impl Send for RawLayer {}
unsafe impl Sync for RawLayer {}

/// `(address, bytes)` of `t` when it is contiguous, readable CPU memory of `kind`.
fn host_memory(t: &Tensor, kind: Kind, elem: usize) -> Result<Option<(usize, usize)>> {
    let f = facts::facts(t)?;
    let ok = f.place == Place::Cpu
        && f.kind == Some(kind)
        && f.contiguous
        && f.strided
        && !f.python
        && f.storage == Storage::Readable
        && (f.numel() == 0 || !f.data.is_null());
    Ok(ok.then(|| (f.data as usize, f.numel() * elem)))
}

/// Raw views of every layer, or `None` when some tensor is not contiguous CPU memory
/// of the dtype the loop reads, or buffers overlap (the generic route then runs).
pub fn plan(cfg: &MonitorConfig, layers: &[MonitorLayer<'_>]) -> Result<Option<Vec<RawLayer>>> {
    let overlaps = |spans: &[(usize, usize)], s: (usize, usize)| {
        s.1 > 0
            && spans
                .iter()
                .any(|&(a, n)| n > 0 && s.0 < a + n && a < s.0 + s.1)
    };
    let mut written: Vec<(usize, usize)> = Vec::new();
    let mut read: Vec<(usize, usize)> = Vec::new();
    let mut raw = Vec::with_capacity(layers.len());
    for l in layers {
        let (Some(w), Some(s), Some(e), Some(t)) = (
            host_memory(l.weight, Kind::Float, 4)?,
            host_memory(l.sign, Kind::Int8, 1)?,
            host_memory(l.ever_flipped, Kind::Bool, 1)?,
            host_memory(l.tracker, Kind::Float, 4)?,
        ) else {
            return Ok(None);
        };
        let mut mutable = vec![s, e];
        if cfg.update_trackers {
            mutable.push(t);
        } else {
            read.push(t);
        }
        for span in mutable {
            if overlaps(&written, span) {
                return Ok(None);
            }
            written.push(span);
        }
        read.push(w);
        raw.push(RawLayer {
            weight: w.0 as *const f32,
            sign: s.0 as *mut i8,
            ever: e.0 as *mut u8,
            tracker: t.0 as *mut f32,
            len: w.1 / 4,
        });
    }
    if read.iter().any(|&s| overlaps(&written, s)) {
        return Ok(None);
    }
    Ok(Some(raw))
}

/// torch.sign as -1 / 0 / +1 without branches.
#[inline(always)]
fn sign(v: f32) -> i8 {
    (v > 0.0) as i8 - (v < 0.0) as i8
}

/// Counts over elements `[lo, hi)` of one layer: (flipped, never flipped, silent).
/// `UPDATE`: the monitor owns the tracker and advances it.
fn run_range<const UPDATE: bool>(
    cfg: &MonitorConfig,
    l: &RawLayer,
    lo: usize,
    hi: usize,
) -> [u64; 3] {
    let k = hi - lo;
    // SAFETY: see RawLayer; this task owns elements [lo, hi) of every buffer of the layer.
    let w = unsafe { std::slice::from_raw_parts(l.weight.add(lo), k) };
    let s = unsafe { std::slice::from_raw_parts_mut(l.sign.add(lo), k) };
    let e = unsafe { std::slice::from_raw_parts_mut(l.ever.add(lo), k) };
    let t = unsafe { std::slice::from_raw_parts_mut(l.tracker.add(lo), k) };
    let m = cfg.momentum as f32;
    let one_minus_m = (1.0 - cfg.momentum) as f32;
    let tau = cfg.threshold as f32;
    // Branch-free, so that the loop vectorizes; u32 sums cannot overflow within a task
    // of at most GRAIN elements.
    let (mut flipped, mut never, mut silent) = (0u32, 0u32, 0u32);
    for (((&wi, si), ei), ti) in w
        .iter()
        .zip(s.iter_mut())
        .zip(e.iter_mut())
        .zip(t.iter_mut())
    {
        let now = sign(wi);
        let f = (now != *si) as u8;
        *si = now;
        let ever = (*ei != 0) as u8 | f;
        *ei = ever;
        flipped += u32::from(f);
        never += u32::from(1 - ever);
        let tracked = if UPDATE {
            let tn = m * *ti + one_minus_m * f32::from(f);
            *ti = tn;
            tn
        } else {
            *ti
        };
        silent += (tracked < tau) as u32;
    }
    [u64::from(flipped), u64::from(never), u64::from(silent)]
}

/// Runs every layer (in parallel) and returns the per-layer shares as float64 `[L]` CPU
/// tensors: (flipped, never flipped, silent).
pub fn run(cfg: &MonitorConfig, layers: &[RawLayer]) -> Result<[Tensor; 3]> {
    // Tasks are runs of at most GRAIN elements within one layer.
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new(); // (layer, lo, hi)
    for (i, l) in layers.iter().enumerate() {
        tasks.extend(
            (0..l.len)
                .step_by(GRAIN)
                .map(|lo| (i, lo, (lo + GRAIN).min(l.len))),
        );
    }
    let mut counts = vec![[0u64; 3]; tasks.len()];
    let out = SharedMut(counts.as_mut_ptr());
    parallel_for(tasks.len(), 1, |begin, end| {
        for (j, &(layer, lo, hi)) in tasks.iter().enumerate().take(end).skip(begin) {
            let c = if cfg.update_trackers {
                run_range::<true>(cfg, &layers[layer], lo, hi)
            } else {
                run_range::<false>(cfg, &layers[layer], lo, hi)
            };
            // SAFETY: each task index belongs to exactly one range.
            unsafe { *out.at(j) = c };
        }
    })?;
    let mut sums = vec![[0u64; 3]; layers.len()];
    for (&(layer, _, _), c) in tasks.iter().zip(&counts) {
        for k in 0..3 {
            sums[layer][k] += c[k];
        }
    }
    // 0 / 0 is NaN for a layer without weights, as torch's mean of nothing.
    let share = |k: usize| -> Result<Tensor> {
        let v: Vec<f64> = sums
            .iter()
            .zip(layers)
            .map(|(s, l)| s[k] as f64 / l.len as f64)
            .collect();
        Ok(Tensor::f_from_slice(&v)?)
    };
    Ok([share(0)?, share(1)?, share(2)?])
}
