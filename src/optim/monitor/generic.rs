//! The monitoring step through libtorch ops: any device, any floating dtype, any layout.

use tch::{Kind, Tensor};

use super::config::{MonitorConfig, MonitorLayer};
use crate::error::Result;
use crate::facts;

/// Updates every layer's state in place; returns the per-layer shares (flipped, never
/// flipped, silent) as float64 `[L]` tensors on the weights' device, built there
/// without a copy to the host.
pub fn run(cfg: &MonitorConfig, layers: &[MonitorLayer<'_>]) -> Result<[Tensor; 3]> {
    let mut flipped_shares = Vec::with_capacity(layers.len());
    let mut never_shares = Vec::with_capacity(layers.len());
    let mut silent_shares = Vec::with_capacity(layers.len());
    for l in layers {
        let n = facts::facts(l.weight)?.numel() as f64;
        // Second handles to the state's storage for tch's in-place calls.
        let mut sign = l.sign.f_alias()?;
        let mut ever = l.ever_flipped.f_alias()?;
        let now = l.weight.f_sign()?.f_to_kind(Kind::Int8)?;
        let flipped = now.f_ne_tensor(&sign)?;
        sign.f_copy_(&now)?;
        let _ = ever.f_logical_or_(&flipped)?;
        if cfg.update_trackers {
            let mut tracker = l.tracker.f_alias()?;
            let f = flipped.f_to_kind(facts::kind(&tracker)?)?;
            let _ = tracker.f_mul_scalar_(cfg.momentum)?;
            let _ = tracker.f_add_(&f.f_mul_scalar(1.0 - cfg.momentum)?)?;
        }
        let silent = l.tracker.f_lt(cfg.threshold)?;
        // Counts summed in float64 (exact up to 2^53 weights), then divided: a mean of
        // nothing is NaN, as on the fused route.
        let count = |t: &Tensor| -> Result<Tensor> { Ok(t.f_sum(Kind::Double)?) };
        flipped_shares.push(count(&flipped)?.f_div_scalar(n)?);
        never_shares.push(count(&ever)?.f_neg()?.f_add_scalar(n)?.f_div_scalar(n)?);
        silent_shares.push(count(&silent)?.f_div_scalar(n)?);
    }
    Ok([
        Tensor::f_stack(&flipped_shares, 0)?,
        Tensor::f_stack(&never_shares, 0)?,
        Tensor::f_stack(&silent_shares, 0)?,
    ])
}
