//! How the bindings behind the `torch.ops.ovsw` custom ops pass tensors that may be
//! absent.
//!
//! A `torch.library` op cannot return `None`, so every output that some calls lack
//! (the per-sample std in eval mode, the W-derived alpha when the layer owns a
//! learnable scale, a gradient nobody asked for) is an *absent marker*: a 1-D tensor of
//! zero elements. A present one never has that shape (a std or a pre-scale product has
//! two or more dims, an alpha `[O]` with `O >= 1`). The marker keeps a dtype, which
//! carries the dtype the matrix product ran in when the product itself is not kept.

use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::{facts, ffi};

/// `t`, or the absent marker of dtype `kind` on `like`'s device.
pub fn or_absent(t: Option<Tensor>, like: &Tensor, kind: Kind) -> Result<PyTensor> {
    Ok(PyTensor(match t {
        Some(t) => t,
        None => ffi::new_full(like, &[0], 0.0, kind)?,
    }))
}

/// `t`, or the absent marker in `like`'s dtype.
pub fn or_absent_like(t: Option<Tensor>, like: &Tensor) -> Result<PyTensor> {
    or_absent(t, like, facts::kind(like)?)
}

/// `None` for the absent marker, else the tensor.
pub fn present(t: &Tensor) -> Result<Option<&Tensor>> {
    let f = facts::facts(t)?;
    Ok(if f.sizes == [0] { None } else { Some(t) })
}
