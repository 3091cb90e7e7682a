//! The host launcher: the CUDA route with CPU memory for device memory.
//!
//! The kernels of `kernels/` are also compiled for the CPU (`host/launch.cpp`, under
//! `host/cuda_host.h`: each block's threads are real threads with real barriers). When
//! the host launcher is selected, CPU tensors in float32, float16 and bfloat16 count as
//! memory of a device of their own ([`HOST_INDEX`]): [`crate::facts::Route::of`] gives
//! them the CUDA route, and the same launch code as on a GPU (grid sizes, argument
//! order, the `AgsLayer`/`AgsParams` layouts) hands its launches to [`launch`] instead
//! of the driver. What runs is the route a GPU user gets, minus the hardware: for tests.
//!
//! Selection: [`select`] for the process (or `OVSW_CUDA_HOST=1` in the environment at
//! first use), [`with_selected`] for the calling thread (which overrides the process).
//! Without the `cuda-host` feature nothing is compiled and selecting fails.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// The device index the CUDA route gives CPU memory while the host launcher is selected.
pub const HOST_INDEX: usize = usize::MAX;

/// Threads per block, as on a GPU (`OVSW_THREADS`).
const THREADS: u32 = super::device::THREADS;

/// The "streaming multiprocessors" that size grid-stride grids (at most 32 blocks
/// each): two, so that large tensors take several turns of the grid-stride loops.
const SM_COUNT: u64 = 2;

static SELECTED: AtomicBool = AtomicBool::new(false);
static ENV_READ: Once = Once::new();

thread_local! {
    static THREAD: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the kernels were compiled for the CPU (the `cuda-host` feature).
pub fn available() -> bool {
    cfg!(feature = "cuda-host")
}

/// Whether the calling thread's CPU tensors take the CUDA route through the host
/// launcher.
pub fn selected() -> bool {
    if !available() {
        return false;
    }
    if let Some(on) = THREAD.with(Cell::get) {
        return on;
    }
    ENV_READ.call_once(|| {
        if std::env::var("OVSW_CUDA_HOST").is_ok_and(|v| v.trim() == "1") {
            SELECTED.store(true, Ordering::Relaxed);
        }
    });
    SELECTED.load(Ordering::Relaxed)
}

/// Selects the host launcher (or not) for the whole process.
pub fn select(on: bool) -> Result<()> {
    if on && !available() {
        return Err(Error::Unsupported(
            "ovsw was built without the cuda-host feature: no kernels for the CPU".into(),
        ));
    }
    ENV_READ.call_once(|| {}); // the environment may no longer override this
    SELECTED.store(on, Ordering::Relaxed);
    Ok(())
}

/// Runs `f` with the host launcher selected (or not) on this thread only.
pub fn with_selected<T>(on: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|c| c.replace(Some(on && available()))));
    f()
}

/// Blocks for a grid-stride loop over `n` elements (as `DeviceState::elementwise_blocks`
/// with [`SM_COUNT`] multiprocessors).
pub(crate) fn elementwise_blocks(n: i64) -> u64 {
    let needed = (n.max(0) as u64).div_ceil(THREADS as u64);
    needed.clamp(1, SM_COUNT * 32)
}

#[cfg(feature = "cuda-host")]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

    extern "C" {
        pub fn ovsw_host_kernel_count() -> c_int;
        pub fn ovsw_host_kernel_name(i: c_int) -> *const c_char;
        pub fn ovsw_host_launch(
            name: *const c_char,
            blocks: c_ulonglong,
            threads: c_uint,
            args: *mut *mut c_void,
        ) -> c_int;
    }
}

/// The kernels compiled for the CPU, by name.
pub fn kernel_names() -> Vec<String> {
    #[cfg(feature = "cuda-host")]
    {
        // SAFETY: plain queries of a static table; the names are NUL-terminated
        // literals.
        unsafe {
            (0..ffi::ovsw_host_kernel_count())
                .filter_map(|i| {
                    let p = ffi::ovsw_host_kernel_name(i);
                    (!p.is_null())
                        .then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
                })
                .collect()
        }
    }
    #[cfg(not(feature = "cuda-host"))]
    Vec::new()
}

