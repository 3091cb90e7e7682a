//! Python bindings of AGS and SAD: `OvSWConfig` (built once per `ovsw.OvSW`, handed as
//! it is to each step), the option table with its range text, the check of one option's
//! value (ovsw-train's flags) and the functions `ovsw/ops.py` and `ovsw/optim.py` call.

use std::hash::{Hash, Hasher};

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyTuple};
use pyo3_tch::PyTensor;

use super::config::{self, Config, Limit, OptionSpec, Value, OPTIONS};
use super::layer::Layer;
use super::{initial_state, step};
use crate::error::{boundary, Error};

/// OvSW's AGS and SAD settings (SPEC sections 2 and 3), validated on construction and
/// handed as they are to [`ags_sad_step`]. Equal (and hashed) by value, bit for bit;
/// subclassable, so that `ovsw.ops.OvSWConfig` can make it a value-type opaque object
/// of `torch.library` (the one argument of the custom op that carries the settings).
#[pyclass(frozen, subclass, module = "ovsw._core")]
pub struct OvSWConfig {
    cfg: Config,
}

/// `__reduce__`'s answer: the class and its constructor arguments.
type Reduced<'py, A> = PyResult<(Bound<'py, pyo3::types::PyType>, A)>;

/// One option's value from Python, typed by the option's table entry.
fn value_of(o: &OptionSpec, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let typed = match o.default {
        Value::Bool(_) => v.extract::<bool>().map(Value::Bool),
        Value::Float(_) => v.extract::<f64>().map(Value::Float),
    };
    typed.map_err(|_| {
        let got = v
            .get_type()
            .name()
            .map_or_else(|_| "another type".to_owned(), |n| n.to_string());
        Error::Type(format!("{} must be a {}, got {got}", o.name, o.type_name())).into()
    })
}

