//! The binary convolution of OvSW (SPEC section 1), forward and backward.
//!
//! Every operation goes through libtorch's dispatcher (`tch`), so CPU and CUDA tensors
//! and `torch.autocast` behave as they do for ordinary PyTorch ops. The backward is
//! written out by hand: the binarizers' surrogate gradients are elementwise, and the
//! convolution's own gradients come from `at::convolution_backward` through the C++
//! shim in `csrc/` (see [`crate::ffi`]), so nothing is recomputed and no autograd graph
//! is kept alive between forward and backward.

use tch::{Kind, Tensor};

use crate::error::{value_err, Error, Result};
use crate::ffi;
use crate::kernels;

/// Added to variances before the square root, as upstream does (SPEC 1.1 and 1.4).
pub const EPS: f64 = 1e-5;

/// Weight binarizer (`act_w`, SPEC 1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActW {
    /// `sign(W)`, identity backward.
    Ste,
    /// `sign(W)`, backward masked by `|W| < 1`.
    Hardtanh,
    /// `sign(W) * mean_o|W|`, identity backward.
    SteV2,
    /// `sign(W)`, backward masked by `|W| < mean_o|W|`.
    HardtanhV2,
}

impl ActW {
    pub const NAMES: [&'static str; 4] = ["ste", "hardtanh", "ste_v2", "hardtanhv2"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "ste" => Ok(ActW::Ste),
            "hardtanh" => Ok(ActW::Hardtanh),
            "ste_v2" => Ok(ActW::SteV2),
            "hardtanhv2" => Ok(ActW::HardtanhV2),
            other => value_err!(
                "unknown act_w '{other}'; expected one of {}",
                ActW::NAMES.map(|n| format!("'{n}'")).join(", ")
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ActW::Ste => "ste",
            ActW::Hardtanh => "hardtanh",
            ActW::SteV2 => "ste_v2",
            ActW::HardtanhV2 => "hardtanhv2",
        }
    }
}

/// Activation binarizer (`act_a`, SPEC 1.2). Upstream offers one choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActA {
    /// `sign(x)`, backward `max(0, 2 - 2|x|)` (Bi-Real).
    Binary,
}

impl ActA {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "binary" => Ok(ActA::Binary),
            other => value_err!("unknown act_a '{other}'; expected 'binary'"),
        }
    }
}

/// Validates the forward type; upstream's binary conv has the one type "xnor".
pub fn check_forward_type(name: &str) -> Result<()> {
    if name == "xnor" {
        Ok(())
    } else {
        value_err!("unknown forward_type '{name}'; expected 'xnor'")
    }
}

/// Stride, padding, dilation and groups of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: [i64; 2],
    pub padding: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

impl Geometry {
    pub fn new(
        stride: [i64; 2],
        padding: [i64; 2],
        dilation: [i64; 2],
        groups: i64,
    ) -> Result<Self> {
        if stride.iter().any(|&s| s < 1) {
            return value_err!("stride must be positive, got {stride:?}");
        }
        if padding.iter().any(|&p| p < 0) {
            return value_err!("padding must be non-negative, got {padding:?}");
        }
        if dilation.iter().any(|&d| d < 1) {
            return value_err!("dilation must be positive, got {dilation:?}");
        }
        if groups < 1 {
            return value_err!("groups must be positive, got {groups}");
        }
        Ok(Geometry {
            stride,
            padding,
            dilation,
            groups,
        })
    }
}

/// What the forward keeps for the backward besides the input and weight.
pub struct Forward {
    /// The layer output `conv(a, w_b, bias) * alpha`.
    pub y: Tensor,
    /// Per-sample `sqrt(Var(x_n) + eps)`, shape `[N, 1, 1, 1]`; `None` in eval mode.
    pub std: Option<Tensor>,
    /// The per-channel scale recomputed from W (shape `[O]`); `None` when the layer
    /// owns a learnable `scaling_factor`.
    pub alpha: Option<Tensor>,
    /// `conv(a, w_b, bias)` before scaling, kept only for a learnable scale's gradient.
    pub conv_out: Option<Tensor>,
    /// The dtype the convolution ran in (differs from the input's under autocast).
    pub conv_kind: Kind,
}

