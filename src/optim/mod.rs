//! Adaptive Gradient Scaling (SPEC section 2) and Silence Awareness Decaying (section 3).
//!
//! Both act on the weight gradient of every binary layer after backward and before the
//! optimizer update. [`step`] validates the layers, picks the route once for the whole
//! step and runs it:
//! - [`cpu`]: fused loops over contiguous float32 CPU tensors; two passes over each
//!   output channel (norms, then scale + track + decay + copy in one sweep), all
//!   channels of all layers split across libtorch's intra-op threads, no temporaries;
//! - the fused CUDA kernels ([`crate::cuda::ags`]) on float32, float16 and bfloat16
//!   CUDA tensors: one multi-tensor pass over all layers in two launches, figures left
//!   on the device;
//! - [`generic`]: the same formulas through libtorch ops (any device, any dtype), also
//!   where the CUDA kernels decline.
//!
//! Tests hold both to a plain-PyTorch oracle written from SPEC.

pub mod cpu;
pub mod generic;
pub mod monitor;
pub mod py;

use tch::Tensor;

use crate::cuda::{self, Op};
use crate::error::{value_err, Error, Result};
use crate::ffi;
use crate::tensor::{self, Route};

/// Floors of SPEC section 2: `g_o = max(||G_o||, 1e-6)`, `w_o = max(||W_o||, 1e-3)`.
pub const GRAD_NORM_FLOOR: f64 = 1e-6;
pub const WEIGHT_NORM_FLOOR: f64 = 1e-3;

/// One end of an option's valid range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    pub value: f64,
    /// Whether `value` itself is allowed (a closed end).
    pub inclusive: bool,
}

impl Limit {
    pub const fn closed(value: f64) -> Option<Limit> {
        Some(Limit {
            value,
            inclusive: true,
        })
    }

    pub const fn open(value: f64) -> Option<Limit> {
        Some(Limit {
            value,
            inclusive: false,
        })
    }
}

/// A value of an option.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Float(f64),
}

/// One OvSW option: its name, type and default, its valid range (floats must also be
/// finite) and a line of help.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptionSpec {
    pub name: &'static str,
    pub default: Value,
    pub min: Option<Limit>,
    pub max: Option<Limit>,
    pub help: &'static str,
}

impl OptionSpec {
    const fn flag(name: &'static str, help: &'static str) -> Self {
        OptionSpec {
            name,
            default: Value::Bool(false),
            min: None,
            max: None,
            help,
        }
    }

    const fn float(
        name: &'static str,
        default: f64,
        min: Option<Limit>,
        max: Option<Limit>,
        help: &'static str,
    ) -> Self {
        OptionSpec {
            name,
            default: Value::Float(default),
            min,
            max,
            help,
        }
    }

    /// `"bool"` or `"float"`.
    pub fn type_name(&self) -> &'static str {
        match self.default {
            Value::Bool(_) => "bool",
            Value::Float(_) => "float",
        }
    }

    /// The valid range in words, e.g. `"a finite number >= 0"` or `"[0, 1)"`.
    pub fn range_text(&self) -> String {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!(
                "in {}{}, {}{}",
                if lo.inclusive { "[" } else { "(" },
                lo.value,
                hi.value,
                if hi.inclusive { "]" } else { ")" }
            ),
            (Some(lo), None) => format!(
                "a finite number {} {}",
                if lo.inclusive { ">=" } else { ">" },
                lo.value
            ),
            (None, Some(hi)) => format!(
                "a finite number {} {}",
                if hi.inclusive { "<=" } else { "<" },
                hi.value
            ),
            (None, None) => "a finite number".to_string(),
        }
    }

    /// Checks `value` against the option's type and range.
    pub fn check(&self, value: Value) -> Result<()> {
        match (self.default, value) {
            (Value::Bool(_), Value::Bool(_)) => Ok(()),
            (Value::Float(_), Value::Float(v)) => {
                let above = self.min.is_none_or(|lo| {
                    if lo.inclusive {
                        v >= lo.value
                    } else {
                        v > lo.value
                    }
                });
                let below = self.max.is_none_or(|hi| {
                    if hi.inclusive {
                        v <= hi.value
                    } else {
                        v < hi.value
                    }
                });
                if v.is_finite() && above && below {
                    Ok(())
                } else {
                    value_err!("{} must be {}, got {v}", self.name, self.range_text())
                }
            }
            (_, _) => Err(Error::Type(format!(
                "{} must be a {}, got {value:?}",
                self.name,
                self.type_name()
            ))),
        }
    }
}

