//! The binary convolution of OvSW (SPEC section 1), forward and backward.
//!
//! Each op validates its arguments, picks the route of its elementwise parts once
//! ([`binarize::kernels_for`]) and runs: binarize the activation and the weight, convolve
//! through libtorch, scale per output channel. The backward is written out by hand: the
//! binarizers' surrogate gradients are elementwise, and the convolution's own gradients
//! come from `at::convolution_backward` through the C++ shim ([`crate::ffi`]), so
//! nothing is recomputed twice and no autograd graph is kept alive between forward and
//! backward. The convolution itself and everything on the weight side go through
//! libtorch's dispatcher on every route, so CPU and CUDA tensors and `torch.autocast`
//! behave as they do for ordinary PyTorch ops.

pub mod py;

use tch::{Kind, Tensor};

use crate::binarize::{self, ActW};
use crate::error::{value_err, Error, Result};
use crate::ffi;
use crate::geometry::Geometry;
use crate::tensor::{self, check_float, Facts};

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

pub(crate) fn check_same_device(t: &Facts, reference: &Facts, what: &str) -> Result<()> {
    if t.place != reference.place {
        return value_err!(
            "{what} is on {} but the input is on {}; move them to one device",
            t.place,
            reference.place
        );
    }
    Ok(())
}

/// A per-output-channel vector `[o]` of a learnable scale or bias, checked.
pub(crate) fn check_channel_vector(t: &Tensor, x: &Facts, o: i64, what: &str) -> Result<()> {
    let f = tensor::facts(t)?;
    check_float(&f, what)?;
    check_same_device(&f, x, what)?;
    if f.sizes != [o] {
        return value_err!("{what} must have shape [{o}], got {:?}", f.sizes);
    }
    Ok(())
}

/// Checks the arguments of a binary convolution, naming the first thing that is wrong.
fn validate(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    geom: &Geometry,
) -> Result<()> {
    let xf = tensor::facts(x)?;
    if xf.dim() != 4 {
        return value_err!(
            "OvSWConv2d expects a 4-D input [N, C, H, W], got shape {:?}",
            xf.sizes
        );
    }
    check_float(&xf, "input")?;
    let wf = tensor::facts(weight)?;
    if wf.dim() != 4 {
        return value_err!(
            "weight must be 4-D [O, C/groups, kh, kw], got shape {:?}",
            wf.sizes
        );
    }
    check_float(&wf, "weight")?;
    check_same_device(&wf, &xf, "weight")?;
    let (o, c_per_group) = (wf.sizes[0], wf.sizes[1]);
    if o % geom.groups != 0 {
        return value_err!(
            "out_channels={o} is not divisible by groups={}",
            geom.groups
        );
    }
    let c = xf.sizes[1];
    if c != c_per_group * geom.groups {
        return value_err!(
            "input has {c} channels but the layer expects in_channels={} (weight {:?}, groups={})",
            c_per_group * geom.groups,
            wf.sizes,
            geom.groups
        );
    }
    if let Some(b) = bias {
        check_channel_vector(b, &xf, o, "bias")?;
    }
    if let Some(s) = scale {
        check_channel_vector(s, &xf, o, "scaling_factor")?;
    }
    Ok(())
}

