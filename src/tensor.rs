//! What the core needs to know about a tensor before it touches it, and the route an op
//! takes from that.

use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The facts about one tensor that decide validation and the route.
#[derive(Debug)]
pub struct Facts {
    pub sizes: Vec<i64>,
    pub kind: Kind,
    pub device: Device,
    pub contiguous: bool,
    /// The first element, readable on the host when `device` is the CPU.
    pub data: *mut c_void,
}

impl Facts {
    pub fn dim(&self) -> usize {
        self.sizes.len()
    }

    pub fn numel(&self) -> usize {
        self.sizes.iter().product::<i64>().max(0) as usize
    }
}

/// The facts of `t`.
pub fn facts(t: &Tensor) -> Result<Facts> {
    Ok(Facts {
        sizes: t.size(),
        kind: t.f_kind()?,
        device: t.device(),
        contiguous: t.is_contiguous(),
        data: t.data_ptr(),
    })
}

/// The number of dimensions of `t`.
pub fn dim(t: &Tensor) -> Result<usize> {
    Ok(t.dim())
}

/// The floating dtypes the binary layers and AGS/SAD accept.
pub fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// `Ok(kind)` for a floating tensor, else a TypeError naming `what`.
pub fn check_float(f: &Facts, what: &str) -> Result<Kind> {
    if is_float(f.kind) {
        Ok(f.kind)
    } else {
        Err(Error::Type(format!(
            "{what} must be a floating-point tensor, got dtype {:?}",
            f.kind
        )))
    }
}

/// Which implementation an op runs, chosen once per op from the tensors its fused form
/// would read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Every tensor is contiguous float32 memory on the CPU: the fused loops.
    HostF32,
    /// Anything else: libtorch ops through the dispatcher.
    Generic,
}

impl Route {
    pub fn of(tensors: &[&Tensor]) -> Result<Route> {
        let mut host = true;
        for t in tensors {
            let f = facts(t)?;
            host &= f.device == Device::Cpu && f.kind == Kind::Float && f.contiguous;
        }
        Ok(if host { Route::HostF32 } else { Route::Generic })
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
        if f.device != Device::Cpu || f.kind != Kind::Float || !f.contiguous {
            return Err(Error::Torch(format!(
                "internal: a fused CPU loop got a {:?} tensor on {:?} (contiguous: {})",
                f.kind, f.device, f.contiguous
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
        if self.len == 0 {
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
