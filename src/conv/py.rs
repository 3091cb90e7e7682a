//! Python bindings of the binary convolution: `ConvSpec` (the options of a binary
//! layer, the linear one's too) and the bodies of the `ovsw::binary_conv2d` custom ops
//! that `ovsw/ops.py` registers. They convert arguments, release the GIL around the
//! work and map errors to Python exceptions; absent tensors follow [`op_args`].

use crate::binarize::{self, ActA, ActW, ForwardType};
use crate::conv;
use crate::error::{boundary, Error};
use crate::ffi;
use crate::geometry::Geometry;
use crate::{op_args, tensor};
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
                op_args::or_absent(f.conv_out, &x, f.conv_kind)?,
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
        let needs = conv::Needs {
            input: needs[0],
            weight: needs[1],
            bias: needs[2],
            scale: needs[3],
        };
        let out = py.allow_threads(move || {
            let saved = conv::Saved {
                x: &x,
                weight: &weight,
                has_bias,
                scale: scale.as_deref(),
                std: op_args::present(&std)?,
                alpha: op_args::present(&alpha)?,
                conv_out: op_args::present(&conv_out)?,
                conv_kind: tensor::kind(&conv_out)?,
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
    Ok(())
}
