//! `ovsw._core`: the compute core of the ovsw package.
//!
//! The math lives in [`binarize`] (the elementwise parts of a 1-bit layer, SPEC 1.1 to
//! 1.4, one [`binarize::Elementwise`] per route), [`layer`] (what every binary layer
//! shares: its types and the one skeleton of forward and backward around a product),
//! [`conv`] (the binary convolution, SPEC section 1, with all its routes: the CPU and
//! libtorch one and the fused CUDA one, `conv/cuda.rs`), [`linear`] (the binary fully
//! connected layer, the same skeleton around a matrix product) and [`optim`] (AGS and
//! SAD, sections 2 and 3); [`cuda`] holds what the CUDA routes share (the kernels'
//! CUDA C, compiled at run time by NVRTC, device, stream, host launcher); [`facts`]
//! reads what the core needs to know about a tensor through the C++ shim ([`ffi`]);
//! [`deploy`] binds the deploy engine (the crate `ovsw-engine`, `crates/ovsw-engine/`,
//! which writes, reads and runs exported networks by XNOR and popcount without PyTorch)
//! and reads the tensors it exports out of libtorch. Each
//! family's Python bindings sit beside it (`conv/py.rs`, `linear/py.rs`, `optim/py.rs`,
//! `cuda/py.rs`, `deploy/py.rs`); the layers' and the optimizer's are the bodies of the
//! `torch.ops.ovsw` custom ops (`python/ovsw/ops.py`, conventions in [`op_args`]). This
//! file declares the modules and registers the bindings. `docs/architecture.md` follows
//! a tensor through them.

// No panic outside tests: errors are values (crate::error), and the bindings catch
// anything else at the boundary (error::boundary).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod binarize;
pub mod conv;
pub mod cuda;
pub mod deploy;
pub mod error;
pub mod facts;
mod ffi;
pub mod geometry;
pub mod layer;
pub mod linear;
mod op_args;
pub mod optim;
mod parallel;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    conv::py::register(m)?;
    linear::py::register(m)?;
    optim::py::register(m)?;
    deploy::py::register(m)?;
    cuda::py::register(m)?;
    optim::monitor::py::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
