//! Python bindings of the deploy engine (`ovsw._core.DeployEngine` and friends; the
//! Python API around them is `ovsw.deploy`). Thin: argument conversion, the GIL released
//! around the work, errors mapped to Python exceptions, and every body run through
//! [`boundary`] (a panic reaches Python as a RuntimeError).

use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use ovsw_engine::bitconv::{cpu_flags, Kernel};
use ovsw_engine::engine::{self, Engine};
use ovsw_engine::format::{self, DType};
use ovsw_engine::lower::ChannelAffine;
use ovsw_engine::nhwc::Tensor4;
use ovsw_engine::writer::{self, TensorData};

use super::from_torch as lower;
use crate::binarize::ActW;
use crate::error::{boundary, Error};

/// An engine result for Python: a refused file operation as the `OSError` subclass its
/// kind names (`FileNotFoundError`, `PermissionError`, ...), anything else as the
/// core's error.
fn from_engine<T>(r: ovsw_engine::error::Result<T>) -> PyResult<T> {
    r.map_err(|e| match e {
        ovsw_engine::error::Error::Io { message, source } => {
            PyErr::from(std::io::Error::new(source.kind(), message))
        }
        e => Error::from(e).into(),
    })
}

/// A bit-packed network loaded from an `ovsw.deploy.export` file (see `ovsw.deploy`).
#[pyclass(module = "ovsw._core", name = "DeployEngine")]
pub struct DeployEngine {
    engine: Engine,
}

/// An NCHW float32 numpy array as the engine's NHWC tensor, or a clear error.
fn input_tensor(x: &Bound<'_, PyAny>) -> PyResult<Tensor4> {
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
        Some(s) => Tensor4::from_nchw(s, n, c, h, w),
        None => {
            let owned: Vec<f32> = view.iter().copied().collect();
            Tensor4::from_nchw(&owned, n, c, h, w)
        }
    };
    from_engine(tensor)
}

/// The engine's output as numpy: `(N, K)` when it is one pixel, else `(N, C, H, W)`.
fn output_array(py: Python<'_>, y: Tensor4) -> PyResult<Bound<'_, PyAny>> {
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

/// `(name, op, output NCHW shape, seconds)` of one op of a profiled run.
type OpRow = (String, &'static str, (usize, usize, usize, usize), f64);

#[pymethods]
impl DeployEngine {
    #[new]
    #[pyo3(signature = (data, threads, kernel = "auto"))]
    fn new(py: Python<'_>, data: &[u8], threads: usize, kernel: &str) -> PyResult<Self> {
        boundary(|| {
            let kernel = from_engine(Kernel::parse(kernel))?;
            let engine = py.allow_threads(|| Engine::from_bytes(data, threads, kernel));
            let engine = from_engine(engine)?;
            Ok(DeployEngine { engine })
        })
    }

    /// Runs the network on a float32 NCHW array; returns float32 logits.
    fn __call__<'py>(&self, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        boundary(|| {
            let py = x.py();
            let input = input_tensor(x)?;
            let y = from_engine(py.allow_threads(|| self.engine.run(input)))?;
            output_array(py, y)
        })
    }

    /// Runs once; returns (output, [(name, op, output NCHW shape, seconds), ...]).
    fn profile<'py>(&self, x: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyAny>, Vec<OpRow>)> {
        boundary(|| {
            let py = x.py();
            let input = input_tensor(x)?;
            let (y, times) = from_engine(py.allow_threads(|| self.engine.profile(input)))?;
            let times = times
                .into_iter()
                .map(|t| {
                    let [n, c, h, w] = t.out_shape;
                    (t.name, t.op, (n, c, h, w), t.seconds)
                })
                .collect();
            Ok((output_array(py, y)?, times))
        })
    }

    /// Runs the one op `name` on `x` (and `residual`), NCHW float32 arrays.
    #[pyo3(signature = (name, x, residual = None))]
    fn run_op<'py>(
        &self,
        name: &str,
        x: &Bound<'py, PyAny>,
        residual: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        boundary(|| {
            let py = x.py();
            let input = input_tensor(x)?;
            let residual = residual.map(input_tensor).transpose()?;
            let y = from_engine(py.allow_threads(|| self.engine.run_op(name, input, residual)))?;
            output_array(py, y)
        })
    }

    #[getter]
    fn threads(&self) -> usize {
        self.engine.threads()
    }

    #[setter]
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        boundary(|| from_engine(self.engine.set_threads(threads)))
    }

    #[getter]
    fn kernel(&self) -> &'static str {
        self.engine.kernel.name()
    }

    #[getter]
    fn input_channels(&self) -> usize {
        self.engine.input_channels
    }

    /// Whether the network takes inputs of any height and width, not only the size it
    /// was exported for.
    #[getter]
    fn accepts_any_size(&self) -> bool {
        self.engine.accepts_any_size()
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

/// The engine's thread count for `threads`: the CPUs this process may use when `None`,
/// else `threads` itself once checked (the engine's one check, `ValueError` for 0 or
/// more than those CPUs), for command lines to refuse a count before any work.
#[pyfunction]
#[pyo3(signature = (threads = None))]
fn deploy_threads(threads: Option<usize>) -> PyResult<usize> {
    boundary(|| match threads {
        None => Ok(engine::available_threads()),
        Some(t) => from_engine(engine::check_threads(t)),
    })
}

/// Kernels this CPU can run, best first (`"portable"` always).
#[pyfunction]
fn deploy_kernels() -> PyResult<Vec<&'static str>> {
    boundary(|| {
        Ok(from_engine(Kernel::available())?
            .into_iter()
            .map(Kernel::name)
            .collect())
    })
}

