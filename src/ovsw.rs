//! Adaptive Gradient Scaling (SPEC section 2) and Silence Awareness Decaying (section 3).
//!
//! Both act on the weight gradient of every binary conv after backward and before the
//! optimizer update. Two implementations of the same formulas:
//! - a fused one for contiguous float32 CPU tensors: two passes over each output
//!   channel (norms, then scale + track + decay + copy in one sweep), all channels of all
//!   layers split across libtorch's intra-op threads, with no temporaries;
//! - a generic one through libtorch ops for everything else (CUDA, other dtypes).
//!
//! Tests hold both to a plain-PyTorch oracle written from SPEC.

use tch::{Device, Kind, Tensor};

use crate::error::{value_err, Error, Result};

/// Floors of SPEC section 2: `g_o = max(||G_o||, 1e-6)`, `w_o = max(||W_o||, 1e-3)`.
pub const GRAD_NORM_FLOOR: f64 = 1e-6;
pub const WEIGHT_NORM_FLOOR: f64 = 1e-3;

/// OvSW hyperparameters, validated once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub enable_ags: bool,
    pub delta: f64,
    pub enable_dampen: bool,
    pub dampen_weight: f64,
    pub track_momentum: f64,
    pub track_threshold: f64,
    pub track_ones: bool,
}

impl Config {
    pub fn new(
        enable_ags: bool,
        delta: f64,
        enable_dampen: bool,
        dampen_weight: f64,
        track_momentum: f64,
        track_threshold: f64,
        track_ones: bool,
    ) -> Result<Self> {
        fn non_negative(name: &str, v: f64) -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                value_err!("{name} must be a finite number >= 0, got {v}")
            }
        }
        non_negative("delta", delta)?;
        non_negative("dampen_weight", dampen_weight)?;
        non_negative("track_threshold", track_threshold)?;
        if !(0.0..1.0).contains(&track_momentum) {
            return value_err!("track_momentum must lie in [0, 1), got {track_momentum}");
        }
        Ok(Config {
            enable_ags,
            delta,
            enable_dampen,
            dampen_weight,
            track_momentum,
            track_threshold,
            track_ones,
        })
    }
}

/// One binary conv's tensors. `grad`, `tracker` and `weight_prev` are updated in place.
pub struct Layer<'a> {
    pub grad: &'a Tensor,
    pub weight: &'a Tensor,
    pub tracker: Option<&'a Tensor>,
    pub weight_prev: Option<&'a Tensor>,
}

/// What a layer reports: the mean AGS ratio `r_o` and the silent fraction `mean(M)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerStats {
    pub ags_ratio: Option<f64>,
    pub silent_ratio: Option<f64>,
}

/// The initial SAD state of a weight: the tracker (zeros, or ones with `track_ones`) and
/// `weight_prev`, a copy of W.
pub fn initial_state(weight: &Tensor, track_ones: bool) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    let tracker = if track_ones {
        weight.f_ones_like()?
    } else {
        weight.f_zeros_like()?
    };
    let prev = weight.f_detach_copy()?;
    Ok((tracker, prev))
}

fn check_layer(i: usize, l: &Layer<'_>, cfg: &Config) -> Result<()> {
    let shape = l.weight.size();
    if !l.grad.defined() {
        return value_err!("layer {i}: the weight has no gradient; run backward first");
    }
    let kind = l.weight.f_kind()?;
    if !crate::conv::is_float(kind) {
        return Err(Error::Type(format!(
            "layer {i}: weight dtype {kind:?} is not floating point"
        )));
    }
    if shape.is_empty() {
        return value_err!("layer {i}: weight must have an output-channel dimension");
    }
    let mut named = vec![("grad", l.grad)];
    if cfg.enable_dampen {
        match (l.tracker, l.weight_prev) {
            (Some(t), Some(p)) => {
                named.push(("tracker", t));
                named.push(("weight_prev", p));
            }
            _ => {
                return value_err!(
                    "layer {i}: SAD is enabled but the layer has no tracker/weight_prev buffers"
                )
            }
        }
    }
    for (name, t) in named {
        if t.size() != shape {
            return value_err!(
                "layer {i}: {name} has shape {:?}, weight {shape:?}",
                t.size()
            );
        }
        if t.device() != l.weight.device() {
            return value_err!(
                "layer {i}: {name} is on {:?}, weight on {:?}",
                t.device(),
                l.weight.device()
            );
        }
        if t.f_kind()? != kind {
            return Err(Error::Type(format!(
                "layer {i}: {name} has dtype {:?}, weight {kind:?}",
                t.f_kind()?
            )));
        }
    }
    Ok(())
}

