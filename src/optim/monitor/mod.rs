//! The flip monitor: per binary layer and per step, how many latent weights flipped
//! sign, how many never have since monitoring began, how many are silent (their
//! sign-flip tracker below the SAD threshold) and an exponential flip rate.
//!
//! It sits beside AGS and SAD and shares their definitions (SPEC section 3): a flip is
//! `sign(W) != sign(W_prev)` with torch.sign (so 0 is a sign of its own), the tracker is
//! `T <- m * T + (1 - m) * flipped` and a weight is silent where `T < tau`. With SAD
//! enabled the monitor reads SAD's own tracker (read-only); without SAD it keeps a
//! tracker of its own with the same update, so both report comparable figures.
//!
//! Per layer the state is the sign of W when last seen (int8), whether each weight
//! ever flipped (bool) and, without SAD, the tracker (W's dtype); per monitor a float64
//! `[L]` tensor of per-layer flip-rate averages. [`update`] validates the layers, picks
//! the route once for the whole step and runs it:
//! - [`cpu`]: one fused pass over contiguous CPU memory (float32 weights and tracker)
//!   per layer, split across libtorch's intra-op threads, no temporaries;
//! - [`generic`]: the same through libtorch ops (any device, any floating dtype).
//!
//! Either way the figures come back as one float64 `[L, 4]` tensor on the weights'
//! device and nothing is copied to the host. The types the dispatcher and the routes
//! share are in [`config`]; the check of a layer's tensors is the step's
//! ([`crate::optim::layer::check_layer`]).

pub mod config;
pub mod cpu;
pub mod generic;
pub mod py;

use tch::{Kind, Tensor};

use self::config::{MonitorConfig, MonitorLayer, COLUMNS};
use crate::error::{value_err, Result};
use crate::facts;
use crate::ffi;
use crate::optim::layer::{check_layer, Dtype};

/// The monitor's state for a weight: its sign (int8), the ever-flipped mask (bool, all
/// false) and, with `own_tracker`, a tracker of zeros in W's dtype.
pub fn initial_state(
    weight: &Tensor,
    own_tracker: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let f = facts::facts(weight)?;
    facts::check_float(&f, "weight")?;
    let _guard = ffi::no_grad();
    let sign = weight.f_sign()?.f_to_kind(Kind::Int8)?.f_contiguous()?;
    let ever = weight
        .f_zeros_like()?
        .f_to_kind(Kind::Bool)?
        .f_contiguous()?;
    let tracker = if own_tracker {
        Some(weight.f_zeros_like()?.f_contiguous()?)
    } else {
        None
    };
    Ok((sign, ever, tracker))
}

/// Checks layer `i`: a floating weight, and its int8 sign, bool ever-flipped mask and
/// floating tracker of its shape and device.
fn check(i: usize, l: &MonitorLayer<'_>) -> Result<facts::Place> {
    let others = [
        ("sign", l.sign, Dtype::Dense(Kind::Int8)),
        ("ever_flipped", l.ever_flipped, Dtype::Dense(Kind::Bool)),
        ("tracker", l.tracker, Dtype::Float),
    ];
    check_layer(i, l.weight, false, &others)
}

