//! What the core needs to know about a tensor before it touches it, read without a
//! panic, and the route an op takes from that.
//!
//! tch's accessors (`size`, `dim`, `kind`, `device`, `data_ptr`, `is_contiguous`, ...)
//! unwrap libtorch's error and so panic, for instance on the data pointer of a
//! FakeTensor under `torch.export`. [`facts`] reads all of them in one call to the C++
//! shim (`csrc/tensor_facts.cpp`), which catches every exception; the core uses it and
//! tch's fallible `f_` calls only.

use std::ffi::c_void;
use std::fmt;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::ffi;

/// Where a tensor lives. Two tensors are on one device when their places are equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Cpu,
    Cuda(i32),
    /// A meta tensor: shape and dtype, no elements.
    Meta,
    /// Any other device, by libtorch's name for it.
    Other(String),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Cpu => write!(f, "cpu"),
            Place::Cuda(i) => write!(f, "cuda:{i}"),
            Place::Meta => write!(f, "meta"),
            Place::Other(name) => write!(f, "{name}"),
        }
    }
}

/// Where a tensor's elements are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Real memory on the tensor's device.
    Readable,
    /// A meta tensor: libtorch ops compute shapes, nothing reads elements.
    Meta,
}

/// The facts about one tensor that decide validation and the route.
#[derive(Clone, Debug)]
pub struct Facts {
    pub sizes: Vec<i64>,
    /// Element strides, one per dim (zeros for a layout other than strided).
    pub strides: Vec<i64>,
    /// `None` for a dtype the core has no use for (complex, quantized, ...).
    pub kind: Option<Kind>,
    pub place: Place,
    pub strided: bool,
    pub contiguous: bool,
    /// A `__torch_dispatch__` subclass: its ops run through Python.
    pub python: bool,
    pub storage: Storage,
    /// The first element when `storage` is readable (may be null when empty).
    pub data: *mut c_void,
}

impl Facts {
    pub fn dim(&self) -> usize {
        self.sizes.len()
    }

    pub fn numel(&self) -> usize {
        self.sizes.iter().map(|&s| s.max(0) as usize).product()
    }

    /// Size of dimension 0 (the output channel of a weight, the sample of an input).
    pub fn dim0(&self) -> Option<i64> {
        self.sizes.first().copied()
    }

    /// Whether the fused float32 CPU loops can read (and write) this tensor as memory.
    pub fn is_host_f32(&self) -> bool {
        self.place == Place::Cpu
            && self.kind == Some(Kind::Float)
            && self.contiguous
            && !self.python
            && self.storage == Storage::Readable
    }

    /// The CUDA device whose fused kernels (`crate::cuda`) could take this tensor: real
    /// float32, float16 or bfloat16 strided memory on that device, not a Python
    /// subclass. Its layout is the kernels' own check. CPU memory counts as the device
    /// [`crate::cuda::host::HOST_INDEX`] while the host launcher is selected.
    pub fn cuda_kernel_device(&self) -> Option<usize> {
        let memory = matches!(self.kind, Some(Kind::Float | Kind::Half | Kind::BFloat16))
            && self.strided
            && !self.python
            && self.storage == Storage::Readable;
        match &self.place {
            Place::Cuda(i) if memory && *i >= 0 => Some(*i as usize),
            Place::Cpu if memory && crate::cuda::host::selected() => {
                Some(crate::cuda::host::HOST_INDEX)
            }
            _ => None,
        }
    }

    /// The dtype in torch's spelling, for messages.
    pub fn dtype_name(&self) -> String {
        match self.kind {
            Some(k) => kind_name(k).to_string(),
            None => "a dtype ovsw does not use".to_string(),
        }
    }
}

