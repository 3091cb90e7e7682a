//! Safe wrapper over the C++ shim `csrc/conv_backward.cpp` (`at::convolution_backward`).

use std::ffi::{c_char, c_int, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::conv::Geometry;
use crate::error::{Error, Result};

extern "C" {
    fn ovsw_convolution_backward(
        grad_output: *const C_tensor,
        input: *const C_tensor,
        weight: *const C_tensor,
        stride: *const i64,
        padding: *const i64,
        dilation: *const i64,
        groups: i64,
        want_input: c_int,
        want_weight: c_int,
        want_bias: c_int,
        grad_input: *mut *mut C_tensor,
        grad_weight: *mut *mut C_tensor,
        grad_bias: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Takes ownership of a tensor the shim allocated (null means "not computed").
fn adopt(ptr: *mut C_tensor) -> Option<Tensor> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the shim returns a fresh heap `at::Tensor*` that nothing else owns;
        // tch frees it when the Tensor drops.
        Some(unsafe { Tensor::from_ptr(ptr) })
    }
}

/// Gradients of a (non-transposed) 2-D convolution with respect to its input, weight
/// and bias, for the mask `want`.
pub fn convolution_backward(
    grad_output: &Tensor,
    input: &Tensor,
    weight: &Tensor,
    geom: &Geometry,
    want: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut gi: *mut C_tensor = std::ptr::null_mut();
    let mut gw: *mut C_tensor = std::ptr::null_mut();
    let mut gb: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 1024];
    // SAFETY: the tensor pointers come from live tch Tensors borrowed for the whole
    // call; the int arrays have the two elements the shim reads; the shim catches every
    // C++ exception and reports it through `err`.
    let rc = unsafe {
        ovsw_convolution_backward(
            grad_output.as_ptr(),
            input.as_ptr(),
            weight.as_ptr(),
            geom.stride.as_ptr(),
            geom.padding.as_ptr(),
            geom.dilation.as_ptr(),
            geom.groups,
            c_int::from(want[0]),
            c_int::from(want[1]),
            c_int::from(want[2]),
            &mut gi,
            &mut gw,
            &mut gb,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    let (gi, gw, gb) = (adopt(gi), adopt(gw), adopt(gb));
    if rc != 0 {
        // SAFETY: the shim always NUL-terminates `err` within its length.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(Error::Torch(format!("convolution_backward: {msg}")));
    }
    Ok((gi, gw, gb))
}
