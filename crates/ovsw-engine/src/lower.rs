//! Export lowering: the tensors the engine's ops read, made from a trained layer's.
//!
//! `ovsw.deploy.export` walks the module graph in Python and hands each layer's tensors
//! here (read out of libtorch by the root crate's `src/deploy/from_torch.rs`); this
//! module computes what the file stores:
//!
//! - the sign bits of a binary weight in the layout of [`super::bits`] (the one the
//!   engine packs activations in), with a non-zero mask when a weight is exactly 0;
//! - one per-channel scale and shift for a binary conv, folding the layer's eval-mode
//!   affine map (SPEC 1.3 to 1.5, given by the root crate's `binarize::eval_affine`, the
//!   rule the training forward applies too), its bias and the BatchNorm after it;
//! - a float conv's weight in the engine's `[O][kh][kw][C/groups]` order with the
//!   BatchNorm after it folded in, and a standalone BatchNorm as a per-channel affine.
//!
//! The folds run in float64 and round once to the float32 the file stores; each
//! product and sum is one IEEE operation (no fused multiply-add), so a file's bytes
//! depend on the model only.

use crate::bits::{pack_channels, words_for};
use crate::error::{value_err, Result};

/// A conv weight `[O][C][kh][kw]` (row-major) in the engine's order `[O][kh][kw][C]`.
pub fn to_ohwc<T: Copy>(w: &[T], [o, c, kh, kw]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len());
    for oi in 0..o {
        for ky in 0..kh {
            for kx in 0..kw {
                out.extend((0..c).map(|ci| w[((oi * c + ci) * kh + ky) * kw + kx]));
            }
        }
    }
    out
}

/// The sign bits of a binary weight, `[O][kh][kw][words_for(C)]` words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedSigns {
    /// `[O, kh, kw, words_for(C)]`.
    pub shape: [usize; 4],
    /// Bit set where the weight is negative (`-0.0` is not).
    pub bits: Vec<u64>,
    /// Bit set where the weight is not zero; `None` when no weight is zero.
    pub mask: Option<Vec<u64>>,
}

/// Packs a float weight `[O][C][kh][kw]` (`shape`) as the engine reads it: for each
/// output channel and tap, the `C` input channels in the layout of [`super::bits`],
/// set where `W < 0`, and the non-zero mask alike.
pub fn pack_signs(w: &[f32], shape: [usize; 4]) -> Result<PackedSigns> {
    let [o, c, kh, kw] = shape;
    if c == 0 || w.len() != o * c * kh * kw {
        return value_err!(
            "cannot pack {} weights as shape {shape:?} (in channels must be at least 1)",
            w.len()
        );
    }
    let words = words_for(c);
    let runs = to_ohwc(w, shape);
    let mut bits = vec![0u64; o * kh * kw * words];
    let mut mask = vec![0u64; bits.len()];
    for ((run, b), m) in runs
        .chunks_exact(c)
        .zip(bits.chunks_exact_mut(words))
        .zip(mask.chunks_exact_mut(words))
    {
        pack_channels(run, b, |v| v < 0.0);
        pack_channels(run, m, |v| v != 0.0);
    }
    let any_zero = runs.contains(&0.0);
    Ok(PackedSigns {
        shape: [o, kh, kw, words],
        bits,
        mask: any_zero.then_some(mask),
    })
}

/// A per-channel affine map `y = scale * x + shift` in float64, the form every fold
/// takes.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelAffine {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

impl ChannelAffine {
    pub fn new(scale: Vec<f64>, shift: Vec<f64>) -> Result<Self> {
        if scale.len() != shift.len() {
            return value_err!(
                "a per-channel affine needs as many shifts as scales, got {} and {}",
                shift.len(),
                scale.len()
            );
        }
        Ok(ChannelAffine { scale, shift })
    }

