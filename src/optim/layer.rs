//! What the AGS+SAD step's dispatcher ([`crate::optim::step`]) and its routes share
//! besides the options: the norm floors of SPEC section 2, a binary layer's tensors
//! ([`Layer`]), the columns of the figures the step returns, and the check of a layer's
//! tensors against its weight ([`check_layer`]), which the flip monitor uses too.

use tch::{Kind, Tensor};

use super::config::Config;
use crate::error::{value_err, Error, Result};
use crate::facts::{self, Place};

/// Floors of SPEC section 2: `g_o = max(||G_o||, 1e-6)`, `w_o = max(||W_o||, 1e-3)`.
pub const GRAD_NORM_FLOOR: f64 = 1e-6;
pub const WEIGHT_NORM_FLOOR: f64 = 1e-3;

/// The per-layer figures the step returns: a float64 tensor `[L, 2]` on the weights'
/// device, column [`AGS_RATIO`] the mean AGS ratio `r_o` and column [`SILENT_RATIO`] the
/// silent fraction `mean(M)`, NaN where that part is disabled. It never leaves the
/// device during the step; whoever reads it pays the one device-to-host copy.
pub const AGS_RATIO: usize = 0;
pub const SILENT_RATIO: usize = 1;

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
    pub fn sad_buffers(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.tracker?, self.weight_prev?))
    }

    /// Every tensor the step touches under `cfg`.
    pub fn tensors(&self, cfg: &Config) -> Vec<&Tensor> {
        let mut ts = vec![self.grad, self.weight];
        if cfg.enable_dampen {
            if let Some((t, p)) = self.sad_buffers() {
                ts.push(t);
                ts.push(p);
            }
        }
        ts
    }

    /// Checks layer `i` for the step under `cfg`: a floating weight with an
    /// output-channel dimension, and the gradient (and, with SAD, the tracker and
    /// `weight_prev`) of its shape, device and dtype.
    pub fn check(&self, i: usize, cfg: &Config) -> Result<Place> {
        let mut others = vec![("grad", self.grad, Dtype::Weight)];
        if cfg.enable_dampen {
            let Some((t, p)) = self.sad_buffers() else {
                return value_err!(
                    "layer {i}: SAD is enabled but the layer has no tracker/weight_prev buffers"
                );
            };
            others.push(("tracker", t, Dtype::Weight));
            others.push(("weight_prev", p, Dtype::Weight));
        }
        check_layer(i, self.weight, true, &others)
    }
}

/// The dtype a tensor of a layer must have, besides the weight's shape and device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dtype {
    /// The weight's own dtype.
    Weight,
    /// Any floating dtype.
    Float,
    /// This dtype, in dense (strided) memory.
    Dense(Kind),
}

/// Checks layer `i`: `weight` is a floating tensor (with an output-channel dimension
/// when `channels`), and every named tensor of `others` has its shape, its device and the
/// dtype asked. Returns the weight's place. The one check of a layer's tensors for the
/// step and the flip monitor.
pub fn check_layer(
    i: usize,
    weight: &Tensor,
    channels: bool,
    others: &[(&str, &Tensor, Dtype)],
) -> Result<Place> {
    let wf = facts::facts(weight)?;
    let kind = facts::check_float(&wf, &format!("layer {i}: weight"))?;
    if channels && wf.sizes.is_empty() {
        return value_err!(
            "layer {i}: weight must have an output-channel dimension, got a 0-d tensor"
        );
    }
    for &(name, t, want) in others {
        if want == Dtype::Float {
            facts::check_float(&facts::facts(t)?, &format!("layer {i}: {name}"))?;
        }
    }
    for &(name, t, want) in others {
        let f = facts::facts(t)?;
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
        match want {
            Dtype::Weight if f.kind != Some(kind) => {
                return Err(Error::Type(format!(
                    "layer {i}: {name} has dtype {}, weight {}",
                    f.dtype_name(),
                    facts::kind_name(kind)
                )));
            }
            Dtype::Dense(k) if f.kind != Some(k) || !f.strided => {
                return Err(Error::Type(format!(
                    "layer {i}: {name} must be a dense {} tensor, got {}",
                    facts::kind_name(k),
                    f.dtype_name()
                )));
            }
            _ => {}
        }
    }
    Ok(wf.place)
}
