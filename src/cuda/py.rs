//! Python bindings of the shared CUDA machinery (`ovsw._core.cuda_*`), for
//! `ovsw.cuda`, the tests and the GPU check: where NVRTC and the driver are, compiling
//! the kernels, the switch, the host launcher, how often the library's ops took the
//! fused route; and the stream handling ([`plan_for`], [`on_stream`]) of the bindings
//! that launch one fused pass (the conv's, `crate::conv::py`). (The library's own ops,
//! `binary_conv2d_forward`/`_backward` and `ags_sad_step`, choose the CUDA route by
//! themselves; see `crate::cuda`.)
//!
//! `stream=` of a pass binding (a raw `cudaStream_t`; default PyTorch's current stream
//! of the tensor's device): the pass runs on that stream, made PyTorch's current stream for the call so
//! that its outputs and temporaries are allocated on it, as under
//! `with torch.cuda.stream(s):` ([`StreamPlan`]). The caller orders the inputs'
//! producers and the outputs' consumers against that stream.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tch::{Kind, Tensor};

use super::{compile, current_stream, host, loader, Stream};
use crate::error::{boundary, Error, Result};
use crate::facts;

pub(crate) fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "float32" => Ok(Kind::Float),
        "float16" => Ok(Kind::Half),
        "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::Value(format!(
            "dtype must be 'float32', 'float16' or 'bfloat16', got {other:?}"
        ))),
    }
}

/// Where a kernel binding launches, and whether the call must first make the stream it
/// was given PyTorch's current stream of the device.
///
/// The passes allocate their outputs and temporaries (the moments' partial sums) with
/// PyTorch's caching allocator, which ties each block to the *current* stream: freed,
/// it is reused by the next allocation on that stream with no wait for other streams.
/// Kernels launched on another stream could then still be reading or writing it. So a
/// binding given a stream other than the current one runs with that stream made
/// current (as `with torch.cuda.stream(s):` would), and every tensor the pass allocates
/// belongs to the stream its kernels run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamPlan {
    /// Launch on this stream, the device's current one (or any stream on the host
    /// launcher, which runs each launch to its end and allocates no device memory; or
    /// one given for a tensor the kernels will decline).
    Current(Stream),
    /// Make `stream` current on CUDA device `index` for the call, then launch on it.
    Switch { index: usize, stream: Stream },
}

impl StreamPlan {
    fn stream(self) -> Stream {
        match self {
            StreamPlan::Current(s) | StreamPlan::Switch { stream: s, .. } => s,
        }
    }
}

/// The [`StreamPlan`] for a binding called with `given` (its `stream=` argument) on a
/// tensor at `place`; `current` reads PyTorch's current stream of a device index and
/// `host` says whether the host launcher is selected.
fn stream_plan(
    place: &facts::Place,
    given: Option<u64>,
    host: bool,
    current: impl FnOnce(usize) -> Result<Stream>,
) -> Result<StreamPlan> {
    match (place, given) {
        (facts::Place::Cuda(i), _) if *i >= 0 => {
            let index = *i as usize;
            let cur = current(index)?;
            Ok(match given {
                Some(s) if s != cur.0 => StreamPlan::Switch {
                    index,
                    stream: Stream(s),
                },
                _ => StreamPlan::Current(cur),
            })
        }
        (facts::Place::Cpu, _) if host => Ok(StreamPlan::Current(current(host::HOST_INDEX)?)),
        // The entry point declines the tensor and says why.
        (_, Some(s)) => Ok(StreamPlan::Current(Stream(s))),
        (other, None) => Err(Error::Value(format!(
            "expected a CUDA tensor, got one on {other}"
        ))),
    }
}

/// The plan for `t` (see [`stream_plan`]).
pub(crate) fn plan_for(t: &Tensor, stream: Option<u64>) -> Result<StreamPlan> {
    let f = facts::facts(t)?;
    stream_plan(&f.place, stream, host::selected(), current_stream)
}

