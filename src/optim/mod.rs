//! Adaptive Gradient Scaling (SPEC section 2) and Silence Awareness Decaying (section 3).
//!
//! Both act on the weight gradient of every binary layer after backward and before the
//! optimizer update. [`step`] validates the layers, picks the route once for the whole
//! step and runs it:
//! - [`cpu`]: fused loops over contiguous float32 CPU tensors; two passes over each
//!   output channel (norms, then scale + track + decay + copy in one sweep), all
//!   channels of all layers split across libtorch's intra-op threads, no temporaries;
//! - [`generic`]: the same formulas through libtorch ops (any device, any dtype).
//!
//! Tests hold both to a plain-PyTorch oracle written from SPEC.

pub mod cpu;
pub mod generic;
pub mod py;

use tch::Tensor;

use crate::error::{value_err, Error, Result};
use crate::ffi;
use crate::tensor::{self, Route};

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

/// One binary layer's tensors. `grad`, `tracker` and `weight_prev` are updated in place.
pub struct Layer<'a> {
    pub grad: &'a Tensor,
    pub weight: &'a Tensor,
    pub tracker: Option<&'a Tensor>,
    pub weight_prev: Option<&'a Tensor>,
}

impl Layer<'_> {
    /// The tensors SAD reads and writes besides the weight and the gradient, when SAD
    /// is enabled (`None` if the layer lacks them).
    fn sad_buffers(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.tracker?, self.weight_prev?))
    }

    /// Every tensor the step touches under `cfg`.
    fn tensors(&self, cfg: &Config) -> Vec<&Tensor> {
        let mut ts = vec![self.grad, self.weight];
        if cfg.enable_dampen {
            if let Some((t, p)) = self.sad_buffers() {
                ts.push(t);
                ts.push(p);
            }
        }
        ts
    }
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
    let f = tensor::facts(weight)?;
    tensor::check_float(&f, "weight")?;
    if f.sizes.is_empty() {
        return value_err!("weight must have an output-channel dimension, got a 0-d tensor");
    }
    let _guard = ffi::no_grad();
    let tracker = if track_ones {
        weight.f_ones_like()?
    } else {
        weight.f_zeros_like()?
    };
    let prev = weight.f_detach_copy()?;
    Ok((tracker, prev))
}

fn check_layer(i: usize, l: &Layer<'_>, cfg: &Config) -> Result<()> {
    let wf = tensor::facts(l.weight)?;
    let kind = tensor::check_float(&wf, &format!("layer {i}: weight"))?;
    if wf.sizes.is_empty() {
        return value_err!(
            "layer {i}: weight must have an output-channel dimension, got a 0-d tensor"
        );
    }
    let mut named = vec![("grad", l.grad)];
    if cfg.enable_dampen {
        let Some((t, p)) = l.sad_buffers() else {
            return value_err!(
                "layer {i}: SAD is enabled but the layer has no tracker/weight_prev buffers"
            );
        };
        named.push(("tracker", t));
        named.push(("weight_prev", p));
    }
    for (name, t) in named {
        let f = tensor::facts(t)?;
        if f.sizes != wf.sizes {
            return value_err!(
                "layer {i}: {name} has shape {:?}, weight {:?}",
                f.sizes,
                wf.sizes
            );
        }
        if f.place != wf.place {
            return value_err!(
                "layer {i}: {name} is on {}, weight on {}",
                f.place,
                wf.place
            );
        }
        if f.kind != Some(kind) {
            return Err(Error::Type(format!(
                "layer {i}: {name} has dtype {}, weight {}",
                f.dtype_name(),
                tensor::kind_name(kind)
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
    let _guard = ffi::no_grad();
    let all: Vec<&Tensor> = layers.iter().flat_map(|l| l.tensors(cfg)).collect();
    let plan = match Route::of(&all)? {
        Route::HostF32 => cpu::plan(cfg, layers)?,
        Route::Generic => None,
    };
    match plan {
        Some(raw) => cpu::run(cfg, &raw),
        None => generic::run(cfg, layers),
    }
}
