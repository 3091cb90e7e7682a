//! AGS and SAD as raw loops over contiguous float32 CPU memory.

use tch::Tensor;

use super::config::Config;
use super::layer::{Layer, GRAD_NORM_FLOOR, WEIGHT_NORM_FLOOR};
use crate::error::Result;
use crate::facts::{self, HostF32};
use crate::parallel::{parallel_for, SharedMut, GRAIN};

/// One layer as raw pointers. Built only by [`plan`], which checks that every tensor is
/// a contiguous float32 CPU tensor of `channels * per_channel` elements and that the
/// mutable ones do not overlap anything else.
pub struct RawLayer {
    grad: *mut f32,
    weight: *const f32,
    tracker: *mut f32,
    prev: *mut f32,
    channels: usize,
    per_channel: usize,
}

// SAFETY: each RawLayer refers to distinct, non-overlapping buffers (checked in `plan`)
// that outlive the parallel section (the caller borrows the tensors); every output
// channel is touched by exactly one task.
unsafe impl Send for RawLayer {}
unsafe impl Sync for RawLayer {}

/// Raw views of every layer, or `None` when some tensor is empty or the buffers
/// overlap (the generic route then runs the step). The caller has checked that every
/// tensor is contiguous float32 CPU memory and that shapes agree.
pub fn plan(cfg: &Config, layers: &[Layer<'_>]) -> Result<Option<Vec<RawLayer>>> {
    let overlaps = |spans: &[(usize, usize)], s: (usize, usize)| {
        spans.iter().any(|&(a, b)| s.0 < b && a < s.1)
    };
    let mut written: Vec<(usize, usize)> = Vec::new();
    let mut weights: Vec<(usize, usize)> = Vec::new();
    let mut raw = Vec::with_capacity(layers.len());
    for l in layers {
        let grad = HostF32::of(l.grad)?;
        let weight = HostF32::of(l.weight)?;
        let (tracker, prev) = match (cfg.enable_dampen, l.sad_buffers()) {
            (true, Some((t, p))) => (Some(HostF32::of(t)?), Some(HostF32::of(p)?)),
            _ => (None, None),
        };
        let mutable = [Some(grad), tracker, prev];
        for v in mutable.iter().flatten() {
            if v.is_empty() || overlaps(&written, v.span()) {
                return Ok(None);
            }
            written.push(v.span());
        }
        if weight.is_empty() {
            return Ok(None);
        }
        weights.push(weight.span());
        let channels = facts::facts(l.weight)?
            .sizes
            .first()
            .map_or(0, |&o| o.max(0) as usize);
        raw.push(RawLayer {
            grad: grad.ptr(),
            weight: weight.ptr(),
            tracker: tracker.map_or(std::ptr::null_mut(), |t| t.ptr()),
            prev: prev.map_or(std::ptr::null_mut(), |p| p.ptr()),
            channels,
            per_channel: weight.len() / channels.max(1),
        });
    }
    // The weights are only read, but must not overlap any written buffer either.
    if weights.iter().any(|&s| overlaps(&written, s)) {
        return Ok(None);
    }
    Ok(Some(raw))
}

/// Per-channel result: (ratio r_o, silent count).
fn run_channel(cfg: &Config, l: &RawLayer, c: usize) -> (f64, usize) {
    let k = l.per_channel;
    let off = c * k;
    // SAFETY: see RawLayer; channel c owns elements [off, off + k) of each buffer.
    let g = unsafe { std::slice::from_raw_parts_mut(l.grad.add(off), k) };
    let w = unsafe { std::slice::from_raw_parts(l.weight.add(off), k) };

    let mut factor = 1.0f32;
    let mut ratio = 0.0f64;
    if cfg.enable_ags {
        let (gs, ws) = sums_of_squares(g, w);
        let gn = (gs.sqrt() as f32).max(GRAD_NORM_FLOOR as f32);
        let wn = (ws.sqrt() as f32).max(WEIGHT_NORM_FLOOR as f32);
        let r = gn / wn;
        ratio = f64::from(r);
        if r < cfg.delta as f32 {
            factor = (cfg.delta as f32) * wn / gn;
        }
    }
    if !cfg.enable_dampen {
        if factor != 1.0 {
            g.iter_mut().for_each(|gi| *gi *= factor);
        }
        return (ratio, 0);
    }
    // SAFETY: as above; present because `plan` required them with SAD enabled.
    let t = unsafe { std::slice::from_raw_parts_mut(l.tracker.add(off), k) };
    let p = unsafe { std::slice::from_raw_parts_mut(l.prev.add(off), k) };
    let m = cfg.track_momentum as f32;
    let one_minus_m = (1.0 - cfg.track_momentum) as f32;
    let tau = cfg.track_threshold as f32;
    let lambda = cfg.dampen_weight as f32;
    // Branch-free so that the loop vectorizes: silent masks are data-dependent and
    // would mispredict about half the time.
    let mut silent = 0u32;
    for (((gi, ti), pi), &wi) in g.iter_mut().zip(t.iter_mut()).zip(p.iter_mut()).zip(w) {
        let flipped = (sign(wi) != sign(*pi)) as u32 as f32;
        let tn = m * *ti + one_minus_m * flipped;
        *ti = tn;
        let is_silent = tn < tau;
        silent += is_silent as u32;
        let decay = if is_silent { wi * lambda } else { 0.0 };
        *gi = *gi * factor + decay;
        *pi = wi;
    }
    (ratio, silent as usize)
}

/// torch.sign as -1 / 0 / +1 without branches.
#[inline(always)]
fn sign(v: f32) -> i32 {
    (v > 0.0) as i32 - (v < 0.0) as i32
}

/// `(sum g^2, sum w^2)` in f64, with eight independent partial sums so the loop
/// pipelines and vectorizes instead of waiting on one accumulator.
fn sums_of_squares(g: &[f32], w: &[f32]) -> (f64, f64) {
    const LANES: usize = 8;
    let mut ga = [0f64; LANES];
    let mut wa = [0f64; LANES];
    let (gc, wc) = (g.chunks_exact(LANES), w.chunks_exact(LANES));
    let (gr, wr) = (gc.remainder(), wc.remainder());
    for (gx, wx) in gc.zip(wc) {
        for j in 0..LANES {
            ga[j] += f64::from(gx[j]) * f64::from(gx[j]);
            wa[j] += f64::from(wx[j]) * f64::from(wx[j]);
        }
    }
    let mut gs: f64 = ga.iter().sum();
    let mut ws: f64 = wa.iter().sum();
    for (&gi, &wi) in gr.iter().zip(wr) {
        gs += f64::from(gi) * f64::from(gi);
        ws += f64::from(wi) * f64::from(wi);
    }
    (gs, ws)
}

/// Runs every channel of every layer (in parallel) and gathers the per-layer figures
/// (`[L, 2]` float64 on the CPU, NaN where a part is disabled).
pub fn run(cfg: &Config, layers: &[RawLayer]) -> Result<Tensor> {
    // Channel c of layer l has the global index starts[l] + c. Tasks are runs of
    // channels within one layer holding about GRAIN elements each, so that an even
    // split of tasks across threads is an even split of the work.
    let mut starts = Vec::with_capacity(layers.len() + 1);
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new(); // (layer, first, last)
    let mut total = 0usize;
    for (i, l) in layers.iter().enumerate() {
        starts.push(total);
        let step = (GRAIN / l.per_channel.max(1)).max(1);
        tasks.extend(
            (0..l.channels)
                .step_by(step)
                .map(|c| (i, c, (c + step).min(l.channels))),
        );
        total += l.channels;
    }
    starts.push(total);
    let mut results = vec![(0.0f64, 0usize); total];
    let out = SharedMut(results.as_mut_ptr());
    parallel_for(tasks.len(), 1, |begin, end| {
        for &(layer, first, last) in &tasks[begin..end] {
            for c in first..last {
                let r = run_channel(cfg, &layers[layer], c);
                // SAFETY: each channel belongs to exactly one task.
                unsafe { *out.at(starts[layer] + c) = r };
            }
        }
    })?;
    let mut figures = Vec::with_capacity(2 * layers.len());
    for (i, l) in layers.iter().enumerate() {
        let part = &results[starts[i]..starts[i + 1]];
        let ratio_sum: f64 = part.iter().map(|r| r.0).sum();
        let silent: usize = part.iter().map(|r| r.1).sum();
        figures.push(if cfg.enable_ags {
            ratio_sum / l.channels as f64
        } else {
            f64::NAN
        });
        figures.push(if cfg.enable_dampen {
            silent as f64 / (l.channels * l.per_channel) as f64
        } else {
            f64::NAN
        });
    }
    Ok(Tensor::f_from_slice(&figures)?.f_reshape([layers.len() as i64, 2])?)
}
