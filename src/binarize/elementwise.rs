//! What the routes of the elementwise math implement and share: the [`Elementwise`]
//! trait (one implementation per route, `cpu.rs` and `generic.rs`), the named options
//! [`ActW`], [`ActA`] and [`ForwardType`], and [`EPS`]. `mod.rs` picks a route's
//! implementation and re-exports these.

use tch::Tensor;

use crate::error::{value_err, Result};

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
/// weight-side parts act on small tensors: every route takes libtorch ops for them
/// (`generic.rs`'s functions).
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
    fn binarize_weight(&self, weight: &Tensor, act_w: ActW) -> Result<Tensor>;

    /// The weight binarizer's backward: the gradient of `W` from that of `w_b`.
    fn weight_grad(&self, grad_wb: &Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor>;

    /// The per-output-channel scale computed from W (SPEC 1.4), shape `[O]`.
    fn channel_alpha(&self, weight: &Tensor) -> Result<Tensor>;
}
