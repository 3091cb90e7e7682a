//! `ovsw._core`: the compute core of the ovsw package.
//!
//! The math lives in [`binarize`] (the elementwise parts of a 1-bit layer, SPEC 1.1 to
//! 1.4), [`conv`] (the binary convolution, SPEC section 1) and [`optim`] (AGS and SAD,
//! sections 2 and 3); [`deploy`] runs exported networks by XNOR and popcount without
//! PyTorch. Each family's Python bindings sit beside it (`conv/py.rs`, `optim/py.rs`);
//! this file declares the modules and registers the bindings.

// No panic outside tests: errors are values (crate::error), and the bindings catch
// anything else at the boundary (error::boundary).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod binarize;
pub mod conv;
pub mod deploy;
pub mod error;
mod ffi;
pub mod geometry;
pub mod optim;
mod parallel;
pub mod tensor;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

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
    conv::py::register(m)?;
    optim::py::register(m)?;
    optim::monitor::py::register(m)?;
    m.add_class::<DeployEngine>()?;
    m.add_function(wrap_pyfunction!(deploy_kernels, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