#[pymethods]
impl OvSWConfig {
    /// `OvSWConfig(enable_ags=False, delta=0.01, ...)`: the options of [`OPTIONS`], by
    /// keyword or by position in table order, each checked against its range.
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        boundary(|| {
            if args.len() > OPTIONS.len() {
                return Err(Error::Type(format!(
                    "OvSWConfig takes at most {} options, got {} positional arguments",
                    OPTIONS.len(),
                    args.len()
                ))
                .into());
            }
            let mut given: Vec<(&str, Value)> = Vec::new();
            for (o, v) in OPTIONS.iter().zip(args.iter()) {
                given.push((o.name, value_of(o, &v)?));
            }
            let mut unknown = Vec::new();
            if let Some(kwargs) = kwargs {
                for (k, v) in kwargs.iter() {
                    let name: String = k.extract()?;
                    let Some(o) = config::option(&name) else {
                        unknown.push(format!("'{name}'"));
                        continue;
                    };
                    if given.iter().any(|g| g.0 == o.name) {
                        return Err(Error::Type(format!(
                            "OvSWConfig got multiple values for '{name}'"
                        ))
                        .into());
                    }
                    given.push((o.name, value_of(o, &v)?));
                }
            }
            if !unknown.is_empty() {
                return Err(Error::Type(format!(
                    "unknown OvSW option(s) {}; the options are {}",
                    unknown.join(", "),
                    OPTIONS.map(|o| o.name).join(", ")
                ))
                .into());
            }
            Ok(OvSWConfig {
                cfg: Config::from_options(&given)?,
            })
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

    /// Pickling rebuilds from the values, by position in table order.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> Reduced<'py, Bound<'py, PyTuple>> {
        boundary(|| {
            let py = slf.py();
            let values = slf
                .get()
                .cfg
                .values()
                .map(|v| value_object(py, v))
                .into_iter()
                .collect::<PyResult<Vec<_>>>()?;
            Ok((slf.get_type(), PyTuple::new(py, values)?))
        })
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.bits() == other.bits()
    }

    fn __hash__(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.bits().hash(&mut h);
        h.finish()
    }

    fn __repr__(&self) -> String {
        let parts: Vec<String> = OPTIONS
            .iter()
            .zip(self.cfg.values())
            .map(|(o, v)| format!("{}={}", o.name, value_text(v)))
            .collect();
        format!("OvSWConfig({})", parts.join(", "))
    }
}

impl OvSWConfig {
    /// The values' bits, in table order: what equality and the hash compare.
    fn bits(&self) -> [u64; 7] {
        self.cfg.values().map(|v| match v {
            Value::Bool(b) => u64::from(b),
            Value::Float(f) => f.to_bits(),
        })
    }
}

/// A value as Python writes it (`True`, `0.01`).
fn value_text(v: Value) -> String {
    match v {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Float(f) => format!("{f}"),
    }
}

fn value_object(py: Python<'_>, v: Value) -> PyResult<Bound<'_, PyAny>> {
    Ok(match v {
        Value::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
        Value::Float(f) => PyFloat::new(py, f).into_any(),
    })
}

fn limit_fields(l: Option<Limit>) -> (Option<f64>, bool) {
    l.map_or((None, false), |l| (Some(l.value), l.inclusive))
}

/// The OvSW options, one dict each in constructor order: `name`, `type` (`"bool"` or
/// `"float"`), `default`, `min`/`max` (None when unbounded), `min_inclusive`,
/// `max_inclusive`, `range` (the valid range in words, [`OptionSpec::range_text`]; None
/// for a flag) and `help`. Float options must also be finite.
#[pyfunction]
fn ovsw_options(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    boundary(|| {
        OPTIONS
            .iter()
            .map(|o| {
                let d = PyDict::new(py);
                let (min, min_inclusive) = limit_fields(o.min);
                let (max, max_inclusive) = limit_fields(o.max);
                d.set_item("name", o.name)?;
                d.set_item("type", o.type_name())?;
                d.set_item("default", value_object(py, o.default)?)?;
                d.set_item("min", min)?;
                d.set_item("min_inclusive", min_inclusive)?;
                d.set_item("max", max)?;
                d.set_item("max_inclusive", max_inclusive)?;
                let range = match o.default {
                    Value::Bool(_) => None,
                    Value::Float(_) => Some(o.range_text()),
                };
                d.set_item("range", range)?;
                d.set_item("help", o.help)?;
                Ok(d)
            })
            .collect()
    })
}

/// Checks one value of the option `name` against the table: None when valid, else the
/// error `OvSWConfig` would raise for it (TypeError for an unknown name or a wrong type,
/// ValueError for a value outside the range). ovsw-train's flags call it.
#[pyfunction]
fn ovsw_check_option(name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
    boundary(|| {
        let o = config::spec(name)?;
        Ok(o.check(value_of(o, value)?)?)
    })
}

/// Fresh SAD buffers for a weight: `(tracker, weight_prev)`.
#[pyfunction]
fn sad_initial_state(weight: PyTensor, track_ones: bool) -> PyResult<(PyTensor, PyTensor)> {
    boundary(|| {
        let (t, p) = initial_state(&weight, track_ones)?;
        Ok((PyTensor(t), PyTensor(p)))
    })
}

/// AGS then SAD on every layer, in place on the gradients and SAD buffers. Returns the
/// per-layer figures as one float64 tensor `[L, 2]` on the weights' device (`ags_ratio`,
/// `silent_ratio`; NaN where disabled), with no device-to-host copy.
#[pyfunction]
fn ags_sad_step(
    py: Python<'_>,
    config: &OvSWConfig,
    grads: Vec<PyTensor>,
    weights: Vec<PyTensor>,
    trackers: Vec<Option<PyTensor>>,
    weight_prevs: Vec<Option<PyTensor>>,
) -> PyResult<PyTensor> {
    boundary(|| {
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
        let figures = py.allow_threads(move || {
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
            step(&cfg, &layers)
        })?;
        Ok(PyTensor(figures))
    })
}

/// Adds the optimizer's classes and functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OvSWConfig>()?;
    m.add_function(wrap_pyfunction!(ovsw_options, m)?)?;
    m.add_function(wrap_pyfunction!(ovsw_check_option, m)?)?;
    m.add_function(wrap_pyfunction!(sad_initial_state, m)?)?;
    m.add_function(wrap_pyfunction!(ags_sad_step, m)?)?;
    Ok(())
}
