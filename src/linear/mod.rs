//! The binary fully connected layer of ovsw (`OvSWLinear`): SPEC section 1 with a
//! matrix product in place of the convolution, forward and backward.
//!
//! `x` is `[N, *, in]` with the sample in dim 0. The forward runs the same steps as the
//! convolution ([`crate::conv`]) on the same [`binarize::Kernels`], chosen once per op:
//! per-sample std over every dim but the first (training only), `a = sign(x / std)`,
//! the binarized weight `w_b` (`[O, in]`), `y = (a w_b^T + bias) * alpha` with alpha per
//! output feature (learnable `scaling_factor` or derived from W). The product goes
//! through libtorch's `linear` (BLAS on the CPU, cuBLAS on CUDA, `torch.autocast`
//! applies); with operands in {-1, 0, +1} it is exact, an integer below 2^24. The
//! backward is written out like the conv's: two matrix products for the product's
//! gradients, the binarizers' surrogate gradients elementwise, no autograd graph.

pub mod py;

use tch::{Kind, Tensor};

use crate::binarize::{self, ActW};
use crate::conv::{check_channel_vector, check_same_device, check_saved_parts, Grads, Needs};
use crate::error::{value_err, Error, Result};
use crate::ffi;
use crate::tensor::{self, check_float, Facts};

/// What the forward keeps for the backward besides the input and weight.
pub struct Forward {
    /// The layer output `(a w_b^T + bias) * alpha`, `[N, *, O]`.
    pub y: Tensor,
    /// Per-sample `sqrt(Var(x_n) + eps)`, shape `[N, 1, ..., 1]`; `None` in eval mode.
    pub std: Option<Tensor>,
    /// The per-feature scale recomputed from W (shape `[O]`); `None` when the layer
    /// owns a learnable `scaling_factor`.
    pub alpha: Option<Tensor>,
    /// `a w_b^T + bias` before scaling, kept only for a learnable scale's gradient.
    pub product: Option<Tensor>,
    /// The dtype the product ran in (differs from the input's under autocast).
    pub product_kind: Kind,
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
    pub product: Option<&'a Tensor>,
    pub product_kind: Kind,
}

/// `(x facts, in, out)` after checking the input and weight; names the first problem.
fn validate_operands(x: &Tensor, weight: &Tensor, x_name: &str) -> Result<(Facts, i64, i64)> {
    let xf = tensor::facts(x)?;
    if xf.dim() < 2 {
        return value_err!(
            "OvSWLinear expects an input [N, *, in_features] with a batch dim (per-sample \
             normalisation), got {x_name} of shape {:?}",
            xf.sizes
        );
    }
    check_float(&xf, x_name)?;
    let wf = tensor::facts(weight)?;
    if wf.dim() != 2 {
        return value_err!(
            "weight must be 2-D [out_features, in_features], got shape {:?}",
            wf.sizes
        );
    }
    check_float(&wf, "weight")?;
    check_same_device(&wf, &xf, "weight")?;
    let (o, i) = (wf.sizes[0], wf.sizes[1]);
    let last = xf.sizes[xf.dim() - 1];
    if last != i {
        return value_err!(
            "{x_name} has {last} features (shape {:?}) but the layer expects in_features={i}",
            xf.sizes
        );
    }
    Ok((xf, i, o))
}

/// Forward of the binary linear layer.
pub fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    act_w: ActW,
    training: bool,
) -> Result<Forward> {
    let (xf, _, o) = validate_operands(x, weight, "input")?;
    if let Some(b) = bias {
        check_channel_vector(b, &xf, o, "bias")?;
    }
    if let Some(s) = scale {
        check_channel_vector(s, &xf, o, "scaling_factor")?;
    }
    let _guard = ffi::no_grad();
    let k = binarize::kernels_for(&[x])?;
    let std = if training {
        Some(k.sample_std(x)?)
    } else {
        None
    };
    let a = k.sign(x, std.as_ref())?;
    let wb = k.binarize_weight(weight, act_w)?;
    let product = a.f_linear(&wb, bias)?;
    let product_kind = tensor::kind(&product)?;
    // [O] broadcasts over the last dim of [N, *, O].
    let (y, alpha, product) = match scale {
        Some(s) => (product.f_mul(s)?, None, Some(product)),
        None => {
            let alpha = k.channel_alpha(weight)?;
            (product.f_mul(&alpha)?, Some(alpha), None)
        }
    };
    Ok(Forward {
        y,
        std,
        alpha,
        product,
        product_kind,
    })
}

