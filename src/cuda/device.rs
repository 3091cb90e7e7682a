//! Per-device state (PyTorch's primary context, the loaded kernels) and launches on a
//! GPU, with what every launch takes: [`Stream`], [`THREADS`], [`arg`]. The choice
//! between a GPU and the host launcher is `launcher.rs`'s.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::result as drv;
use cudarc::driver::sys;

use super::{compile, loader};
use crate::error::Error;

type Result<T, E = Error> = std::result::Result<T, E>;

/// Devices this process can use the kernels on (CUDA device ordinals below this).
const MAX_DEVICES: usize = 64;

/// One GPU: its primary context (the one PyTorch's runtime uses), the kernels loaded
/// into it, and figures that size the grids.
pub struct DeviceState {
    pub index: usize,
    /// `major * 10 + minor` (90 for H100/H200).
    pub arch: u32,
    pub sm_count: u32,
    ctx: sys::CUcontext,
    functions: HashMap<String, sys::CUfunction>,
}

// SAFETY: driver handles (context, functions) may be used from any thread; the state is
// immutable after construction.
unsafe impl Send for DeviceState {}
unsafe impl Sync for DeviceState {}

/// Makes `ctx` current for the guard's lifetime (if it is not already).
struct CtxGuard {
    pushed: bool,
}

impl CtxGuard {
    fn new(ctx: sys::CUcontext) -> Result<Self, String> {
        let current = drv::ctx::get_current().map_err(|e| format!("cuCtxGetCurrent: {e}"))?;
        if current == Some(ctx) {
            return Ok(CtxGuard { pushed: false });
        }
        // SAFETY: `ctx` is a retained primary context, alive for the process.
        unsafe { sys::cuCtxPushCurrent_v2(ctx) }
            .result()
            .map_err(|e| format!("cuCtxPushCurrent: {e}"))?;
        Ok(CtxGuard { pushed: true })
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        if self.pushed {
            let mut old: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: pops the context this guard pushed on this thread.
            let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
        }
    }
}

fn attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32, String> {
    // SAFETY: `dev` came from cuDeviceGet.
    unsafe { drv::device::get_attribute(dev, attr) }.map_err(|e| format!("{attr:?}: {e}"))
}

fn init(index: usize) -> Result<DeviceState, String> {
    loader::driver()?;
    loader::nvrtc()?;
    loader::guarded("CUDA", || {
        let dev =
            drv::device::get(index as i32).map_err(|e| format!("cuDeviceGet({index}): {e}"))?;
        use sys::CUdevice_attribute::*;
        let major = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let arch = (major * 10 + minor) as u32;
        if arch < 80 {
            return Err(format!(
                "cuda:{index} has compute capability {major}.{minor}; the kernels need 8.0 or newer"
            ));
        }
        // SAFETY: `dev` is valid; the primary context is retained for the process.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(|e| format!("cuDevicePrimaryCtxRetain: {e}"))?;
        let image = compile::compiled(arch)?;
        let _guard = CtxGuard::new(ctx)?;
        // SAFETY: the cubin is a complete image; the module stays loaded for the process.
        let module = unsafe { drv::module::load_data(image.cubin.as_ptr() as *const c_void) }
            .map_err(|e| format!("cuModuleLoadData (sm_{arch}): {e}"))?;
        let mut functions = HashMap::new();
        for name in compile::entry_points() {
            let c = compile::cstr(&name)?;
            // SAFETY: `module` is loaded.
            let f = unsafe { drv::module::get_function(module, c) }
                .map_err(|e| format!("cuModuleGetFunction({name}): {e}"))?;
            functions.insert(name, f);
        }
        Ok(DeviceState {
            index,
            arch,
            sm_count,
            ctx,
            functions,
        })
    })
}

/// The state of CUDA device `index`, set up on first use (compiles the kernels for its
/// architecture, once per process and architecture).
pub fn get(index: usize) -> Result<&'static DeviceState, String> {
    static DEVICES: [OnceLock<Result<DeviceState, String>>; MAX_DEVICES] =
        [const { OnceLock::new() }; MAX_DEVICES];
    let slot = DEVICES
        .get(index)
        .ok_or_else(|| format!("cuda:{index} is beyond the {MAX_DEVICES} devices supported"))?;
    slot.get_or_init(|| init(index))
        .as_ref()
        .map_err(Clone::clone)
}

/// One kernel argument: a pointer to its value, as `cuLaunchKernel` takes them.
pub(crate) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

impl DeviceState {
    /// Launches kernel `name` on `stream` with `OVSW_THREADS` (256) threads per block.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, each pointing to a
    /// live value; every device pointer among them must be valid on this device for what
    /// the kernel reads and writes, until the kernel has run on `stream`.
    pub(crate) unsafe fn launch(
        &self,
        name: &str,
        blocks: u64,
        stream: Stream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let blocks = u32::try_from(blocks)
            .ok()
            .filter(|&b| b < i32::MAX as u32)
            .ok_or_else(|| Error::Value(format!("{name}: {blocks} blocks is too many")))?;
        let f = *self
            .functions
            .get(name)
            .ok_or_else(|| Error::Internal(format!("no CUDA kernel named {name}")))?;
        let _guard = CtxGuard::new(self.ctx).map_err(Error::Unsupported)?;
        drv::launch_kernel(
            f,
            (blocks, 1, 1),
            (THREADS, 1, 1),
            0,
            stream.0 as sys::CUstream,
            args,
        )
        .map_err(|e| Error::Unsupported(format!("launching {name} on cuda:{}: {e}", self.index)))
    }

    /// Blocks for a grid-stride loop over `n` elements: enough to fill the GPU, no more.
    pub(crate) fn elementwise_blocks(&self, n: i64) -> u64 {
        let needed = (n.max(0) as u64).div_ceil(THREADS as u64);
        needed.min(self.sm_count as u64 * 32).max(1)
    }
}

/// A CUDA stream handle (`CUstream` / `cudaStream_t`; 0 is the legacy default stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(pub u64);

/// Threads per block of every kernel (`OVSW_THREADS` in `kernels/common.cuh`).
pub const THREADS: u32 = 256;
