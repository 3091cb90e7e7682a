//! `ovsw._core`: the compute core of the ovsw package.
//!
//! The math lives in [`conv`] (the binary convolution, SPEC section 1) and [`ovsw`]
//! (AGS and SAD, sections 2 and 3), and [`deploy`] runs exported networks by XNOR and
//! popcount without PyTorch. This file is the one thin bindings layer: it
//! converts arguments, releases the GIL around the work and maps errors to Python
//! exceptions.

pub mod conv;
pub mod cuda;
pub mod deploy;
pub mod error;
mod ffi;
mod kernels;
pub mod ovsw;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use crate::conv::{ActA, ActW, Geometry};
use crate::error::Error;

/// Options of a binary convolution (`act_a`, `act_w`, `forward_type`), validated once.
#[pyclass(frozen, module = "ovsw._core")]
#[derive(Clone)]
pub struct ConvSpec {
    act_w: ActW,
}

#[pymethods]
impl ConvSpec {
    #[new]
    #[pyo3(signature = (act_a = "binary", act_w = "ste", forward_type = "xnor"))]
    fn new(act_a: &str, act_w: &str, forward_type: &str) -> PyResult<Self> {
        ActA::parse(act_a)?;
        conv::check_forward_type(forward_type)?;
        Ok(ConvSpec {
            act_w: ActW::parse(act_w)?,
        })
    }

    #[getter]
    fn act_a(&self) -> &'static str {
        "binary"
    }

    #[getter]
    fn act_w(&self) -> &'static str {
        self.act_w.name()
    }

    #[getter]
    fn forward_type(&self) -> &'static str {
        "xnor"
    }

    /// Pickling (deepcopy, torch.save of whole modules) rebuilds from the names.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> Reduced<'py, (&'static str, &'static str, &'static str)> {
        Ok((slf.get_type(), ("binary", slf.get().act_w.name(), "xnor")))
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.act_w == other.act_w
    }

    fn __repr__(&self) -> String {
        format!(
            "ConvSpec(act_a='binary', act_w='{}', forward_type='xnor')",
            self.act_w.name()
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
/// `__reduce__`'s answer: the class and its constructor arguments.
type Reduced<'py, A> = PyResult<(Bound<'py, pyo3::types::PyType>, A)>;
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
}

/// `w_b`, the binarized weight the layer convolves with (SPEC 1.3).
#[pyfunction]
fn binarize_weight(py: Python<'_>, weight: PyTensor, spec: &ConvSpec) -> PyResult<PyTensor> {
    let act_w = spec.act_w;
    let t = py.allow_threads(move || {
        let _guard = tch::no_grad_guard();
        conv::binarize_weight(&weight, act_w)
    })?;
    Ok(PyTensor(t))
}

/// `mean_o |W|` per output channel (initial value of a learnable `scaling_factor`).
#[pyfunction]
fn channel_abs_mean(weight: PyTensor) -> PyResult<PyTensor> {
    let _guard = tch::no_grad_guard();
    Ok(PyTensor(conv::channel_abs_mean(&weight)?))
}

/// The W-derived per-channel scale alpha of SPEC 1.4.
#[pyfunction]
fn channel_alpha(weight: PyTensor) -> PyResult<PyTensor> {
    let _guard = tch::no_grad_guard();
    if weight.dim() != 4 {
        return Err(
            Error::Value(format!("weight must be 4-D, got shape {:?}", weight.size())).into(),
        );
    }
    Ok(PyTensor(conv::channel_alpha(&weight)?))
}

/// OvSW's AGS and SAD settings (SPEC sections 2 and 3), validated on construction.
#[pyclass(frozen, module = "ovsw._core")]
pub struct OvSWConfig {
    cfg: ovsw::Config,
}

