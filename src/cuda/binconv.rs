//! The binary convolution on CUDA with fused elementwise passes (SPEC section 1).
//!
//! Forward: `binarize_activation` (two kernels: per-sample moments, then `sign(x/std)`
//! written straight in the convolution's dtype), `weight_operand` (one kernel: `w_b`,
//! alpha and, when the dtypes allow it, the scale folded into the weight and bias), then
//! cuDNN's convolution. Backward: `convolution_backward` against the same folded weight
//! (so the incoming gradient is never multiplied by the scale), `bireal_backward` (one
//! pass) and `weight_grads` (one kernel: the estimator's mask, the scale, and the
//! learnable scale's and the bias's gradients). Nothing is saved that the backward can
//! recompute: `a` and `w_eff` are rebuilt from `x`, `std` and `W`.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::device::{arg, DeviceState};
use super::tensor::{
    cuda_index, dense_order, dim0_major, dtype_code, empty_like_kind, opt_ptr, ptr, suffix,
};
use super::{autocast_kind, current_stream, decline, ran, ready, Outcome, Stream};
use crate::conv::{self, ActW, Forward, Geometry, Grads, Needs, Saved};
use crate::error::{Error, Result};
use crate::ffi;

/// The code of `act_w` in the kernels.
fn act_code(act_w: ActW) -> i32 {
    match act_w {
        ActW::Ste => 0,
        ActW::Hardtanh => 1,
        ActW::SteV2 => 2,
        ActW::HardtanhV2 => 3,
    }
}

/// The device and kernels for `t`, or why not.
fn device_of(t: &Tensor, what: &str) -> Result<Outcome<&'static DeviceState>> {
    let Some(index) = cuda_index(t) else {
        decline!("{what} is not a CUDA tensor");
    };
    Ok(ready(index))
}

fn check_dtype(t: &Tensor, what: &str) -> Result<Outcome<Kind>> {
    let kind = t.f_kind()?;
    if dtype_code(kind).is_none() {
        decline!("{what} has dtype {kind:?}; the kernels take float32, float16 and bfloat16");
    }
    Ok(Outcome::Ran(kind))
}

fn same_device(t: &Tensor, dev: &DeviceState, what: &str) -> Result<Outcome<()>> {
    if cuda_index(t) != Some(dev.index) {
        decline!("{what} is on {:?}, not cuda:{}", t.device(), dev.index);
    }
    Ok(Outcome::Ran(()))
}

/// Elements per block of `ovsw_sample_moments` (before the per-sample cap below).
const MOMENT_CHUNK: i64 = 16 * 1024;
/// At most this many partial sums per sample (each `ovsw_sign` block folds them all).
const MAX_CHUNKS: i64 = 64;
/// Elements per block of `ovsw_sign`.
const SIGN_SPAN: i64 = 8 * 1024;