/// Every OvSW option, in `OvSWConfig`'s constructor order: the one definition of their
/// names, defaults and ranges (SPEC sections 2 and 3). `Config`, `OvSWConfig`, `ovsw.OvSW`
/// and the CLI derive from it.
pub const OPTIONS: [OptionSpec; 7] = [
    OptionSpec::flag(
        "enable_ags",
        "apply Adaptive Gradient Scaling to the binary weights' gradients",
    ),
    OptionSpec::float(
        "delta",
        0.01,
        Limit::closed(0.0),
        None,
        "AGS: the lower bound on a channel's gradient-to-weight norm ratio",
    ),
    OptionSpec::flag(
        "enable_dampen",
        "apply Silence Awareness Decaying to the binary weights' gradients",
    ),
    OptionSpec::float(
        "dampen_weight",
        0.0,
        Limit::closed(0.0),
        None,
        "SAD: lambda, the extra decay on silent weights",
    ),
    OptionSpec::float(
        "track_momentum",
        0.999,
        Limit::closed(0.0),
        Limit::open(1.0),
        "SAD: m, the momentum of the sign-flip tracker",
    ),
    OptionSpec::float(
        "track_threshold",
        1e-4,
        Limit::closed(0.0),
        None,
        "SAD: tau, a weight whose tracker is below it is silent",
    ),
    OptionSpec::flag(
        "track_ones",
        "SAD: start the trackers at ones instead of zeros",
    ),
];

/// The option called `name`.
pub fn option(name: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.name == name)
}

/// OvSW hyperparameters, validated once against [`OPTIONS`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub enable_ags: bool,
    pub delta: f64,
    pub enable_dampen: bool,
    pub dampen_weight: f64,
    pub track_momentum: f64,
    pub track_threshold: f64,
    pub track_ones: bool,
}

impl Config {
    /// A config from `(name, value)` pairs, every other option at its default. An
    /// unknown name is a TypeError, a value outside its range a ValueError.
    pub fn from_options(given: &[(&str, Value)]) -> Result<Config> {
        let mut cfg = Config {
            enable_ags: false,
            delta: 0.0,
            enable_dampen: false,
            dampen_weight: 0.0,
            track_momentum: 0.0,
            track_threshold: 0.0,
            track_ones: false,
        };
        for o in &OPTIONS {
            cfg.set(o.name, o.default)?;
        }
        for &(name, value) in given {
            let Some(o) = option(name) else {
                return Err(Error::Type(format!(
                    "unknown OvSW option '{name}'; the options are {}",
                    OPTIONS.map(|o| o.name).join(", ")
                )));
            };
            o.check(value)?;
            cfg.set(name, value)?;
        }
        Ok(cfg)
    }

    /// The options' values in [`OPTIONS`] order.
    pub fn values(&self) -> [Value; 7] {
        [
            Value::Bool(self.enable_ags),
            Value::Float(self.delta),
            Value::Bool(self.enable_dampen),
            Value::Float(self.dampen_weight),
            Value::Float(self.track_momentum),
            Value::Float(self.track_threshold),
            Value::Bool(self.track_ones),
        ]
    }