#[pymethods]
impl OvSWConfig {
    #[new]
    #[pyo3(signature = (enable_ags = false, delta = 0.01, enable_dampen = false, dampen_weight = 0.0,
                        track_momentum = 0.999, track_threshold = 1e-4, track_ones = false))]
    fn new(
        enable_ags: bool,
        delta: f64,
        enable_dampen: bool,
        dampen_weight: f64,
        track_momentum: f64,
        track_threshold: f64,
        track_ones: bool,
    ) -> PyResult<Self> {
        let cfg = ovsw::Config::new(
            enable_ags,
            delta,
            enable_dampen,
            dampen_weight,
            track_momentum,
            track_threshold,
            track_ones,
        )?;
        Ok(OvSWConfig { cfg })
    }

    #[getter]
    fn enable_ags(&self) -> bool {
        self.cfg.enable_ags
    }
    #[getter]
    fn delta(&self) -> f64 {
        self.cfg.delta
    }
    #[getter]
    fn enable_dampen(&self) -> bool {
        self.cfg.enable_dampen
    }
    #[getter]
    fn dampen_weight(&self) -> f64 {
        self.cfg.dampen_weight
    }
    #[getter]
    fn track_momentum(&self) -> f64 {
        self.cfg.track_momentum
    }
    #[getter]
    fn track_threshold(&self) -> f64 {
        self.cfg.track_threshold
    }
    #[getter]
    fn track_ones(&self) -> bool {
        self.cfg.track_ones
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> Reduced<'py, (bool, f64, bool, f64, f64, f64, bool)> {
        let c = slf.get().cfg;
        Ok((
            slf.get_type(),
            (
                c.enable_ags,
                c.delta,
                c.enable_dampen,
                c.dampen_weight,
                c.track_momentum,
                c.track_threshold,
                c.track_ones,
            ),
        ))
    }

    fn __repr__(&self) -> String {
        let c = &self.cfg;
        format!(
            "OvSWConfig(enable_ags={}, delta={}, enable_dampen={}, dampen_weight={}, \
             track_momentum={}, track_threshold={}, track_ones={})",
            py_bool(c.enable_ags),
            c.delta,
            py_bool(c.enable_dampen),
            c.dampen_weight,
            c.track_momentum,
            c.track_threshold,
            py_bool(c.track_ones)
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Fresh SAD buffers for a weight: `(tracker, weight_prev)`.
#[pyfunction]
fn sad_initial_state(weight: PyTensor, track_ones: bool) -> PyResult<(PyTensor, PyTensor)> {
    let (t, p) = ovsw::initial_state(&weight, track_ones)?;
    Ok((PyTensor(t), PyTensor(p)))
}

/// AGS then SAD on every layer, in place on the gradients and SAD buffers. Returns one
/// `(ags_ratio, silent_ratio)` pair per layer (`None` for a disabled part).
#[pyfunction]
fn ags_sad_step(
    py: Python<'_>,
    config: &OvSWConfig,
    grads: Vec<PyTensor>,
    weights: Vec<PyTensor>,
    trackers: Vec<Option<PyTensor>>,
    weight_prevs: Vec<Option<PyTensor>>,
) -> PyResult<Vec<(Option<f64>, Option<f64>)>> {
    let n = weights.len();
    if grads.len() != n || trackers.len() != n || weight_prevs.len() != n {
        return Err(Error::Value(format!(
            "ags_sad_step: got {} grads, {n} weights, {} trackers and {} weight_prevs",
            grads.len(),
            trackers.len(),
            weight_prevs.len()
        ))
        .into());
    }
    let cfg = config.cfg;
    let stats = py.allow_threads(move || {
        let layers: Vec<ovsw::Layer<'_>> = (0..n)
            .map(|i| ovsw::Layer {
                grad: &grads[i],
                weight: &weights[i],
                tracker: trackers[i].as_deref(),
                weight_prev: weight_prevs[i].as_deref(),
            })
            .collect();
        ovsw::step(&cfg, &layers)
    })?;
    Ok(stats
        .into_iter()
        .map(|s| (s.ags_ratio, s.silent_ratio))
        .collect())
}

// -- deploy engine ----------------------------------------------------------------------

/// A bit-packed network loaded from an `ovsw.deploy.export` file (see `ovsw.deploy`).
#[pyclass(module = "ovsw._core", name = "DeployEngine")]
pub struct DeployEngine {
    engine: deploy::Engine,
}

/// An NCHW float32 numpy array as the engine's NHWC tensor, or a clear error.
fn input_tensor(x: &Bound<'_, PyAny>) -> PyResult<deploy::tensor::Tensor4> {
    use numpy::{
        PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
    };
    let py = x.py();
    let untyped = x.downcast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a float32 numpy array of shape (N, C, H, W), got {}",
            x.get_type()
                .name()
                .map_or_else(|_| "an unknown object".to_owned(), |n| n.to_string())
        ))
    })?;
    if !untyped.dtype().is_equiv_to(&numpy::dtype::<f32>(py)) {
        return Err(PyTypeError::new_err(format!(
            "expected a float32 array, got dtype {} (use x.astype(numpy.float32))",
            untyped.dtype()
        )));
    }
    let shape = untyped.shape().to_vec();
    if shape.len() != 4 {
        return Err(PyValueError::new_err(format!(
            "expected an input of shape (N, C, H, W), got shape {shape:?}"
        )));
    }
    let array = x.downcast::<PyArrayDyn<f32>>()?.readonly();
    let view = array.as_array();
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let tensor = match view.as_slice() {
        Some(s) => deploy::tensor::Tensor4::from_nchw(s, n, c, h, w),
        None => {
            let owned: Vec<f32> = view.iter().copied().collect();
            deploy::tensor::Tensor4::from_nchw(&owned, n, c, h, w)
        }
    };
    Ok(tensor?)
}