/// Gradients of the layer's inputs; `None` where not requested.
pub struct Grads {
    pub input: Option<Tensor>,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub scale: Option<Tensor>,
}

/// The floating dtypes the binary conv and AGS/SAD accept.
pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

fn check_float(t: &Tensor, what: &str) -> Result<Kind> {
    let kind = t.f_kind()?;
    if is_float(kind) {
        Ok(kind)
    } else {
        Err(Error::Type(format!(
            "{what} must be a floating-point tensor, got dtype {kind:?}"
        )))
    }
}

fn check_same_device(t: &Tensor, reference: &Tensor, what: &str) -> Result<()> {
    if t.device() != reference.device() {
        return value_err!(
            "{what} is on {:?} but the input is on {:?}; move them to one device",
            t.device(),
            reference.device()
        );
    }
    Ok(())
}

/// Checks the arguments of a binary convolution, naming the first thing that is wrong.
pub fn validate(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    geom: &Geometry,
) -> Result<()> {
    if x.dim() != 4 {
        return value_err!(
            "OvSWConv2d expects a 4-D input [N, C, H, W], got shape {:?}",
            x.size()
        );
    }
    check_float(x, "input")?;
    if weight.dim() != 4 {
        return value_err!(
            "weight must be 4-D [O, C/groups, kh, kw], got shape {:?}",
            weight.size()
        );
    }
    check_float(weight, "weight")?;
    check_same_device(weight, x, "weight")?;
    let (o, c_per_group) = (weight.size()[0], weight.size()[1]);
    if o % geom.groups != 0 {
        return value_err!(
            "out_channels={o} is not divisible by groups={}",
            geom.groups
        );
    }
    let c = x.size()[1];
    if c != c_per_group * geom.groups {
        return value_err!(
            "input has {c} channels but the layer expects in_channels={} (weight {:?}, groups={})",
            c_per_group * geom.groups,
            weight.size(),
            geom.groups
        );
    }
    if let Some(b) = bias {
        check_float(b, "bias")?;
        check_same_device(b, x, "bias")?;
        if b.size() != [o] {
            return value_err!("bias must have shape [{o}], got {:?}", b.size());
        }
    }
    if let Some(s) = scale {
        check_float(s, "scaling_factor")?;
        check_same_device(s, x, "scaling_factor")?;
        if s.size() != [o] {
            return value_err!("scaling_factor must have shape [{o}], got {:?}", s.size());
        }
    }
    Ok(())
}

/// `mean_o |W|`: the mean absolute weight of each output channel, shape `[O]`.
/// It initialises a learnable `scaling_factor` and scales `ste_v2` weights.
pub fn channel_abs_mean(weight: &Tensor) -> Result<Tensor> {
    if weight.dim() < 2 {
        return value_err!(
            "weight must have an output-channel dimension, got shape {:?}",
            weight.size()
        );
    }
    check_float(weight, "weight")?;
    let o = weight.size()[0];
    Ok(weight
        .f_reshape([o, -1])?
        .f_abs()?
        .f_mean_dim(1i64, false, None::<Kind>)?)
}

/// The per-channel scale computed from W when the layer has no learnable one (SPEC 1.4):
/// `alpha_o = mean(|(W_o - mean W_o) / sqrt(Var W_o + eps)|)`.
pub fn channel_alpha(weight: &Tensor) -> Result<Tensor> {
    let o = weight.size()[0];
    let w = weight.f_reshape([o, -1])?;
    let mu = w.f_mean_dim(1i64, true, None::<Kind>)?;
    let sd = w.f_var_dim(1i64, true, true)?.f_add_scalar(EPS)?.f_sqrt()?;
    Ok(w.f_sub(&mu)?
        .f_div(&sd)?
        .f_abs()?
        .f_mean_dim(1i64, false, None::<Kind>)?)
}

