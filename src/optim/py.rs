//! Python bindings of AGS and SAD: `OvSWConfig` and the functions `ovsw/optim.py` calls.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::error::{boundary, Error};
use crate::optim::{self, Config, Layer};

/// OvSW's AGS and SAD settings (SPEC sections 2 and 3), validated on construction.
#[pyclass(frozen, module = "ovsw._core")]
pub struct OvSWConfig {
    cfg: Config,
}

/// `__reduce__`'s answer: the class and its constructor arguments.
type Reduced<'py, A> = PyResult<(Bound<'py, pyo3::types::PyType>, A)>;

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
        boundary(|| {
            let cfg = Config::new(
                enable_ags,
                delta,
                enable_dampen,
                dampen_weight,
                track_momentum,
                track_threshold,
                track_ones,
            )?;
            Ok(OvSWConfig { cfg })
        })
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
        boundary(|| {
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
        })
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
    boundary(|| {
        let (t, p) = optim::initial_state(&weight, track_ones)?;
        Ok((PyTensor(t), PyTensor(p)))
    })
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
    boundary(|| ags_sad_step_impl(py, config, grads, weights, trackers, weight_prevs))
}

fn ags_sad_step_impl(
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
        let layers: Vec<Layer<'_>> = grads
            .iter()
            .zip(&weights)
            .zip(trackers.iter().zip(&weight_prevs))
            .map(|((g, w), (t, p))| Layer {
                grad: g,
                weight: w,
                tracker: t.as_deref(),
                weight_prev: p.as_deref(),
            })
            .collect();
        optim::step(&cfg, &layers)
    })?;
    Ok(stats
        .into_iter()
        .map(|s| (s.ags_ratio, s.silent_ratio))
        .collect())
}

/// Adds the optimizer's classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OvSWConfig>()?;
    m.add_function(wrap_pyfunction!(sad_initial_state, m)?)?;
    m.add_function(wrap_pyfunction!(ags_sad_step, m)?)?;
    Ok(())
}