/// The engine's output as numpy: `(N, K)` when it is one pixel, else `(N, C, H, W)`.
fn output_array(py: Python<'_>, y: deploy::tensor::Tensor4) -> PyResult<Bound<'_, PyAny>> {
    use numpy::{PyArray1, PyArrayMethods};
    let flat = y.h == 1 && y.w == 1;
    let (n, c, h, w) = (y.n, y.c, y.h, y.w);
    let data = if flat { y.into_data() } else { y.to_nchw() };
    let array = PyArray1::from_vec(py, data);
    let reshaped = if flat {
        array.reshape([n, c])?.into_any()
    } else {
        array.reshape([n, c, h, w])?.into_any()
    };
    Ok(reshaped)
}

#[pymethods]
impl DeployEngine {
    #[new]
    #[pyo3(signature = (data, threads, kernel = "auto"))]
    fn new(py: Python<'_>, data: &[u8], threads: usize, kernel: &str) -> PyResult<Self> {
        let kernel = deploy::bitconv::Kernel::parse(kernel)?;
        let engine = py.allow_threads(|| deploy::Engine::from_bytes(data, threads, kernel))?;
        Ok(DeployEngine { engine })
    }

    /// Runs the network on a float32 NCHW array; returns float32 logits.
    fn __call__<'py>(&self, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = x.py();
        let input = input_tensor(x)?;
        let y = py.allow_threads(|| self.engine.run(input))?;
        output_array(py, y)
    }

    /// Runs once; returns (output, [(name, op, output NCHW shape, seconds), ...]).
    #[allow(clippy::type_complexity)]
    fn profile<'py>(
        &self,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        Vec<(String, &'static str, [usize; 4], f64)>,
    )> {
        let py = x.py();
        let input = input_tensor(x)?;
        let (y, times) = py.allow_threads(|| self.engine.profile(input))?;
        let times = times
            .into_iter()
            .map(|t| (t.name, t.op, t.out_shape, t.seconds))
            .collect();
        Ok((output_array(py, y)?, times))
    }

    /// Runs the one op `name` on `x` (and `residual`), NCHW float32 arrays.
    #[pyo3(signature = (name, x, residual = None))]
    fn run_op<'py>(
        &self,
        name: &str,
        x: &Bound<'py, PyAny>,
        residual: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = x.py();
        let input = input_tensor(x)?;
        let residual = residual.map(input_tensor).transpose()?;
        let y = py.allow_threads(|| self.engine.run_op(name, input, residual))?;
        output_array(py, y)
    }

    #[getter]
    fn threads(&self) -> usize {
        self.engine.threads()
    }

    #[setter]
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        Ok(self.engine.set_threads(threads)?)
    }

    #[getter]
    fn kernel(&self) -> &'static str {
        self.engine.kernel.name()
    }

    #[getter]
    fn input_channels(&self) -> usize {
        self.engine.input_channels
    }

    /// `(name, op)` of every op in execution order.
    #[getter]
    fn ops(&self) -> Vec<(String, &'static str)> {
        self.engine.ops()
    }

    /// The file's JSON header (metadata, graph and tensor table) as a string.
    #[getter]
    fn header_json(&self) -> String {
        self.engine.header.to_string()
    }
}

/// Kernels this CPU can run, best first (`"portable"` always).
#[pyfunction]
fn deploy_kernels() -> Vec<&'static str> {
    deploy::bitconv::Kernel::NAMES
        .iter()
        .rev()
        .copied()
        .filter(|n| deploy::bitconv::Kernel::parse(n).is_ok())
        .collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ConvSpec>()?;
    m.add_class::<OvSWConfig>()?;
    m.add_function(wrap_pyfunction!(binary_conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(binary_conv2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(binarize_weight, m)?)?;
    m.add_function(wrap_pyfunction!(channel_abs_mean, m)?)?;
    m.add_function(wrap_pyfunction!(channel_alpha, m)?)?;
    m.add_function(wrap_pyfunction!(sad_initial_state, m)?)?;
    m.add_function(wrap_pyfunction!(ags_sad_step, m)?)?;
    m.add_class::<DeployEngine>()?;
    m.add_function(wrap_pyfunction!(deploy_kernels, m)?)?;
    cuda::py::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