    /// A BatchNorm in eval mode, `gamma * (x - mean) / sqrt(var + eps) + beta`:
    /// `k = 1 / sqrt(var + eps) * gamma` and `c = -mean * k + beta` (without `gamma`
    /// or `beta`, as torch's `affine=False`).
    pub fn batchnorm(
        mean: &[f64],
        var: &[f64],
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
        eps: f64,
    ) -> Result<Self> {
        let n = mean.len();
        for (len, what) in [
            (Some(var.len()), "running_var"),
            (gamma.map(<[f64]>::len), "weight"),
            (beta.map(<[f64]>::len), "bias"),
        ] {
            if let Some(len) = len.filter(|&l| l != n) {
                return value_err!(
                    "BatchNorm {what} has {len} channels, running_mean {n}; they must match"
                );
            }
        }
        let mut k: Vec<f64> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
        if let Some(g) = gamma {
            k.iter_mut().zip(g).for_each(|(k, g)| *k *= g);
        }
        let mut c: Vec<f64> = mean.iter().zip(&k).map(|(&m, &k)| -m * k).collect();
        if let Some(b) = beta {
            c.iter_mut().zip(b).for_each(|(c, b)| *c += b);
        }
        Ok(ChannelAffine { scale: k, shift: c })
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// `self`, then `next`: `scale * k` and `shift * k + c`.
    pub fn then(&self, next: &ChannelAffine) -> Result<ChannelAffine> {
        self.check_channels(next.channels(), "the BatchNorm that follows")?;
        let scale = self.scale.iter().zip(&next.scale).map(|(s, k)| s * k);
        let shift =
            (self.shift.iter().zip(&next.scale).zip(&next.shift)).map(|((t, k), c)| t * k + c);
        Ok(ChannelAffine {
            scale: scale.collect(),
            shift: shift.collect(),
        })
    }

    /// `(scale, shift)` rounded to the float32 the file stores.
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        (f32s(&self.scale), f32s(&self.shift))
    }

    /// `Ok` when the map has `n` channels, else an error naming `what`.
    pub fn check_channels(&self, n: usize, what: &str) -> Result<()> {
        if n != self.channels() {
            return value_err!("{what} has {n} channels, the layer {}", self.channels());
        }
        Ok(())
    }
}

/// Each value rounded to the nearest float32 (ties to even).
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// A float conv as the `conv2d` op stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatConv {
    /// `[O, kh, kw, C/groups]`.
    pub shape: [usize; 4],
    /// In the order of `shape`.
    pub weight: Vec<f32>,
    /// `[O]`; `None` when the conv has no bias and no BatchNorm follows.
    pub bias: Option<Vec<f32>>,
}

