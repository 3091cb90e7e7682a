//! The binary convolution's product: a 2-D convolution of `[N, C, H, W]` activations,
//! libtorch's forward and `at::convolution_backward` (through the C++ shim,
//! [`crate::ffi`]) for its gradients, as the layer skeleton ([`crate::layer`]) runs it
//! on the CPU and libtorch routes.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::ffi;
use crate::geometry::Geometry;
use crate::layer::{self, Operands, Product};

/// The convolution of a binary conv layer, with its geometry.
pub struct Conv<'g>(pub &'g Geometry);

/// The dims of the convolution's input and output, `[N, C, H, W]`.
const DIMS: usize = 4;
/// The output channel's dim.
const CHANNEL: usize = 1;

/// A per-output-channel vector `[O]` shaped to broadcast over `[N, O, H, W]`.
pub fn over_channels(v: &Tensor) -> Result<Tensor> {
    layer::over_channels(v, DIMS, CHANNEL)
}

impl Product for Conv<'_> {
    const NAME: &'static str = "conv_out";

    fn dims(&self) -> usize {
        DIMS
    }

    fn channel(&self) -> usize {
        CHANNEL
    }

    fn forward(&self, a: &Tensor, wb: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let g = self.0;
        Ok(a.f_conv2d(wb, bias, g.stride, g.padding, g.dilation, g.groups)?)
    }

    fn backward(
        &self,
        grad: &Tensor,
        kind: Kind,
        operands: &Operands<'_>,
        want: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        let grad = grad.f_to_kind(kind)?;
        let (ga, gwb, gb) =
            ffi::convolution_backward(&grad, operands.a()?, operands.wb()?, self.0, want)?;
        Ok([ga, gwb, gb])
    }
}
