//! The binary convolution of OvSW (SPEC section 1), forward and backward.
//!
//! Each op validates its arguments ([`validate`]), picks its route once ([`Route::of`]
//! on the activation) and runs. On CUDA tensors that is the fused CUDA form
//! ([`crate::cuda::binconv`]); anywhere else, or where the CUDA kernels decline, it is
//! the form below with the route's [`binarize::Kernels`]: binarize the activation and the
//! weight, convolve through libtorch, scale per output channel. The backward is written out by hand: the
//! binarizers' surrogate gradients are elementwise, and the convolution's own gradients
//! come from `at::convolution_backward` through the C++ shim ([`crate::ffi`]), so
//! nothing is recomputed twice and no autograd graph is kept alive between forward and
//! backward. The convolution itself and everything on the weight side go through
//! libtorch's dispatcher on every route, so CPU and CUDA tensors and `torch.autocast`
//! behave as they do for ordinary PyTorch ops.

pub mod py;

use tch::{Kind, Tensor};

use crate::binarize::{self, ActW, Alpha};
use crate::cuda::{self, Op};
use crate::error::{value_err, Result};
use crate::ffi;
use crate::geometry::Geometry;
use crate::tensor::{self, check_float, Facts, Route};

/// What the forward keeps for the backward besides the input and weight.
pub struct Forward {
    /// The layer output `conv(a, w_b, bias) * alpha`.
    pub y: Tensor,
    /// Per-sample `sqrt(Var(x_n) + eps)`, shape `[N, 1, 1, 1]`; `None` in eval mode.
    pub std: Option<Tensor>,
    /// The per-channel scale recomputed from W (shape `[O]`); `None` when the layer
    /// owns a learnable `scaling_factor`.
    pub alpha: Option<Tensor>,
    /// `conv(a, w_b, bias)` before scaling (`[N, O, H, W]`, the convolution's dtype):
    /// kept exactly when the layer owns a learnable `scaling_factor`, on every route,
    /// as the op's fake implementation declares (`ops._fake_layer_outputs`); `None`
    /// otherwise.
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

/// The per-output-channel scale `s` of a layer's output `y = conv(a, w_b, bias) * s`
/// (SPEC 1.4).
#[derive(Clone, Copy)]
pub enum Scale<'a> {
    /// The layer's learnable `scaling_factor`, which gets a gradient.
    Learnable(&'a Tensor),
    /// alpha, recomputed from W by the forward (no gradient of its own).
    Alpha(&'a Tensor),
}

impl<'a> Scale<'a> {
    /// The `[O]` tensor.
    pub fn tensor(self) -> &'a Tensor {
        match self {
            Scale::Learnable(s) | Scale::Alpha(s) => s,
        }
    }
}

impl<'a> Saved<'a> {
    /// The scale the forward applied.
    pub fn scale(&self) -> Result<Scale<'a>> {
        match (self.scale, self.alpha) {
            (Some(s), _) => Ok(Scale::Learnable(s)),
            (None, Some(a)) => Ok(Scale::Alpha(a)),
            (None, None) => value_err!("backward needs either a scaling_factor or alpha"),
        }
    }
}