/// A float conv `[O][C/groups][kh][kw]` (`shape`, float64 `weight`) with the BatchNorm
/// after it folded in: `W_o * k_o` and `b_o * k_o + c_o` (`b = 0` without a bias).
pub fn fold_conv(
    weight: &[f64],
    shape: [usize; 4],
    bias: Option<&[f64]>,
    bn: Option<&ChannelAffine>,
) -> Result<FloatConv> {
    let o = shape[0];
    if weight.len() != shape.iter().product::<usize>() {
        return value_err!("{} weights do not have shape {shape:?}", weight.len());
    }
    if let Some(b) = bias.filter(|b| b.len() != o) {
        return value_err!("the conv has {o} output channels but {} biases", b.len());
    }
    let per = weight.len().checked_div(o).unwrap_or(0);
    let mut w = weight.to_vec();
    let folded_bias = match bn {
        Some(bn) => {
            if bn.channels() != o {
                return value_err!(
                    "the BatchNorm after the conv has {} channels, the conv {o}",
                    bn.channels()
                );
            }
            for (row, k) in w.chunks_exact_mut(per.max(1)).zip(&bn.scale) {
                row.iter_mut().for_each(|v| *v *= k);
            }
            let b = bias.map_or_else(|| vec![0.0; o], <[f64]>::to_vec);
            let layer = ChannelAffine::new(vec![1.0; o], b)?;
            Some(f32s(&layer.then(bn)?.shift))
        }
        None => bias.map(f32s),
    };
    let [o, c, kh, kw] = shape;
    Ok(FloatConv {
        shape: [o, kh, kw, c],
        weight: f32s(&to_ohwc(&w, shape)),
        bias: folded_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ohwc_moves_channels_last() {
        // w[o][c][y][x] = 1000 o + 100 c + 10 y + x
        let shape = [2, 3, 2, 4];
        let w: Vec<u32> = (0..2)
            .flat_map(|o| {
                (0..3).flat_map(move |c| {
                    (0..2).flat_map(move |y| (0..4).map(move |x| 1000 * o + 100 * c + 10 * y + x))
                })
            })
            .collect();
        let t = to_ohwc(&w, shape);
        let mut i = 0;
        for o in 0..2 {
            for y in 0..2 {
                for x in 0..4 {
                    for c in 0..3 {
                        assert_eq!(t[i], 1000 * o + 100 * c + 10 * y + x);
                        i += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn signs_and_mask_per_tap() {
        // 2 output channels, 70 input channels (one full word, one partial), 1x2 taps.
        let shape = [2, 70, 1, 2];
        let mut w: Vec<f32> = (0..2 * 70 * 2)
            .map(|i| if (i * 37) % 11 < 5 { -0.5 } else { 0.25 })
            .collect();
        let at = |o: usize, c: usize, x: usize| (o * 70 + c) * 2 + x;
        w[at(1, 3, 0)] = 0.0;
        w[at(0, 66, 1)] = -0.0;
        let p = pack_signs(&w, shape).unwrap();
        assert_eq!(p.shape, [2, 1, 2, 2]);
        let mask = p.mask.as_ref().expect("zeros need a mask");
        for o in 0..2 {
            for x in 0..2 {
                for c in 0..70 {
                    let word = (o * 2 + x) * 2 + c / 64;
                    let v = w[at(o, c, x)];
                    assert_eq!((p.bits[word] >> (c % 64)) & 1 == 1, v < 0.0, "{o} {c} {x}");
                    assert_eq!((mask[word] >> (c % 64)) & 1 == 1, v != 0.0, "{o} {c} {x}");
                }
                assert_eq!(
                    p.bits[(o * 2 + x) * 2 + 1] >> 6,
                    0,
                    "bits past the channels"
                );
            }
        }
        let no_zero = pack_signs(&[1.0, -2.0], [1, 2, 1, 1]).unwrap();
        assert_eq!((no_zero.bits, no_zero.mask), (vec![0b10], None));
        assert!(pack_signs(&[1.0; 3], [1, 2, 1, 1]).is_err());
        assert!(pack_signs(&[], [1, 0, 1, 1]).is_err());
    }

    #[test]
    fn batchnorm_is_its_eval_formula() {
        let bn = ChannelAffine::batchnorm(
            &[0.5, -1.0],
            &[3.0, 0.25],
            Some(&[2.0, -1.0]),
            Some(&[0.125, 4.0]),
            1.0,
        )
        .unwrap();
        // k = gamma / sqrt(var + eps): 2 / 2 = 1, -1 / sqrt(1.25); c = beta - mean * k
        let k1 = -1.0 / 1.25f64.sqrt();
        assert_eq!(bn.scale, vec![1.0, k1]);
        assert_eq!(bn.shift, vec![0.125 - 0.5, 4.0 + k1]);
        let plain = ChannelAffine::batchnorm(&[2.0], &[3.0], None, None, 1.0).unwrap();
        assert_eq!((plain.scale, plain.shift), (vec![0.5], vec![-1.0]));
        let err = ChannelAffine::batchnorm(&[0.0; 2], &[1.0; 3], None, None, 1e-5);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("running_var has 3 channels"));
    }

    #[test]
    fn float_conv_folds_the_batchnorm() {
        // 2 output channels, 1 input channel, 1x2 taps.
        let bn = ChannelAffine::new(vec![2.0, -0.5], vec![1.0, 3.0]).unwrap();
        let w = [1.0, -3.0, 0.5, 4.0];
        let folded = fold_conv(&w, [2, 1, 1, 2], Some(&[0.25, 2.0]), Some(&bn)).unwrap();
        assert_eq!(folded.weight, vec![2.0, -6.0, -0.25, -2.0]);
        assert_eq!(folded.bias, Some(vec![0.25 * 2.0 + 1.0, 2.0 * -0.5 + 3.0]));
        let no_bias = fold_conv(&w, [2, 1, 1, 2], None, Some(&bn)).unwrap();
        assert_eq!(no_bias.bias, Some(vec![1.0, 3.0]));
        let alone = fold_conv(&w, [2, 1, 1, 2], None, None).unwrap();
        assert_eq!(
            (alone.weight, alone.bias),
            (vec![1.0, -3.0, 0.5, 4.0], None)
        );
        let wrong = ChannelAffine::new(vec![1.0; 3], vec![0.0; 3]).unwrap();
        assert!(fold_conv(&w, [2, 1, 1, 2], None, Some(&wrong)).is_err());
    }
}
