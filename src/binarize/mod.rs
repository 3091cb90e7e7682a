//! The elementwise math of a 1-bit layer (SPEC 1.1 to 1.4): the per-sample standard
//! deviation, the activation binarizer `sign(x / std)` and its Bi-Real backward, the
//! weight binarizers and the per-output-channel scale.
//!
//! Shared by every binary layer ([`crate::layer`]'s skeleton runs on them). An op picks
//! its [`Elementwise`] parts once, with [`for_route`] for the [`Route`] it chose from
//! its activation tensors:
//! - [`cpu`]: fused loops over contiguous float32 CPU memory;
//! - [`generic`]: libtorch ops, any device and floating dtype.
//!
//! What both implement and share (the trait, the options [`ActW`], [`ActA`] and
//! [`ForwardType`], [`EPS`]) is in `elementwise.rs`, re-exported here; this file picks a
//! route's parts and holds what is built on them ([`Alpha`], [`eval_affine`]).
//!
//! On CUDA tensors ([`Route::Cuda`]) the conv's fused kernels ([`crate::conv::cuda`])
//! run the whole op, for they fuse more than these parts (the std with the sign, the scale into the
//! weight); where they decline, the op's elementwise parts take [`generic`].

pub mod cpu;
mod elementwise;
pub mod generic;

use tch::{Kind, Tensor};

pub use elementwise::{ActA, ActW, Elementwise, ForwardType, EPS};

use crate::error::{value_err, Result};
use crate::facts::{self, Route};

/// The elementwise parts of `route`, chosen once per op (see [`Route`]). A
/// [`Route::Cuda`] op gets here only when the fused CUDA kernels declined it (or its
/// layer has no CUDA route): libtorch ops then.
pub fn for_route(route: Route) -> &'static dyn Elementwise {
    match route {
        Route::HostF32 => &cpu::Fused,
        Route::Cuda(_) | Route::Generic => &generic::Ops,
    }
}

/// The scale alpha of SPEC 1.4 that a layer uses: its learnable `scaling_factor` when
/// it owns one, else the one computed from W at every forward ([`Elementwise::channel_alpha`]).
pub enum Alpha<'a> {
    Learnable(&'a Tensor),
    FromWeight(Tensor),
}

impl<'a> Alpha<'a> {
    pub fn of(
        k: &dyn Elementwise,
        weight: &Tensor,
        scaling_factor: Option<&'a Tensor>,
    ) -> Result<Self> {
        Ok(match scaling_factor {
            Some(s) => Alpha::Learnable(s),
            None => Alpha::FromWeight(k.channel_alpha(weight)?),
        })
    }

    /// Alpha, shape `[O]`.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Alpha::Learnable(s) => s,
            Alpha::FromWeight(a) => a,
        }
    }
}

/// A binary layer in eval mode as one per-output-channel affine map of its +-1 dot
/// product `dot_o = sum sign(x) * sign(W_o)` (SPEC 1.3 to 1.5 with `x_hat = x`):
///
/// `y_o = alpha_o * (m_o * dot_o + bias_o) = scale_o * dot_o + shift_o`,
///
/// `scale = alpha * m` ([`Alpha`], and `m` of [`weight_factor`]: `mean_o|W|` for
/// `ste_v2`, else 1) and `shift = alpha * bias` (0 without a bias). Returns
/// `(scale, shift)`, float64 of shape `[O]`, each entry one float64 product of the
/// factors as the layer holds them. The training forward applies the same factors
/// separately (`m` inside `w_b`, alpha after the conv); the deploy lowering stores
/// these.
pub fn eval_affine(
    weight: &Tensor,
    scaling_factor: Option<&Tensor>,
    bias: Option<&Tensor>,
    act_w: ActW,
) -> Result<(Tensor, Tensor)> {
    let (o, _) = generic::weight_shape(weight)?;
    for (t, what) in [(scaling_factor, "scaling_factor"), (bias, "bias")] {
        if let Some(t) = t {
            let f = facts::facts(t)?;
            facts::check_float(&f, what)?;
            if f.sizes != [o] {
                return value_err!("{what} must have shape [{o}], got {:?}", f.sizes);
            }
        }
    }
    let alpha = Alpha::of(&generic::Ops, weight, scaling_factor)?;
    let alpha = alpha.tensor().f_to_kind(Kind::Double)?;
    let shift = match bias {
        Some(b) => b.f_to_kind(Kind::Double)?.f_mul(&alpha)?,
        None => alpha.f_zeros_like()?,
    };
    let scale = match weight_factor(weight, act_w)? {
        Some(m) => alpha.f_mul(&m.f_to_kind(Kind::Double)?)?,
        None => alpha,
    };
    Ok((scale, shift))
}

/// The binarized weight of SPEC 1.3 (libtorch ops).
pub use generic::binarize_weight;
/// `mean_o |W|`: the mean absolute weight of each output channel, shape `[O]`. It
/// initialises a learnable `scaling_factor` and scales `ste_v2` weights.
pub use generic::channel_abs_mean;
/// The W-derived per-channel scale alpha of SPEC 1.4 (libtorch ops).
pub use generic::channel_alpha;
/// The magnitude `m` of `w_b = sign(W) * m` (SPEC 1.3), `None` where it is 1.
pub use generic::weight_factor;
