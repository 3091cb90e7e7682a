//! Python bindings of the binary convolution: `ConvSpec` and the functions the
//! autograd glue in `ovsw/nn.py` calls. They convert arguments, release the GIL around
//! the work and map errors to Python exceptions.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use crate::binarize::{self, ActA, ActW, ForwardType};
use crate::conv;
use crate::error::{boundary, Error};
use crate::ffi;
use crate::geometry::Geometry;

/// Options of a binary convolution (`act_a`, `act_w`, `forward_type`), validated once.
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

/// The conv dtype crosses to Python and back as a small integer.
fn kind_code(k: Kind) -> i32 {
    match k {
        Kind::Half => 1,
        Kind::BFloat16 => 2,
        Kind::Double => 3,
        _ => 0,
    }
}

fn kind_from_code(c: i32) -> PyResult<Kind> {
    match c {
        0 => Ok(Kind::Float),
        1 => Ok(Kind::Half),
        2 => Ok(Kind::BFloat16),
        3 => Ok(Kind::Double),
        _ => Err(Error::Value(format!("invalid conv dtype code {c}")).into()),
    }
}

type Pair = (i64, i64);
/// `(y, std, alpha, conv_out, conv_dtype)`.
type ForwardOut = (
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    i32,
);
/// Gradients of `(x, weight, bias, scale)`.
type BackwardOut = (
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
);

fn geometry(stride: Pair, padding: Pair, dilation: Pair, groups: i64) -> PyResult<Geometry> {
    Ok(Geometry::new(
        [stride.0, stride.1],
        [padding.0, padding.1],
        [dilation.0, dilation.1],
        groups,
    )?)
}

fn opt(t: Option<Tensor>) -> Option<PyTensor> {
    t.map(PyTensor)
}

/// Forward of the binary convolution. Returns `(y, std, alpha, conv_out, conv_dtype)`:
/// what the autograd glue saves for [`binary_conv2d_backward`].
#[pyfunction]
#[pyo3(signature = (x, weight, bias, scale, spec, stride, padding, dilation, groups, training))]
#[allow(clippy::too_many_arguments)]
fn binary_conv2d_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    scale: Option<PyTensor>,
    spec: &ConvSpec,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    training: bool,
) -> PyResult<ForwardOut> {
    boundary(|| {
        let geom = geometry(stride, padding, dilation, groups)?;
        let act_w = spec.act_w;
        let f = py.allow_threads(move || {
            conv::forward(
                &x,
                &weight,
                bias.as_deref(),
                scale.as_deref(),
                act_w,
                &geom,
                training,
            )
        })?;
        Ok((
            PyTensor(f.y),
            opt(f.std),
            opt(f.alpha),
            opt(f.conv_out),
            kind_code(f.conv_kind),
        ))
    })
}

/// Backward of the binary convolution. Returns the gradients of
/// `(x, weight, bias, scale)`, `None` where `needs` is false.
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight, has_bias, scale, std, alpha, conv_out, conv_dtype, spec, stride, padding, dilation, groups, needs))]
#[allow(clippy::too_many_arguments)]
fn binary_conv2d_backward(
    py: Python<'_>,
    grad_y: PyTensor,
    x: PyTensor,
    weight: PyTensor,
    has_bias: bool,
    scale: Option<PyTensor>,
    std: Option<PyTensor>,
    alpha: Option<PyTensor>,
    conv_out: Option<PyTensor>,
    conv_dtype: i32,
    spec: &ConvSpec,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    needs: (bool, bool, bool, bool),
) -> PyResult<BackwardOut> {
    boundary(|| {
        let geom = geometry(stride, padding, dilation, groups)?;
        let conv_kind = kind_from_code(conv_dtype)?;
        let act_w = spec.act_w;
        let needs = conv::Needs {
            input: needs.0,
            weight: needs.1,
            bias: needs.2,
            scale: needs.3,
        };
        let g = py.allow_threads(move || {
            let saved = conv::Saved {
                x: &x,
                weight: &weight,
                has_bias,
                scale: scale.as_deref(),
                std: std.as_deref(),
                alpha: alpha.as_deref(),
                conv_out: conv_out.as_deref(),
                conv_kind,
            };
            conv::backward(&grad_y, &saved, act_w, &geom, needs)
        })?;
        Ok((opt(g.input), opt(g.weight), opt(g.bias), opt(g.scale)))
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