/// The dtype of a tch `Kind` as torch spells it.
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Uint8 => "torch.uint8",
        Kind::Int8 => "torch.int8",
        Kind::Int16 => "torch.int16",
        Kind::Int => "torch.int32",
        Kind::Int64 => "torch.int64",
        Kind::Half => "torch.float16",
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::Bool => "torch.bool",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::ComplexHalf => "torch.complex32",
        Kind::ComplexFloat => "torch.complex64",
        Kind::ComplexDouble => "torch.complex128",
        _ => "another dtype",
    }
}

/// The refusal of a tensor without storage, naming the likely cause.
fn no_storage(python: bool) -> Error {
    let kind = if python {
        "a tensor subclass without storage (a FakeTensor or FunctionalTensor)"
    } else {
        "a tensor without storage (a functional or batched tensor)"
    };
    Error::Unsupported(format!(
        "ovsw._core got {kind}, as torch.export, torch.compile tracing, torch.func and \
         FakeTensorMode create: _core computes on real tensors only; trace the \
         torch.library ops in torch.ops.ovsw (what ovsw's modules call), whose fake \
         implementations handle such tensors"
    ))
}

/// The facts of `t`: a RuntimeError for a tensor without storage (FakeTensor,
/// FunctionalTensor, ...), a ValueError for an undefined one.
pub fn facts(t: &Tensor) -> Result<Facts> {
    let (raw, sizes, strides) = ffi::tensor_facts(t)?;
    if raw.defined == 0 {
        return Err(Error::Value("got an undefined tensor".into()));
    }
    if raw.storage == ffi::STORAGE_NONE {
        return Err(no_storage(raw.python != 0));
    }
    let place = match raw.place {
        0 => Place::Cpu,
        1 => Place::Cuda(raw.device_index),
        2 => Place::Meta,
        _ => Place::Other(ffi::device_name(&raw)),
    };
    Ok(Facts {
        sizes,
        strides,
        kind: ffi::kind_of(raw.scalar_type),
        place,
        strided: raw.strided != 0,
        contiguous: raw.contiguous != 0,
        python: raw.python != 0,
        storage: if raw.storage == 1 {
            Storage::Meta
        } else {
            Storage::Readable
        },
        data: raw.data,
    })
}

/// The number of dimensions of `t`.
pub fn dim(t: &Tensor) -> Result<usize> {
    Ok(facts(t)?.dim())
}

/// The dtype of `t`.
pub fn kind(t: &Tensor) -> Result<Kind> {
    let f = facts(t)?;
    f.kind
        .ok_or_else(|| Error::Type(format!("unsupported dtype {}", f.dtype_name())))
}

/// The floating dtypes the binary layers and AGS/SAD accept.
pub fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// `Ok(kind)` for a dense floating tensor, else a TypeError naming `what`.
pub fn check_float(f: &Facts, what: &str) -> Result<Kind> {
    match f.kind {
        Some(k) if is_float(k) && f.strided => Ok(k),
        Some(k) if is_float(k) => Err(Error::Type(format!(
            "{what} must be a dense (strided) tensor, not sparse or another layout"
        ))),
        _ => Err(Error::Type(format!(
            "{what} must be a floating-point tensor, got dtype {}",
            f.dtype_name()
        ))),
    }
}

/// Which implementation an op runs, chosen once per op from the tensors its fused form
/// would read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Every tensor is contiguous float32 memory on the CPU: the fused loops.
    HostF32,
    /// Every tensor is float32, float16 or bfloat16 memory on CUDA device `.0`: the fused
    /// CUDA kernels (`crate::cuda`). They may still decline (a layout they do not cover,
    /// the kernels turned off or unavailable); the op then runs the generic route.
    Cuda(usize),
    /// Anything else: libtorch ops through the dispatcher (meta tensors included).
    Generic,
}

