//! The elementwise parts through libtorch ops: any device, any floating dtype, any
//! layout. Also the weight-side parts of every route (binarizers and scale), whose
//! tensors are small.

use tch::{Kind, Tensor};

use super::elementwise::{ActW, Elementwise, EPS};
use crate::error::{value_err, Result};
use crate::facts;

/// The [`Elementwise`] of the generic route.
pub struct Ops;

impl Elementwise for Ops {
    fn sample_std(&self, x: &Tensor) -> Result<Tensor> {
        let dims: Vec<i64> = (1..facts::dim(x)? as i64).collect();
        Ok(x.f_var_dim(dims.as_slice(), true, true)?
            .f_add_scalar(EPS)?
            .f_sqrt()?)
    }

    fn sign(&self, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
        Ok(match std {
            Some(s) => x.f_div(s)?.f_sign()?,
            None => x.f_sign()?,
        })
    }

    fn bireal_backward(&self, grad_a: &Tensor, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
        let grad_a = grad_a.f_to_kind(facts::kind(x)?)?;
        let scaled;
        let x_hat = match std {
            Some(s) => {
                scaled = x.f_div(s)?;
                &scaled
            }
            None => x,
        };
        let surrogate = x_hat
            .f_abs()?
            .f_mul_scalar(-2.0)?
            .f_add_scalar(2.0)?
            .f_clamp_min(0.0)?;
        let g = grad_a.f_mul(&surrogate)?;
        Ok(match std {
            Some(s) => g.f_div(s)?,
            None => g,
        })
    }

    fn binarize_weight(&self, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        binarize_weight(weight, act_w)
    }

    fn weight_grad(&self, grad_wb: &Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        weight_grad(grad_wb, weight, act_w)
    }

    fn channel_alpha(&self, weight: &Tensor) -> Result<Tensor> {
        channel_alpha(weight)
    }
}

/// `(O, dims)` of a floating weight `[O, ...]` with at least two dims, or the error
/// naming what is wrong.
pub(super) fn weight_shape(weight: &Tensor) -> Result<(i64, usize)> {
    let facts = facts::facts(weight)?;
    match facts.dim0() {
        Some(o) if facts.dim() >= 2 => {
            facts::check_float(&facts, "weight")?;
            Ok((o, facts.dim()))
        }
        _ => value_err!(
            "weight must have an output-channel dimension and at least one more, got shape {:?}",
            facts.sizes
        ),
    }
}

/// `mean_o |W|`: the mean absolute weight of each output channel, shape `[O]`.
/// It initialises a learnable `scaling_factor` and scales `ste_v2` weights.
pub fn channel_abs_mean(weight: &Tensor) -> Result<Tensor> {
    let (o, _) = weight_shape(weight)?;
    Ok(weight
        .f_reshape([o, -1])?
        .f_abs()?
        .f_mean_dim(1i64, false, None::<Kind>)?)
}

/// The per-channel scale computed from W when the layer has no learnable one (SPEC 1.4):
/// `alpha_o = mean(|(W_o - mean W_o) / sqrt(Var W_o + eps)|)`.
pub fn channel_alpha(weight: &Tensor) -> Result<Tensor> {
    let (o, _) = weight_shape(weight)?;
    let w = weight.f_reshape([o, -1])?;
    let mu = w.f_mean_dim(1i64, true, None::<Kind>)?;
    let sd = w.f_var_dim(1i64, true, true)?.f_add_scalar(EPS)?.f_sqrt()?;
    Ok(w.f_sub(&mu)?
        .f_div(&sd)?
        .f_abs()?
        .f_mean_dim(1i64, false, None::<Kind>)?)
}

/// A per-output-channel vector `[O]` shaped to broadcast over a weight of `dim` dims,
/// `[O, 1, ..., 1]`.
fn over_weight(v: &Tensor, dim: usize) -> Result<Tensor> {
    let mut shape = vec![-1i64];
    shape.resize(dim.max(1), 1);
    Ok(v.f_reshape(shape.as_slice())?)
}

/// The per-output-channel magnitude `m` of the binarized weight, `w_b = sign(W) * m`
/// (SPEC 1.3): `mean_o |W|` for `ste_v2`, `None` (m = 1) for the sign-only binarizers.
/// Shape `[O]`.
pub fn weight_factor(weight: &Tensor, act_w: ActW) -> Result<Option<Tensor>> {
    Ok(match act_w {
        ActW::SteV2 => Some(channel_abs_mean(weight)?),
        ActW::Ste | ActW::Hardtanh | ActW::HardtanhV2 => None,
    })
}

/// The binarized weight `w_b` of SPEC 1.3.
pub fn binarize_weight(weight: &Tensor, act_w: ActW) -> Result<Tensor> {
    let (_, dim) = weight_shape(weight)?;
    let sign = weight.f_sign()?;
    Ok(match weight_factor(weight, act_w)? {
        Some(m) => sign.f_mul(&over_weight(&m, dim)?)?,
        None => sign,
    })
}

/// The weight binarizer's backward: the gradient of `W` from the gradient of `w_b`,
/// in `W`'s dtype.
pub fn weight_grad(grad_wb: &Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
    let (_, dim) = weight_shape(weight)?;
    let grad_wb = grad_wb.f_to_kind(facts::kind(weight)?)?;
    Ok(match act_w {
        ActW::Ste | ActW::SteV2 => grad_wb,
        ActW::Hardtanh => {
            let inside = weight.f_abs()?.f_lt(1.0)?;
            grad_wb.f_mul(&inside)?
        }
        ActW::HardtanhV2 => {
            let bound = over_weight(&channel_abs_mean(weight)?, dim)?;
            let inside = weight.f_abs()?.f_lt_tensor(&bound)?;
            grad_wb.f_mul(&inside)?
        }
    })
}