/// One monitoring step after an optimizer update: compares every layer's weight signs
/// with the last ones seen, updates the state in place, advances the per-layer flip
/// rate averages in `rates` (float64 `[L]` on the weights' device) and returns the
/// figures (see [`FLIPPED`]). `step` counts the updates monitored so far, this one
/// included (>= 1); it bias-corrects the flip rate.
pub fn update(
    cfg: &MonitorConfig,
    layers: &[MonitorLayer<'_>],
    rates: &Tensor,
    step: u64,
) -> Result<Tensor> {
    if step == 0 {
        return value_err!("step counts the updates monitored, this one included: it must be >= 1");
    }
    let mut place = None;
    for (i, l) in layers.iter().enumerate() {
        let p = check(i, l)?;
        match &place {
            None => place = Some(p),
            Some(first) if *first != p => {
                return value_err!(
                    "layer {i}: weight is on {p}, layer 0's on {first}; one step runs on one device"
                )
            }
            Some(_) => {}
        }
    }
    let rf = facts::facts(rates)?;
    if rf.kind != Some(Kind::Double) || rf.sizes != [layers.len() as i64] {
        return value_err!(
            "rates must be a float64 tensor of shape [{}] (one per layer), got {} of shape {:?}",
            layers.len(),
            rf.dtype_name(),
            rf.sizes
        );
    }
    if layers.is_empty() {
        return Ok(Tensor::f_zeros(
            [0, COLUMNS as i64],
            (Kind::Double, tch::Device::Cpu),
        )?);
    }
    if let Some(p) = place {
        if rf.place != p {
            return value_err!("rates is on {}, the weights on {p}", rf.place);
        }
    }
    let _guard = ffi::no_grad();
    // Per layer: (flipped share, never-flipped share, silent share), as float64 [L]
    // tensors on the device.
    let shares = match cpu::plan(cfg, layers)? {
        Some(raw) => cpu::run(cfg, &raw)?,
        None => generic::run(cfg, layers)?,
    };
    let [flipped, never, silent] = shares;
    let m = cfg.momentum;
    let mut ema = rates.f_alias()?;
    let _ = ema.f_mul_scalar_(m)?;
    let _ = ema.f_add_(&flipped.f_mul_scalar(1.0 - m)?)?;
    // The average starts at 0, so after `step` updates its weights sum to 1 - m^step.
    let debias = 1.0 - m.powf(step as f64);
    let rate = ema.f_div_scalar(debias)?;
    Ok(Tensor::f_stack(&[flipped, never, silent, rate], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use tch::Device;

    /// Two steps worked out by hand: m = 0.5, tau = 0.3, own tracker.
    fn two_steps(kind: Kind) -> Vec<Vec<f64>> {
        let cfg = MonitorConfig::new(0.5, 0.3, true).expect("config");
        let w0 = Tensor::from_slice(&[1.0f32, -1.0, 0.0, 2.0, -3.0, 0.5])
            .reshape([2, 3])
            .to_kind(kind);
        let w1 = Tensor::from_slice(&[-1.0f32, -1.0, 1.0, 2.0, 3.0, 0.5])
            .reshape([2, 3])
            .to_kind(kind);
        let (sign, ever, tracker) = initial_state(&w0, true).expect("state");
        let tracker = tracker.expect("own tracker");
        let rates = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        let mut out = Vec::new();
        for step in 1..=2u64 {
            let layer = MonitorLayer {
                weight: &w1,
                sign: &sign,
                ever_flipped: &ever,
                tracker: &tracker,
            };
            let f = update(&cfg, &[layer], &rates, step).expect("update");
            out.push(Vec::<f64>::try_from(f.reshape([-1])).expect("figures"));
        }
        out
    }

    #[test]
    fn both_routes_give_the_hand_worked_figures() {
        // step 1: weights 0 (1 -> -1), 2 (0 -> 1) and 4 (-3 -> 3) flip: half of six;
        // their trackers 0.5 (not silent), the others 0 (silent); rate 0.25 / 0.5.
        // step 2: no flip; trackers 0.25 < 0.3, all silent; rate 0.125 / 0.75.
        let expected = vec![vec![0.5, 0.5, 0.5, 0.5], vec![0.0, 0.5, 1.0, 0.125 / 0.75]];
        for kind in [Kind::Float, Kind::Double] {
            let got = two_steps(kind);
            for (g, e) in got.iter().zip(&expected) {
                for (a, b) in g.iter().zip(e) {
                    assert!((a - b).abs() < 1e-12, "{kind:?}: {got:?} vs {expected:?}");
                }
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(MonitorConfig::new(1.0, 0.1, true).is_err());
        assert!(MonitorConfig::new(0.5, -0.1, true).is_err());
        let cfg = MonitorConfig::new(0.5, 0.1, true).expect("config");
        let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let (sign, ever, tracker) = initial_state(&w, true).expect("state");
        let tracker = tracker.expect("own tracker");
        let layer = || MonitorLayer {
            weight: &w,
            sign: &sign,
            ever_flipped: &ever,
            tracker: &tracker,
        };
        let rates = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        assert!(matches!(
            update(&cfg, &[layer()], &rates, 0),
            Err(Error::Value(_))
        ));
        let two = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        assert!(matches!(
            update(&cfg, &[layer()], &two, 1),
            Err(Error::Value(_))
        ));
        let wrong_sign = sign.to_kind(Kind::Float);
        let bad = MonitorLayer {
            weight: &w,
            sign: &wrong_sign,
            ever_flipped: &ever,
            tracker: &tracker,
        };
        assert!(matches!(
            update(&cfg, &[bad], &rates, 1),
            Err(Error::Type(_))
        ));
    }
}