/// Runs `f` (which launches on `plan.stream()`) with the plan's stream made PyTorch's
/// current stream of its device for the call. Afterwards (also when `f` fails or
/// panics) the device's previous stream is restored, and so is the current device:
/// `torch.cuda.set_stream` also makes the stream's device current, so a tensor on
/// another device than the current one would otherwise leave that device current.
pub(crate) fn on_stream<T>(
    py: Python<'_>,
    plan: StreamPlan,
    f: impl FnOnce(Stream) -> PyResult<T>,
) -> PyResult<T> {
    let StreamPlan::Switch { index, stream } = plan else {
        return f(plan.stream());
    };
    let cuda = py.import("torch.cuda")?;
    let device = cuda.call_method0("current_device")?;
    let previous = cuda.call_method1("current_stream", (index,))?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("device", index)?;
    let given = cuda
        .getattr("ExternalStream")?
        .call((stream.0,), Some(&kwargs))?;
    cuda.call_method1("set_stream", (given,))?;
    // A panic in `f` is caught at the binding's boundary; restore first.
    let out = catch_unwind(AssertUnwindSafe(|| f(stream)));
    let restored = cuda
        .call_method1("set_stream", (previous,))
        .and_then(|_| cuda.call_method1("set_device", (device,)));
    match out {
        Ok(out) => {
            restored?;
            out
        }
        Err(panic) => resume_unwind(panic),
    }
}

/// Where NVRTC and the driver were found (or why not), and whether the kernels are on.
#[pyfunction]
fn cuda_status(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    boundary(|| {
        let d = PyDict::new(py);
        d.set_item("enabled", super::enabled())?;
        match loader::nvrtc() {
            Ok(info) => {
                d.set_item("nvrtc", &info.path)?;
                d.set_item("nvrtc_version", info.version)?;
            }
            Err(e) => {
                d.set_item("nvrtc", py.None())?;
                d.set_item("nvrtc_error", e)?;
            }
        }
        match py.allow_threads(loader::driver) {
            Ok(v) => d.set_item("driver_version", v)?,
            Err(e) => d.set_item("driver_error", e)?,
        }
        Ok(d)
    })
}

/// Compiles every kernel for `sm_{arch}` (cached per process). Returns
/// `(ptx, cubin, log, entries)`: the PTX text, the SASS image, NVRTC's log, and the
/// entry points the PTX declares. No GPU needed.
#[pyfunction]
fn cuda_compile(
    py: Python<'_>,
    arch: u32,
) -> PyResult<(String, Bound<'_, PyBytes>, String, Vec<String>)> {
    boundary(|| {
        if !(50..=200).contains(&arch) {
            return Err(Error::Value(format!(
                "arch is sm_XY as the number XY (80, 90), got {arch}"
            ))
            .into());
        }
        let img = py
            .allow_threads(|| compile::compiled(arch))
            .map_err(|e| Error::Unsupported(format!("NVRTC: {e}")))?;
        Ok((
            img.ptx.clone(),
            PyBytes::new(py, &img.cubin),
            img.log.clone(),
            compile::ptx_entries(&img),
        ))
    })
}

/// Names of every kernel in the source.
#[pyfunction]
fn cuda_entry_points() -> PyResult<Vec<String>> {
    boundary(|| Ok(compile::entry_points()))
}

/// Turns the CUDA kernels on or off for the process (off: the libtorch path runs).
#[pyfunction]
fn cuda_set_enabled(on: bool) -> PyResult<()> {
    boundary(|| {
        super::set_enabled(on);
        Ok(())
    })
}

/// Whether the CUDA kernels may be used.
#[pyfunction]
fn cuda_enabled() -> PyResult<bool> {
    boundary(|| Ok(super::enabled()))
}

/// Selects the host launcher for the process (or not): CPU tensors in float32, float16
/// and bfloat16 then take the CUDA route, its kernels compiled for the CPU (for tests
/// without a GPU). `RuntimeError` where ovsw was built without them.
#[pyfunction]
fn cuda_set_host_launcher(on: bool) -> PyResult<()> {
    boundary(|| Ok(host::select(on)?))
}

