//! Python bindings of the binary convolution: `ConvSpec` (the options of a binary
//! layer, the linear one's too) and the bodies of the `ovsw::binary_conv2d` custom ops
//! that `ovsw/ops.py` registers, and the CUDA route's fused passes one by one
//! (`_core.cuda_binarize_activation`, ...). They convert arguments, release the GIL around the
//! work and map errors to Python exceptions; absent tensors follow [`op_args`].

use crate::binarize::{self, ActA, ActW, ForwardType};
use crate::conv;
use crate::conv::cuda::{self, Std, WantGrads};
use crate::cuda::operand::operand;
use crate::cuda::py::{on_stream, parse_kind, plan_for};
use crate::cuda::ready;
use crate::error::{boundary, Error};
use crate::ffi;
use crate::geometry::Geometry;
use crate::layer::{Needs, Saved};
use crate::{facts, op_args};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

/// Options of a binary layer (`act_a`, `act_w`, `forward_type`), validated once.
#[pyclass(frozen, module = "ovsw._core")]
#[derive(Clone)]
pub struct ConvSpec {
    act_a: ActA,
    act_w: ActW,
    forward_type: ForwardType,
}

/// `__reduce__`'s answer: the class and its constructor arguments.
type Reduced<'py, A> = PyResult<(Bound<'py, pyo3::types::PyType>, A)>;

#[pymethods]
impl ConvSpec {
    #[new]
    #[pyo3(signature = (act_a = "binary", act_w = "ste", forward_type = "xnor"))]
    fn new(act_a: &str, act_w: &str, forward_type: &str) -> PyResult<Self> {
        boundary(|| {
            Ok(ConvSpec {
                act_a: ActA::parse(act_a)?,
                act_w: ActW::parse(act_w)?,
                forward_type: ForwardType::parse(forward_type)?,
            })
        })
    }

    #[getter]
    fn act_a(&self) -> &'static str {
        self.act_a.name()
    }

    #[getter]
    fn act_w(&self) -> &'static str {
        self.act_w.name()
    }

    #[getter]
    fn forward_type(&self) -> &'static str {
        self.forward_type.name()
    }

    /// Pickling (deepcopy, torch.save of whole modules) rebuilds from the names.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> Reduced<'py, (&'static str, &'static str, &'static str)> {
        boundary(|| {
            let s = slf.get();
            Ok((
                slf.get_type(),
                (s.act_a.name(), s.act_w.name(), s.forward_type.name()),
            ))
        })
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.act_a == other.act_a
            && self.act_w == other.act_w
            && self.forward_type == other.forward_type
    }

    fn __repr__(&self) -> String {
        format!(
            "ConvSpec(act_a='{}', act_w='{}', forward_type='{}')",
            self.act_a.name(),
            self.act_w.name(),
            self.forward_type.name()
        )
    }
}

type Pair = [i64; 2];
/// Four tensors: `(y, std, alpha, conv_out)` forward, the gradients of
/// `(x, weight, bias, scale)` backward; absent ones as [`op_args`] markers.
type Four = (PyTensor, PyTensor, PyTensor, PyTensor);

fn geometry(stride: Pair, padding: Pair, dilation: Pair, groups: i64) -> PyResult<Geometry> {
    Ok(Geometry::new(stride, padding, dilation, groups)?)
}

