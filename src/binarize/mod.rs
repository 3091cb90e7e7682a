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
//! On CUDA tensors ([`Route::Cuda`]) the conv's fused kernels ([`crate::conv::cuda`])
//! run the whole op, for they fuse more than these parts (the std with the sign, the scale into the
//! weight); where they decline, the op's elementwise parts take [`generic`].

pub mod cpu;
pub mod generic;

use tch::{Kind, Tensor};

use crate::error::{value_err, Result};
use crate::facts::{self, Route};

/// Added to variances before the square root, as upstream does (SPEC 1.1 and 1.4).
pub const EPS: f64 = 1e-5;

/// A closed set of named choices, defined by one table of variants and names: the
/// enum, `ALL` (in the order listed to users), `name`, `names` and `parse` (whose error
/// names the option and lists the choices).
macro_rules! named_choice {
    (
        $(#[$meta:meta])*
        $ty:ident, option $option:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $ty {
            $($(#[$vmeta])* $variant,)+
        }

        impl $ty {
            /// Every choice, in the order the names are listed to users.
            pub const ALL: &'static [$ty] = &[$($ty::$variant,)+];

            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $text,)+
                }
            }

            pub fn names() -> Vec<&'static str> {
                Self::ALL.iter().map(|a| a.name()).collect()
            }

            pub fn parse(name: &str) -> Result<Self> {
                match Self::ALL.iter().find(|a| a.name() == name) {
                    Some(&a) => Ok(a),
                    None => value_err!(
                        concat!("unknown ", $option, " '{}'; expected one of {}"),
                        name,
                        quoted(&Self::names())
                    ),
                }
            }
        }
    };
}

named_choice! {
    /// Weight binarizer (`act_w`, SPEC 1.3).
    ActW, option "act_w" {
        /// `sign(W)`, identity backward.
        Ste => "ste",
        /// `sign(W)`, backward masked by `|W| < 1`.
        Hardtanh => "hardtanh",
        /// `sign(W) * mean_o|W|`, identity backward.
        SteV2 => "ste_v2",
        /// `sign(W)`, backward masked by `|W| < mean_o|W|`.
        HardtanhV2 => "hardtanhv2",
    }
}

named_choice! {
    /// Activation binarizer (`act_a`, SPEC 1.2). Upstream offers one choice.
    ActA, option "act_a" {
        /// `sign(x)`, backward `max(0, 2 - 2|x|)` (Bi-Real).
        Binary => "binary",
    }
}

named_choice! {
    /// How the binarized operands are combined. Upstream's binary layers have one type.
    ForwardType, option "forward_type" {
        /// `sign(x) (*) sign(W)`, what XNOR and popcount compute.
        Xnor => "xnor",
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The elementwise parts of a binary layer, one implementation per route.
///
/// Activation tensors are `[N, ...]` with the sample in dim 0; `std` is the per-sample
/// standard deviation as [`Elementwise::sample_std`] returns it, `[N, 1, ..., 1]`. The
/// weight-side parts act on small tensors and default to libtorch ops on every route.
pub trait Elementwise: Sync {
    /// Per-sample `sqrt(Var(x_n) + eps)` (unbiased, over all dims but 0), shaped
    /// `[N, 1, ..., 1]` with `x.dim()` dims, in `x`'s dtype (SPEC 1.1).
    fn sample_std(&self, x: &Tensor) -> Result<Tensor>;

    /// `a = sign(x / std)`, or `sign(x)` without `std` (eval mode), in `x`'s dtype and
    /// shape (SPEC 1.2).
    fn sign(&self, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor>;

    /// The gradient of `x` from the gradient of `a = sign(x_hat)`: Bi-Real,
    /// `grad_a * max(0, 2 - 2|x_hat|) / std` with `x_hat = x / std` and std a
    /// constant (no `/ std` without it). `grad_a` has `x`'s shape, any dtype; the
    /// result has `x`'s dtype.
    fn bireal_backward(&self, grad_a: &Tensor, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor>;

    /// The binarized weight `w_b` of SPEC 1.3.
    fn binarize_weight(&self, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        generic::binarize_weight(weight, act_w)
    }

    /// The weight binarizer's backward: the gradient of `W` from that of `w_b`.
    fn weight_grad(&self, grad_wb: &Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
        generic::weight_grad(grad_wb, weight, act_w)
    }

    /// The per-output-channel scale computed from W (SPEC 1.4), shape `[O]`.
    fn channel_alpha(&self, weight: &Tensor) -> Result<Tensor> {
        generic::channel_alpha(weight)
    }
}

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
