//! What the CUDA routes share: the CUDA C kernels (`kernels/*.cu`), compiled at run
//! time by NVRTC for the GPU present ([`compile`]) and loaded into PyTorch's own
//! (primary) context ([`device`]), the host launcher that runs them on the CPU
//! ([`host`]), the choice between the two ([`launcher`]), the kernels' view of a tensor
//! ([`operand`]), the route switch and counts,
//! and the status bindings ([`py`]). The routes themselves live with their families:
//! the binary conv's in [`crate::conv::cuda`], AGS+SAD's in [`crate::optim::cuda`].
//!
//! The kernels launch on PyTorch's current stream of the tensors' device. Nothing CUDA
//! is linked: the driver (`libcuda`) and NVRTC are opened with `dlopen` (cudarc's
//! dynamic loading) the first time a CUDA tensor reaches an entry point, NVRTC from the
//! torch wheel's `nvidia/cu13/lib` (or `nvidia/cuda_nvrtc/lib`) folder or the system
//! library path ([`loader`]). The crate builds, and its CPU paths run, with no CUDA
//! toolkit, driver or GPU.
//!
//! # How the library gets here
//! [`crate::conv::forward`], [`crate::conv::backward`] and [`crate::optim::step`] choose
//! their route once ([`Route::of`]); for [`Route::Cuda`] they hand the op to [`fused`]
//! with their CUDA entry point, and take the generic libtorch route where it declines.
//!
//! # Entry points
//! Each takes tch tensors, checks dtype, device, shape and layout (as [`operand`]s), and
//! returns `Ok(Outcome::Ran(..))` when it ran or `Ok(Outcome::Declined(why))` when it
//! does not apply (CPU tensors, float64, a layout it does not cover, kernels disabled or
//! unavailable); the caller then takes the libtorch path. `Err` is a real failure (a
//! launch or allocation error). When NVRTC or the driver cannot be loaded the first
//! decline of the process also raises one Python `RuntimeWarning`.
//!
//! - `conv::cuda::forward` / `conv::cuda::backward`: the whole binary conv on CUDA, the
//!   CUDA route of `conv::forward` / `conv::backward` (the same `layer::Forward`,
//!   `Saved`, `Grads`; arguments validated there), made of four fused passes
//!   (`binarize_activation`, `bireal_backward`, `weight_operand`, `weight_grads`, also
//!   bound as `_core.cuda_*` for kernel-level checks).
//! - [`crate::optim::cuda::ags_sad_step`] (in its family's folder): AGS then SAD on
//!   all layers in two launches, figures in a float64 `[L, 2]` device tensor: the CUDA
//!   route of `optim::step`.
//!
//! The ops launch on PyTorch's current stream of the tensors' device, [`current_stream`]
//! (read through `torch._C`, so the extension never links `libtorch_cuda`).

pub mod compile;
pub mod device;
pub mod host;
pub mod launcher;
pub mod loader;
pub(crate) mod operand;
pub mod py;

#[cfg(not(test))]
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

// Python is reached only outside the unit tests, whose binary links no interpreter.
#[cfg(not(test))]
use pyo3::prelude::*;
#[cfg(not(test))]
use pyo3::sync::GILOnceCell;
use tch::Kind;

pub use device::Stream;

use crate::error::{Error, Result};
use crate::facts::Route;

/// What an entry point did.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The kernels ran; here is the result.
    Ran(T),
    /// The kernels do not apply (the reason says why); take the libtorch path.
    Declined(String),
}

impl<T> Outcome<T> {
    /// The result, or a `RuntimeError` naming why the kernels did not run (for callers
    /// that asked for the kernels explicitly).
    pub fn required(self, what: &str) -> Result<T> {
        match self {
            Outcome::Ran(t) => Ok(t),
            Outcome::Declined(why) => Err(Error::Unsupported(format!(
                "{what}: the CUDA kernels do not apply here: {why}"
            ))),
        }
    }
}