    fn set(&mut self, name: &str, value: Value) -> Result<()> {
        match (name, value) {
            ("enable_ags", Value::Bool(b)) => self.enable_ags = b,
            ("delta", Value::Float(v)) => self.delta = v,
            ("enable_dampen", Value::Bool(b)) => self.enable_dampen = b,
            ("dampen_weight", Value::Float(v)) => self.dampen_weight = v,
            ("track_momentum", Value::Float(v)) => self.track_momentum = v,
            ("track_threshold", Value::Float(v)) => self.track_threshold = v,
            ("track_ones", Value::Bool(b)) => self.track_ones = b,
            _ => {
                return Err(Error::Internal(format!(
                    "option '{name}' with {value:?} has no Config field"
                )))
            }
        }
        Ok(())
    }
}

/// One binary layer's tensors. `grad`, `tracker` and `weight_prev` are updated in place.
pub struct Layer<'a> {
    pub grad: &'a Tensor,
    pub weight: &'a Tensor,
    pub tracker: Option<&'a Tensor>,
    pub weight_prev: Option<&'a Tensor>,
}

impl Layer<'_> {
    /// The tensors SAD reads and writes besides the weight and the gradient, when SAD
    /// is enabled (`None` if the layer lacks them).
    fn sad_buffers(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.tracker?, self.weight_prev?))
    }

    /// Every tensor the step touches under `cfg`.
    fn tensors(&self, cfg: &Config) -> Vec<&Tensor> {
        let mut ts = vec![self.grad, self.weight];
        if cfg.enable_dampen {
            if let Some((t, p)) = self.sad_buffers() {
                ts.push(t);
                ts.push(p);
            }
        }
        ts
    }
}

/// The per-layer figures [`step`] returns: a float64 tensor `[L, 2]` on the weights'
/// device, column [`AGS_RATIO`] the mean AGS ratio `r_o` and column [`SILENT_RATIO`] the
/// silent fraction `mean(M)`, NaN where that part is disabled. It never leaves the
/// device during the step; whoever reads it pays the one device-to-host copy.
pub const AGS_RATIO: usize = 0;
pub const SILENT_RATIO: usize = 1;

/// The initial SAD state of a weight: the tracker (zeros, or ones with `track_ones`) and
/// `weight_prev`, a copy of W.
pub fn initial_state(weight: &Tensor, track_ones: bool) -> Result<(Tensor, Tensor)> {
    let f = tensor::facts(weight)?;
    tensor::check_float(&f, "weight")?;
    if f.sizes.is_empty() {
        return value_err!("weight must have an output-channel dimension, got a 0-d tensor");
    }
    let _guard = ffi::no_grad();
    let tracker = if track_ones {
        weight.f_ones_like()?
    } else {
        weight.f_zeros_like()?
    };
    let prev = weight.f_detach_copy()?;
    Ok((tracker, prev))
}

fn check_layer(i: usize, l: &Layer<'_>, cfg: &Config) -> Result<()> {
    let wf = tensor::facts(l.weight)?;
    let kind = tensor::check_float(&wf, &format!("layer {i}: weight"))?;
    if wf.sizes.is_empty() {
        return value_err!(
            "layer {i}: weight must have an output-channel dimension, got a 0-d tensor"
        );
    }
    let mut named = vec![("grad", l.grad)];
    if cfg.enable_dampen {
        let Some((t, p)) = l.sad_buffers() else {
            return value_err!(
                "layer {i}: SAD is enabled but the layer has no tracker/weight_prev buffers"
            );
        };
        named.push(("tracker", t));
        named.push(("weight_prev", p));
    }
    for (name, t) in named {
        let f = tensor::facts(t)?;
        if f.sizes != wf.sizes {
            return value_err!(
                "layer {i}: {name} has shape {:?}, weight {:?}",
                f.sizes,
                wf.sizes
            );
        }
        if f.place != wf.place {
            return value_err!(
                "layer {i}: {name} is on {}, weight on {}",
                f.place,
                wf.place
            );
        }
        if f.kind != Some(kind) {
            return Err(Error::Type(format!(
                "layer {i}: {name} has dtype {}, weight {}",
                f.dtype_name(),
                tensor::kind_name(kind)
            )));
        }
    }
    Ok(())
}

