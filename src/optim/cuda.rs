//! The CUDA route of the step: AGS then SAD on every binary layer in one multi-tensor
//! pass of the fused kernels (`src/cuda/kernels/ags_sad.cu`, SPEC sections 2 and 3),
//! launched through what [`crate::cuda`] shares between the routes (device, loader,
//! stream, operands).

use tch::{Kind, Tensor};

use super::config::Config;
use super::layer::Layer;
use crate::cuda::device::arg;
use crate::cuda::launcher::Launcher;
use crate::cuda::operand::{dtype_code, operand, ptr, Operand};
use crate::cuda::{current_stream, decline, ran, ready, Outcome};
use crate::error::{Error, Result};

/// `AgsParams` of `kernels/ags_sad.cu`.
#[repr(C)]
struct Params {
    ags: i32,
    sad: i32,
    delta: f32,
    m: f32,
    one_minus_m: f32,
    tau: f32,
    lambda: f32,
}

/// Bytes `t` spans in memory.
fn span(t: &Operand) -> (u64, u64) {
    let elem = if t.kind == Kind::Float { 4 } else { 2 };
    (t.ptr(), t.ptr() + t.numel() as u64 * elem)
}

/// AGS then SAD (each as enabled in `cfg`) on every layer, in place on the gradients,
/// trackers and `weight_prev`s, in two launches on the current stream for all layers
/// together (per-channel work, then per-layer figures), with no host synchronisation:
/// the CUDA route of [`crate::optim::step`], which validated the layers (shapes,
/// dtypes, one device, SAD buffers present when enabled) and handles the empty and the
/// all-disabled cases.
///
/// Returns a float64 `[L, 2]` tensor on the layers' device: column 0 the mean AGS ratio
/// `r_o`, column 1 the silent fraction `mean(M)`; NaN where that part is disabled. The
/// figures are final once the stream reaches them; whoever reads them pays the sync.
///
/// Applies when every tensor of every layer is float32/float16/bfloat16 memory on one
/// CUDA device (one dtype per layer), dense with the output channel outermost
/// (contiguous or channels_last), the tensors of a layer with one layout, none empty,
/// and no written buffer overlapping another tensor.
pub fn ags_sad_step(cfg: &Config, layers: &[Layer<'_>]) -> Result<Outcome<Tensor>> {
    let Some(first) = layers.first() else {
        decline!("no layers");
    };
    let first = ran!(operand(first.weight, "layer 0's weight"));
    let (index, device) = (first.index, first.device());
    let dev = ran!(Ok::<_, Error>(ready(index)));

    let mut table: Vec<i64> = Vec::with_capacity(layers.len() * 8);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut weights: Vec<(u64, u64)> = Vec::new();
    let mut total_channels = 0i64;
    for (i, l) in layers.iter().enumerate() {
        let mut tensors = vec![l.grad, l.weight];
        if cfg.enable_dampen {
            match (l.tracker, l.weight_prev) {
                (Some(t), Some(p)) => {
                    tensors.push(t);
                    tensors.push(p);
                }
                _ => return Err(Error::Value(format!("layer {i}: SAD buffers missing"))),
            }
        }
        let mut ops: Vec<Operand> = Vec::with_capacity(tensors.len());
        for t in &tensors {
            ops.push(ran!(operand(t, &format!("a tensor of layer {i}"))));
        }
        let w = &ops[1];
        let Some(code) = dtype_code(w.kind) else {
            decline!("layer {i}: dtype {:?}", w.kind);
        };
        for t in &ops {
            if t.index != index {
                decline!("layer {i}: tensors on more than one device");
            }
            if t.kind != w.kind || t.strides() != w.strides() || t.sizes() != w.sizes() {
                decline!("layer {i}: grad, weight and SAD buffers differ in dtype or layout");
            }
            if !t.dim0_major() || t.numel() == 0 {
                decline!("layer {i}: not dense with the output channel outermost, or empty");
            }
        }
        for (j, t) in ops.iter().enumerate() {
            let s = span(t);
            if spans.iter().any(|&(a, b)| s.0 < b && a < s.1) {
                decline!("layer {i}: a buffer overlaps another");
            }
            if j == 1 {
                weights.push(s);
            } else {
                spans.push(s);
            }
        }
        let channels = w.sizes()[0];
        let per_channel = w.numel() / channels;
        let (tracker, prev) = if cfg.enable_dampen {
            (ops[2].ptr(), ops[3].ptr())
        } else {
            (0, 0)
        };
        table.extend([
            ops[0].ptr() as i64,
            w.ptr() as i64,
            tracker as i64,
            prev as i64,
            channels,
            per_channel,
            total_channels,
            code as i64,
        ]);
        total_channels += channels;
    }
    for w in &weights {
        if spans.iter().any(|&(a, b)| w.0 < b && a < w.1) {
            decline!("a weight overlaps a buffer that is written");
        }
    }
    let stream = current_stream(index)?;

    // The layer table reaches the device through pinned memory and a copy on the
    // current stream (no sync; torch's host allocator keeps the pinned block until the
    // copy is done). `_pin_memory`, not `pin_memory`: the latter warns, deprecated, when
    // it is given a device, and tch always gives one. The host launcher reads it where
    // it is.
    let host = Tensor::f_from_slice(&table)?;
    let table_dev = if matches!(dev, Launcher::Host) {
        host
    } else {
        let pinned = match host.f_internal_pin_memory(device) {
            Ok(p) => p,
            Err(e) => decline!("pinning the layer table failed: {e}"),
        };
        pinned.f_to_device_(device, Kind::Int64, true, false)?
    };
    let chan = Tensor::f_empty([total_channels * 2], (Kind::Double, device))?;
    let out = Tensor::f_empty([layers.len() as i64, 2], (Kind::Double, device))?;
    let params = Params {
        ags: i32::from(cfg.enable_ags),
        sad: i32::from(cfg.enable_dampen),
        delta: cfg.delta as f32,
        m: cfg.track_momentum as f32,
        one_minus_m: (1.0 - cfg.track_momentum) as f32,
        tau: cfg.track_threshold as f32,
        lambda: cfg.dampen_weight as f32,
    };
    let num_layers = i32::try_from(layers.len())
        .map_err(|_| Error::Value(format!("{} layers is too many", layers.len())))?;
    let (table_ptr, chan_ptr, out_ptr) = (ptr(&table_dev)?, ptr(&chan)?, ptr(&out)?);
    let mut step_args = [
        arg(&table_ptr),
        arg(&num_layers),
        arg(&params),
        arg(&chan_ptr),
    ];
    let mut fin_args = [arg(&table_ptr), arg(&params), arg(&chan_ptr), arg(&out_ptr)];
    // SAFETY: argument types match the kernels (the table's 8 x i64 rows are AgsLayer);
    // every pointer in the table was taken from a live tensor of the stated size on this
    // device, checked not to overlap; the caller keeps the layers' tensors alive, and
    // table/chan/out are freed stream-ordered after the kernels.
    unsafe {
        dev.launch(
            "ovsw_ags_sad_step",
            total_channels as u64,
            stream,
            &mut step_args,
        )?;
        dev.launch(
            "ovsw_ags_sad_finalize",
            layers.len() as u64,
            stream,
            &mut fin_args,
        )?;
    }
    Ok(Outcome::Ran(out))
}
