//! Python bindings of the CUDA kernels (`ovsw._core.cuda_*`), for `ovsw.cuda`, the
//! tests and the GPU check. These ask for the kernels explicitly: where they do not apply
//! they raise `RuntimeError` with the reason instead of falling back.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use super::binconv::{self, Std};
use super::{ags, compile, current_stream, loader, tensor, Stream};
use crate::conv::{ActW, Geometry, Needs, Saved};
use crate::error::{Error, Result};
use crate::ovsw::{Config, Layer};

fn parse_kind(name: &str) -> PyResult<Kind> {
    match name {
        "float32" => Ok(Kind::Float),
        "float16" => Ok(Kind::Half),
        "bfloat16" => Ok(Kind::BFloat16),
        other => Err(PyValueError::new_err(format!(
            "dtype must be 'float32', 'float16' or 'bfloat16', got {other:?}"
        ))),
    }
}

fn stream_for(t: &Tensor, stream: Option<u64>) -> Result<Stream> {
    match (stream, tensor::cuda_index(t)) {
        (Some(s), _) => Ok(Stream(s)),
        (None, Some(i)) => current_stream(i),
        (None, None) => Err(Error::Value(format!(
            "expected a CUDA tensor, got one on {:?}",
            t.device()
        ))),
    }
}

/// `act_w` of a `ConvSpec` (read through Python, so any spec object with that name works).
fn act_w_of(spec: &Bound<'_, PyAny>) -> PyResult<ActW> {
    let name: String = spec.getattr("act_w")?.extract()?;
    Ok(ActW::parse(&name)?)
}

fn config_of(c: &Bound<'_, PyAny>) -> PyResult<Config> {
    Ok(Config::new(
        c.getattr("enable_ags")?.extract()?,
        c.getattr("delta")?.extract()?,
        c.getattr("enable_dampen")?.extract()?,
        c.getattr("dampen_weight")?.extract()?,
        c.getattr("track_momentum")?.extract()?,
        c.getattr("track_threshold")?.extract()?,
        c.getattr("track_ones")?.extract()?,
    )?)
}

/// Where NVRTC and the driver were found (or why not), and whether the kernels are on.
#[pyfunction]
fn cuda_status(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("enabled", super::enabled())?;
    match loader::nvrtc() {
        Ok(info) => {
            d.set_item("nvrtc", &info.path)?;
            d.set_item("nvrtc_version", info.version)?;
        }
        Err(e) => {
            d.set_item("nvrtc", py.None())?;
            d.set_item("nvrtc_error", e)?;
        }
    }
    match py.allow_threads(loader::driver) {
        Ok(v) => d.set_item("driver_version", v)?,
        Err(e) => d.set_item("driver_error", e)?,
    }
    Ok(d)
}

/// Compiles every kernel for `sm_{arch}` (cached per process). Returns
/// `(ptx, cubin, log, entries)`: the PTX text, the SASS image, NVRTC's log, and the
/// entry points the PTX declares. No GPU needed.
#[pyfunction]
fn cuda_compile(
    py: Python<'_>,
    arch: u32,
) -> PyResult<(String, Bound<'_, PyBytes>, String, Vec<String>)> {
    if !(50..=200).contains(&arch) {
        return Err(PyValueError::new_err(format!(
            "arch is sm_XY as the number XY (80, 90), got {arch}"
        )));
    }
    let img = py
        .allow_threads(|| compile::compiled(arch))
        .map_err(|e| Error::Torch(format!("NVRTC: {e}")))?;
    Ok((
        img.ptx.clone(),
        PyBytes::new(py, &img.cubin),
        img.log.clone(),
        compile::ptx_entries(&img),
    ))
}

/// Names of every kernel in the source.
#[pyfunction]
fn cuda_entry_points() -> Vec<String> {
    compile::entry_points()
}

/// Turns the CUDA kernels on or off for the process (off: the libtorch path runs).
#[pyfunction]
fn cuda_set_enabled(on: bool) {
    super::set_enabled(on);
}

/// Whether the CUDA kernels may be used.
#[pyfunction]
fn cuda_enabled() -> bool {
    super::enabled()
}

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
    let kind = parse_kind(out_dtype)?;
    let stream = stream_for(&x, stream)?;
    let (a, s) = py.allow_threads(move || {
        let mode = match (&std, training) {
            (Some(s), _) => Std::Given(s),
            (None, true) => Std::Compute,
            (None, false) => Std::None,
        };
        binconv::binarize_activation(&x, mode, kind, stream)?.required("binarize_activation")
    })?;
    Ok((PyTensor(a), s.map(PyTensor)))
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
    let stream = stream_for(&x, stream)?;
    let out = py.allow_threads(move || {
        binconv::bireal_backward(&grad_a, &x, std.as_deref(), stream)?.required("bireal_backward")
    })?;
    Ok(PyTensor(out))
}

/// `(w_eff, alpha, bias_eff)`: see `cuda::binconv::weight_operand`.
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
    let act_w = ActW::parse(act_w)?;
    let kind = parse_kind(out_dtype)?;
    let stream = stream_for(&weight, stream)?;
    let op = py.allow_threads(move || {
        binconv::weight_operand(
            &weight,
            act_w,
            scale.as_deref(),
            bias.as_deref(),
            fold,
            kind,
            stream,
        )?
        .required("weight_operand")
    })?;
    Ok((
        PyTensor(op.w_eff),
        op.alpha.map(PyTensor),
        op.bias_eff.map(PyTensor),
    ))
}

