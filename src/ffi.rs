//! Safe wrappers over the C++ shim in `csrc/`: `at::convolution_backward`,
//! `at::parallel_for`, the fallible tensor accessor that [`crate::facts`] reads its
//! facts with, c10's dtype codes and autograd's grad mode. Every call returns an error
//! instead of letting a C++ exception or a Rust panic cross the boundary. A leaf of the
//! crate: it uses only [`crate::error`] and [`crate::geometry`].

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::geometry::Geometry;

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

    fn ovsw_conv_mode(
        cpu: c_int,
        autocast_dtype: *mut i32,
        tf32: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    fn ovsw_tensor_facts(
        t: *const C_tensor,
        out: *mut RawFacts,
        sizes: *mut i64,
        strides: *mut i64,
        cap: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    fn ovsw_new_full(
        like: *const C_tensor,
        sizes: *const i64,
        dim: i64,
        value: f64,
        scalar_type: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;

    fn ovsw_set_grad_enabled(enabled: c_int) -> c_int;

    fn ovsw_parallel_for(
        n: i64,
        grain: i64,
        f: extern "C" fn(*mut c_void, i64, i64),
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// The message the shim wrote into `err` (it always NUL-terminates within the buffer).
fn shim_message(err: &[c_char]) -> String {
    match err.iter().position(|&c| c == 0) {
        // SAFETY: a NUL lies within the buffer, so the C string ends inside it.
        Some(_) => unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        None => "unknown error".to_string(),
    }
}

/// What `ovsw_tensor_facts` reports (`OvswTensorFacts` in csrc/tensor_facts.cpp).
#[repr(C)]
pub struct RawFacts {
    pub dim: i64,
    pub defined: i32,
    pub scalar_type: i32,
    pub place: i32,
    pub device_index: i32,
    pub strided: i32,
    pub contiguous: i32,
    pub python: i32,
    pub storage: i32,
    pub data: *mut c_void,
    pub device_name: [c_char; 32],
}

/// The shim's `OVSW_STORAGE_NONE`: the tensor has no readable storage; its sizes were
/// not read.
pub const STORAGE_NONE: i32 = 2;

/// The facts of `t`, its sizes and its strides (empty when `t` is undefined or has no
/// storage; strides are zeros for a layout other than strided).
pub fn tensor_facts(t: &Tensor) -> Result<(RawFacts, Vec<i64>, Vec<i64>)> {
    let mut sizes = vec![0i64; 8];
    let mut strides = vec![0i64; 8];
    loop {
        let mut raw = RawFacts {
            dim: 0,
            defined: 0,
            scalar_type: -1,
            place: 0,
            device_index: -1,
            strided: 0,
            contiguous: 0,
            python: 0,
            storage: 0,
            data: std::ptr::null_mut(),
            device_name: [0; 32],
        };
        let mut err = [0 as c_char; 512];
        // SAFETY: `t` is a live tensor borrowed for the call; `raw`, `sizes` and
        // `strides` are writable for the lengths passed; the shim catches every C++
        // exception.
        let rc = unsafe {
            ovsw_tensor_facts(
                t.as_ptr(),
                &mut raw,
                sizes.as_mut_ptr(),
                strides.as_mut_ptr(),
                sizes.len() as i64,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(Error::Torch(shim_message(&err)));
        }
        let dim = usize::try_from(raw.dim).unwrap_or(0);
        if raw.defined == 0 || raw.storage == STORAGE_NONE {
            return Ok((raw, Vec::new(), Vec::new()));
        }
        if dim <= sizes.len() {
            sizes.truncate(dim);
            strides.truncate(dim);
            return Ok((raw, sizes, strides));
        }
        sizes = vec![0i64; dim];
        strides = vec![0i64; dim];
    }
}

/// How libtorch will run a float convolution on CUDA tensors (CPU tensors with `cpu`)
/// from this thread: the c10::ScalarType code autocast casts to (`None` outside
/// `torch.autocast("cuda")`, or `"cpu"`), and whether cuDNN may run float32 convolutions
/// in TF32 (never on the CPU).
pub fn conv_mode(cpu: bool) -> Result<(Option<i32>, bool)> {
    let mut dtype = -1i32;
    let mut tf32: c_int = 0;
    let mut err = [0 as c_char; 512];
    // SAFETY: two writable out-values and an error buffer of the length passed; the shim
    // catches every C++ exception.
    let rc = unsafe {
        ovsw_conv_mode(
            c_int::from(cpu),
            &mut dtype,
            &mut tf32,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        return Err(Error::Torch(format!(
            "reading the autocast and TF32 state: {}",
            shim_message(&err)
        )));
    }
    Ok(((dtype >= 0).then_some(dtype), tf32 != 0))
}

/// The device name the shim wrote (`"cpu"`, `"cuda:0"`, `"meta"`, ...).
pub fn device_name(raw: &RawFacts) -> String {
    shim_message(&raw.device_name)
}

/// c10::ScalarType codes of the dtypes the core names (c10/core/ScalarType.h).
pub(crate) fn kind_of(scalar_type: i32) -> Option<Kind> {
    Some(match scalar_type {
        0 => Kind::Uint8,
        1 => Kind::Int8,
        2 => Kind::Int16,
        3 => Kind::Int,
        4 => Kind::Int64,
        5 => Kind::Half,
        6 => Kind::Float,
        7 => Kind::Double,
        8 => Kind::ComplexHalf,
        9 => Kind::ComplexFloat,
        10 => Kind::ComplexDouble,
        11 => Kind::Bool,
        15 => Kind::BFloat16,
        _ => return None,
    })
}

/// The c10::ScalarType code of a dtype the core names (the inverse of `kind_of`).
pub(crate) fn scalar_type(kind: Kind) -> Option<i32> {
    (0..16).find(|&code| kind_of(code) == Some(kind))
}

/// A float64 tensor of `sizes` filled with `value` on `like`'s device (any device,
/// meta included: tch can name only some).
pub fn new_full_f64(like: &Tensor, sizes: &[i64], value: f64) -> Result<Tensor> {
    new_full(like, sizes, value, Kind::Double)
}

/// A tensor of `kind` and `sizes` filled with `value` on `like`'s device (any device,
/// meta included).
pub fn new_full(like: &Tensor, sizes: &[i64], value: f64, kind: Kind) -> Result<Tensor> {
    let scalar_type = scalar_type(kind)
        .ok_or_else(|| Error::Internal(format!("new_full: no ScalarType for {kind:?}")))?;
    let mut err = [0 as c_char; 512];
    // SAFETY: `like` is a live tensor borrowed for the call; `sizes` has the length
    // passed; the shim catches every C++ exception.
    let ptr = unsafe {
        ovsw_new_full(
            like.as_ptr(),
            sizes.as_ptr(),
            sizes.len() as i64,
            value,
            scalar_type,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    adopt(ptr).ok_or_else(|| Error::Torch(format!("new_full: {}", shim_message(&err))))
}

/// Turns autograd off on this thread until dropped (`torch.no_grad()`), restoring the
/// previous mode. `c10::GradMode` is a thread-local flag: setting it cannot fail.
pub struct NoGrad {
    previous: c_int,
}

pub fn no_grad() -> NoGrad {
    // SAFETY: flips a thread-local flag; no pointers cross.
    let previous = unsafe { ovsw_set_grad_enabled(0) };
    NoGrad { previous }
}

impl Drop for NoGrad {
    fn drop(&mut self) {
        // SAFETY: as in `no_grad`.
        unsafe { ovsw_set_grad_enabled(self.previous) };
    }
}

struct RangeTask<'a, F> {
    f: &'a F,
    panicked: AtomicBool,
}

extern "C" fn run_range<F: Fn(usize, usize) + Sync>(ctx: *mut c_void, begin: i64, end: i64) {
    // SAFETY: ctx is the &RangeTask<F> that `parallel_for` passed, alive for the call.
    let task = unsafe { &*(ctx as *const RangeTask<'_, F>) };
    // A panic must not unwind into C++; record it instead.
    if catch_unwind(AssertUnwindSafe(|| (task.f)(begin as usize, end as usize))).is_err() {
        task.panicked.store(true, Ordering::Relaxed);
    }
}

/// Runs `f(begin, end)` over disjoint sub-ranges covering `0..n` on libtorch's intra-op
/// thread pool (`at::parallel_for`; serial when `n <= grain`).
pub fn parallel_for<F: Fn(usize, usize) + Sync>(n: usize, grain: usize, f: F) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let task = RangeTask {
        f: &f,
        panicked: AtomicBool::new(false),
    };
    let mut err = [0 as c_char; 512];
    // SAFETY: `task` outlives the call; `run_range::<F>` matches its type.
    let rc = unsafe {
        ovsw_parallel_for(
            n as i64,
            grain.max(1) as i64,
            run_range::<F>,
            &task as *const RangeTask<'_, F> as *mut c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = shim_message(&err);
        return Err(Error::Torch(format!("parallel_for: {msg}")));
    }
    if task.panicked.load(Ordering::Relaxed) {
        return Err(Error::Internal("a panic in a parallel kernel".into()));
    }
    Ok(())
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
        let msg = shim_message(&err);
        return Err(Error::Torch(format!("convolution_backward: {msg}")));
    }
    Ok((gi, gw, gb))
}
