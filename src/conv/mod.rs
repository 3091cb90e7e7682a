//! The binary convolution of OvSW (SPEC section 1), forward and backward: the binary
//! layer of [`crate::layer`] with a 2-D convolution as its product, every route here.
//!
//! Each op validates its arguments ([`validate`]), picks its route once ([`Route::of`]
//! on the activation) and runs. On CUDA tensors that is the fused CUDA form ([`cuda`]);
//! anywhere else, or where the CUDA kernels decline, it is the layer skeleton
//! ([`layer::forward`], [`layer::backward`]) with the route's [`binarize::Elementwise`]
//! parts and the convolution of [`product`] (libtorch's, and
//! `at::convolution_backward` through the C++ shim for its gradients). The
//! convolution itself and everything on the weight side go through libtorch's
//! dispatcher on every route, so CPU and CUDA tensors and `torch.autocast` behave as
//! they do for ordinary PyTorch ops.

pub mod cuda;
pub mod product;
pub mod py;

use tch::{Kind, Tensor};

use crate::binarize::{self, ActW};
use crate::cuda::{fused, Op};
use crate::error::{value_err, Result};
use crate::facts::{self, check_float, Facts, Route};
use crate::ffi;
use crate::geometry::Geometry;
use crate::layer::{
    self, check_same_device, check_saved_parts, check_vectors, Forward, Grads, Needs, OpFacts,
    Product, Saved,
};
use product::Conv;

/// Checks the arguments of a binary convolution, naming the first thing that is wrong;
/// returns the input's and the weight's facts.
pub fn validate(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    geom: &Geometry,
) -> Result<OpFacts> {
    let xf = facts::facts(x)?;
    if xf.dim() != 4 {
        return value_err!(
            "OvSWConv2d expects a 4-D input [N, C, H, W], got shape {:?}",
            xf.sizes
        );
    }
    check_float(&xf, "input")?;
    let wf = facts::facts(weight)?;
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
    check_vectors(&xf, o, bias, scale)?;
    Ok(OpFacts { x: xf, weight: wf })
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
    let args = validate(x, weight, bias, scale, geom)?;
    let _guard = ffi::no_grad();
    let route = Route::of_facts(&[&args.x]);
    let fused = fused(Op::ConvForward, route, || {
        cuda::forward(&args, bias, scale, act_w, geom, training)
    })?;
    if let Some(f) = fused {
        return Ok(f);
    }
    let k = binarize::for_route(route);
    layer::forward(&Conv(geom), k, x, weight, bias, scale, act_w, training)
}

/// What [`validate_saved`] read: the input's and weight's facts, the output
/// gradient's and the saved std's.
struct SavedFacts {
    args: OpFacts,
    grad_y: Facts,
    std: Option<Facts>,
}

/// Checks what the backward was handed against the input and weight; returns the
/// weight's dtype and the facts it read.
fn validate_saved(grad_y: &Tensor, saved: &Saved<'_>) -> Result<(Kind, SavedFacts)> {
    let xf = facts::facts(saved.x)?;
    if xf.dim() != 4 {
        return value_err!("x must be 4-D [N, C, H, W], got shape {:?}", xf.sizes);
    }
    check_float(&xf, "x")?;
    let wf = facts::facts(saved.weight)?;
    if wf.dim() != 4 {
        return value_err!(
            "weight must be 4-D [O, C/groups, kh, kw], got shape {:?}",
            wf.sizes
        );
    }
    let weight_kind = check_float(&wf, "weight")?;
    let (n, o) = (xf.sizes[0], wf.sizes[0]);
    let gf = facts::facts(grad_y)?;
    check_float(&gf, "grad_output")?;
    if gf.dim() != 4 || gf.sizes[0] != n || gf.sizes[1] != o {
        return value_err!(
            "grad_output has shape {:?}, expected [{n}, {o}, H, W]",
            gf.sizes
        );
    }
    let std = check_saved_parts(&xf, &gf, o, saved, Conv::NAME)?;
    let read = SavedFacts {
        args: OpFacts { x: xf, weight: wf },
        grad_y: gf,
        std,
    };
    Ok((weight_kind, read))
}

/// Backward of the binary convolution, given the gradient of its output.
pub fn backward(
    grad_y: &Tensor,
    saved: &Saved<'_>,
    act_w: ActW,
    geom: &Geometry,
    needs: Needs,
) -> Result<Grads> {
    let (weight_kind, read) = validate_saved(grad_y, saved)?;
    let _guard = ffi::no_grad();
    let mut activations = vec![&read.args.x];
    activations.extend(read.std.as_ref());
    let route = Route::of_facts(&activations);
    let fused = fused(Op::ConvBackward, route, || {
        cuda::backward(grad_y, saved, &read.args, &read.grad_y, act_w, geom, needs)
    })?;
    if let Some(g) = fused {
        return Ok(g);
    }
    let k = binarize::for_route(route);
    layer::backward(&Conv(geom), k, grad_y, saved, act_w, needs, weight_kind)
}