impl Route {
    /// The route for `tensors`; a RuntimeError if one of them has no storage.
    pub fn of(tensors: &[&Tensor]) -> Result<Route> {
        let facts = tensors
            .iter()
            .map(|t| facts(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Route::of_facts(&facts.iter().collect::<Vec<_>>()))
    }

    /// The route for the tensors whose facts are `facts` (read once by the op).
    pub fn of_facts(facts: &[&Facts]) -> Route {
        let mut host = true;
        let mut cuda: Option<Option<usize>> = None;
        for f in facts {
            host &= f.is_host_f32();
            let device = f.cuda_kernel_device();
            cuda = match cuda {
                None => Some(device),
                Some(first) if first == device => Some(first),
                Some(_) => Some(None),
            };
        }
        match (host, cuda) {
            // The host launcher runs the CUDA route on CPU memory.
            (_, Some(Some(index))) if index == crate::cuda::host::HOST_INDEX => Route::Cuda(index),
            (true, _) => Route::HostF32,
            (false, Some(Some(index))) => Route::Cuda(index),
            _ => Route::Generic,
        }
    }
}

/// A contiguous float32 CPU tensor seen as memory.
#[derive(Clone, Copy)]
pub struct HostF32 {
    ptr: *mut f32,
    len: usize,
}

impl HostF32 {
    /// The view of `t`, or an error when `t` is not contiguous float32 CPU memory.
    pub fn of(t: &Tensor) -> Result<HostF32> {
        let f = facts(t)?;
        if !f.is_host_f32() {
            return Err(Error::Internal(format!(
                "a fused CPU loop got a {} tensor on {} (contiguous: {})",
                f.dtype_name(),
                f.place,
                f.contiguous
            )));
        }
        Ok(HostF32 {
            ptr: f.data as *mut f32,
            len: f.numel(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// The elements.
    ///
    /// # Safety
    /// The tensor must outlive the slice, with no concurrent writer.
    pub unsafe fn as_slice<'a>(&self) -> &'a [f32] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// First and one-past-last address, for overlap checks.
    pub fn span(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.len * std::mem::size_of::<f32>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_contiguous_float32_cpu_tensor_is_host_memory() {
        let t = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
        let f = facts(&t).expect("facts");
        assert_eq!(f.sizes, [2, 3, 4]);
        assert_eq!(f.strides, [12, 4, 1]);
        assert_eq!((f.kind, f.place.clone()), (Some(Kind::Float), Place::Cpu));
        assert!(f.is_host_f32() && !f.data.is_null());
        assert_eq!(Route::of(&[&t]).expect("route"), Route::HostF32);
    }

    #[test]
    fn other_tensors_take_the_generic_route() {
        let t = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let transposed = t.f_t_copy().expect("t").f_transpose(0, 1).expect("view");
        let tf = facts(&transposed).expect("facts");
        assert!(!tf.contiguous);
        assert_eq!(
            (tf.sizes.as_slice(), tf.strides.as_slice()),
            ([2, 3].as_slice(), [1, 2].as_slice())
        );
        assert_eq!(tf.cuda_kernel_device(), None);
        let double = Tensor::zeros([2, 3], (Kind::Double, Device::Cpu));
        for other in [&transposed, &double] {
            assert_eq!(Route::of(&[&t, other]).expect("route"), Route::Generic);
        }
    }

    #[test]
    fn a_half_tensor_is_not_host_f32() {
        let t = Tensor::zeros([5, 7], (Kind::Half, Device::Cpu));
        let f = facts(&t).expect("facts");
        assert_eq!(f.kind, Some(Kind::Half));
        assert!(!f.is_host_f32());
        assert!(matches!(HostF32::of(&t), Err(Error::Internal(_))));
    }

    #[test]
    fn more_dims_than_the_first_buffer_holds() {
        let shape = [1i64; 11];
        let t = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        assert_eq!(facts(&t).expect("facts").sizes, shape);
    }

    #[test]
    fn an_undefined_tensor_is_a_value_error() {
        let r = facts(&Tensor::new());
        assert!(matches!(r, Err(Error::Value(_))), "{r:?}");
    }
}