/// The library's ops that have a fused CUDA form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ConvForward,
    ConvBackward,
    AgsSadStep,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::ConvForward, Op::ConvBackward, Op::AgsSadStep];

    pub fn name(self) -> &'static str {
        match self {
            Op::ConvForward => "conv_forward",
            Op::ConvBackward => "conv_backward",
            Op::AgsSadStep => "ags_sad_step",
        }
    }
}

/// How often each op ran the kernels or was declined by them, and the last reason.
struct Counts {
    fused: AtomicU64,
    declined: AtomicU64,
    last_declined: Mutex<Option<String>>,
}

static COUNTS: [Counts; 3] = [const {
    Counts {
        fused: AtomicU64::new(0),
        declined: AtomicU64::new(0),
        last_declined: Mutex::new(None),
    }
}; 3];

/// What happened to the ops on the CUDA route so far in this process, per op:
/// `(name, times fused, times declined, the last decline's reason)`.
pub fn route_counts() -> Vec<(&'static str, u64, u64, Option<String>)> {
    Op::ALL
        .iter()
        .zip(&COUNTS)
        .map(|(op, c)| {
            let last = c
                .last_declined
                .lock()
                .map_or_else(|p| p.into_inner().clone(), |g| g.clone());
            (
                op.name(),
                c.fused.load(Ordering::Relaxed),
                c.declined.load(Ordering::Relaxed),
                last,
            )
        })
        .collect()
}

/// The fused CUDA form of `op`, when the op's `route` is [`Route::Cuda`]: `Some(result)`
/// when the kernels ran, `None` when the route is another or the kernels declined (the
/// caller then runs the generic route). Both outcomes are counted ([`route_counts`]).
pub fn fused<T>(
    op: Op,
    route: Route,
    run: impl FnOnce() -> Result<Outcome<T>>,
) -> Result<Option<T>> {
    if !matches!(route, Route::Cuda(_)) {
        return Ok(None);
    }
    let counts = &COUNTS[op as usize];
    match run()? {
        Outcome::Ran(t) => {
            counts.fused.fetch_add(1, Ordering::Relaxed);
            Ok(Some(t))
        }
        Outcome::Declined(why) => {
            counts.declined.fetch_add(1, Ordering::Relaxed);
            match counts.last_declined.lock() {
                Ok(mut g) => *g = Some(why),
                Err(p) => *p.into_inner() = Some(why),
            }
            Ok(None)
        }
    }
}

/// `return Ok(Outcome::Declined(..))` from a format string.
macro_rules! decline {
    ($($arg:tt)*) => { return Ok($crate::cuda::Outcome::Declined(format!($($arg)*))) };
}
pub(crate) use decline;

/// Unwraps a `Result<Outcome<T>>` inside a function returning `Result<Outcome<U>>`.
macro_rules! ran {
    ($e:expr) => {
        match $e? {
            $crate::cuda::Outcome::Ran(v) => v,
            $crate::cuda::Outcome::Declined(why) => return Ok($crate::cuda::Outcome::Declined(why)),
        }
    };
}
pub(crate) use ran;

static DISABLED: AtomicBool = AtomicBool::new(false);
static ENV_READ: Once = Once::new();

/// Whether the kernels may be used (`set_enabled`, or `OVSW_CUDA_KERNELS=0` in the
/// environment at first use, turns them off; the libtorch path then runs).
pub fn enabled() -> bool {
    ENV_READ.call_once(|| {
        if std::env::var("OVSW_CUDA_KERNELS").is_ok_and(|v| v.trim() == "0") {
            DISABLED.store(true, Ordering::Relaxed);
        }
    });
    !DISABLED.load(Ordering::Relaxed)
}

/// Turns the kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    enabled(); // read the environment first so that it cannot override this later
    DISABLED.store(!on, Ordering::Relaxed);
}

#[cfg(not(test))]
fn python_ready() -> bool {
    // SAFETY: a plain query of the interpreter's state.
    unsafe { pyo3::ffi::Py_IsInitialized() != 0 }
}

/// PyTorch's current stream of CUDA device `index` on this thread
/// (`torch._C._cuda_getCurrentRawStream`); 0 for the host launcher's CPU memory.
pub fn current_stream(index: usize) -> Result<Stream> {
    if index == host::HOST_INDEX {
        return Ok(Stream(0));
    }
    python_stream(index)
}

