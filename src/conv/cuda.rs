//! The CUDA route of the binary convolution (SPEC section 1): the whole op on CUDA
//! tensors, with fused elementwise passes, launched through the shared machinery of
//! [`crate::cuda`] (device, loader, operands).
//!
//! Forward: `binarize_activation` (two kernels: per-sample moments, then `sign(x/std)`
//! written straight in the convolution's dtype), `weight_operand` (one kernel: `w_b`,
//! alpha and, when the dtypes allow it, the scale folded into the weight and bias), then
//! cuDNN's convolution. Backward: `convolution_backward` against the same folded weight
//! (so the incoming gradient is never multiplied by the scale), `bireal_backward` (one
//! pass) and `weight_grads` (one kernel: the estimator's mask, the scale, and the
//! learnable scale's and the bias's gradients). Nothing is saved that the backward can
//! recompute: `a` and `w_eff` are rebuilt from `x`, `std` and `W`.
//!
//! [`forward`] and [`backward`] get the device's launcher ([`ready`]) and the stream
//! ([`current_stream`]) once, at their entry, and hand them to each pass (`dev`,
//! `stream`); a pass declines tensors on another device. The passes' bindings
//! (`_core.cuda_*`, `py.rs`) get them at their own entry.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::product::over_channels;
use crate::binarize::{ActW, EPS};
use crate::cuda::device::arg;
use crate::cuda::launcher::Launcher;
use crate::cuda::operand::{dtype_code, operand, operand_of, opt_ptr, ptr, suffix, Operand};
use crate::cuda::{conv_mode, current_stream, decline, host, ran, ready, Outcome, Stream};
use crate::error::{Error, Result};
use crate::facts;
use crate::facts::Facts;
use crate::ffi;
use crate::geometry::Geometry;
use crate::layer::{foldable, Forward, Grads, Needs, OpFacts, Saved, Scale};

/// The code of `act_w` in the kernels.
fn act_code(act_w: ActW) -> i32 {
    match act_w {
        ActW::Ste => 0,
        ActW::Hardtanh => 1,
        ActW::SteV2 => 2,
        ActW::HardtanhV2 => 3,
    }
}

fn same_device(t: &Operand, dev: Launcher, what: &str) -> Result<Outcome<()>> {
    if t.index != dev.index() {
        let name = |i: usize| match i {
            host::HOST_INDEX => "cpu".to_string(),
            i => format!("cuda:{i}"),
        };
        decline!("{what} is on {}, not {}", name(t.index), name(dev.index()));
    }
    Ok(Outcome::Ran(()))
}

/// A per-sample std `[N, 1, ...]`: contiguous, `n` elements, the input's dtype.
fn check_std(s: &Tensor, n: i64, kind: Kind, dev: Launcher) -> Result<Outcome<()>> {
    let so = ran!(operand(s, "std"));
    ran!(same_device(&so, dev, "std"));
    if so.kind != kind || so.numel() != n || !so.facts.contiguous {
        decline!("std must be a contiguous [N, 1, 1, 1] tensor in the input's dtype");
    }
    Ok(Outcome::Ran(()))
}

