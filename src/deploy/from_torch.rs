//! Export lowering from libtorch: a trained layer's tensors read out of libtorch
//! (on the CPU, as float64 or float32) and handed to the engine's lowering
//! ([`ovsw_engine::lower`]), which computes what the deploy file stores. The binary
//! conv's eval-mode affine map comes from [`binarize::eval_affine`], the rule the
//! training forward applies too.

use ovsw_engine::lower::{fold_conv, pack_signs, ChannelAffine, FloatConv, PackedSigns};
use tch::{Device, Kind, Tensor};

use crate::binarize::{self, ActW};
use crate::error::{value_err, Result};
use crate::facts;
use crate::ffi;

/// `Ok` unless the tensor is a meta tensor, which has no values to export.
fn readable(f: &facts::Facts) -> Result<()> {
    if f.storage == facts::Storage::Meta {
        return value_err!(
            "cannot export a meta tensor (it holds no values); load the weights first"
        );
    }
    Ok(())
}

/// A tensor's elements on the CPU as `kind`, row-major.
fn host<T: tch::kind::Element + Copy>(t: &Tensor, kind: Kind) -> Result<Vec<T>> {
    readable(&facts::facts(t)?)?;
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(kind)?
        .f_contiguous()?;
    let n = facts::facts(&t)?.numel();
    let mut out = vec![T::ZERO; n];
    t.f_copy_data(&mut out, n)?;
    Ok(out)
}

/// A floating tensor's elements as float64 (exact for every floating dtype).
fn host_f64(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    facts::check_float(&facts::facts(t)?, what)?;
    host(t, Kind::Double)
}

/// The shape of a 4-D floating conv weight.
fn conv_shape(weight: &Tensor) -> Result<[usize; 4]> {
    let f = facts::facts(weight)?;
    facts::check_float(&f, "weight")?;
    readable(&f)?;
    match f.sizes[..] {
        [o, c, kh, kw] => Ok([o, c, kh, kw].map(|s| s.max(0) as usize)),
        _ => value_err!(
            "a conv weight must be 4-D [O, C/groups, kh, kw], got shape {:?}",
            f.sizes
        ),
    }
}

/// A 1-D tensor of `n` values, or the error naming it.
fn channel_vector(t: &Tensor, n: Option<usize>, what: &str) -> Result<Vec<f64>> {
    let f = facts::facts(t)?;
    if f.dim() != 1 || n.is_some_and(|n| f.sizes[0] as usize != n) {
        let want = n.map_or_else(|| "one dimension".to_owned(), |n| format!("shape [{n}]"));
        return value_err!("{what} must have {want}, got shape {:?}", f.sizes);
    }
    host_f64(t, what)
}

/// [`pack_signs`] of a weight tensor `[O, C/groups, kh, kw]`, read as float32 on the
/// CPU first (as the engine's float32 activations are).
pub fn pack_signs_of(weight: &Tensor) -> Result<PackedSigns> {
    let _guard = ffi::no_grad();
    let shape = conv_shape(weight)?;
    Ok(pack_signs(&host::<f32>(weight, Kind::Float)?, shape)?)
}

/// [`ChannelAffine::batchnorm`] of a BatchNorm's tensors.
pub fn batchnorm_of(
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<ChannelAffine> {
    let _guard = ffi::no_grad();
    let mean = channel_vector(running_mean, None, "BatchNorm running_mean")?;
    let n = Some(mean.len());
    let var = channel_vector(running_var, n, "BatchNorm running_var")?;
    let gamma = weight
        .map(|t| channel_vector(t, n, "BatchNorm weight"))
        .transpose()?;
    let beta = bias
        .map(|t| channel_vector(t, n, "BatchNorm bias"))
        .transpose()?;
    Ok(ChannelAffine::batchnorm(
        &mean,
        &var,
        gamma.as_deref(),
        beta.as_deref(),
        eps,
    )?)
}

/// [`fold_conv`] of a float conv's tensors.
pub fn float_conv_of(
    weight: &Tensor,
    bias: Option<&Tensor>,
    bn: Option<&ChannelAffine>,
) -> Result<FloatConv> {
    let _guard = ffi::no_grad();
    let shape = conv_shape(weight)?;
    let bias = bias
        .map(|b| channel_vector(b, Some(shape[0]), "bias"))
        .transpose()?;
    Ok(fold_conv(
        &host_f64(weight, "weight")?,
        shape,
        bias.as_deref(),
        bn,
    )?)
}

/// The per-channel `(scale, shift)` of a binary conv's `bconv2d` op: the layer's
/// eval-mode affine map of its +-1 dot product ([`binarize::eval_affine`], from the
/// weight read as float32 on the CPU), then the BatchNorm after it.
pub fn binary_conv_of(
    weight: &Tensor,
    scaling_factor: Option<&Tensor>,
    bias: Option<&Tensor>,
    act_w: ActW,
    bn: Option<&ChannelAffine>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let _guard = ffi::no_grad();
    let [o, ..] = conv_shape(weight)?;
    let cpu = |t: &Tensor| t.f_to_device(Device::Cpu);
    let weight = cpu(weight)?.f_to_kind(Kind::Float)?;
    let scaling_factor = scaling_factor.map(cpu).transpose()?;
    let bias = bias.map(cpu).transpose()?;
    let (scale, shift) =
        binarize::eval_affine(&weight, scaling_factor.as_ref(), bias.as_ref(), act_w)?;
    let layer = ChannelAffine::new(host_f64(&scale, "scale")?, host_f64(&shift, "shift")?)?;
    layer.check_channels(o, "the layer's scale")?;
    Ok(match bn {
        Some(bn) => layer.then(bn)?.to_f32(),
        None => layer.to_f32(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_conv_scale_and_shift_follow_spec() {
        // ste_v2: scale alpha * mean|W| * k, shift (alpha * bias) * k + c.
        let w = Tensor::from_slice(&[0.5f32, -0.5, 0.25, -0.75, 0.0, 1.0, -1.0, 2.0])
            .reshape([2, 4, 1, 1]);
        let alpha = Tensor::from_slice(&[2.0f32, 0.5]);
        let bias = Tensor::from_slice(&[1.0f32, -4.0]);
        let bn = ChannelAffine::new(vec![3.0, 0.25], vec![0.5, -1.0]).unwrap();
        let (scale, shift) =
            binary_conv_of(&w, Some(&alpha), Some(&bias), ActW::SteV2, Some(&bn)).unwrap();
        assert_eq!(scale, vec![2.0 * 0.5 * 3.0, 0.5 * 1.0 * 0.25]);
        assert_eq!(shift, vec![2.0 * 1.0 * 3.0 + 0.5, 0.5 * -4.0 * 0.25 - 1.0]);
        // ste: the magnitude of W does not scale the dot product.
        let (scale, shift) = binary_conv_of(&w, Some(&alpha), None, ActW::Ste, None).unwrap();
        assert_eq!((scale, shift), (vec![2.0, 0.5], vec![0.0, 0.0]));
        let short = Tensor::from_slice(&[1.0f32]);
        assert!(binary_conv_of(&w, Some(&short), None, ActW::Ste, None).is_err());
    }
}