/// `a = sign(x_hat)` in dtype `out_kind` and, in training, the per-sample
/// `std = sqrt(Var(x_n) + eps)` (unbiased, over C, H, W) as an `[N, 1, 1, 1]` tensor in
/// x's dtype, exactly what `conv::forward` saves (SPEC 1.1 and 1.2).
///
/// - `x`: a CUDA tensor of 4 (or more) dims in float32/float16/bfloat16, NCHW-contiguous
///   or channels_last (any dense layout with the batch dim outermost).
/// - `std`: `Std::Compute` in training (two launches: moments, then sign),
///   `Std::Given(s)` to rebuild `a` in the backward from the saved std (one launch), or
///   `Std::None` in eval mode (one launch).
/// - Returns `(a, std)`; `a` has x's shape and strides; `std` only for `Std::Compute`.
pub fn binarize_activation(
    x: &Tensor,
    std: Std<'_>,
    out_kind: Kind,
    stream: Stream,
) -> Result<Outcome<(Tensor, Option<Tensor>)>> {
    let dev = ran!(device_of(x, "the input"));
    let xk = ran!(check_dtype(x, "the input"));
    let (Some(xs), Some(os)) = (suffix(xk), suffix(out_kind)) else {
        decline!("output dtype {out_kind:?} is not float32, float16 or bfloat16");
    };
    if x.dim() < 2 || !dim0_major(x) {
        decline!(
            "the input (strides {:?}) is not dense with the batch dim outermost",
            x.stride()
        );
    }
    let size = x.size();
    let n = size[0];
    let per: i64 = size[1..].iter().product();
    let a = empty_like_kind(x, out_kind)?;
    if n == 0 || per == 0 {
        return Ok(Outcome::Ran((a, None)));
    }
    let x_ptr = ptr(x)?;
    let a_ptr = ptr(&a)?;
    let eps = conv::EPS as f32;
    let blocks_per_sample = (per + SIGN_SPAN - 1) / SIGN_SPAN;
    let (partial, chunks, std_out, std_in) = match std {
        Std::Compute => {
            if per < 2 {
                decline!("a sample of one element has no unbiased variance");
            }
            let chunks = ((per + MOMENT_CHUNK - 1) / MOMENT_CHUNK).clamp(1, MAX_CHUNKS);
            let chunk = (per + chunks - 1) / chunks;
            let partial = Tensor::f_empty([n * chunks * 2], (Kind::Double, x.device()))?;
            let part_ptr = ptr(&partial)?;
            let name = format!("ovsw_sample_moments_{xs}");
            let mut args = [
                arg(&x_ptr),
                arg(&per),
                arg(&chunk),
                arg(&chunks),
                arg(&part_ptr),
            ];
            // SAFETY: argument types match the kernel; x holds n * per elements, partial
            // n * chunks * 2 doubles, both on this device and alive until the end of
            // this function (stream-ordered frees in the caching allocator).
            unsafe { dev.launch(&name, (n * chunks) as u64, stream, &mut args)? };
            let std_t = Tensor::f_empty([n, 1, 1, 1], (xk, x.device()))?;
            (Some(partial), chunks, Some(std_t), None)
        }
        Std::Given(s) => {
            ran!(same_device(s, dev, "std"));
            if s.f_kind()? != xk || s.numel() != n as usize || !s.is_contiguous() {
                decline!("std must be a contiguous [N, 1, 1, 1] tensor in the input's dtype");
            }
            (None, 0, None, Some(s))
        }
        Std::None => (None, 0, None, None),
    };
    let part_ptr = opt_ptr(partial.as_ref())?;
    let std_out_ptr = opt_ptr(std_out.as_ref())?;
    let std_in_ptr = opt_ptr(std_in)?;
    let name = format!("ovsw_sign_{xs}_{os}");
    let mut args: [*mut c_void; 10] = [
        arg(&x_ptr),
        arg(&part_ptr),
        arg(&chunks),
        arg(&per),
        arg(&blocks_per_sample),
        arg(&SIGN_SPAN),
        arg(&eps),
        arg(&std_in_ptr),
        arg(&std_out_ptr),
        arg(&a_ptr),
    ];
    // SAFETY: as above; `a` has x's layout, std_in/std_out n elements of x's dtype.
    unsafe { dev.launch(&name, (n * blocks_per_sample) as u64, stream, &mut args)? };
    Ok(Outcome::Ran((a, std_out)))
}

/// Where [`binarize_activation`] gets the per-sample std from.
#[derive(Clone, Copy)]
pub enum Std<'a> {
    /// Compute it (training forward).
    Compute,
    /// Use this saved `[N, 1, 1, 1]` std (training backward).
    Given(&'a Tensor),
    /// No normalisation (eval mode).
    None,
}