/// A per-channel vector `[O]` shaped to broadcast over `[N, O, H, W]` activations.
fn over_channels(v: &Tensor) -> Result<Tensor> {
    Ok(v.f_reshape([1, -1, 1, 1])?)
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
    let _guard = ffi::no_grad();
    let k = binarize::kernels_for(&[x])?;
    let std = if training {
        Some(k.sample_std(x)?)
    } else {
        None
    };
    let a = k.sign(x, std.as_ref())?;
    let wb = k.binarize_weight(weight, act_w)?;
    let conv_out = a.f_conv2d(
        &wb,
        bias,
        geom.stride,
        geom.padding,
        geom.dilation,
        geom.groups,
    )?;
    let conv_kind = tensor::kind(&conv_out)?;
    let (y, alpha, conv_out) = match scale {
        Some(s) => (conv_out.f_mul(&over_channels(s)?)?, None, Some(conv_out)),
        None => {
            let alpha = k.channel_alpha(weight)?;
            let y = conv_out.f_mul(&over_channels(&alpha)?)?;
            (y, Some(alpha), None)
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

/// Checks what the backward was handed against the input and weight; returns the
/// weight's dtype.
fn validate_saved(grad_y: &Tensor, saved: &Saved<'_>) -> Result<Kind> {
    let xf = tensor::facts(saved.x)?;
    if xf.dim() != 4 {
        return value_err!("x must be 4-D [N, C, H, W], got shape {:?}", xf.sizes);
    }
    check_float(&xf, "x")?;
    let wf = tensor::facts(saved.weight)?;
    if wf.dim() != 4 {
        return value_err!(
            "weight must be 4-D [O, C/groups, kh, kw], got shape {:?}",
            wf.sizes
        );
    }
    let weight_kind = check_float(&wf, "weight")?;
    let (n, o) = (xf.sizes[0], wf.sizes[0]);
    let gf = tensor::facts(grad_y)?;
    check_float(&gf, "grad_output")?;
    if gf.dim() != 4 || gf.sizes[0] != n || gf.sizes[1] != o {
        return value_err!(
            "grad_output has shape {:?}, expected [{n}, {o}, H, W]",
            gf.sizes
        );
    }
    if let Some(s) = saved.std {
        let sf = tensor::facts(s)?;
        check_float(&sf, "std")?;
        if sf.sizes != [n, 1, 1, 1] {
            return value_err!("std must have shape [{n}, 1, 1, 1], got {:?}", sf.sizes);
        }
    }
    for (t, what) in [(saved.scale, "scaling_factor"), (saved.alpha, "alpha")] {
        if let Some(t) = t {
            check_channel_vector(t, &xf, o, what)?;
        }
    }
    if let Some(c) = saved.conv_out {
        let cf = tensor::facts(c)?;
        if cf.sizes != gf.sizes {
            return value_err!(
                "conv_out has shape {:?}, grad_output {:?}",
                cf.sizes,
                gf.sizes
            );
        }
    }
    Ok(weight_kind)
}

/// Backward of the binary convolution, given the gradient of its output.
pub fn backward(
    grad_y: &Tensor,
    saved: &Saved<'_>,
    act_w: ActW,
    geom: &Geometry,
    needs: Needs,
) -> Result<Grads> {
    let weight_kind = validate_saved(grad_y, saved)?;
    let _guard = ffi::no_grad();
    let (x, weight) = (saved.x, saved.weight);

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
                        .f_to_kind(tensor::kind(s)?)?,
                )
            } else {
                None
            };
            (s, gs)
        }
        (None, Some(a)) => (a, None),
        (None, None) => return value_err!("backward needs either a scaling_factor or alpha"),
    };
    let grad_conv = grad_y.f_mul(&over_channels(scale)?)?;

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
    let mut activations = vec![x];
    activations.extend(saved.std);
    let k = binarize::kernels_for(&activations)?;
    let kind = saved.conv_kind;
    let a = k.sign(x, saved.std)?.f_to_kind(kind)?;
    let wb = k.binarize_weight(weight, act_w)?.f_to_kind(kind)?;
    let grad_conv = grad_conv.f_to_kind(kind)?;
    let (ga, gwb, gb) = ffi::convolution_backward(
        &grad_conv,
        &a,
        &wb,
        geom,
        [needs.input, needs.weight, needs.bias && saved.has_bias],
    )?;
    let input = ga
        .map(|g| k.bireal_backward(&g, x, saved.std))
        .transpose()?;
    let weight_g = gwb.map(|g| k.weight_grad(&g, weight, act_w)).transpose()?;
    let bias_g = gb.map(|g| g.f_to_kind(weight_kind)).transpose()?;
    Ok(Grads {
        input,
        weight: weight_g,
        bias: bias_g,
        scale: grad_scale,
    })
}