/// Checks what the backward was handed; returns `(in, out, weight dtype)`.
fn validate_saved(grad_y: &Tensor, saved: &Saved<'_>) -> Result<(i64, i64, Kind)> {
    let (xf, i, o) = validate_operands(saved.x, saved.weight, "x")?;
    let weight_kind = tensor::kind(saved.weight)?;
    let gf = tensor::facts(grad_y)?;
    check_float(&gf, "grad_output")?;
    let mut expected = xf.sizes.clone();
    let last = expected.len() - 1;
    expected[last] = o;
    if gf.sizes != expected {
        return value_err!(
            "grad_output has shape {:?}, expected {expected:?}",
            gf.sizes
        );
    }
    check_saved_parts(
        &xf,
        &gf,
        o,
        saved.std,
        [saved.scale, saved.alpha],
        saved.product.map(|p| (p, "product")),
    )?;
    Ok((i, o, weight_kind))
}

/// Backward of the binary linear layer, given the gradient of its output.
pub fn backward(grad_y: &Tensor, saved: &Saved<'_>, act_w: ActW, needs: Needs) -> Result<Grads> {
    let (i, o, weight_kind) = validate_saved(grad_y, saved)?;
    let _guard = ffi::no_grad();
    let (x, weight) = (saved.x, saved.weight);
    // Every dim of x but the last is a row of the product.
    let all_but_last: Vec<i64> = (0..tensor::dim(grad_y)? as i64 - 1).collect();

    // y = product * s: d/d product = grad_y * s, d/d s = sum(grad_y * product).
    let (scale, grad_scale) = match (saved.scale, saved.alpha) {
        (Some(s), _) => {
            let gs = if needs.scale {
                let product = saved
                    .product
                    .ok_or_else(|| Error::Value("missing product for a learnable scale".into()))?;
                Some(
                    grad_y
                        .f_mul(product)?
                        .f_sum_dim_intlist(all_but_last.as_slice(), false, None::<Kind>)?
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
    let grad_product = grad_y.f_mul(scale)?;
    let bias = if needs.bias && saved.has_bias {
        Some(
            grad_product
                .f_sum_dim_intlist(all_but_last.as_slice(), false, None::<Kind>)?
                .f_to_kind(weight_kind)?,
        )
    } else {
        None
    };
    if !(needs.input || needs.weight) {
        return Ok(Grads {
            input: None,
            weight: None,
            bias,
            scale: grad_scale,
        });
    }

    // Recompute the binarized operands in the dtype the forward product ran in.
    let mut activations = vec![x];
    activations.extend(saved.std);
    let k = binarize::kernels_for(&activations)?;
    let kind = saved.product_kind;
    let grad_product = grad_product.f_to_kind(kind)?;
    let input = if needs.input {
        let wb = k.binarize_weight(weight, act_w)?.f_to_kind(kind)?;
        let grad_a = grad_product.f_matmul(&wb)?;
        Some(k.bireal_backward(&grad_a, x, saved.std)?)
    } else {
        None
    };
    let weight_g = if needs.weight {
        let a = k.sign(x, saved.std)?.f_to_kind(kind)?;
        let grad_wb = grad_product
            .f_reshape([-1, o])?
            .f_tr()?
            .f_mm(&a.f_reshape([-1, i])?)?;
        Some(k.weight_grad(&grad_wb, weight, act_w)?)
    } else {
        None
    };
    Ok(Grads {
        input,
        weight: weight_g,
        bias,
        scale: grad_scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).reshape(shape)
    }

    #[test]
    fn eval_forward_is_the_scaled_sign_product() {
        let x = t(&[0.5, -2.0, 0.0, 3.0, -1.0, 1.0], &[2, 3]);
        let w = t(&[1.0, -1.0, 2.0, -0.5, -0.5, 0.25], &[2, 3]);
        let s = t(&[2.0, 0.5], &[2]);
        let bias = t(&[1.0, -1.0], &[2]);
        let f = forward(&x, &w, Some(&bias), Some(&s), ActW::Ste, false).expect("forward");
        // sign(x) = [[1, -1, 0], [1, -1, 1]], sign(W) = [[1, -1, 1], [-1, -1, 1]]
        // products [[2, 0], [3, 1]], + bias [[3, -1], [4, 0]], * s
        let expected = t(&[6.0, -0.5, 8.0, 0.0], &[2, 2]);
        assert!(f.y.allclose(&expected, 0.0, 0.0, false), "{}", f.y);
        assert!(f.std.is_none() && f.alpha.is_none());
        assert_eq!(f.product.expect("kept for the scale").size(), [2, 2]);
        assert_eq!(f.product_kind, Kind::Float);
    }

    #[test]
    fn backward_matches_the_chain_rule() {
        // eval mode, learnable scale: grad_x = (g * s) sign(W) * max(0, 2 - 2|x|)
        let x = t(&[0.25, -2.0, 0.5, 0.75], &[2, 2]);
        let w = t(&[1.0, -1.0, 0.5, 2.0], &[2, 2]);
        let s = t(&[2.0, 3.0], &[2]);
        let f = forward(&x, &w, None, Some(&s), ActW::Ste, false).expect("forward");
        let g = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let saved = Saved {
            x: &x,
            weight: &w,
            has_bias: false,
            scale: Some(&s),
            std: None,
            alpha: None,
            product: f.product.as_ref(),
            product_kind: f.product_kind,
        };
        let needs = Needs {
            input: true,
            weight: true,
            bias: false,
            scale: true,
        };
        let grads = backward(&g, &saved, ActW::Ste, needs).expect("backward");
        // g*s = [[2, 3], [2, 3]], sign(W) = [[1, -1], [1, 1]]: (g*s) sign(W) has rows
        // [2 + 3, -2 + 3] = [5, 1]; the surrogate max(0, 2 - 2|x|) is [[1.5, 0], [1, 0.5]]
        let gx = t(&[7.5, 0.0, 5.0, 0.5], &[2, 2]);
        let input = grads.input.expect("input grad");
        assert!(input.allclose(&gx, 0.0, 0.0, false), "{input}");
        // grad_W = (g*s)^T sign(x): sign(x) = [[1, -1], [1, 1]] -> [[4, 0], [6, 0]]
        let gw = t(&[4.0, 0.0, 6.0, 0.0], &[2, 2]);
        let weight = grads.weight.expect("weight grad");
        assert!(weight.allclose(&gw, 0.0, 0.0, false), "{weight}");
        // grad_s = sum over rows of g * product
        let product = f.product.expect("product");
        let gs = product.sum_dim_intlist([0i64].as_slice(), false, None::<Kind>);
        let scale = grads.scale.expect("scale grad");
        assert!(scale.allclose(&gs, 0.0, 0.0, false), "{scale}");
        assert!(grads.bias.is_none());
    }

    #[test]
    fn shapes_are_checked() {
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([4, 5], (Kind::Float, Device::Cpu));
        let r = forward(&x, &w, None, None, ActW::Ste, true);
        assert!(matches!(r, Err(Error::Value(m)) if m.contains("in_features=5")));
        let x1 = Tensor::ones([5], (Kind::Float, Device::Cpu));
        let r = forward(&x1, &w, None, None, ActW::Ste, true);
        assert!(matches!(r, Err(Error::Value(m)) if m.contains("batch dim")));
    }
}