/// The Bi-Real backward through `x_hat = x / std`:
/// `grad_x = grad_a * max(0, 2 - 2|x_hat|) / std` (without `/ std` and with
/// `x_hat = x` when `std` is `None`), in x's dtype and layout, one pass.
///
/// - `grad_a`: the gradient of `a` (what `convolution_backward` returns, in the
///   convolution's dtype), x's shape, any strides.
/// - `x`: dense (NCHW, channels_last, ...) float32/float16/bfloat16 CUDA tensor.
/// - `std`: the `[N, 1, 1, 1]` std saved by the forward (x's dtype), or `None`.
pub fn bireal_backward(
    grad_a: &Tensor,
    x: &Tensor,
    std: Option<&Tensor>,
    stream: Stream,
) -> Result<Outcome<Tensor>> {
    let dev = ran!(device_of(x, "the input"));
    let xk = ran!(check_dtype(x, "the input"));
    let gk = ran!(check_dtype(grad_a, "the gradient"));
    ran!(same_device(grad_a, dev, "the gradient"));
    let (Some(xs), Some(gs)) = (suffix(xk), suffix(gk)) else {
        decline!("unsupported dtype");
    };
    let size = x.size();
    if size.len() != 4 || grad_a.size() != size {
        decline!(
            "the gradient {:?} and input {:?} must be 4-D of one shape",
            grad_a.size(),
            size
        );
    }
    let Some(order) = dense_order(x) else {
        decline!("the input (strides {:?}) is not dense", x.stride());
    };
    if let Some(s) = std {
        ran!(same_device(s, dev, "std"));
        if s.f_kind()? != xk || s.numel() != size[0] as usize || !s.is_contiguous() {
            decline!("std must be a contiguous [N, 1, 1, 1] tensor in the input's dtype");
        }
    }
    let out = empty_like_kind(x, xk)?;
    let total: i64 = size.iter().product();
    if total == 0 {
        return Ok(Outcome::Ran(out));
    }
    let gstride = grad_a.stride();
    let sizes: Vec<i64> = order.iter().map(|&d| size[d]).collect();
    let g: Vec<i64> = order.iter().map(|&d| gstride[d]).collect();
    let n_axis = order.iter().position(|&d| d == 0).unwrap_or(0) as i32;
    let same_layout = i32::from(dim0_major(x) && gstride == x.stride());
    let per = total / size[0].max(1);
    let (g_ptr, x_ptr, std_ptr, out_ptr) = (ptr(grad_a)?, ptr(x)?, opt_ptr(std)?, ptr(&out)?);
    let name = format!("ovsw_bireal_backward_{gs}_{xs}");
    let mut args = [
        arg(&g_ptr),
        arg(&x_ptr),
        arg(&std_ptr),
        arg(&out_ptr),
        arg(&total),
        arg(&sizes[1]),
        arg(&sizes[2]),
        arg(&sizes[3]),
        arg(&g[0]),
        arg(&g[1]),
        arg(&g[2]),
        arg(&g[3]),
        arg(&n_axis),
        arg(&same_layout),
        arg(&per),
    ];
    // SAFETY: types match the kernel; every offset the kernel forms lies inside the
    // tensors (x and out dense of `total` elements, grad_a of x's shape with its own
    // strides), all on this device and alive until the end of this function.
    unsafe { dev.launch(&name, dev.elementwise_blocks(total), stream, &mut args)? };
    Ok(Outcome::Ran(out))
}

/// The convolution's weight operand: what [`weight_operand`] returns.
pub struct WeightOperand {
    /// `w_b` (SPEC 1.3), times the scale when folded, in the convolution's dtype, with
    /// W's shape and strides.
    pub w_eff: Tensor,
    /// alpha (SPEC 1.4, `[O]`, W's dtype) when no learnable scale was given.
    pub alpha: Option<Tensor>,
    /// The bias (times the scale when folded) in the convolution's dtype.
    pub bias_eff: Option<Tensor>,
}

fn check_vector(
    t: &Tensor,
    o: i64,
    wk: Kind,
    dev: &DeviceState,
    what: &str,
) -> Result<Outcome<()>> {
    ran!(same_device(t, dev, what));
    if t.size() != [o] || t.f_kind()? != wk || !t.is_contiguous() {
        decline!("{what} must be a contiguous [{o}] tensor in the weight's dtype");
    }
    Ok(Outcome::Ran(()))
}