/// Whether a route's backward may work from the folded operands,
/// `conv(a, w_b * s, bias * s) == conv(a, w_b, bias) * s`, without the kept
/// `conv_out`. Always, except a learnable scale together with a bias: the scale's
/// gradient then needs the bias's values, which the backward is not handed
/// ([`Saved::has_bias`]).
pub fn foldable(learnable_scale: bool, has_bias: bool) -> bool {
    !(learnable_scale && has_bias)
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
pub fn validate(
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
pub(crate) fn over_channels(v: &Tensor) -> Result<Tensor> {
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
    let route = Route::of(&[x])?;
    let fused = cuda::fused(Op::ConvForward, route, || {
        cuda::binconv::forward(x, weight, bias, scale, act_w, geom, training)
    })?;
    if let Some(f) = fused {
        return Ok(f);
    }
    let k = binarize::kernels(route);
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
    let (y, alpha, conv_out) = match Alpha::of(k, weight, scale)? {
        Alpha::Learnable(s) => (conv_out.f_mul(&over_channels(s)?)?, None, Some(conv_out)),
        Alpha::FromWeight(alpha) => {
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
    check_saved_parts(
        &xf,
        &gf,
        o,
        saved.std,
        [saved.scale, saved.alpha],
        saved.conv_out.map(|c| (c, "conv_out")),
    )?;
    Ok(weight_kind)
}

/// What a binary layer's backward (conv or linear) checks alike in what its forward
/// saved: the per-sample std `[N, 1, ..., 1]`, the scale and alpha vectors `[O]`, and
/// the kept pre-scale product, shaped like `grad_output`.
pub(crate) fn check_saved_parts(
    xf: &Facts,
    gf: &Facts,
    o: i64,
    std: Option<&Tensor>,
    [scale, alpha]: [Option<&Tensor>; 2],
    product: Option<(&Tensor, &str)>,
) -> Result<()> {
    if let Some(s) = std {
        let sf = tensor::facts(s)?;
        check_float(&sf, "std")?;
        let mut shape = vec![1; xf.dim()];
        shape[0] = xf.sizes[0];
        if sf.sizes != shape {
            return value_err!("std must have shape {shape:?}, got {:?}", sf.sizes);
        }
    }
    for (t, what) in [(scale, "scaling_factor"), (alpha, "alpha")] {
        if let Some(t) = t {
            check_channel_vector(t, xf, o, what)?;
        }
    }
    if let Some((p, what)) = product {
        let pf = tensor::facts(p)?;
        if pf.sizes != gf.sizes {
            return value_err!(
                "{what} has shape {:?}, grad_output {:?}",
                pf.sizes,
                gf.sizes
            );
        }
    }
    Ok(())
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
    let scale = saved.scale()?;
    let _guard = ffi::no_grad();
    let (x, weight) = (saved.x, saved.weight);
    let mut activations = vec![x];
    activations.extend(saved.std);
    let route = Route::of(&activations)?;
    let fused = cuda::fused(Op::ConvBackward, route, || {
        cuda::binconv::backward(grad_y, saved, act_w, geom, needs)
    })?;
    if let Some(g) = fused {
        return Ok(g);
    }
    let k = binarize::kernels(route);

    // Recompute the binarized operands (cheaper than keeping them) in the dtype the
    // forward convolution ran in, when a gradient needs them.
    let kind = saved.conv_kind;
    let needs_conv = needs.input || needs.weight || needs.bias;
    let learnable = matches!(scale, Scale::Learnable(_));
    let recompute_conv_out = needs.scale && learnable && saved.conv_out.is_none();
    let operands = if needs_conv || recompute_conv_out {
        let a = k.sign(x, saved.std)?.f_to_kind(kind)?;
        let wb = k.binarize_weight(weight, act_w)?.f_to_kind(kind)?;
        Some((a, wb))
    } else {
        None
    };

    // y = conv_out * s: d/d conv_out = grad_y * s, d/d s = sum(grad_y * conv_out).
    let grad_scale = match scale {
        Scale::Learnable(s) if needs.scale => {
            let recomputed;
            let conv_out = match (saved.conv_out, &operands) {
                (Some(c), _) => c,
                // Handed no conv_out (every forward keeps it with a learnable scale,
                // but a caller may pass the absent marker): without a bias (see
                // `foldable`) it is conv(a, w_b).
                (None, Some((a, wb))) if !saved.has_bias => {
                    recomputed = a.f_conv2d(
                        wb,
                        None::<&Tensor>,
                        geom.stride,
                        geom.padding,
                        geom.dilation,
                        geom.groups,
                    )?;
                    &recomputed
                }
                _ => return value_err!("missing conv_out for a learnable scale"),
            };
            Some(
                grad_y
                    .f_mul(conv_out)?
                    .f_sum_dim_intlist([0i64, 2, 3].as_slice(), false, None::<Kind>)?
                    .f_to_kind(tensor::kind(s)?)?,
            )
        }
        Scale::Learnable(_) | Scale::Alpha(_) => None,
    };
    let Some((a, wb)) = operands.filter(|_| needs_conv) else {
        return Ok(Grads {
            input: None,
            weight: None,
            bias: None,
            scale: grad_scale,
        });
    };
    let grad_conv = grad_y
        .f_mul(&over_channels(scale.tensor())?)?
        .f_to_kind(kind)?;
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