/// The kernel `name` selects on this CPU (`"auto"`: the best); `ValueError` naming the
/// missing CPU flag for one this CPU cannot run.
#[pyfunction]
fn deploy_kernel(name: &str) -> PyResult<&'static str> {
    boundary(|| Ok(from_engine(Kernel::parse(name))?.name()))
}

/// The CPU flags the kernels use that this CPU has, as `/proc/cpuinfo` names them
/// (less those `OVSW_DISABLE_CPU_FEATURES` hides).
#[pyfunction]
fn deploy_cpu_flags() -> PyResult<Vec<&'static str>> {
    boundary(|| from_engine(cpu_flags()))
}

// -- export lowering (super::from_torch) -------------------------------------------------

/// A BatchNorm's `(k, c)` as `ovsw.deploy` passes it between the folds.
type Fold<'py> = (PyReadonlyArray1<'py, f64>, PyReadonlyArray1<'py, f64>);

/// Two per-channel vectors (`(k, c)`, `(scale, shift)`) as numpy arrays.
type Vectors<'py, T> = (Bound<'py, PyArray1<T>>, Bound<'py, PyArray1<T>>);

/// A float conv's weight and optional bias as numpy arrays.
type ConvArrays<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyArray1<f32>>>);

fn fold_of(fold: Option<Fold<'_>>) -> PyResult<Option<ChannelAffine>> {
    Ok(match fold {
        Some((k, c)) => Some(from_engine(ChannelAffine::new(k.to_vec()?, c.to_vec()?))?),
        None => None,
    })
}

/// A flat vector as a numpy array of `shape`.
fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data).reshape(shape)?.into_any())
}

/// Sign bits of a conv weight `[O, C, kh, kw]` as `[O, kh, kw, ceil(C/64)]` uint64 (bit
/// `c % 64` of word `c // 64` set where the weight is negative), and the non-zero mask
/// alike, or `None` when no weight is zero.
#[pyfunction]
fn deploy_pack_signs<'py>(
    py: Python<'py>,
    weight: PyTensor,
) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
    boundary(|| {
        let packed = py.allow_threads(move || lower::pack_signs_of(&weight))?;
        let bits = array(py, packed.bits, &packed.shape)?;
        let mask = packed
            .mask
            .map(|m| array(py, m, &packed.shape))
            .transpose()?;
        Ok((bits, mask))
    })
}

/// `(k, c)`, float64, with `bn(x) == k * x + c` per channel for a BatchNorm in eval mode.
#[pyfunction]
#[pyo3(signature = (running_mean, running_var, weight, bias, eps))]
fn deploy_fold_batchnorm<'py>(
    py: Python<'py>,
    running_mean: PyTensor,
    running_var: PyTensor,
    weight: Option<PyTensor>,
    bias: Option<PyTensor>,
    eps: f64,
) -> PyResult<Vectors<'py, f64>> {
    boundary(|| {
        let bn = py.allow_threads(move || {
            lower::batchnorm_of(
                &running_mean,
                &running_var,
                weight.as_deref(),
                bias.as_deref(),
                eps,
            )
        })?;
        Ok((
            PyArray1::from_vec(py, bn.scale),
            PyArray1::from_vec(py, bn.shift),
        ))
    })
}