/// One kernel, one block per output channel: `w_b` for `act_w`, the scale `s` (the
/// learnable `scale` if given, else alpha computed from W and returned), and with
/// `fold` the weight `w_b * s` and bias `bias * s`, so that
/// `conv(a, w_eff, bias_eff) == conv(a, w_b, bias) * s`; without `fold` plain `w_b` and
/// `bias`. Outputs are in `out_kind` (the convolution's dtype).
///
/// - `weight`: `[O, ...]` float32/float16/bfloat16 CUDA tensor, each output channel's
///   elements contiguous (contiguous or channels_last).
/// - `scale`, `bias`: `[O]`, contiguous, the weight's dtype and device.
pub fn weight_operand(
    weight: &Tensor,
    act_w: ActW,
    scale: Option<&Tensor>,
    bias: Option<&Tensor>,
    fold: bool,
    out_kind: Kind,
    stream: Stream,
) -> Result<Outcome<WeightOperand>> {
    let dev = ran!(device_of(weight, "the weight"));
    let wk = ran!(check_dtype(weight, "the weight"));
    let (Some(ws), Some(os)) = (suffix(wk), suffix(out_kind)) else {
        decline!("output dtype {out_kind:?} is not float32, float16 or bfloat16");
    };
    if weight.dim() < 2 || !dim0_major(weight) {
        decline!(
            "the weight (strides {:?}) is not dense with the output channel outermost",
            weight.stride()
        );
    }
    let o = weight.size()[0];
    let k = weight.numel() as i64 / o.max(1);
    for (t, what) in [(scale, "scaling_factor"), (bias, "bias")] {
        if let Some(t) = t {
            ran!(check_vector(t, o, wk, dev, what));
        }
    }
    let w_eff = empty_like_kind(weight, out_kind)?;
    let alpha = match scale {
        Some(_) => None,
        None => Some(Tensor::f_empty([o], (wk, weight.device()))?),
    };
    let bias_eff = match bias {
        Some(_) => Some(Tensor::f_empty([o], (out_kind, weight.device()))?),
        None => None,
    };
    if o == 0 || k == 0 {
        return Ok(Outcome::Ran(WeightOperand {
            w_eff,
            alpha,
            bias_eff,
        }));
    }
    let (w_ptr, scale_ptr, bias_ptr) = (ptr(weight)?, opt_ptr(scale)?, opt_ptr(bias)?);
    let (weff_ptr, alpha_ptr, beff_ptr) = (
        ptr(&w_eff)?,
        opt_ptr(alpha.as_ref())?,
        opt_ptr(bias_eff.as_ref())?,
    );
    let act = act_code(act_w);
    let fold = i32::from(fold);
    let eps = conv::EPS as f32;
    let name = format!("ovsw_weight_prep_{ws}_{os}");
    let mut args = [
        arg(&w_ptr),
        arg(&k),
        arg(&act),
        arg(&scale_ptr),
        arg(&bias_ptr),
        arg(&fold),
        arg(&eps),
        arg(&weff_ptr),
        arg(&alpha_ptr),
        arg(&beff_ptr),
    ];
    // SAFETY: types match the kernel; W and w_eff hold o * k elements, the vectors o,
    // all on this device and alive until the end of this function.
    unsafe { dev.launch(&name, o as u64, stream, &mut args)? };
    Ok(Outcome::Ran(WeightOperand {
        w_eff,
        alpha,
        bias_eff,
    }))
}

/// The gradients [`weight_grads`] returns.
pub struct WeightGrads {
    pub weight: Option<Tensor>,
    pub scale: Option<Tensor>,
    pub bias: Option<Tensor>,
}