/// The unit tests run no interpreter (and their binary links none): no stream to read.
#[cfg(test)]
fn python_stream(_index: usize) -> Result<Stream> {
    Err(Error::Unsupported(
        "the current CUDA stream is read through Python, which the unit tests do not run".into(),
    ))
}

#[cfg(not(test))]
fn python_stream(index: usize) -> Result<Stream> {
    if !python_ready() {
        return Err(Error::Unsupported(
            "the current CUDA stream is read through Python, which is not running".into(),
        ));
    }
    static GET: GILOnceCell<PyObject> = GILOnceCell::new();
    Python::with_gil(|py| {
        let f = GET.get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("torch._C")?
                    .getattr("_cuda_getCurrentRawStream")?
                    .unbind(),
            )
        })?;
        let raw: u64 = f.call1(py, (index,))?.extract(py)?;
        Ok::<_, PyErr>(Stream(raw))
    })
    .map_err(|e| Error::Unsupported(format!("reading the current CUDA stream: {e}")))
}

/// How libtorch will run a float convolution on CUDA tensors from this thread.
#[derive(Clone, Copy, Debug)]
pub struct ConvMode {
    /// The dtype `torch.autocast("cuda")` casts the operands to; `None` outside it.
    pub autocast: Option<Kind>,
    /// Whether cuDNN may run float32 convolutions in TF32
    /// (`torch.backends.cudnn.conv.fp32_precision`, "tf32" by default).
    pub tf32: bool,
}

/// The [`ConvMode`] of this thread, read from libtorch (no Python, no GPU), for a
/// convolution of CUDA tensors or, with `cpu` (the host launcher's), of CPU tensors:
/// then CPU autocast, and no TF32.
pub fn conv_mode(cpu: bool) -> Result<ConvMode> {
    let (autocast, tf32) = crate::ffi::conv_mode(cpu)?;
    let autocast = match autocast {
        Some(code) => Some(
            crate::ffi::kind_of(code)
                .ok_or_else(|| Error::Unsupported(format!("autocast runs in dtype code {code}")))?,
        ),
        None => None,
    };
    Ok(ConvMode { autocast, tf32 })
}

static WARNED: Once = Once::new();

/// Raises the one `RuntimeWarning` saying that the kernels are unavailable (once per
/// process; later calls do nothing).
pub(crate) fn warn_unavailable(reason: &str) {
    WARNED.call_once(|| warn_python(reason));
}

/// The unit tests run no interpreter to warn through.
#[cfg(test)]
fn warn_python(_reason: &str) {}

#[cfg(not(test))]
fn warn_python(reason: &str) {
    if !python_ready() {
        return;
    }
    {
        let msg = format!(
            "ovsw: the fused CUDA kernels are unavailable ({reason}); using the slower \
             libtorch path. `python -m ovsw.cuda check` tells more."
        );
        Python::with_gil(|py| {
            let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
            if let Ok(c) = CString::new(msg) {
                // A filter that turns warnings into errors must not break the fallback.
                if let Err(e) = PyErr::warn(py, &category, &c, 1) {
                    e.write_unraisable(py, None);
                }
            }
        });
    }
}

/// The launcher for device `index` when the kernels may run there: CUDA device `index`,
/// or the CPU for [`host::HOST_INDEX`] while the host launcher is selected.
pub(crate) fn ready(index: usize) -> Outcome<launcher::Launcher> {
    if !enabled() {
        return Outcome::Declined("the CUDA kernels are turned off".into());
    }
    if index == host::HOST_INDEX {
        return if host::selected() {
            Outcome::Ran(launcher::Launcher::Host)
        } else {
            Outcome::Declined("CPU memory, and the host launcher is not selected".into())
        };
    }
    match device::get(index) {
        Ok(d) => Outcome::Ran(launcher::Launcher::Gpu(d)),
        Err(why) => {
            warn_unavailable(&why);
            Outcome::Declined(why)
        }
    }
}