/// Forward of the binary convolution, the body of the `ovsw::binary_conv2d` custom op.
/// Returns `(y, std, alpha, conv_out)`, what the autograd formula saves for
/// [`binary_conv2d_backward`]. `std` is absent in eval mode, `alpha` when `scale` is
/// given; `conv_out` (the output before scaling) is kept only with a learnable
/// `scale`, and otherwise is an absent marker in the dtype the convolution ran in.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, scale, act_w, stride, padding, dilation, groups, training))]
#[allow(clippy::too_many_arguments)]
fn binary_conv2d_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    scale: Option<PyTensor>,
    act_w: &str,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    training: bool,
) -> PyResult<Four> {
    boundary(|| {
        let geom = geometry(stride, padding, dilation, groups)?;
        let act_w = ActW::parse(act_w)?;
        let out = py.allow_threads(move || {
            let f = conv::forward(
                &x,
                &weight,
                bias.as_deref(),
                scale.as_deref(),
                act_w,
                &geom,
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

/// Backward of the binary convolution, the body of `ovsw::binary_conv2d_backward`:
/// the gradients of `(x, weight, bias, scale)`, absent where `needs` is false. `std`,
/// `alpha` and `conv_out` are the forward's outputs as it returned them.
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight, has_bias, scale, std, alpha, conv_out, act_w, stride, padding, dilation, groups, needs))]
#[allow(clippy::too_many_arguments)]
fn binary_conv2d_backward(
    py: Python<'_>,
    grad_y: PyTensor,
    x: PyTensor,
    weight: PyTensor,
    has_bias: bool,
    scale: Option<PyTensor>,
    std: PyTensor,
    alpha: PyTensor,
    conv_out: PyTensor,
    act_w: &str,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    needs: [bool; 4],
) -> PyResult<Four> {
    boundary(|| {
        let geom = geometry(stride, padding, dilation, groups)?;
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
                product: op_args::present(&conv_out)?,
                product_kind: facts::kind(&conv_out)?,
            };
            let g = conv::backward(&grad_y, &saved, act_w, &geom, needs)?;
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

/// `w_b`, the binarized weight the layer convolves with (SPEC 1.3).
#[pyfunction]
fn binarize_weight(py: Python<'_>, weight: PyTensor, spec: &ConvSpec) -> PyResult<PyTensor> {
    boundary(|| {
        let act_w = spec.act_w;
        let t = py.allow_threads(move || {
            let _guard = ffi::no_grad();
            binarize::binarize_weight(&weight, act_w)
        })?;
        Ok(PyTensor(t))
    })
}

/// `mean_o |W|` per output channel (initial value of a learnable `scaling_factor`).
#[pyfunction]
fn channel_abs_mean(weight: PyTensor) -> PyResult<PyTensor> {
    boundary(|| {
        let _guard = ffi::no_grad();
        Ok(PyTensor(binarize::channel_abs_mean(&weight)?))
    })
}

/// The W-derived per-channel scale alpha of SPEC 1.4.
#[pyfunction]
fn channel_alpha(weight: PyTensor) -> PyResult<PyTensor> {
    boundary(|| {
        let _guard = ffi::no_grad();
        Ok(PyTensor(binarize::channel_alpha(&weight)?))
    })
}

/// The weight binarizers' names (`act_w`), in the order users see them.
#[pyfunction]
fn act_w_names() -> PyResult<Vec<&'static str>> {
    boundary(|| Ok(ActW::names()))
}

/// The activation binarizers' names (`act_a`).
#[pyfunction]
fn act_a_names() -> PyResult<Vec<&'static str>> {
    boundary(|| Ok(ActA::names()))
}

/// The forward types' names (`forward_type`).
#[pyfunction]
fn forward_type_names() -> PyResult<Vec<&'static str>> {
    boundary(|| Ok(ForwardType::names()))
}

// -- the CUDA route's fused passes one by one (`_core.cuda_*`, for kernel-level checks).
// They ask for the kernels explicitly: where they do not apply they raise
// `RuntimeError` with the reason instead of falling back; `stream=` as in
// `crate::cuda::py`.

/// `(a, std)`: `sign(x / std)` in `out_dtype` and the per-sample std (training without
/// `std`); with `std` given, `sign(x / std)` only; with `training=False`, `sign(x)`.
#[pyfunction]
#[pyo3(signature = (x, training, out_dtype, std = None, stream = None))]
fn cuda_binarize_activation(
    py: Python<'_>,
    x: PyTensor,
    training: bool,
    out_dtype: &str,
    std: Option<PyTensor>,
    stream: Option<u64>,
) -> PyResult<(PyTensor, Option<PyTensor>)> {
    boundary(|| {
        let kind = parse_kind(out_dtype)?;
        let plan = plan_for(&x, stream)?;
        let (a, s) = on_stream(py, plan, |stream| {
            Ok(py.allow_threads(move || {
                let mode = match (&std, training) {
                    (Some(s), _) => Std::Given(s),
                    (None, true) => Std::Compute,
                    (None, false) => Std::None,
                };
                let what = "binarize_activation";
                let xo = operand(&x, "the input")?.required(what)?;
                let dev = ready(xo.index).required(what)?;
                cuda::binarize_activation(&xo, mode, kind, dev, stream)?.required(what)
            })?)
        })?;
        Ok((PyTensor(a), s.map(PyTensor)))
    })
}

/// `grad_a * max(0, 2 - 2|x / std|) / std` in x's dtype and layout.
#[pyfunction]
#[pyo3(signature = (grad_a, x, std = None, stream = None))]
fn cuda_bireal_backward(
    py: Python<'_>,
    grad_a: PyTensor,
    x: PyTensor,
    std: Option<PyTensor>,
    stream: Option<u64>,
) -> PyResult<PyTensor> {
    boundary(|| {
        let plan = plan_for(&x, stream)?;
        let out = on_stream(py, plan, |stream| {
            Ok(py.allow_threads(move || {
                let what = "bireal_backward";
                let xo = operand(&x, "the input")?.required(what)?;
                let dev = ready(xo.index).required(what)?;
                cuda::bireal_backward(&grad_a, &xo, std.as_deref(), dev, stream)?.required(what)
            })?)
        })?;
        Ok(PyTensor(out))
    })
}

/// `(w_eff, alpha, bias_eff)`: see `conv::cuda::weight_operand`.
#[pyfunction]
#[pyo3(signature = (weight, act_w, scale, bias, fold, out_dtype, stream = None))]
#[allow(clippy::too_many_arguments)]
fn cuda_weight_operand(
    py: Python<'_>,
    weight: PyTensor,
    act_w: &str,
    scale: Option<PyTensor>,
    bias: Option<PyTensor>,
    fold: bool,
    out_dtype: &str,
    stream: Option<u64>,
) -> PyResult<(PyTensor, Option<PyTensor>, Option<PyTensor>)> {
    boundary(|| {
        let act_w = ActW::parse(act_w)?;
        let kind = parse_kind(out_dtype)?;
        let plan = plan_for(&weight, stream)?;
        let op = on_stream(py, plan, |stream| {
            Ok(py.allow_threads(move || {
                let wo = operand(&weight, "the weight")?.required("weight_operand")?;
                let dev = ready(wo.index).required("weight_operand")?;
                cuda::weight_operand(
                    &wo,
                    act_w,
                    scale.as_deref(),
                    bias.as_deref(),
                    fold,
                    kind,
                    dev,
                    stream,
                )?
                .required("weight_operand")
            })?)
        })?;
        Ok((
            PyTensor(op.w_eff),
            op.alpha.map(PyTensor),
            op.bias_eff.map(PyTensor),
        ))
    })
}

/// `(grad_weight, grad_scale, grad_bias)`: see `conv::cuda::weight_grads`.
#[pyfunction]
#[pyo3(signature = (grad_weff, grad_beff, weight, act_w, s, bias, want, stream = None))]
#[allow(clippy::too_many_arguments)]
fn cuda_weight_grads(
    py: Python<'_>,
    grad_weff: Option<PyTensor>,
    grad_beff: Option<PyTensor>,
    weight: PyTensor,
    act_w: &str,
    s: PyTensor,
    bias: Option<PyTensor>,
    want: (bool, bool, bool),
    stream: Option<u64>,
) -> PyResult<(Option<PyTensor>, Option<PyTensor>, Option<PyTensor>)> {
    boundary(|| {
        let act_w = ActW::parse(act_w)?;
        let plan = plan_for(&weight, stream)?;
        let want = WantGrads {
            weight: want.0,
            scale: want.1,
            bias: want.2,
        };
        let g = on_stream(py, plan, |stream| {
            Ok(py.allow_threads(move || {
                let wo = operand(&weight, "the weight")?.required("weight_grads")?;
                let dev = ready(wo.index).required("weight_grads")?;
                cuda::weight_grads(
                    grad_weff.as_deref(),
                    grad_beff.as_deref(),
                    &wo,
                    act_w,
                    &s,
                    bias.as_deref(),
                    want,
                    dev,
                    stream,
                )?
                .required("weight_grads")
            })?)
        })?;
        Ok((
            g.weight.map(PyTensor),
            g.scale.map(PyTensor),
            g.bias.map(PyTensor),
        ))
    })
}

/// Adds the conv's classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ConvSpec>()?;
    m.add_function(wrap_pyfunction!(act_w_names, m)?)?;
    m.add_function(wrap_pyfunction!(act_a_names, m)?)?;
    m.add_function(wrap_pyfunction!(forward_type_names, m)?)?;
    m.add_function(wrap_pyfunction!(binary_conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(binary_conv2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(binarize_weight, m)?)?;
    m.add_function(wrap_pyfunction!(channel_abs_mean, m)?)?;
    m.add_function(wrap_pyfunction!(channel_alpha, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_binarize_activation, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_bireal_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_operand, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_grads, m)?)?;
    Ok(())
}
