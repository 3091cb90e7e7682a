//! What the flip monitor's dispatcher ([`crate::optim::monitor::update`]) and its routes
//! share: the columns of the figures, [`MonitorConfig`] and a layer's tensors
//! ([`MonitorLayer`]).

use tch::Tensor;

use crate::error::{Error, Result};
use crate::optim::config::{option, Value};

/// Columns of the figures [`crate::optim::monitor::update`] returns (float64 `[L, 4]`):
/// the share of the layer's weights whose sign changed at this step,
pub const FLIPPED: usize = 0;
/// the share that has not changed sign once since monitoring began,
pub const NEVER_FLIPPED: usize = 1;
/// the share whose tracker is below the threshold (silent, where SAD decays them),
pub const SILENT: usize = 2;
/// and the exponential moving average (momentum `m`) of the per-step flipped share,
/// bias-corrected: `ema / (1 - m^step)`.
pub const FLIP_RATE: usize = 3;
pub const COLUMNS: usize = 4;

/// How the monitor runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonitorConfig {
    /// `m`: the tracker's momentum and the flip-rate average's.
    pub momentum: f64,
    /// `tau`: a weight whose tracker is below it is silent.
    pub threshold: f64,
    /// Whether the monitor owns the trackers and updates them (no SAD), or reads SAD's.
    pub update_trackers: bool,
}

impl MonitorConfig {
    /// A config checked against the ranges of SAD's `track_momentum` and
    /// `track_threshold` options (one definition of what is valid).
    pub fn new(momentum: f64, threshold: f64, update_trackers: bool) -> Result<Self> {
        for (name, v) in [("track_momentum", momentum), ("track_threshold", threshold)] {
            match option(name) {
                Some(o) => o.check(Value::Float(v))?,
                None => return Err(Error::Internal(format!("no option {name}"))),
            }
        }
        Ok(MonitorConfig {
            momentum,
            threshold,
            update_trackers,
        })
    }
}

/// One layer's tensors. `sign`, `ever_flipped` and (when the monitor owns it) `tracker`
/// are updated in place; `weight` is only read.
pub struct MonitorLayer<'a> {
    pub weight: &'a Tensor,
    pub sign: &'a Tensor,
    pub ever_flipped: &'a Tensor,
    pub tracker: &'a Tensor,
}
