//! The ovsw deploy engine: runs an exported binary network without PyTorch.
//!
//! [`format`] reads a deploy file and [`writer`] writes one (the format's constants and
//! byte layout are defined in [`format`] only); [`engine::Engine::from_bytes`] builds the graph
//! of ops from a file's header, and [`engine::Engine::run`] executes it on NHWC float32
//! tensors ([`nhwc`]), after [`shapes`] has checked that the network can take the input:
//! binary convolutions by XNOR + popcount ([`bitconv`], its
//! instruction-set kernels in `bitconv/simd/`), full-precision layers in [`float`]. Work
//! inside each op is split over a rayon pool whose size the user sets. [`lower`] makes
//! what the file stores from a trained model's layers (sign bits, folded scales and
//! shifts), in the bit layout of [`bits`] that the engine packs activations in.
//!
//! The crate has no PyTorch and no Python: the root crate `ovsw` reads tensors out of
//! libtorch and binds the engine to Python (`src/deploy/`). This file only declares the
//! modules.

// No panic outside tests: errors are values (crate::error).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bitconv;
pub mod bits;
pub mod engine;
pub mod error;
pub mod float;
pub mod format;
pub mod geom;
pub mod lower;
pub mod nhwc;
pub mod par;
pub mod shapes;
pub mod writer;