/// Reshapes a per-channel vector `[O]` to broadcast over `[O, ...]` weights (`[O,1,1,1]`)
/// or over `[N, O, H, W]` activations (`[1,O,1,1]`).
fn per_channel(v: &Tensor, on_weight: bool) -> Result<Tensor> {
    let o = v.size()[0];
    Ok(if on_weight {
        v.f_reshape([o, 1, 1, 1])?
    } else {
        v.f_reshape([1, o, 1, 1])?
    })
}

/// The binarized weight `w_b` of SPEC 1.3.
pub fn binarize_weight(weight: &Tensor, act_w: ActW) -> Result<Tensor> {
    let sign = weight.f_sign()?;
    Ok(match act_w {
        ActW::SteV2 => sign.f_mul(&per_channel(&channel_abs_mean(weight)?, true)?)?,
        _ => sign,
    })
}

/// The weight binarizer's backward: the gradient of `W` from the gradient of `w_b`.
fn weight_grad(grad_wb: Tensor, weight: &Tensor, act_w: ActW) -> Result<Tensor> {
    Ok(match act_w {
        ActW::Ste | ActW::SteV2 => grad_wb,
        ActW::Hardtanh => {
            let inside = weight.f_abs()?.f_lt(1.0)?;
            grad_wb.f_mul(&inside)?
        }
        ActW::HardtanhV2 => {
            let bound = per_channel(&channel_abs_mean(weight)?, true)?;
            let inside = weight.f_abs()?.f_lt_tensor(&bound)?;
            grad_wb.f_mul(&inside)?
        }
    })
}

/// Per-sample `sqrt(Var(x_n) + eps)` over (C, H, W), shaped `[N, 1, 1, 1]`.
fn sample_std(x: &Tensor) -> Result<Tensor> {
    let n = x.size()[0];
    Ok(x.f_var_dim([1i64, 2, 3].as_slice(), true, true)?
        .f_add_scalar(EPS)?
        .f_sqrt()?
        .f_reshape([n, 1, 1, 1])?)
}

/// `x_hat`: `x / std` in training, `x` itself in eval mode.
fn normalized(x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
    Ok(match std {
        Some(s) => x.f_div(s)?,
        None => x.shallow_clone(),
    })
}

/// `sign(x / std)`, or `sign(x)` without std.
fn sign_of_normalized(x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
    if kernels::eligible(x) {
        let values = std.map(kernels::to_vec).transpose()?;
        return kernels::sign_normalized(x, values.as_deref());
    }
    Ok(normalized(x, std)?.f_sign()?)
}

/// `a = sign(x_hat)` and, in training, the per-sample std (SPEC 1.1 and 1.2).
fn binarize_activation(x: &Tensor, training: bool) -> Result<(Tensor, Option<Tensor>)> {
    let std = match (training, kernels::eligible(x)) {
        (false, _) => None,
        (true, true) => Some(kernels::sample_std(x, EPS)?),
        (true, false) => Some(sample_std(x)?),
    };
    Ok((sign_of_normalized(x, std.as_ref())?, std))
}

/// The gradient of `x` from the gradient of `a = sign(x_hat)`: Bi-Real,
/// `d a / d x_hat = max(0, 2 - 2|x_hat|)`, through `x_hat = x / std` with std a constant.
fn activation_grad(grad_a: Tensor, x: &Tensor, std: Option<&Tensor>) -> Result<Tensor> {
    let grad_a = grad_a.f_to_kind(x.f_kind()?)?;
    if kernels::eligible(x) && kernels::eligible(&grad_a) && grad_a.size() == x.size() {
        let values = std.map(kernels::to_vec).transpose()?;
        return kernels::bireal_backward(&grad_a, x, values.as_deref());
    }
    let x_hat = normalized(x, std)?;
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

/// Forward of the binary convolution (SPEC 1.1 to 1.5).
pub fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    act_w: ActW,
    geom: &Geometry,
    training: bool,
) -> Result<Forward> {
    validate(x, weight, bias, scale, geom)?;
    let _guard = tch::no_grad_guard();
    let (a, std) = binarize_activation(x, training)?;
    let wb = binarize_weight(weight, act_w)?;
    let conv_out = a.f_conv2d(
        &wb,
        bias,
        geom.stride,
        geom.padding,
        geom.dilation,
        geom.groups,
    )?;
    let conv_kind = conv_out.f_kind()?;
    let (y, alpha, conv_out) = match scale {
        Some(s) => (
            conv_out.f_mul(&per_channel(s, false)?)?,
            None,
            Some(conv_out),
        ),
        None => {
            let alpha = channel_alpha(weight)?;
            (
                conv_out.f_mul(&per_channel(&alpha, false)?)?,
                Some(alpha),
                None,
            )
        }
    };
    Ok(Forward {
        y,
        std,
        alpha,
        conv_out,
        conv_kind,
    })
}

