//! AGS and SAD through libtorch ops: any device, any floating dtype, any layout.

use tch::{Kind, Tensor};

use super::config::Config;
use super::layer::{Layer, GRAD_NORM_FLOOR, WEIGHT_NORM_FLOOR};
use crate::error::{value_err, Result};
use crate::{facts, ffi};

/// Applies AGS then SAD to every layer, in place; returns the figures as a float64
/// `[L, 2]` tensor on the weights' device, built there without a copy to the host.
pub fn run(cfg: &Config, layers: &[Layer<'_>]) -> Result<Tensor> {
    let mut ags: Vec<Tensor> = Vec::with_capacity(layers.len());
    let mut silent_fractions: Vec<Tensor> = Vec::with_capacity(layers.len());
    for l in layers {
        let wf = facts::facts(l.weight)?;
        let o = wf.sizes.first().copied().unwrap_or(1);
        // A second handle to the gradient's storage for tch's in-place calls.
        let mut grad = l.grad.f_alias()?;
        if cfg.enable_ags {
            // Norms, their ratio and the factor in float32 at least (float64 weights stay
            // float64): in half precision the squares of gradients below about 2.4e-4
            // underflow, and the fused routes sum in float64 and divide in float32 too.
            let acc = match facts::kind(l.weight)? {
                Kind::Double => Kind::Double,
                _ => Kind::Float,
            };
            let g2 = grad.f_reshape([o, -1])?.f_to_kind(acc)?;
            let w2 = l.weight.f_reshape([o, -1])?.f_to_kind(acc)?;
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
            shape.resize(wf.dim(), 1);
            let _ = grad.f_mul_(&factor.f_reshape(shape.as_slice())?)?;
            ags.push(r.f_mean(Kind::Double)?);
        }
        if cfg.enable_dampen {
            // check_layer guarantees both buffers exist when SAD is enabled.
            let Some((t, p)) = l.sad_buffers() else {
                return value_err!("SAD buffers missing");
            };
            let mut tracker = t.f_alias()?;
            let mut prev = p.f_alias()?;
            let flipped = l
                .weight
                .f_sign()?
                .f_ne_tensor(&prev.f_sign()?)?
                .f_to_kind(facts::kind(&tracker)?)?;
            let _ = tracker.f_mul_scalar_(cfg.track_momentum)?;
            let _ = tracker.f_add_(&flipped.f_mul_scalar(1.0 - cfg.track_momentum)?)?;
            let silent = tracker.f_lt(cfg.track_threshold)?;
            let decay = l.weight.f_mul(&silent)?.f_mul_scalar(cfg.dampen_weight)?;
            let _ = grad.f_add_(&decay)?;
            prev.f_copy_(l.weight)?;
            silent_fractions.push(silent.f_mean(Kind::Double)?);
        }
    }
    let Some(first) = layers.first() else {
        return value_err!("no layers");
    };
    let n = layers.len() as i64;
    let column = |parts: &[Tensor]| -> Result<Tensor> {
        if parts.is_empty() {
            ffi::new_full_f64(first.weight, &[n], f64::NAN)
        } else {
            Ok(Tensor::f_stack(parts, 0)?)
        }
    };
    Ok(Tensor::f_stack(
        &[column(&ags)?, column(&silent_fractions)?],
        1,
    )?)
}