/// Applies AGS then SAD (each as enabled in `cfg`) to every layer, in place.
pub fn step(cfg: &Config, layers: &[Layer<'_>]) -> Result<Vec<LayerStats>> {
    for (i, l) in layers.iter().enumerate() {
        check_layer(i, l, cfg)?;
    }
    if !cfg.enable_ags && !cfg.enable_dampen {
        return Ok(vec![LayerStats::default(); layers.len()]);
    }
    let _guard = tch::no_grad_guard();
    match fused::plan(cfg, layers) {
        Some(raw) => fused::run(cfg, &raw),
        None => generic(cfg, layers),
    }
}

/// The same formulas through libtorch ops: any device, any floating dtype.
fn generic(cfg: &Config, layers: &[Layer<'_>]) -> Result<Vec<LayerStats>> {
    let mut figures: Vec<Tensor> = Vec::with_capacity(2 * layers.len());
    for l in layers {
        let o = l.weight.size()[0];
        let mut grad = l.grad.shallow_clone();
        if cfg.enable_ags {
            let g2 = grad.f_reshape([o, -1])?;
            let w2 = l.weight.f_reshape([o, -1])?;
            let gn = g2
                .f_square()?
                .f_sum_dim_intlist(1i64, false, None::<Kind>)?
                .f_sqrt()?;
            let wn = w2
                .f_square()?
                .f_sum_dim_intlist(1i64, false, None::<Kind>)?
                .f_sqrt()?;
            let gn = gn.f_clamp_min(GRAD_NORM_FLOOR)?;
            let wn = wn.f_clamp_min(WEIGHT_NORM_FLOOR)?;
            let r = gn.f_div(&wn)?;
            let boost = wn.f_mul_scalar(cfg.delta)?.f_div(&gn)?;
            let factor = boost.f_where_scalarother(&r.f_lt(cfg.delta)?, 1.0)?;
            let mut shape = vec![o];
            shape.extend(std::iter::repeat_n(1, l.weight.dim() - 1));
            let _ = grad.f_mul_(&factor.f_reshape(shape.as_slice())?)?;
            figures.push(r.f_mean(Kind::Double)?);
        }
        if cfg.enable_dampen {
            // check_layer guarantees both buffers exist when SAD is enabled.
            let (Some(t), Some(p)) = (l.tracker, l.weight_prev) else {
                return value_err!("SAD buffers missing");
            };
            let mut tracker = t.shallow_clone();
            let mut prev = p.shallow_clone();
            let flipped = l
                .weight
                .f_sign()?
                .f_ne_tensor(&prev.f_sign()?)?
                .f_to_kind(tracker.f_kind()?)?;
            let _ = tracker.f_mul_scalar_(cfg.track_momentum)?;
            let _ = tracker.f_add_(&flipped.f_mul_scalar(1.0 - cfg.track_momentum)?)?;
            let silent = tracker.f_lt(cfg.track_threshold)?;
            let decay = l.weight.f_mul(&silent)?.f_mul_scalar(cfg.dampen_weight)?;
            let _ = grad.f_add_(&decay)?;
            prev.f_copy_(l.weight)?;
            figures.push(silent.f_mean(Kind::Double)?);
        }
    }
    let values: Vec<f64> = if figures.is_empty() {
        Vec::new()
    } else {
        let all = Tensor::f_stack(&figures, 0)?.f_to_device(Device::Cpu)?;
        let n = all.numel();
        let mut out = vec![0f64; n];
        all.f_copy_data(&mut out, n)?;
        out
    };
    let mut it = values.into_iter();
    Ok(layers
        .iter()
        .map(|_| LayerStats {
            ags_ratio: if cfg.enable_ags { it.next() } else { None },
            silent_ratio: if cfg.enable_dampen { it.next() } else { None },
        })
        .collect())
}

mod fused {
    //! Raw loops over contiguous float32 CPU memory.

    use super::*;
    use crate::ffi::parallel_for;
    use crate::kernels::{SharedMut, GRAIN};

    /// One layer as raw pointers. Built only by [`plan`], which checks that every
    /// tensor is a contiguous float32 CPU tensor of `channels * per_channel` elements
    /// and that the mutable ones do not overlap anything else.
    pub struct RawLayer {
        grad: *mut f32,
        weight: *const f32,
        tracker: *mut f32,
        prev: *mut f32,
        channels: usize,
        per_channel: usize,
    }

    // SAFETY: each RawLayer refers to distinct, non-overlapping buffers (checked in
    // `plan`) that outlive the parallel section (the caller borrows the tensors); every
    // output channel is touched by exactly one task.
    unsafe impl Send for RawLayer {}
    unsafe impl Sync for RawLayer {}

    fn span(t: &Tensor) -> (usize, usize) {
        let start = t.data_ptr() as usize;
        (start, start + t.numel() * 4)
    }

    /// Raw views of every layer when all of them qualify for the fused path.
    pub fn plan(cfg: &Config, layers: &[Layer<'_>]) -> Option<Vec<RawLayer>> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut raw = Vec::with_capacity(layers.len());
        for l in layers {
            let mut tensors = vec![l.grad, l.weight];
            if cfg.enable_dampen {
                tensors.push(l.tracker?);
                tensors.push(l.weight_prev?);
            }
            for t in &tensors {
                if t.device() != Device::Cpu
                    || t.f_kind().ok()? != Kind::Float
                    || !t.is_contiguous()
                    || t.numel() == 0
                {
                    return None;
                }
            }
            // The weight is only read; everything else is written.
            for (j, t) in tensors.iter().enumerate() {
                let s = span(t);
                if spans.iter().any(|&(a, b)| s.0 < b && a < s.1) {
                    return None;
                }
                if j != 1 {
                    spans.push(s);
                }
            }
            let channels = usize::try_from(l.weight.size()[0]).ok()?;
            let per_channel = l.weight.numel() / channels.max(1);
            raw.push(RawLayer {
                grad: l.grad.data_ptr() as *mut f32,
                weight: l.weight.data_ptr() as *const f32,
                tracker: l
                    .tracker
                    .map_or(std::ptr::null_mut(), |t| t.data_ptr() as *mut f32),
                prev: l
                    .weight_prev
                    .map_or(std::ptr::null_mut(), |t| t.data_ptr() as *mut f32),
                channels,
                per_channel,
            });
        }
        // Weights must not overlap any written buffer either.
        for l in layers {
            let s = span(l.weight);
            if spans.iter().any(|&(a, b)| s.0 < b && a < s.1) {
                return None;
            }
        }
        Some(raw)
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

    /// Runs every channel of every layer (in parallel) and gathers per-layer figures.
    pub fn run(cfg: &Config, layers: &[RawLayer]) -> Result<Vec<LayerStats>> {
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
        Ok(layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let part = &results[starts[i]..starts[i + 1]];
                let ratio_sum: f64 = part.iter().map(|r| r.0).sum();
                let silent: usize = part.iter().map(|r| r.1).sum();
                LayerStats {
                    ags_ratio: cfg.enable_ags.then(|| ratio_sum / l.channels as f64),
                    silent_ratio: cfg
                        .enable_dampen
                        .then(|| silent as f64 / (l.channels * l.per_channel) as f64),
                }
            })
            .collect())
    }
}
