//! The optimizer-step family: Adaptive Gradient Scaling (SPEC section 2) and Silence
//! Awareness Decaying (section 3), with the flip monitor beside them ([`monitor`]).
//!
//! Both act on the weight gradient of every binary layer after backward and before the
//! optimizer update. [`step`] validates the layers, picks the route once for the whole
//! step and runs it:
//! - [`cpu`]: fused loops over contiguous float32 CPU tensors; two passes over each
//!   output channel (norms, then scale + track + decay + copy in one sweep), all
//!   channels of all layers split across libtorch's intra-op threads, no temporaries;
//! - [`cuda`]: the fused CUDA kernels on float32, float16 and bfloat16 CUDA tensors:
//!   one multi-tensor pass over all layers in two launches, figures left on the device;
//! - [`generic`]: the same formulas through libtorch ops (any device, any dtype), also
//!   where the CUDA kernels decline.
//!
//! What they share lives in [`config`] (the option table and [`Config`], built and
//! validated once) and [`layer`] (a layer's tensors, the norm floors, the figures'
//! columns and the check of a layer's tensors); the routes read those two and never this
//! file. [`py`] binds the family to Python. Tests hold the routes to a plain-PyTorch
//! oracle written from SPEC.

pub mod config;
pub mod cpu;
pub mod cuda;
pub mod generic;
pub mod layer;
pub mod monitor;
pub mod py;

use tch::Tensor;

pub use config::{Config, Value};
pub use layer::Layer;

use crate::cuda::{fused, Op};
use crate::error::{value_err, Result};
use crate::facts::{self, Route};
use crate::ffi;

/// The initial SAD state of a weight: the tracker (zeros, or ones with `track_ones`) and
/// `weight_prev`, a copy of W.
pub fn initial_state(weight: &Tensor, track_ones: bool) -> Result<(Tensor, Tensor)> {
    let f = facts::facts(weight)?;
    facts::check_float(&f, "weight")?;
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

/// Applies AGS then SAD (each as enabled in `cfg`) to every layer, in place, and
/// returns the figures (see [`layer::AGS_RATIO`]).
pub fn step(cfg: &Config, layers: &[Layer<'_>]) -> Result<Tensor> {
    let places = layers
        .iter()
        .enumerate()
        .map(|(i, l)| l.check(i, cfg))
        .collect::<Result<Vec<_>>>()?;
    if let Some(place) = places.first() {
        for (i, p) in places.iter().enumerate().skip(1) {
            if p != place {
                return value_err!(
                    "layer {i}: weight is on {p}, layer 0's on {place}; one step runs on one device"
                );
            }
        }
    }
    let Some(first) = layers.first() else {
        return Ok(Tensor::f_zeros(
            [0, 2],
            (tch::Kind::Double, tch::Device::Cpu),
        )?);
    };
    if !cfg.enable_ags && !cfg.enable_dampen {
        return ffi::new_full_f64(first.weight, &[layers.len() as i64, 2], f64::NAN);
    }
    let _guard = ffi::no_grad();
    let all: Vec<&Tensor> = layers.iter().flat_map(|l| l.tensors(cfg)).collect();
    let route = Route::of(&all)?;
    match route {
        Route::HostF32 => {
            if let Some(raw) = cpu::plan(cfg, layers)? {
                return cpu::run(cfg, &raw);
            }
        }
        Route::Cuda(_) => {
            let ran = fused(Op::AgsSadStep, route, || cuda::ags_sad_step(cfg, layers))?;
            if let Some(figures) = ran {
                return Ok(figures);
            }
        }
        Route::Generic => {}
    }
    generic::run(cfg, layers)
}