/// One kernel, one block per output channel: from the gradients of the folded
/// `w_eff = w_b * s` and `bias_eff = bias * s` (as `convolution_backward` returns them,
/// in the convolution's dtype):
/// - `weight` (if `want.0`): `grad_weff * s * mask(W)` (the estimator's backward:
///   ste/ste_v2 identity, hardtanh `|W| < 1`, hardtanhv2 `|W| < mean_o|W|`);
/// - `scale` (if `want.1`): `sum_k grad_weff * w_b` (+ `grad_beff * bias` when `bias`);
/// - `bias` (if `want.2`): `grad_beff * s`.
///
/// All in W's dtype. `s` is the scale the forward used (learnable or alpha, `[O]`, W's
/// dtype). `grad_weff` is needed for `want.0` or `want.1`, `grad_beff` for `want.2`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(
    grad_weff: Option<&Tensor>,
    grad_beff: Option<&Tensor>,
    weight: &Tensor,
    act_w: ActW,
    s: &Tensor,
    bias: Option<&Tensor>,
    want: (bool, bool, bool),
    stream: Stream,
) -> Result<Outcome<WeightGrads>> {
    let dev = ran!(device_of(weight, "the weight"));
    let wk = ran!(check_dtype(weight, "the weight"));
    if weight.dim() < 2 || !dim0_major(weight) {
        decline!(
            "the weight (strides {:?}) is not dense with the output channel outermost",
            weight.stride()
        );
    }
    let o = weight.size()[0];
    let k = weight.numel() as i64 / o.max(1);
    ran!(check_vector(s, o, wk, dev, "the scale"));
    if let Some(b) = bias {
        ran!(check_vector(b, o, wk, dev, "bias"));
    }
    let gk = match (grad_weff, grad_beff) {
        (Some(g), _) | (None, Some(g)) => ran!(check_dtype(g, "the gradient")),
        (None, None) => wk,
    };
    if let Some(g) = grad_weff {
        ran!(same_device(g, dev, "grad_weff"));
        if g.size() != weight.size() || g.stride() != weight.stride() || g.f_kind()? != gk {
            decline!("grad_weff must have the weight's shape and strides");
        }
    } else if want.0 || want.1 {
        return Err(Error::Value(
            "weight_grads: grad_weff is needed for the weight or scale gradient".into(),
        ));
    }
    if let Some(g) = grad_beff {
        ran!(same_device(g, dev, "grad_beff"));
        if g.size() != [o] || g.f_kind()? != gk || !g.is_contiguous() {
            decline!("grad_beff must be a contiguous [{o}] tensor");
        }
    } else if want.2 {
        return Err(Error::Value(
            "weight_grads: grad_beff is needed for the bias gradient".into(),
        ));
    }
    let (Some(gs), Some(ws)) = (suffix(gk), suffix(wk)) else {
        decline!("unsupported dtype");
    };
    let grad_w = if want.0 {
        Some(empty_like_kind(weight, wk)?)
    } else {
        None
    };
    let grad_s = if want.1 {
        Some(Tensor::f_empty([o], (wk, weight.device()))?)
    } else {
        None
    };
    let grad_b = if want.2 {
        Some(Tensor::f_empty([o], (wk, weight.device()))?)
    } else {
        None
    };
    if o > 0 && (want.0 || want.1 || want.2) {
        let (gw_ptr, gb_ptr, w_ptr, s_ptr, b_ptr) = (
            opt_ptr(grad_weff)?,
            opt_ptr(grad_beff)?,
            ptr(weight)?,
            ptr(s)?,
            opt_ptr(bias)?,
        );
        let (ow, os, ob) = (
            opt_ptr(grad_w.as_ref())?,
            opt_ptr(grad_s.as_ref())?,
            opt_ptr(grad_b.as_ref())?,
        );
        let act = act_code(act_w);
        let name = format!("ovsw_weight_grad_{gs}_{ws}");
        let mut args = [
            arg(&gw_ptr),
            arg(&w_ptr),
            arg(&k),
            arg(&act),
            arg(&s_ptr),
            arg(&gb_ptr),
            arg(&b_ptr),
            arg(&ow),
            arg(&os),
            arg(&ob),
        ];
        // SAFETY: types match the kernel; the [O, K] tensors share W's dense layout,
        // the vectors hold o elements; all on this device, alive until the end.
        unsafe { dev.launch(&name, o as u64, stream, &mut args)? };
    }
    Ok(Outcome::Ran(WeightGrads {
        weight: grad_w,
        scale: grad_s,
        bias: grad_b,
    }))
}

fn per_channel(v: &Tensor) -> Result<Tensor> {
    Ok(v.f_reshape([1, v.size()[0], 1, 1])?)
}

/// The dtype the convolution runs in: autocast's under `torch.autocast("cuda")` (which
/// casts float32, float16 and bfloat16 operands), else the input's.
fn conv_kind_for(x_kind: Kind) -> Result<Kind> {
    Ok(autocast_kind()?.unwrap_or(x_kind))
}

/// The binary convolution's forward on CUDA: the same contract and result as
/// `conv::forward` (SPEC 1.1 to 1.5), through the fused passes. `conv_out` is never
/// saved (the backward does not need it). Declines (take `conv::forward`) for CPU or
/// float64 tensors, layouts other than dense batch-major, and a learnable scale together
/// with a bias.
///
/// The scale is folded into the weight when the convolution runs in W's dtype (no
/// autocast): `y = conv(a, w_b * s, bias * s)`, no pass over the output. Under autocast
/// `y = conv(a, w_b, bias) * s` in float32, as the libtorch path gives.
pub fn conv_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    act_w: ActW,
    geom: &Geometry,
    training: bool,
) -> Result<Outcome<Forward>> {
    let Some(index) = cuda_index(x) else {
        decline!("the input is not a CUDA tensor");
    };
    conv::validate(x, weight, bias, scale, geom)?;
    if scale.is_some() && bias.is_some() {
        decline!("a learnable scaling_factor together with a bias");
    }
    let dev = ran!(Ok::<_, Error>(ready(index)));
    let xk = ran!(check_dtype(x, "the input"));
    let wk = ran!(check_dtype(weight, "the weight"));
    let ck = conv_kind_for(xk)?;
    if dtype_code(ck).is_none() {
        decline!("autocast runs the convolution in {ck:?}");
    }
    if ck == xk && wk != xk && autocast_kind()?.is_none() {
        decline!("input {xk:?} and weight {wk:?} differ (libtorch reports it)");
    }
    let stream = current_stream(dev.index)?;
    let _guard = tch::no_grad_guard();
    let std_mode = if training { Std::Compute } else { Std::None };
    let (a, std) = ran!(binarize_activation(x, std_mode, ck, stream));
    let fold = wk == ck;
    let op = ran!(weight_operand(weight, act_w, scale, bias, fold, ck, stream));
    let out = a.f_conv2d(
        &op.w_eff,
        op.bias_eff.as_ref(),
        geom.stride,
        geom.padding,
        geom.dilation,
        geom.groups,
    )?;
    let conv_kind = out.f_kind()?;
    let y = if fold {
        out
    } else {
        let s = match (scale, &op.alpha) {
            (Some(s), _) => s,
            (None, Some(a)) => a,
            (None, None) => return Err(Error::Torch("weight_operand returned no alpha".into())),
        };
        out.f_mul(&per_channel(s)?)?
    };
    Ok(Outcome::Ran(Forward {
        y,
        std,
        alpha: op.alpha,
        conv_out: None,
        conv_kind,
    }))
}