/// A float conv's `conv2d` tensors with the BatchNorm fold `bn` (`(k, c)`) applied:
/// float32 weight `[O, kh, kw, C/groups]` and bias `[O]` (`None` without a bias or
/// `bn`).
#[pyfunction]
#[pyo3(signature = (weight, bias, bn))]
fn deploy_fold_conv2d<'py>(
    py: Python<'py>,
    weight: PyTensor,
    bias: Option<PyTensor>,
    bn: Option<Fold<'py>>,
) -> PyResult<ConvArrays<'py>> {
    boundary(|| {
        let bn = fold_of(bn)?;
        let conv =
            py.allow_threads(move || lower::float_conv_of(&weight, bias.as_deref(), bn.as_ref()))?;
        Ok((
            array(py, conv.weight, &conv.shape)?,
            conv.bias.map(|b| PyArray1::from_vec(py, b)),
        ))
    })
}

/// A binary conv's float32 `(scale, shift)` `[O]`: its eval-mode scale (learnable
/// `scaling_factor` or the W-derived alpha, times `mean|W|` for `ste_v2`) and bias,
/// then the BatchNorm fold `bn` (`(k, c)`).
#[pyfunction]
#[pyo3(signature = (weight, scaling_factor, bias, act_w, bn))]
fn deploy_fold_bconv2d<'py>(
    py: Python<'py>,
    weight: PyTensor,
    scaling_factor: Option<PyTensor>,
    bias: Option<PyTensor>,
    act_w: &str,
    bn: Option<Fold<'py>>,
) -> PyResult<Vectors<'py, f32>> {
    boundary(|| {
        let act_w = ActW::parse(act_w)?;
        let bn = fold_of(bn)?;
        let (scale, shift) = py.allow_threads(move || {
            lower::binary_conv_of(
                &weight,
                scaling_factor.as_deref(),
                bias.as_deref(),
                act_w,
                bn.as_ref(),
            )
        })?;
        Ok((PyArray1::from_vec(py, scale), PyArray1::from_vec(py, shift)))
    })
}

// -- the file (ovsw_engine::writer) --------------------------------------------------

/// A float32 or uint64 numpy array as a tensor of the file (little-endian bytes).
fn tensor_data(name: String, array: &Bound<'_, PyAny>) -> PyResult<TensorData> {
    if let Ok(a) = array.downcast::<PyArrayDyn<f32>>() {
        let a = a.readonly();
        let shape = a.shape().to_vec();
        let bytes = a.as_array().iter().flat_map(|v| v.to_le_bytes()).collect();
        return Ok(TensorData {
            name,
            dtype: DType::F32,
            shape,
            bytes,
        });
    }
    if let Ok(a) = array.downcast::<PyArrayDyn<u64>>() {
        let a = a.readonly();
        let shape = a.shape().to_vec();
        let bytes = a.as_array().iter().flat_map(|v| v.to_le_bytes()).collect();
        return Ok(TensorData {
            name,
            dtype: DType::U64,
            shape,
            bytes,
        });
    }
    Err(PyTypeError::new_err(format!(
        "tensor '{name}': expected a float32 or uint64 numpy array"
    )))
}

/// Writes a deploy file to `path` atomically: the header's `metadata` (a JSON object's
/// text), `tensors` (`(name, float32 or uint64 array)` in table order), `ops` (a JSON
/// array's text) and the `output` value. Returns the number of bytes written.
#[pyfunction]
#[pyo3(signature = (path, metadata, tensors, ops, output))]
fn deploy_write(
    py: Python<'_>,
    path: std::path::PathBuf,
    metadata: &str,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    ops: &str,
    output: usize,
) -> PyResult<usize> {
    boundary(|| {
        let tensors = tensors
            .into_iter()
            .map(|(name, a)| tensor_data(name, &a))
            .collect::<PyResult<Vec<_>>>()?;
        from_engine(py.allow_threads(|| {
            let bytes = writer::to_bytes(metadata, &tensors, ops, output)?;
            writer::write_atomic(&path, &bytes)?;
            Ok(bytes.len())
        }))
    })
}

/// Adds the deploy engine's classes and functions to `ovsw._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DeployEngine>()?;
    m.add_function(wrap_pyfunction!(deploy_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_threads, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_cpu_flags, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_pack_signs, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_fold_batchnorm, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_fold_conv2d, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_fold_bconv2d, m)?)?;
    m.add_function(wrap_pyfunction!(deploy_write, m)?)?;
    m.add("DEPLOY_FORMAT_VERSION", format::VERSION)?;
    Ok(())
}
