//! The binary fully connected layer of ovsw (`OvSWLinear`): the binary layer of
//! [`crate::layer`] with a matrix product in place of the convolution, forward and
//! backward.
//!
//! `x` is `[N, *, in]` with the sample in dim 0. The op validates its arguments, picks
//! its route's [`binarize::Elementwise`] parts once and runs the layer skeleton
//! ([`layer::forward`], [`layer::backward`]) with the product [`Linear`]:
//! `a w_b^T + bias` through libtorch's `linear` (BLAS on the CPU, cuBLAS on CUDA,
//! `torch.autocast` applies; with operands in {-1, 0, +1} it is exact, an integer below
//! 2^24), alpha per output feature, and for the backward two matrix products. It has
//! no fused CUDA route: CUDA tensors take libtorch's ops.

pub mod py;

use tch::{Kind, Tensor};

use crate::binarize::{self, ActW};
use crate::error::{value_err, Result};
use crate::facts::{self, check_float, Facts, Route};
use crate::ffi;
use crate::layer::{
    self, check_same_device, check_saved_parts, check_vectors, Forward, Grads, Needs, Operands,
    Product, Saved,
};

/// The matrix product of a binary linear layer: `[N, *, in]` activations against an
/// `[out, in]` weight.
pub struct Linear {
    /// The dims of the input (and the output).
    dims: usize,
    in_features: i64,
    out_features: i64,
}

impl Product for Linear {
    const NAME: &'static str = "product";

    fn dims(&self) -> usize {
        self.dims
    }

    fn channel(&self) -> usize {
        self.dims - 1
    }

    fn forward(&self, a: &Tensor, wb: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(a.f_linear(wb, bias)?)
    }

    fn backward(
        &self,
        grad: &Tensor,
        kind: Kind,
        operands: &Operands<'_>,
        [input, weight, bias]: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        // Every dim but the last is a row of the product.
        let rows: Vec<i64> = (0..self.dims as i64 - 1).collect();
        let grad_bias = if bias {
            Some(grad.f_sum_dim_intlist(rows.as_slice(), false, None::<Kind>)?)
        } else {
            None
        };
        let grad = grad.f_to_kind(kind)?;
        let grad_a = if input {
            Some(grad.f_matmul(operands.wb()?)?)
        } else {
            None
        };
        let grad_wb = if weight {
            let (i, o) = (self.in_features, self.out_features);
            Some(
                grad.f_reshape([-1, o])?
                    .f_tr()?
                    .f_mm(&operands.a()?.f_reshape([-1, i])?)?,
            )
        } else {
            None
        };
        Ok([grad_a, grad_wb, grad_bias])
    }
}

/// `(x facts, the product)` after checking the input and weight; names the first
/// problem.
fn validate_operands(x: &Tensor, weight: &Tensor, x_name: &str) -> Result<(Facts, Linear)> {
    let xf = facts::facts(x)?;
    if xf.dim() < 2 {
        return value_err!(
            "OvSWLinear expects an input [N, *, in_features] with a batch dim (per-sample \
             normalisation), got {x_name} of shape {:?}",
            xf.sizes
        );
    }
    check_float(&xf, x_name)?;
    let wf = facts::facts(weight)?;
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
    let product = Linear {
        dims: xf.dim(),
        in_features: i,
        out_features: o,
    };
    Ok((xf, product))
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
    let (xf, product) = validate_operands(x, weight, "input")?;
    check_vectors(&xf, product.out_features, bias, scale)?;
    let _guard = ffi::no_grad();
    let k = binarize::for_route(Route::of(&[x])?);
    layer::forward(&product, k, x, weight, bias, scale, act_w, training)
}

/// Checks what the backward was handed; returns the product and the weight's dtype.
fn validate_saved(grad_y: &Tensor, saved: &Saved<'_>) -> Result<(Linear, Kind)> {
    let (xf, product) = validate_operands(saved.x, saved.weight, "x")?;
    let o = product.out_features;
    let weight_kind = facts::kind(saved.weight)?;
    let gf = facts::facts(grad_y)?;
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
    check_saved_parts(&xf, &gf, o, saved, Linear::NAME)?;
    Ok((product, weight_kind))
}

/// Backward of the binary linear layer, given the gradient of its output.
pub fn backward(grad_y: &Tensor, saved: &Saved<'_>, act_w: ActW, needs: Needs) -> Result<Grads> {
    let (product, weight_kind) = validate_saved(grad_y, saved)?;
    let _guard = ffi::no_grad();
    let mut activations = vec![saved.x];
    activations.extend(saved.std);
    let k = binarize::for_route(Route::of(&activations)?);
    layer::backward(&product, k, grad_y, saved, act_w, needs, weight_kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
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
