//! Python bindings of the flip monitor: the functions `ovsw/analysis/_monitor.py` calls.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use super::config::{MonitorConfig, MonitorLayer};
use super::{initial_state, update};
use crate::error::{boundary, Error};

/// Fresh monitor state for a weight: `(sign, ever_flipped, tracker)`, the tracker (zeros
/// in W's dtype) only with `own_tracker`.
#[pyfunction]
fn flip_monitor_state(
    weight: PyTensor,
    own_tracker: bool,
) -> PyResult<(PyTensor, PyTensor, Option<PyTensor>)> {
    boundary(|| {
        let (s, e, t) = initial_state(&weight, own_tracker)?;
        Ok((PyTensor(s), PyTensor(e), t.map(PyTensor)))
    })
}

/// How a flip monitor runs ([`MonitorConfig`]), checked once when built (against SAD's
/// option ranges) and handed to every [`flip_monitor_step`] as it is.
#[pyclass(name = "FlipMonitorConfig", module = "ovsw._core", frozen)]
pub struct PyMonitorConfig(pub MonitorConfig);

#[pymethods]
impl PyMonitorConfig {
    #[new]
    #[pyo3(signature = (track_momentum, track_threshold, update_trackers))]
    fn new(track_momentum: f64, track_threshold: f64, update_trackers: bool) -> PyResult<Self> {
        boundary(|| {
            Ok(PyMonitorConfig(MonitorConfig::new(
                track_momentum,
                track_threshold,
                update_trackers,
            )?))
        })
    }

    /// `m`: the tracker's momentum and the flip-rate average's.
    #[getter]
    fn track_momentum(&self) -> f64 {
        self.0.momentum
    }

    /// `tau`: a weight whose tracker is below it is silent.
    #[getter]
    fn track_threshold(&self) -> f64 {
        self.0.threshold
    }

    /// Whether the monitor owns the trackers and updates them (no SAD), or reads SAD's.
    #[getter]
    fn update_trackers(&self) -> bool {
        self.0.update_trackers
    }

    fn __repr__(&self) -> String {
        format!(
            "FlipMonitorConfig(track_momentum={:?}, track_threshold={:?}, update_trackers={})",
            self.0.momentum,
            self.0.threshold,
            if self.0.update_trackers {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// One monitoring step after an optimizer update, in place on the state; returns the
/// figures as one float64 tensor `[L, 4]` on the weights' device (flipped, never
/// flipped, silent, flip rate) with no device-to-host copy.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (weights, signs, ever_flipped, trackers, rates, step, config))]
fn flip_monitor_step(
    py: Python<'_>,
    weights: Vec<PyTensor>,
    signs: Vec<PyTensor>,
    ever_flipped: Vec<PyTensor>,
    trackers: Vec<PyTensor>,
    rates: PyTensor,
    step: u64,
    config: PyRef<'_, PyMonitorConfig>,
) -> PyResult<PyTensor> {
    boundary(|| {
        let n = weights.len();
        if signs.len() != n || ever_flipped.len() != n || trackers.len() != n {
            return Err(Error::Value(format!(
                "flip_monitor_step: got {n} weights, {} signs, {} ever_flipped and {} trackers",
                signs.len(),
                ever_flipped.len(),
                trackers.len()
            ))
            .into());
        }
        let cfg = config.0;
        let figures = py.allow_threads(move || {
            let layers: Vec<MonitorLayer<'_>> = weights
                .iter()
                .zip(&signs)
                .zip(ever_flipped.iter().zip(&trackers))
                .map(|((w, s), (e, t))| MonitorLayer {
                    weight: w,
                    sign: s,
                    ever_flipped: e,
                    tracker: t,
                })
                .collect();
            update(&cfg, &layers, &rates, step)
        })?;
        Ok(PyTensor(figures))
    })
}

/// Adds the monitor's functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(flip_monitor_state, m)?)?;
    m.add_function(wrap_pyfunction!(flip_monitor_step, m)?)?;
    m.add_class::<PyMonitorConfig>()?;
    Ok(())
}