/// Runs kernel `name` on the CPU with `blocks` blocks of [`THREADS`] threads and
/// returns when it has finished.
///
/// # Safety
/// As for a GPU launch: `args` must match the kernel's parameters in number and type,
/// each pointing to a live value, and every pointer among them must be valid CPU
/// memory for what the kernel reads and writes.
pub(crate) unsafe fn launch(name: &str, blocks: u64, args: &mut [*mut c_void]) -> Result<()> {
    #[cfg(feature = "cuda-host")]
    {
        let c = super::compile::cstr(name).map_err(Error::Internal)?;
        // SAFETY: the caller's contract; `c` is NUL-terminated and lives across the call.
        match unsafe { ffi::ovsw_host_launch(c.as_ptr(), blocks, THREADS, args.as_mut_ptr()) } {
            0 => Ok(()),
            1 => Err(Error::Internal(format!("no CUDA kernel named {name}"))),
            _ => Err(Error::Value(format!("{name}: {blocks} blocks is too many"))),
        }
    }
    #[cfg(not(feature = "cuda-host"))]
    {
        let _ = (blocks, args);
        Err(Error::Unsupported(format!(
            "{name}: ovsw was built without the cuda-host feature"
        )))
    }
}

#[cfg(all(test, feature = "cuda-host"))]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_compiled_for_the_cpu() {
        let mut host = kernel_names();
        let mut named = super::super::compile::entry_points();
        host.sort();
        named.sort();
        assert_eq!(host, named);
    }

    #[test]
    fn selection_is_per_thread_and_restored() {
        let process = selected();
        with_selected(true, || {
            assert!(selected());
            with_selected(false, || assert!(!selected()));
            assert!(selected());
            // Another thread sees the process's selection, not this thread's.
            let other = std::thread::spawn(selected).join().expect("thread");
            assert_eq!(other, process);
        });
        assert_eq!(selected(), process);
    }

    use tch::{Device, Kind, Tensor};

    use crate::binarize::ActW;
    use crate::conv;
    use crate::geometry::Geometry;
    use crate::layer::{Needs, Saved};
    use crate::optim::{self, Config, Layer};

    /// `max |got - want| <= 1e-5 max |want|` (float32 within 1e-5 relative to the
    /// tensor's scale), NaN and inf never passing; `Err` with the figures otherwise.
    fn close(what: &str, got: &Tensor, want: &Tensor) -> std::result::Result<(), String> {
        let g = got.to_kind(Kind::Double);
        let w = want.to_kind(Kind::Double);
        if got.size() != want.size() {
            return Err(format!(
                "{what}: shape {:?} != {:?}",
                got.size(),
                want.size()
            ));
        }
        let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
        if !finite(&g) || !finite(&w) {
            return Err(format!("{what}: not finite"));
        }
        let err = (&g - &w).abs().max().double_value(&[]);
        let scale = w.abs().max().double_value(&[]);
        if err <= 1e-5 * scale {
            Ok(())
        } else {
            Err(format!("{what}: max err {err:e} > 1e-5 x {scale:e}"))
        }
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        if let Err(e) = close(what, got, want) {
            panic!("{e}");
        }
    }

    fn counts(op: &str) -> (u64, u64) {
        let c = super::super::route_counts();
        let (_, fused, declined, _) = c.into_iter().find(|c| c.0 == op).expect("op");
        (fused, declined)
    }

    /// One binary conv layer, forward and backward, on the CUDA route through the host
    /// launcher against the CPU route (float32, training).
    fn conv_case(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        scale: Option<&Tensor>,
        act_w: ActW,
        geom: &Geometry,
    ) {
        let run = |host: bool| {
            with_selected(host, || {
                let f = conv::forward(x, w, bias, scale, act_w, geom, true).expect("forward");
                let grad_y = f.y.ones_like() * 0.5 + f.y.sin() * 0.25;
                let saved = Saved {
                    x,
                    weight: w,
                    has_bias: bias.is_some(),
                    scale,
                    std: f.std.as_ref(),
                    alpha: f.alpha.as_ref(),
                    product: f.product.as_ref(),
                    product_kind: f.product_kind,
                };
                let needs = Needs {
                    input: true,
                    weight: true,
                    bias: bias.is_some(),
                    scale: scale.is_some(),
                };
                let g = conv::backward(&grad_y, &saved, act_w, geom, needs).expect("backward");
                (f, g)
            })
        };
        let before = (counts("conv_forward"), counts("conv_backward"));
        let (hf, hg) = run(true);
        let after = (counts("conv_forward"), counts("conv_backward"));
        assert!(
            after.0 .0 > before.0 .0,
            "the forward did not take the fused route"
        );
        assert!(
            after.1 .0 > before.1 .0,
            "the backward did not take the fused route"
        );
        let (cf, cg) = run(false);
        assert_close("y", &hf.y, &cf.y);
        assert_close(
            "std",
            hf.std.as_ref().expect("std"),
            cf.std.as_ref().expect("std"),
        );
        match (&hf.alpha, &cf.alpha) {
            (Some(a), Some(b)) => assert_close("alpha", a, b),
            (None, None) => {}
            _ => panic!("alpha on one route only"),
        }
        // The bias gradient sums N x H x W float32 terms on either route, each in its
        // own order (7,200 here: the CPU route is 1.5e-5 off the float64 sum, the fused
        // one 5.4e-6): held to the float64 sum of the same gradient instead.
        if let Some(hb) = &hg.bias {
            let grad_y = (hf.y.ones_like() * 0.5 + hf.y.sin() * 0.25).to_kind(Kind::Double);
            let s = hf
                .alpha
                .as_ref()
                .or(scale)
                .expect("a scale")
                .to_kind(Kind::Double);
            let exact = grad_y.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double) * s;
            assert_close("grad_bias (float64 sum)", hb, &exact);
            assert!(cg.bias.is_some(), "grad_bias on one route only");
        }
        for (what, a, b) in [
            ("grad_x", &hg.input, &cg.input),
            ("grad_w", &hg.weight, &cg.weight),
            ("grad_scale", &hg.scale, &cg.scale),
        ] {
            match (a, b) {
                (Some(a), Some(b)) => assert_close(what, a, b),
                (None, None) => {}
                _ => panic!("{what} on one route only"),
            }
        }
        // The bound refuses a wrong answer: one element of y off by 1e-4 of its scale.
        let scale_y = cf.y.abs().max().double_value(&[]);
        let flat = hf.y.contiguous().view([-1]).copy();
        let v = flat.get(7).double_value(&[]);
        let _ = flat.get(7).fill_(v + 1e-4 * scale_y);
        let planted = flat.view(hf.y.size().as_slice());
        assert!(
            close("y planted", &planted, &cf.y).is_err(),
            "the 1e-5 bound took a planted error"
        );
    }

    fn input(shape: [i64; 4], seed: i64) -> Tensor {
        let n: i64 = shape.iter().product();
        let t = Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.731 + 0.01 * seed as f64);
        (t.sin() * 2.0 + (t * 0.013).cos() * 0.5)
            .to_kind(Kind::Float)
            .reshape(shape)
    }

    #[test]
    fn conv_on_the_host_launcher_equals_the_cpu_route() {
        // 18,000 elements per sample (two moment chunks, three sign blocks), a channel of
        // 5 x 3 x 3 weights, alpha folded with a bias, ste_v2.
        let x = input([2, 5, 60, 60], 1);
        let w = input([4, 5, 3, 3], 2) * 0.3;
        let b = Tensor::from_slice(&[0.1f32, -0.2, 0.0, 0.3]);
        let geom = Geometry::new([1, 1], [1, 1], [1, 1], 1).expect("geometry");
        conv_case(&x, &w, Some(&b), None, ActW::SteV2, &geom);
        // channels_last input, 288 weights per channel (> 256 threads), a learnable scale,
        // hardtanh, stride 2 and dilation 2.
        let x = input([3, 32, 9, 9], 3)
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]);
        let w = input([6, 32, 3, 3], 4) * 0.8;
        let s = Tensor::from_slice(&[0.5f32, -0.25, 1.5, 0.0, 2.0, 0.75]);
        let geom = Geometry::new([2, 2], [1, 1], [2, 2], 1).expect("geometry");
        conv_case(&x, &w, None, Some(&s), ActW::Hardtanh, &geom);
    }

    #[test]
    fn ags_sad_on_the_host_launcher_equals_the_cpu_route() {
        let cfg = Config::from_options(&[
            ("enable_ags", optim::Value::Bool(true)),
            ("delta", optim::Value::Float(0.05)),
            ("enable_dampen", optim::Value::Bool(true)),
            ("dampen_weight", optim::Value::Float(0.01)),
            ("track_momentum", optim::Value::Float(0.9)),
            ("track_threshold", optim::Value::Float(0.05)),
        ])
        .expect("config");
        // Two layers; in each, channels whose gradients AGS rescales and channels it
        // leaves alone, one with zero gradients.
        let make = |o: i64, k: i64, seed: i64| {
            let w = input([o, k, 1, 1], seed).reshape([o, k]);
            let rows: Vec<Tensor> = (0..o)
                .map(|c| {
                    input([1, k, 1, 1], seed + c + 10).reshape([1, k])
                        * [1e-3, 1.0, 0.0][(c % 3) as usize]
                })
                .collect();
            let g = Tensor::cat(&rows, 0);
            let tracker =
                (input([o, k, 1, 1], seed + 5).reshape([o, k]).abs() * 0.4).to_kind(Kind::Float);
            let prev = &w * input([o, k, 1, 1], seed + 6).reshape([o, k]).sign();
            (g, w, tracker, prev)
        };
        let layers = [make(5, 300, 1), make(3, 45, 2)];
        let run = |host: bool| {
            let copies: Vec<(Tensor, Tensor, Tensor, Tensor)> = layers
                .iter()
                .map(|(g, w, t, p)| (g.copy(), w.copy(), t.copy(), p.copy()))
                .collect();
            let figures = with_selected(host, || {
                let ls: Vec<Layer<'_>> = copies
                    .iter()
                    .map(|(g, w, t, p)| Layer {
                        grad: g,
                        weight: w,
                        tracker: Some(t),
                        weight_prev: Some(p),
                    })
                    .collect();
                optim::step(&cfg, &ls).expect("step")
            });
            (figures, copies)
        };
        let before = counts("ags_sad_step");
        let (hf, hl) = run(true);
        assert!(
            counts("ags_sad_step").0 > before.0,
            "the step did not take the fused route"
        );
        let (cf, cl) = run(false);
        assert_close("figures", &hf, &cf);
        for (i, (h, c)) in hl.iter().zip(&cl).enumerate() {
            assert_close(&format!("layer {i} grad"), &h.0, &c.0);
            assert_close(&format!("layer {i} tracker"), &h.2, &c.2);
            assert!(h.3.equal(&c.3), "layer {i}: weight_prev differs");
        }
    }

    #[test]
    fn unknown_kernel_is_an_error() {
        // SAFETY: nothing runs for an unknown name.
        let err = unsafe { launch("ovsw_no_such_kernel", 1, &mut []) };
        assert!(matches!(err, Err(Error::Internal(_))));
    }
}
