//! What the kernels need to know about a tensor, read with fallible calls.

use std::ffi::{c_char, CStr};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The dtype code of the kernels (0 f32, 1 f16, 2 bf16), `None` for other dtypes.
pub fn dtype_code(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Float => Some(0),
        Kind::Half => Some(1),
        Kind::BFloat16 => Some(2),
        _ => None,
    }
}

/// The suffix of a kernel's name for `kind` (`f32`, `f16`, `bf16`).
pub fn suffix(kind: Kind) -> Option<&'static str> {
    dtype_code(kind).map(|c| super::compile::DTYPES[c])
}

/// The CUDA device index of `t`, `None` for a tensor elsewhere.
pub fn cuda_index(t: &Tensor) -> Option<usize> {
    match t.device() {
        Device::Cuda(i) => Some(i),
        _ => None,
    }
}

/// The address of `t`'s first element (a device pointer for a CUDA tensor), or an error
/// (an undefined tensor, one without storage).
pub fn ptr(t: &Tensor) -> Result<u64> {
    // SAFETY: `t` is a live tensor; libtorch reports failures through its error slot,
    // read right after.
    let p = unsafe { torch_sys::at_data_ptr(t.as_ptr() as *mut _) };
    // SAFETY: the error slot is a malloc'ed C string or null; we free what we take.
    let err = unsafe { torch_sys::get_and_reset_last_err() };
    if !err.is_null() {
        // SAFETY: non-null, NUL-terminated, owned by us from here.
        let msg = unsafe { CStr::from_ptr(err as *const c_char) }
            .to_string_lossy()
            .into_owned();
        unsafe { libc_free(err as *mut std::ffi::c_void) };
        return Err(Error::Torch(msg));
    }
    Ok(p as u64)
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}

/// `Some(p)` for a tensor, `0` (a null device pointer) for none.
pub fn opt_ptr(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), ptr)
}

/// The dims of `t` from outermost to innermost in memory, when `t` is non-overlapping
/// and dense (a permutation of a contiguous tensor: NCHW-contiguous, channels_last, ...).
/// Size-1 dims may carry any stride.
pub fn dense_order(t: &Tensor) -> Option<Vec<usize>> {
    let size = t.size();
    let stride = t.stride();
    let mut order: Vec<usize> = (0..size.len()).collect();
    // Outermost first; a size-1 dim sorts by its position (its stride is arbitrary).
    order.sort_by(|&a, &b| {
        let key = |d: usize| if size[d] == 1 { -1 } else { stride[d] };
        key(b).cmp(&key(a)).then(a.cmp(&b))
    });
    let mut expected = 1i64;
    for &d in order.iter().rev() {
        if size[d] == 1 {
            continue;
        }
        if stride[d] != expected {
            return None;
        }
        expected *= size[d];
    }
    Some(order)
}

/// Whether `t` is dense with dim 0 outermost: slice `i` of dim 0 is the flat range
/// `[i * per, (i + 1) * per)` (NCHW-contiguous and channels_last activations; weights
/// `[O, ...]` in either format).
pub fn dim0_major(t: &Tensor) -> bool {
    let size = t.size();
    if size.is_empty() {
        return false;
    }
    let per: i64 = size[1..].iter().product();
    dense_order(t).is_some() && (size[0] == 1 || t.stride()[0] == per)
}

/// A fresh tensor of `t`'s shape and strides (so its layout) in `kind`.
pub fn empty_like_kind(t: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_empty_strided(
        t.size(),
        t.stride(),
        (kind, t.device()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_orders() {
        let x = Tensor::zeros([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(dense_order(&x), Some(vec![0, 1, 2, 3]));
        assert!(dim0_major(&x));
        // channels_last: strides (60, 1, 15, 3)
        let cl = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        assert_eq!(cl.stride(), vec![60, 1, 15, 3]);
        assert_eq!(dense_order(&cl), Some(vec![0, 2, 3, 1]));
        assert!(dim0_major(&cl));
        // batch not outermost: dense but not dim0-major
        let cn = x.permute([1, 0, 2, 3]).contiguous().permute([1, 0, 2, 3]);
        assert_eq!(dense_order(&cn), Some(vec![1, 0, 2, 3]));
        assert!(!dim0_major(&cn));
        // a strided slice is not dense
        let sliced = x.slice(3, 0, 4, 2);
        assert_eq!(dense_order(&sliced), None);
        assert!(!dim0_major(&sliced));
        // size-1 dims with odd strides still count as dense
        let one = Tensor::zeros([1, 3, 1, 5], (Kind::Float, Device::Cpu));
        assert!(dim0_major(&one));
    }

    #[test]
    fn pointers_and_codes() {
        let x = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert_eq!(ptr(&x).unwrap(), x.data_ptr() as u64);
        assert_eq!(opt_ptr(None).unwrap(), 0);
        assert_eq!(dtype_code(Kind::BFloat16), Some(2));
        assert_eq!(dtype_code(Kind::Double), None);
        assert_eq!(suffix(Kind::Half), Some("f16"));
        let e = empty_like_kind(&x.view([2, 2]).tr(), Kind::Half).unwrap();
        assert_eq!(e.stride(), vec![1, 2]);
        assert_eq!(e.kind(), Kind::Half);
    }
}
