//! Python bindings of the binary linear layer: the bodies of the `ovsw::binary_linear`
//! custom ops that `ovsw/ops.py` registers. Options are the conv's (`ConvSpec` names);
//! absent tensors follow [`op_args`].

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::binarize::ActW;
use crate::error::{boundary, Error};
use crate::layer::{Needs, Saved};
use crate::{facts, linear, op_args};

/// Four tensors: `(y, std, alpha, product)` forward, the gradients of
/// `(x, weight, bias, scale)` backward.
type Four = (PyTensor, PyTensor, PyTensor, PyTensor);

/// Forward of the binary linear layer, the body of the `ovsw::binary_linear` custom op.
/// Returns `(y, std, alpha, product)` as [`crate::conv`]'s forward binding does, with
/// `product` (`a w_b^T + bias` before scaling) in place of `conv_out`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, scale, act_w, training))]
fn binary_linear_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    scale: Option<PyTensor>,
    act_w: &str,
    training: bool,
) -> PyResult<Four> {
    boundary(|| {
        let act_w = ActW::parse(act_w)?;
        let out = py.allow_threads(move || {
            let f = linear::forward(
                &x,
                &weight,
                bias.as_deref(),
                scale.as_deref(),
                act_w,
                training,
            )?;
            Ok::<_, Error>((
                PyTensor(f.y),
                op_args::or_absent_like(f.std, &x)?,
                op_args::or_absent_like(f.alpha, &weight)?,
                op_args::or_absent(f.product, &x, f.product_kind)?,
            ))
        })?;
        Ok(out)
    })
}

/// Backward of the binary linear layer, the body of `ovsw::binary_linear_backward`:
/// the gradients of `(x, weight, bias, scale)`, absent where `needs` is false.
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight, has_bias, scale, std, alpha, product, act_w, needs))]
#[allow(clippy::too_many_arguments)]
fn binary_linear_backward(
    py: Python<'_>,
    grad_y: PyTensor,
    x: PyTensor,
    weight: PyTensor,
    has_bias: bool,
    scale: Option<PyTensor>,
    std: PyTensor,
    alpha: PyTensor,
    product: PyTensor,
    act_w: &str,
    needs: [bool; 4],
) -> PyResult<Four> {
    boundary(|| {
        let act_w = ActW::parse(act_w)?;
        let needs = Needs {
            input: needs[0],
            weight: needs[1],
            bias: needs[2],
            scale: needs[3],
        };
        let out = py.allow_threads(move || {
            let saved = Saved {
                x: &x,
                weight: &weight,
                has_bias,
                scale: scale.as_deref(),
                std: op_args::present(&std)?,
                alpha: op_args::present(&alpha)?,
                product: op_args::present(&product)?,
                product_kind: facts::kind(&product)?,
            };
            let g = linear::backward(&grad_y, &saved, act_w, needs)?;
            Ok::<_, Error>((
                op_args::or_absent_like(g.input, &x)?,
                op_args::or_absent_like(g.weight, &weight)?,
                op_args::or_absent_like(g.bias, &weight)?,
                op_args::or_absent_like(g.scale, &weight)?,
            ))
        })?;
        Ok(out)
    })
}

/// Adds the linear layer's functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(binary_linear_forward, m)?)?;
    m.add_function(wrap_pyfunction!(binary_linear_backward, m)?)?;
    Ok(())
}