/// Whether the host launcher is selected (for the calling thread).
#[pyfunction]
fn cuda_host_launcher() -> PyResult<bool> {
    boundary(|| Ok(host::selected()))
}

/// The kernels compiled for the CPU (empty without the `cuda-host` feature).
#[pyfunction]
fn cuda_host_kernels() -> PyResult<Vec<String>> {
    boundary(|| Ok(host::kernel_names()))
}

/// How libtorch will run a float convolution on CUDA tensors from this thread:
/// `(autocast dtype, tf32)`, the dtype `torch.autocast("cuda")` casts to (`None` outside
/// it, e.g. `"torch.float16"` inside) and whether cuDNN may run float32 convolutions in
/// TF32. The CUDA route folds the scale into the weight only where neither rounds it.
#[pyfunction]
fn cuda_conv_mode() -> PyResult<(Option<&'static str>, bool)> {
    boundary(|| {
        let mode = super::conv_mode(false)?;
        Ok((mode.autocast.map(facts::kind_name), mode.tf32))
    })
}

/// How often each of the library's ops ran the fused CUDA kernels, and how often they
/// declined it (it then ran the libtorch route), since the process started:
/// `{op: {"fused": n, "declined": n, "last_declined": reason or None}}`.
#[pyfunction]
fn cuda_route_counts(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    boundary(|| {
        let d = PyDict::new(py);
        for (name, fused, declined, last) in super::route_counts() {
            let c = PyDict::new(py);
            c.set_item("fused", fused)?;
            c.set_item("declined", declined)?;
            c.set_item("last_declined", last)?;
            d.set_item(name, c)?;
        }
        Ok(d)
    })
}

/// Adds the `cuda_*` functions to `ovsw._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_entry_points, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_set_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_set_host_launcher, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_host_launcher, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_host_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_route_counts, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_conv_mode, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::Place;

    fn current(i: usize) -> Result<Stream> {
        Ok(Stream(if i == host::HOST_INDEX {
            0
        } else {
            100 + i as u64
        }))
    }

    #[test]
    fn a_stream_other_than_the_current_one_is_made_current_for_the_call() {
        let cuda1 = Place::Cuda(1);
        // No stream given, or the current one: launch on the current stream.
        assert_eq!(
            stream_plan(&cuda1, None, false, current).expect("plan"),
            StreamPlan::Current(Stream(101))
        );
        assert_eq!(
            stream_plan(&cuda1, Some(101), false, current).expect("plan"),
            StreamPlan::Current(Stream(101))
        );
        // Another stream (the legacy default 0 included): it becomes current, so that
        // the pass's allocations belong to the stream its kernels run on.
        for s in [7, 0] {
            assert_eq!(
                stream_plan(&cuda1, Some(s), true, current).expect("plan"),
                StreamPlan::Switch {
                    index: 1,
                    stream: Stream(s)
                }
            );
        }
        // The host launcher has no streams: whatever was given, nothing to switch.
        assert_eq!(
            stream_plan(&Place::Cpu, Some(7), true, current).expect("plan"),
            StreamPlan::Current(Stream(0))
        );
        // A CPU tensor without the host launcher: with a stream, the entry point
        // declines it; without one, a ValueError here.
        assert_eq!(
            stream_plan(&Place::Cpu, Some(7), false, current).expect("plan"),
            StreamPlan::Current(Stream(7))
        );
        let err = stream_plan(&Place::Cpu, None, false, current).expect_err("cpu");
        assert!(err.to_string().contains("expected a CUDA tensor"), "{err}");
        // The current stream is read only for the tensor's own device.
        let unread = |_: usize| -> Result<Stream> { panic!("read a stream") };
        assert_eq!(
            stream_plan(&Place::Meta, Some(3), false, unread).expect("plan"),
            StreamPlan::Current(Stream(3))
        );
    }
}