/// The shape of the per-sample std of `x`: `[N, 1, ...]`.
fn std_shape(x: &Operand) -> Vec<i64> {
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.sizes()[0];
    shape
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
    xo: &Operand,
    std: Std<'_>,
    out_kind: Kind,
    dev: Launcher,
    stream: Stream,
) -> Result<Outcome<(Tensor, Option<Tensor>)>> {
    ran!(same_device(xo, dev, "the input"));
    let (Some(xs), Some(os)) = (suffix(xo.kind), suffix(out_kind)) else {
        decline!("output dtype {out_kind:?} is not float32, float16 or bfloat16");
    };
    if xo.dim() < 2 || !xo.dim0_major() {
        decline!(
            "the input (strides {:?}) is not dense with the batch dim outermost",
            xo.strides()
        );
    }
    let n = xo.sizes()[0];
    let per: i64 = xo.sizes()[1..].iter().product();
    let a = xo.empty_like(out_kind)?;
    if matches!(std, Std::Compute) && n > 0 && per < 2 {
        decline!("a sample of {per} elements has no unbiased variance");
    }
    if n == 0 || per == 0 {
        // Nothing to launch; in training the std is still `[N, 1, ...]` (here `[0, 1,
        // ...]`), as the generic route and the fake implementation give.
        let std_out = match std {
            Std::Compute => Some(Tensor::f_empty(
                std_shape(xo).as_slice(),
                (xo.kind, xo.device()),
            )?),
            Std::Given(_) | Std::None => None,
        };
        return Ok(Outcome::Ran((a, std_out)));
    }
    let x_ptr = xo.ptr();
    let a_ptr = ptr(&a)?;
    let eps = EPS as f32;
    let blocks_per_sample = (per + SIGN_SPAN - 1) / SIGN_SPAN;
    let (partial, chunks, std_out, std_in) = match std {
        Std::Compute => {
            let chunks = ((per + MOMENT_CHUNK - 1) / MOMENT_CHUNK).clamp(1, MAX_CHUNKS);
            let chunk = (per + chunks - 1) / chunks;
            let partial = Tensor::f_empty([n * chunks * 2], (Kind::Double, xo.device()))?;
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
            let std_t = Tensor::f_empty(std_shape(xo).as_slice(), (xo.kind, xo.device()))?;
            (Some(partial), chunks, Some(std_t), None)
        }
        Std::Given(s) => {
            ran!(check_std(s, n, xo.kind, dev));
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
    xo: &Operand,
    std: Option<&Tensor>,
    dev: Launcher,
    stream: Stream,
) -> Result<Outcome<Tensor>> {
    ran!(same_device(xo, dev, "the input"));
    let go = ran!(operand(grad_a, "the gradient"));
    ran!(same_device(&go, dev, "the gradient"));
    let (Some(xs), Some(gs)) = (suffix(xo.kind), suffix(go.kind)) else {
        decline!("unsupported dtype");
    };
    let size = xo.sizes();
    if size.len() != 4 || go.sizes() != size {
        decline!(
            "the gradient {:?} and input {:?} must be 4-D of one shape",
            go.sizes(),
            size
        );
    }
    let Some(order) = xo.dense_order() else {
        decline!("the input (strides {:?}) is not dense", xo.strides());
    };
    if let Some(s) = std {
        ran!(check_std(s, size[0], xo.kind, dev));
    }
    let out = xo.empty_like(xo.kind)?;
    let total = xo.numel();
    if total == 0 {
        return Ok(Outcome::Ran(out));
    }
    let gstride = go.strides();
    let sizes: Vec<i64> = order.iter().map(|&d| size[d]).collect();
    let g: Vec<i64> = order.iter().map(|&d| gstride[d]).collect();
    let n_axis = order.iter().position(|&d| d == 0).unwrap_or(0) as i32;
    let same_layout = i32::from(xo.dim0_major() && gstride == xo.strides());
    let per = total / size[0].max(1);
    let (g_ptr, x_ptr, std_ptr, out_ptr) = (go.ptr(), xo.ptr(), opt_ptr(std)?, ptr(&out)?);
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

fn check_vector(t: &Tensor, o: i64, wk: Kind, dev: Launcher, what: &str) -> Result<Outcome<()>> {
    let v = ran!(operand(t, what));
    ran!(same_device(&v, dev, what));
    if v.sizes() != [o] || v.kind != wk || !v.facts.contiguous {
        decline!("{what} must be a contiguous [{o}] tensor in the weight's dtype");
    }
    Ok(Outcome::Ran(()))
}

/// The weight as the per-channel kernels of `dev` read it: `(O, K)`.
fn weight_of(wo: &Operand, dev: Launcher) -> Result<Outcome<(i64, i64)>> {
    ran!(same_device(wo, dev, "the weight"));
    if wo.dim() < 2 || !wo.dim0_major() {
        decline!(
            "the weight (strides {:?}) is not dense with the output channel outermost",
            wo.strides()
        );
    }
    let o = wo.sizes()[0];
    let k = wo.numel() / o.max(1);
    Ok(Outcome::Ran((o, k)))
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
#[allow(clippy::too_many_arguments)]
pub fn weight_operand(
    wo: &Operand,
    act_w: ActW,
    scale: Option<&Tensor>,
    bias: Option<&Tensor>,
    fold: bool,
    out_kind: Kind,
    dev: Launcher,
    stream: Stream,
) -> Result<Outcome<WeightOperand>> {
    let (o, k) = ran!(weight_of(wo, dev));
    let (Some(ws), Some(os)) = (suffix(wo.kind), suffix(out_kind)) else {
        decline!("output dtype {out_kind:?} is not float32, float16 or bfloat16");
    };
    for (t, what) in [(scale, "scaling_factor"), (bias, "bias")] {
        if let Some(t) = t {
            ran!(check_vector(t, o, wo.kind, dev, what));
        }
    }
    let w_eff = wo.empty_like(out_kind)?;
    let alpha = match scale {
        Some(_) => None,
        None => Some(Tensor::f_empty([o], (wo.kind, wo.device()))?),
    };
    let bias_eff = match bias {
        Some(_) => Some(Tensor::f_empty([o], (out_kind, wo.device()))?),
        None => None,
    };
    if o == 0 || k == 0 {
        return Ok(Outcome::Ran(WeightOperand {
            w_eff,
            alpha,
            bias_eff,
        }));
    }
    let (w_ptr, scale_ptr, bias_ptr) = (wo.ptr(), opt_ptr(scale)?, opt_ptr(bias)?);
    let (weff_ptr, alpha_ptr, beff_ptr) = (
        ptr(&w_eff)?,
        opt_ptr(alpha.as_ref())?,
        opt_ptr(bias_eff.as_ref())?,
    );
    let act = act_code(act_w);
    let fold = i32::from(fold);
    let eps = EPS as f32;
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

/// Which gradients [`weight_grads`] computes.
#[derive(Clone, Copy, Debug)]
pub struct WantGrads {
    pub weight: bool,
    pub scale: bool,
    pub bias: bool,
}

/// One kernel, one block per output channel: from the gradients of the folded
/// `w_eff = w_b * s` and `bias_eff = bias * s` (as `convolution_backward` returns them,
/// in the convolution's dtype):
/// - `weight`: `grad_weff * s * mask(W)` (the estimator's backward: ste/ste_v2
///   identity, hardtanh `|W| < 1`, hardtanhv2 `|W| < mean_o|W|`);
/// - `scale`: `sum_k grad_weff * w_b` (+ `grad_beff * bias` when `bias`);
/// - `bias`: `grad_beff * s`.
///
/// All in W's dtype. `s` is the scale the forward used (learnable or alpha, `[O]`, W's
/// dtype). `grad_weff` is needed for the weight's or the scale's gradient, `grad_beff`
/// for the bias's.
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(
    grad_weff: Option<&Tensor>,
    grad_beff: Option<&Tensor>,
    wo: &Operand,
    act_w: ActW,
    s: &Tensor,
    bias: Option<&Tensor>,
    want: WantGrads,
    dev: Launcher,
    stream: Stream,
) -> Result<Outcome<WeightGrads>> {
    let (o, k) = ran!(weight_of(wo, dev));
    let wk = wo.kind;
    ran!(check_vector(s, o, wk, dev, "the scale"));
    if let Some(b) = bias {
        ran!(check_vector(b, o, wk, dev, "bias"));
    }
    let gweff = match grad_weff {
        Some(g) => Some(ran!(operand(g, "grad_weff"))),
        None if want.weight || want.scale => {
            return Err(Error::Value(
                "weight_grads: grad_weff is needed for the weight or scale gradient".into(),
            ))
        }
        None => None,
    };
    let gbeff = match grad_beff {
        Some(g) => Some(ran!(operand(g, "grad_beff"))),
        None if want.bias => {
            return Err(Error::Value(
                "weight_grads: grad_beff is needed for the bias gradient".into(),
            ))
        }
        None => None,
    };
    let gk = match (&gweff, &gbeff) {
        (Some(g), _) | (None, Some(g)) => g.kind,
        (None, None) => wk,
    };
    if let Some(g) = &gweff {
        ran!(same_device(g, dev, "grad_weff"));
        if g.sizes() != wo.sizes() || g.strides() != wo.strides() || g.kind != gk {
            decline!("grad_weff must have the weight's shape and strides");
        }
    }
    if let Some(g) = &gbeff {
        ran!(same_device(g, dev, "grad_beff"));
        if g.sizes() != [o] || g.kind != gk || !g.facts.contiguous {
            decline!("grad_beff must be a contiguous [{o}] tensor");
        }
    }
    let (Some(gs), Some(ws)) = (suffix(gk), suffix(wk)) else {
        decline!("unsupported dtype");
    };
    let vector = || Tensor::f_empty([o], (wk, wo.device()));
    let grad_w = want.weight.then(|| wo.empty_like(wk)).transpose()?;
    let grad_s = want.scale.then(vector).transpose()?;
    let grad_b = want.bias.then(vector).transpose()?;
    if o > 0 && (want.weight || want.scale || want.bias) {
        let (gw_ptr, gb_ptr, w_ptr, s_ptr, b_ptr) = (
            gweff.as_ref().map_or(0, Operand::ptr),
            gbeff.as_ref().map_or(0, Operand::ptr),
            wo.ptr(),
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

/// The binary convolution's forward on CUDA, the CUDA route of [`crate::conv::forward`]
/// (which validated the arguments): the same contract and result (SPEC 1.1 to 1.5),
/// through the fused passes. `conv_out` follows the one contract of every route and the
/// fake implementation (`ops._fake_layer_outputs`): kept (`conv(a, w_b)`, `[N, O, H, W]`
/// in the convolution's dtype) exactly when the scale is a learnable `scaling_factor`,
/// absent otherwise; this backward does not read it. Declines (the generic route runs)
/// for tensors other than float32, float16 and bfloat16 CUDA memory, layouts other than
/// dense batch-major, and a learnable scale together with a bias ([`foldable`]).
///
/// The computed alpha is folded into the weight when the convolution runs in W's dtype
/// (no autocast) and, for float32, without TF32: `y = conv(a, w_b * alpha, bias *
/// alpha)`, no pass over the output. Otherwise, and always for a learnable scale (whose
/// product the contract keeps), `y = conv(a, w_b, bias) * s` (in float32 under
/// autocast), as the libtorch path gives.
pub fn forward(
    args: &OpFacts,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    act_w: ActW,
    geom: &Geometry,
    training: bool,
) -> Result<Outcome<Forward>> {
    if !foldable(scale.is_some(), bias.is_some()) {
        decline!("a learnable scaling_factor together with a bias");
    }
    let xo = ran!(Ok::<_, Error>(operand_of(&args.x, "the input")));
    let wo = ran!(Ok::<_, Error>(operand_of(&args.weight, "the weight")));
    let dev = ran!(Ok::<_, Error>(ready(xo.index)));
    // The dtype the convolution runs in: autocast's under `torch.autocast("cuda")`
    // (which casts float32, float16 and bfloat16 operands), else the input's.
    let mode = conv_mode(matches!(dev, Launcher::Host))?;
    let ck = mode.autocast.unwrap_or(xo.kind);
    if dtype_code(ck).is_none() {
        decline!("autocast runs the convolution in {ck:?}");
    }
    if mode.autocast.is_none() && wo.kind != xo.kind {
        decline!(
            "input {:?} and weight {:?} differ (libtorch reports it)",
            xo.kind,
            wo.kind
        );
    }
    let stream = current_stream(dev.index())?;
    let std_mode = if training { Std::Compute } else { Std::None };
    let (a, std) = ran!(binarize_activation(&xo, std_mode, ck, dev, stream));
    // Fold the scale into the weight where that loses nothing against scaling the
    // output: the weight keeps its own dtype (no autocast cast of `w_b * s`), and a
    // float32 convolution runs in float32 (cuDNN's TF32 would round `w_b * s` to 11
    // bits, where `w_b` alone is exact).
    // A learnable scale is never folded: its product is kept (see above).
    let fold = scale.is_none() && wo.kind == ck && !(ck == Kind::Float && mode.tf32);
    let op = ran!(weight_operand(
        &wo, act_w, scale, bias, fold, ck, dev, stream
    ));
    let out = a.f_conv2d(
        &op.w_eff,
        op.bias_eff.as_ref(),
        geom.stride,
        geom.padding,
        geom.dilation,
        geom.groups,
    )?;
    let product_kind = facts::kind(&out)?;
    let (y, product) = if fold {
        (out, None)
    } else if let Some(s) = scale {
        // The learnable scale's product is kept: y is a tensor of its own.
        (out.f_mul(&over_channels(s)?)?, Some(out))
    } else {
        let Some(s) = &op.alpha else {
            return Err(Error::Internal("weight_operand returned no alpha".into()));
        };
        let y = if wo.kind == ck {
            // `out` is this op's own and keeps its dtype: scale it in place.
            let mut out = out;
            let _ = out.f_mul_(&over_channels(s)?)?;
            out
        } else {
            // Under autocast: conv_out in ck times s in W's dtype promotes (to float32
            // for float32 weights), as the libtorch route gives.
            out.f_mul(&over_channels(s)?)?
        };
        (y, None)
    };
    Ok(Outcome::Ran(Forward {
        y,
        std,
        alpha: op.alpha,
        product,
        product_kind,
    }))
}

/// The binary convolution's backward on CUDA, the CUDA route of [`crate::conv::backward`]
/// (which validated what it was handed): the same contract and result, from what
/// either route's forward saved (`conv_out` is not read). Declines where [`forward`]
/// does. It always convolves against the folded weight `w_b * s`, so the incoming
/// gradient needs no pass of its own; under TF32 that rounds `w_b * s` where the
/// libtorch route rounds `grad_y * s` instead, errors of one size.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    grad_y: &Tensor,
    saved: &Saved<'_>,
    args: &OpFacts,
    grad_facts: &Facts,
    act_w: ActW,
    geom: &Geometry,
    needs: Needs,
) -> Result<Outcome<Grads>> {
    let scale = saved.scale()?;
    let learnable = matches!(scale, Scale::Learnable(_));
    if !foldable(learnable, saved.has_bias) {
        decline!("a learnable scaling_factor together with a bias");
    }
    let xo = ran!(Ok::<_, Error>(operand_of(&args.x, "the input")));
    let wo = ran!(Ok::<_, Error>(operand_of(&args.weight, "the weight")));
    ran!(Ok::<_, Error>(operand_of(
        grad_facts,
        "the output gradient"
    )));
    let dev = ran!(Ok::<_, Error>(ready(xo.index)));
    let ck = saved.product_kind;
    if dtype_code(ck).is_none() {
        decline!("the convolution ran in {ck:?}");
    }
    let want = WantGrads {
        weight: needs.weight,
        scale: needs.scale && learnable,
        bias: needs.bias && saved.has_bias,
    };
    if !(needs.input || want.weight || want.scale || want.bias) {
        return Ok(Outcome::Ran(Grads {
            input: None,
            weight: None,
            bias: None,
            scale: None,
        }));
    }
    let stream = current_stream(dev.index())?;
    let std_mode = match saved.std {
        Some(s) => Std::Given(s),
        None => Std::None,
    };
    let (a, _) = ran!(binarize_activation(&xo, std_mode, ck, dev, stream));
    let s = scale.tensor();
    let op = ran!(weight_operand(
        &wo,
        act_w,
        Some(s),
        None,
        true,
        ck,
        dev,
        stream
    ));
    let grad_conv = grad_y.f_to_kind(ck)?;
    let (ga, gweff, gbeff) = ffi::convolution_backward(
        &grad_conv,
        &a,
        &op.w_eff,
        geom,
        [needs.input, want.weight || want.scale, want.bias],
    )?;
    let input = match ga {
        Some(ga) => Some(ran!(bireal_backward(&ga, &xo, saved.std, dev, stream))),
        None => None,
    };
    // convolution_backward may return grad_weff in a layout other than W's; the kernel
    // reads it in W's.
    let gweff = match gweff {
        Some(g) => {
            let gf = facts::facts(&g)?;
            if gf.strides == wo.strides() {
                Some(g)
            } else {
                let mut like = wo.empty_like(facts::kind(&g)?)?;
                like.f_copy_(&g)?;
                Some(like)
            }
        }
        None => None,
    };
    let g = ran!(weight_grads(
        gweff.as_ref(),
        gbeff.as_ref(),
        &wo,
        act_w,
        s,
        None,
        want,
        dev,
        stream,
    ));
    Ok(Outcome::Ran(Grads {
        input,
        weight: g.weight,
        bias: g.bias,
        scale: g.scale,
    }))
}
