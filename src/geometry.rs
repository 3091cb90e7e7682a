//! The geometry of a 2-D convolution: stride, padding, dilation and groups.
//!
//! A leaf module: the conv orchestration ([`crate::conv`]) and the C++ shim wrapper
//! ([`crate::ffi`]) both use it, and it uses neither.

use crate::error::{value_err, Result};

/// Stride, padding, dilation and groups of a 2-D convolution, validated once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: [i64; 2],
    pub padding: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

impl Geometry {
    pub fn new(
        stride: [i64; 2],
        padding: [i64; 2],
        dilation: [i64; 2],
        groups: i64,
    ) -> Result<Self> {
        if stride.iter().any(|&s| s < 1) {
            return value_err!("stride must be positive, got {stride:?}");
        }
        if padding.iter().any(|&p| p < 0) {
            return value_err!("padding must be non-negative, got {padding:?}");
        }
        if dilation.iter().any(|&d| d < 1) {
            return value_err!("dilation must be positive, got {dilation:?}");
        }
        if groups < 1 {
            return value_err!("groups must be positive, got {groups}");
        }
        Ok(Geometry {
            stride,
            padding,
            dilation,
            groups,
        })
    }
}