/// `(grad_weight, grad_scale, grad_bias)`: see `cuda::binconv::weight_grads`.
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
    let act_w = ActW::parse(act_w)?;
    let stream = stream_for(&weight, stream)?;
    let g = py.allow_threads(move || {
        binconv::weight_grads(
            grad_weff.as_deref(),
            grad_beff.as_deref(),
            &weight,
            act_w,
            &s,
            bias.as_deref(),
            want,
            stream,
        )?
        .required("weight_grads")
    })?;
    Ok((
        g.weight.map(PyTensor),
        g.scale.map(PyTensor),
        g.bias.map(PyTensor),
    ))
}

type Pair = (i64, i64);

fn geometry(stride: Pair, padding: Pair, dilation: Pair, groups: i64) -> Result<Geometry> {
    Geometry::new(
        [stride.0, stride.1],
        [padding.0, padding.1],
        [dilation.0, dilation.1],
        groups,
    )
}

/// The binary conv's forward through the fused kernels; same arguments and result as
/// `binary_conv2d_forward`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, scale, spec, stride, padding, dilation, groups, training))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn cuda_binary_conv2d_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    scale: Option<PyTensor>,
    spec: &Bound<'_, PyAny>,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    training: bool,
) -> PyResult<(
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    i32,
)> {
    let act_w = act_w_of(spec)?;
    let geom = geometry(stride, padding, dilation, groups)?;
    let f = py.allow_threads(move || {
        binconv::conv_forward(
            &x,
            &weight,
            bias.as_deref(),
            scale.as_deref(),
            act_w,
            &geom,
            training,
        )?
        .required("binary_conv2d_forward")
    })?;
    Ok((
        PyTensor(f.y),
        f.std.map(PyTensor),
        f.alpha.map(PyTensor),
        f.conv_out.map(PyTensor),
        crate::kind_code(f.conv_kind),
    ))
}

/// The binary conv's backward through the fused kernels; same arguments and result as
/// `binary_conv2d_backward`.
#[pyfunction]
#[pyo3(signature = (grad_y, x, weight, has_bias, scale, std, alpha, conv_out, conv_dtype, spec, stride, padding, dilation, groups, needs))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn cuda_binary_conv2d_backward(
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
    spec: &Bound<'_, PyAny>,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: i64,
    needs: (bool, bool, bool, bool),
) -> PyResult<(
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
)> {
    let act_w = act_w_of(spec)?;
    let geom = geometry(stride, padding, dilation, groups)?;
    let conv_kind = crate::kind_from_code(conv_dtype)?;
    let needs = Needs {
        input: needs.0,
        weight: needs.1,
        bias: needs.2,
        scale: needs.3,
    };
    let g = py.allow_threads(move || {
        let saved = Saved {
            x: &x,
            weight: &weight,
            has_bias,
            scale: scale.as_deref(),
            std: std.as_deref(),
            alpha: alpha.as_deref(),
            conv_out: conv_out.as_deref(),
            conv_kind,
        };
        binconv::conv_backward(&grad_y, &saved, act_w, &geom, needs)?
            .required("binary_conv2d_backward")
    })?;
    Ok((
        g.input.map(PyTensor),
        g.weight.map(PyTensor),
        g.bias.map(PyTensor),
        g.scale.map(PyTensor),
    ))
}

/// AGS then SAD through the fused kernels; same arguments as `ags_sad_step`. Returns
/// the float64 `[L, 2]` figures on the weights' device (NaN where a part is disabled).
#[pyfunction]
#[pyo3(signature = (config, grads, weights, trackers, weight_prevs, stream = None))]
fn cuda_ags_sad_step(
    py: Python<'_>,
    config: &Bound<'_, PyAny>,
    grads: Vec<PyTensor>,
    weights: Vec<PyTensor>,
    trackers: Vec<Option<PyTensor>>,
    weight_prevs: Vec<Option<PyTensor>>,
    stream: Option<u64>,
) -> PyResult<PyTensor> {
    let cfg = config_of(config)?;
    let n = weights.len();
    if n == 0 || grads.len() != n || trackers.len() != n || weight_prevs.len() != n {
        return Err(Error::Value(format!(
            "cuda_ags_sad_step: got {} grads, {n} weights, {} trackers and {} weight_prevs \
             (at least one layer)",
            grads.len(),
            trackers.len(),
            weight_prevs.len()
        ))
        .into());
    }
    for (i, (g, w)) in grads.iter().zip(&weights).enumerate() {
        if g.size() != w.size() {
            return Err(Error::Value(format!(
                "layer {i}: grad has shape {:?}, weight {:?}",
                g.size(),
                w.size()
            ))
            .into());
        }
    }
    let stream = stream_for(&weights[0], stream)?;
    let out = py.allow_threads(move || {
        let layers: Vec<Layer<'_>> = (0..n)
            .map(|i| Layer {
                grad: &grads[i],
                weight: &weights[i],
                tracker: trackers[i].as_deref(),
                weight_prev: weight_prevs[i].as_deref(),
            })
            .collect();
        let _guard = tch::no_grad_guard();
        ags::ags_sad_step(&cfg, &layers, stream)?.required("ags_sad_step")
    })?;
    Ok(PyTensor(out))
}

/// Adds the `cuda_*` functions to `ovsw._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_entry_points, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_set_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_binarize_activation, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_bireal_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_operand, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_grads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_binary_conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_binary_conv2d_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_ags_sad_step, m)?)?;
    Ok(())
}