/// Which gradients the caller needs (`ctx.needs_input_grad` of the autograd function).
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    pub input: bool,
    pub weight: bool,
    pub bias: bool,
    pub scale: bool,
}

/// What the backward reads, as saved by [`forward`].
pub struct Saved<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub has_bias: bool,
    /// The learnable `scaling_factor`, or `None` for the W-derived alpha.
    pub scale: Option<&'a Tensor>,
    pub std: Option<&'a Tensor>,
    pub alpha: Option<&'a Tensor>,
    pub conv_out: Option<&'a Tensor>,
    pub conv_kind: Kind,
}

/// Backward of the binary convolution, given the gradient of its output.
pub fn backward(
    grad_y: &Tensor,
    saved: &Saved<'_>,
    act_w: ActW,
    geom: &Geometry,
    needs: Needs,
) -> Result<Grads> {
    let _guard = tch::no_grad_guard();
    let x = saved.x;
    let weight = saved.weight;
    let o = weight.size()[0];
    if grad_y.dim() != 4 || grad_y.size()[1] != o {
        return value_err!(
            "grad_output has shape {:?}, expected [N, {o}, H, W]",
            grad_y.size()
        );
    }

    // y = conv_out * s: d/d conv_out = grad_y * s, d/d s = sum(grad_y * conv_out).
    let (scale, grad_scale) = match (saved.scale, saved.alpha) {
        (Some(s), _) => {
            let gs = if needs.scale {
                let conv_out = saved
                    .conv_out
                    .ok_or_else(|| Error::Value("missing conv_out for a learnable scale".into()))?;
                Some(
                    grad_y
                        .f_mul(conv_out)?
                        .f_sum_dim_intlist([0i64, 2, 3].as_slice(), false, None::<Kind>)?
                        .f_to_kind(s.f_kind()?)?,
                )
            } else {
                None
            };
            (s, gs)
        }
        (None, Some(a)) => (a, None),
        (None, None) => return value_err!("backward needs either a scaling_factor or alpha"),
    };
    let grad_conv = grad_y.f_mul(&per_channel(scale, false)?)?;

    if !(needs.input || needs.weight || needs.bias) {
        return Ok(Grads {
            input: None,
            weight: None,
            bias: None,
            scale: grad_scale,
        });
    }

    // Recompute the binarized operands (cheaper than keeping them) in the dtype the
    // forward convolution ran in.
    let k = saved.conv_kind;
    let a = sign_of_normalized(x, saved.std)?.f_to_kind(k)?;
    let wb = binarize_weight(weight, act_w)?.f_to_kind(k)?;
    let grad_conv = grad_conv.f_to_kind(k)?;
    let (ga, gwb, gb) = ffi::convolution_backward(
        &grad_conv,
        &a,
        &wb,
        geom,
        [needs.input, needs.weight, needs.bias && saved.has_bias],
    )?;

    let input = match ga {
        Some(ga) => Some(activation_grad(ga, x, saved.std)?),
        None => None,
    };
    let weight_g = match gwb {
        Some(g) => Some(weight_grad(g.f_to_kind(weight.f_kind()?)?, weight, act_w)?),
        None => None,
    };
    let bias_g = match gb {
        Some(g) => Some(g.f_to_kind(weight.f_kind()?)?),
        None => None,
    };
    Ok(Grads {
        input,
        weight: weight_g,
        bias: bias_g,
        scale: grad_scale,
    })
}