/// Applies AGS then SAD (each as enabled in `cfg`) to every layer, in place, and
/// returns the figures (see [`AGS_RATIO`]).
pub fn step(cfg: &Config, layers: &[Layer<'_>]) -> Result<Tensor> {
    for (i, l) in layers.iter().enumerate() {
        check_layer(i, l, cfg)?;
    }
    let Some(first) = layers.first() else {
        return Ok(Tensor::f_zeros(
            [0, 2],
            (tch::Kind::Double, tch::Device::Cpu),
        )?);
    };
    let place = tensor::facts(first.weight)?.place;
    for (i, l) in layers.iter().enumerate().skip(1) {
        let p = tensor::facts(l.weight)?.place;
        if p != place {
            return value_err!(
                "layer {i}: weight is on {p}, layer 0's on {place}; one step runs on one device"
            );
        }
    }
    if !cfg.enable_ags && !cfg.enable_dampen {
        return ffi::new_full_f64(first.weight, &[layers.len() as i64, 2], f64::NAN);
    }
    let _guard = ffi::no_grad();
    let all: Vec<&Tensor> = layers.iter().flat_map(|l| l.tensors(cfg)).collect();
    let route = Route::of(&all)?;
    match route {
        Route::HostF32 => {
            if let Some(raw) = cpu::plan(cfg, layers)? {
                return cpu::run(cfg, &raw);
            }
        }
        Route::Cuda(_) => {
            let fused = cuda::fused(Op::AgsSadStep, route, || {
                cuda::ags::ags_sad_step(cfg, layers)
            })?;
            if let Some(figures) = fused {
                return Ok(figures);
            }
        }
        Route::Generic => {}
    }
    generic::run(cfg, layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_sets_its_own_field_in_table_order() {
        // A value other than the default for each option, in table order.
        let given: Vec<(&str, Value)> = OPTIONS
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let v = match o.default {
                    Value::Bool(b) => Value::Bool(!b),
                    Value::Float(_) => Value::Float(0.125 * (i as f64 + 1.0) / 8.0),
                };
                (o.name, v)
            })
            .collect();
        let cfg = Config::from_options(&given).expect("valid values");
        let expected: Vec<Value> = given.iter().map(|g| g.1).collect();
        assert_eq!(cfg.values().to_vec(), expected);
    }

    #[test]
    fn defaults_are_the_spec_values_and_valid() {
        let cfg = Config::from_options(&[]).expect("defaults");
        assert_eq!(
            cfg,
            Config {
                enable_ags: false,
                delta: 0.01,
                enable_dampen: false,
                dampen_weight: 0.0,
                track_momentum: 0.999,
                track_threshold: 1e-4,
                track_ones: false,
            }
        );
        for o in &OPTIONS {
            o.check(o.default).expect(o.name);
        }
    }

    #[test]
    fn ranges_are_checked_at_each_end() {
        let ok = |name, v| Config::from_options(&[(name, Value::Float(v))]).is_ok();
        assert!(ok("track_momentum", 0.0) && !ok("track_momentum", 1.0));
        assert!(ok("track_momentum", 0.999_999) && !ok("track_momentum", -1e-12));
        assert!(ok("delta", 0.0) && !ok("delta", -1e-12) && !ok("delta", f64::INFINITY));
        assert!(!ok("dampen_weight", f64::NAN));
    }

    #[test]
    fn unknown_names_and_wrong_types_are_type_errors() {
        let r = Config::from_options(&[("deltaa", Value::Float(0.1))]);
        assert!(matches!(r, Err(Error::Type(m)) if m.contains("'deltaa'")));
        let r = Config::from_options(&[("enable_ags", Value::Float(1.0))]);
        assert!(matches!(r, Err(Error::Type(_))));
    }
}