/// The binary convolution's backward on CUDA: the same contract and result as
/// `conv::backward`, from what either forward saved (`conv_out` is not read). Declines
/// where [`conv_forward`] does, and for a learnable scale with a bias.
pub fn conv_backward(
    grad_y: &Tensor,
    saved: &Saved<'_>,
    act_w: ActW,
    geom: &Geometry,
    needs: Needs,
) -> Result<Outcome<Grads>> {
    let x = saved.x;
    let weight = saved.weight;
    let Some(index) = cuda_index(x) else {
        decline!("the input is not a CUDA tensor");
    };
    let o = weight.size()[0];
    if grad_y.dim() != 4 || grad_y.size()[1] != o {
        return Err(Error::Value(format!(
            "grad_output has shape {:?}, expected [N, {o}, H, W]",
            grad_y.size()
        )));
    }
    let learnable = saved.scale.is_some();
    if learnable && saved.has_bias {
        decline!("a learnable scaling_factor together with a bias");
    }
    let s = match (saved.scale, saved.alpha) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            return Err(Error::Value(
                "backward needs either a scaling_factor or alpha".into(),
            ))
        }
    };
    let dev = ran!(Ok::<_, Error>(ready(index)));
    ran!(check_dtype(x, "the input"));
    ran!(check_dtype(weight, "the weight"));
    ran!(check_dtype(grad_y, "the output gradient"));
    let ck = saved.conv_kind;
    if dtype_code(ck).is_none() {
        decline!("the convolution ran in {ck:?}");
    }
    let want_scale = needs.scale && learnable;
    let want_bias = needs.bias && saved.has_bias;
    if !(needs.input || needs.weight || want_scale || want_bias) {
        return Ok(Outcome::Ran(Grads {
            input: None,
            weight: None,
            bias: None,
            scale: None,
        }));
    }
    let stream = current_stream(dev.index)?;
    let _guard = tch::no_grad_guard();
    let std_mode = match saved.std {
        Some(s) => Std::Given(s),
        None => Std::None,
    };
    let (a, _) = ran!(binarize_activation(x, std_mode, ck, stream));
    let op = ran!(weight_operand(
        weight,
        act_w,
        Some(s),
        None,
        true,
        ck,
        stream
    ));
    let grad_conv = grad_y.f_to_kind(ck)?;
    let want_weff = needs.weight || want_scale;
    let (ga, gweff, gbeff) = ffi::convolution_backward(
        &grad_conv,
        &a,
        &op.w_eff,
        geom,
        [needs.input, want_weff, want_bias],
    )?;
    let input = match ga {
        Some(ga) => Some(ran!(bireal_backward(&ga, x, saved.std, stream))),
        None => None,
    };
    // convolution_backward may return grad_weff in a layout other than W's; the kernel
    // reads it in W's.
    let gweff = match gweff {
        Some(g) if g.stride() != weight.stride() => {
            let mut like = empty_like_kind(weight, g.f_kind()?)?;
            like.f_copy_(&g)?;
            Some(like)
        }
        other => other,
    };
    let g = ran!(weight_grads(
        gweff.as_ref(),
        gbeff.as_ref(),
        weight,
        act_w,
        s,
        None,
        (needs.weight, want_scale, want_bias),
        stream,
    ));
    Ok(Outcome::Ran(Grads {
        input,
        weight: g.weight,
        bias: g.bias,
        scale: g.scale,
    }))
}
