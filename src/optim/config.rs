//! The OvSW options (SPEC sections 2 and 3): the one table of their names, defaults,
//! ranges and help ([`OPTIONS`]), the check of a value against it
//! ([`OptionSpec::check`], which writes the one error message) and [`Config`], the
//! settings of a step built and validated once from it. The step's dispatcher and its
//! routes, the flip monitor, the Python bindings and (through them) `ovsw.OvSW` and
//! ovsw-train's flags all read the options from here.

use crate::error::{value_err, Error, Result};

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

/// The option called `name`; an unknown name is a TypeError that lists the options.
pub fn spec(name: &str) -> Result<&'static OptionSpec> {
    option(name).ok_or_else(|| {
        Error::Type(format!(
            "unknown OvSW option '{name}'; the options are {}",
            OPTIONS.map(|o| o.name).join(", ")
        ))
    })
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
            let o = spec(name)?;
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
