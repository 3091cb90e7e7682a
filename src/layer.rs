//! What every binary layer shares (SPEC section 1): the types its ops exchange
//! ([`Forward`], [`Saved`], [`Grads`], [`Needs`], [`Scale`]), the checks of what they
//! are handed, and the one skeleton of the forward and the backward on the
//! [`Elementwise`] parts of a route ([`forward`], [`backward`]).
//!
//! A layer differs from another only in its [`Product`]: the convolution of
//! [`crate::conv`] or the matrix product of [`crate::linear`]. The skeleton writes the
//! rest once: the per-sample std (training only), `a = sign(x / std)`, the binarized
//! weight `w_b`, `y = product(a, w_b, bias) * s` with `s` the learnable
//! `scaling_factor` or alpha computed from W, and by hand the backward (the binarizers'
//! surrogate gradients elementwise, the product's gradients from the product, no
//! autograd graph kept between forward and backward).

use std::cell::OnceCell;

use tch::{Kind, Tensor};

use crate::binarize::{ActW, Alpha, Elementwise};
use crate::error::{value_err, Result};
use crate::facts::{self, check_float, Facts};

/// What the forward returns: the output and what it keeps for the backward besides the
/// input and weight.
pub struct Forward {
    /// The layer output `product(a, w_b, bias) * s`.
    pub y: Tensor,
    /// Per-sample `sqrt(Var(x_n) + eps)`, shape `[N, 1, ..., 1]`; `None` in eval mode.
    pub std: Option<Tensor>,
    /// The per-output-channel scale recomputed from W (shape `[O]`); `None` when the
    /// layer owns a learnable `scaling_factor`.
    pub alpha: Option<Tensor>,
    /// `product(a, w_b, bias)` before scaling (the product's dtype): kept exactly when
    /// the layer owns a learnable `scaling_factor`, on every route, as the op's fake
    /// implementation declares (`ops._fake_layer_outputs`); `None` otherwise.
    pub product: Option<Tensor>,
    /// The dtype the product ran in (differs from the input's under autocast).
    pub product_kind: Kind,
}

/// Gradients of the layer's inputs; `None` where not requested.
pub struct Grads {
    pub input: Option<Tensor>,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub scale: Option<Tensor>,
}

/// Which gradients the caller needs (`ctx.needs_input_grad` of the autograd function).
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    pub input: bool,
    pub weight: bool,
    pub bias: bool,
    pub scale: bool,
}

/// What the backward reads, as saved by the forward.
pub struct Saved<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub has_bias: bool,
    /// The learnable `scaling_factor`, or `None` for the W-derived alpha.
    pub scale: Option<&'a Tensor>,
    pub std: Option<&'a Tensor>,
    pub alpha: Option<&'a Tensor>,
    /// The kept [`Forward::product`], if any.
    pub product: Option<&'a Tensor>,
    pub product_kind: Kind,
}

/// The per-output-channel scale `s` of a layer's output `y = product(a, w_b, bias) * s`
/// (SPEC 1.4).
#[derive(Clone, Copy)]
pub enum Scale<'a> {
    /// The layer's learnable `scaling_factor`, which gets a gradient.
    Learnable(&'a Tensor),
    /// alpha, recomputed from W by the forward (no gradient of its own).
    Alpha(&'a Tensor),
}

impl<'a> Scale<'a> {
    /// The `[O]` tensor.
    pub fn tensor(self) -> &'a Tensor {
        match self {
            Scale::Learnable(s) | Scale::Alpha(s) => s,
        }
    }
}

impl<'a> Saved<'a> {
    /// The scale the forward applied.
    pub fn scale(&self) -> Result<Scale<'a>> {
        match (self.scale, self.alpha) {
            (Some(s), _) => Ok(Scale::Learnable(s)),
            (None, Some(a)) => Ok(Scale::Alpha(a)),
            (None, None) => value_err!("backward needs either a scaling_factor or alpha"),
        }
    }
}

/// The facts of an op's input and weight, read once by its validation and handed to
/// its route.
pub struct OpFacts {
    pub x: Facts,
    pub weight: Facts,
}

/// Whether a route's backward may work from the folded operands,
/// `product(a, w_b * s, bias * s) == product(a, w_b, bias) * s`, without the kept
/// product. Always, except a learnable scale together with a bias: the scale's
/// gradient then needs the bias's values, which the backward is not handed
/// ([`Saved::has_bias`]).
pub fn foldable(learnable_scale: bool, has_bias: bool) -> bool {
    !(learnable_scale && has_bias)
}

/// A per-output-channel vector `[O]` shaped to broadcast over an output of `dims` dims
/// whose output channel is dim `channel`.
pub fn over_channels(v: &Tensor, dims: usize, channel: usize) -> Result<Tensor> {
    let mut shape = vec![1i64; dims];
    shape[channel] = -1;
    Ok(v.f_reshape(shape)?)
}

/// The product a binary layer makes of its binarized operands: what tells one layer
/// from another. Its output has [`Product::dims`] dims, the output channel in dim
/// [`Product::channel`], the sample in dim 0.
pub trait Product {
    /// The kept product's name in messages (the `Saved` field the op binds it to).
    const NAME: &'static str;

    /// The number of dims of the input and the output.
    fn dims(&self) -> usize;

    /// The dim of the output channel in the output.
    fn channel(&self) -> usize;

    /// `product(a, w_b, bias)`.
    fn forward(&self, a: &Tensor, wb: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// The gradients of `(a, w_b, bias)` where `want` asks for them, from `grad`, the
    /// gradient of the product (`grad_y * s`, in `grad_y`'s dtype); `kind` is the dtype
    /// the forward product ran in, `operands` rebuilds `a` and `w_b` in it.
    fn backward(
        &self,
        grad: &Tensor,
        kind: Kind,
        operands: &Operands<'_>,
        want: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]>;
}

/// The binarized operands of a backward, rebuilt (cheaper than keeping them) in the
/// dtype the forward's product ran in, each at most once and only when asked for.
pub struct Operands<'a> {
    k: &'a dyn Elementwise,
    x: &'a Tensor,
    std: Option<&'a Tensor>,
    weight: &'a Tensor,
    act_w: ActW,
    kind: Kind,
    a: OnceCell<Tensor>,
    wb: OnceCell<Tensor>,
}

impl<'a> Operands<'a> {
    fn new(k: &'a dyn Elementwise, saved: &Saved<'a>, act_w: ActW) -> Self {
        Operands {
            k,
            x: saved.x,
            std: saved.std,
            weight: saved.weight,
            act_w,
            kind: saved.product_kind,
            a: OnceCell::new(),
            wb: OnceCell::new(),
        }
    }

    /// `a = sign(x / std)`.
    pub fn a(&self) -> Result<&Tensor> {
        if let Some(a) = self.a.get() {
            return Ok(a);
        }
        let a = self.k.sign(self.x, self.std)?.f_to_kind(self.kind)?;
        Ok(self.a.get_or_init(|| a))
    }

    /// `w_b`.
    pub fn wb(&self) -> Result<&Tensor> {
        if let Some(wb) = self.wb.get() {
            return Ok(wb);
        }
        let wb = self
            .k
            .binarize_weight(self.weight, self.act_w)?
            .f_to_kind(self.kind)?;
        Ok(self.wb.get_or_init(|| wb))
    }
}

pub(crate) fn check_same_device(t: &Facts, reference: &Facts, what: &str) -> Result<()> {
    if t.place != reference.place {
        return value_err!(
            "{what} is on {} but the input is on {}; move them to one device",
            t.place,
            reference.place
        );
    }
    Ok(())
}

/// A per-output-channel vector `[o]` of a learnable scale or bias, checked.
pub(crate) fn check_channel_vector(t: &Tensor, x: &Facts, o: i64, what: &str) -> Result<()> {
    let f = facts::facts(t)?;
    check_float(&f, what)?;
    check_same_device(&f, x, what)?;
    if f.sizes != [o] {
        return value_err!("{what} must have shape [{o}], got {:?}", f.sizes);
    }
    Ok(())
}

/// The forward's optional bias and learnable scale, `[o]` each, checked.
pub(crate) fn check_vectors(
    xf: &Facts,
    o: i64,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
) -> Result<()> {
    if let Some(b) = bias {
        check_channel_vector(b, xf, o, "bias")?;
    }
    if let Some(s) = scale {
        check_channel_vector(s, xf, o, "scaling_factor")?;
    }
    Ok(())
}

/// What a binary layer's backward checks alike in what its forward saved: the
/// per-sample std `[N, 1, ..., 1]`, the scale and alpha vectors `[O]`, and the kept
/// product (named `what`), shaped like `grad_output`. Returns the std's facts.
pub(crate) fn check_saved_parts(
    xf: &Facts,
    gf: &Facts,
    o: i64,
    saved: &Saved<'_>,
    what: &str,
) -> Result<Option<Facts>> {
    let mut std = None;
    if let Some(s) = saved.std {
        let sf = facts::facts(s)?;
        check_float(&sf, "std")?;
        let mut shape = vec![1; xf.dim()];
        shape[0] = xf.sizes[0];
        if sf.sizes != shape {
            return value_err!("std must have shape {shape:?}, got {:?}", sf.sizes);
        }
        std = Some(sf);
    }
    for (t, name) in [(saved.scale, "scaling_factor"), (saved.alpha, "alpha")] {
        if let Some(t) = t {
            check_channel_vector(t, xf, o, name)?;
        }
    }
    if let Some(p) = saved.product {
        let pf = facts::facts(p)?;
        if pf.sizes != gf.sizes {
            return value_err!(
                "{what} has shape {:?}, grad_output {:?}",
                pf.sizes,
                gf.sizes
            );
        }
    }
    Ok(std)
}

/// The forward of a binary layer (SPEC 1.1 to 1.5) on the elementwise parts `k` of the
/// route its op chose, the arguments validated by the op.
#[allow(clippy::too_many_arguments)]
pub fn forward<P: Product>(
    p: &P,
    k: &dyn Elementwise,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: Option<&Tensor>,
    act_w: ActW,
    training: bool,
) -> Result<Forward> {
    let std = if training {
        Some(k.sample_std(x)?)
    } else {
        None
    };
    let a = k.sign(x, std.as_ref())?;
    let wb = k.binarize_weight(weight, act_w)?;
    let product = p.forward(&a, &wb, bias)?;
    let product_kind = facts::kind(&product)?;
    let per_channel = |v: &Tensor| over_channels(v, p.dims(), p.channel());
    let (y, alpha, product) = match Alpha::of(k, weight, scale)? {
        Alpha::Learnable(s) => (product.f_mul(&per_channel(s)?)?, None, Some(product)),
        Alpha::FromWeight(alpha) => {
            let y = product.f_mul(&per_channel(&alpha)?)?;
            (y, Some(alpha), None)
        }
    };
    Ok(Forward {
        y,
        std,
        alpha,
        product,
        product_kind,
    })
}

/// The backward of a binary layer, given the gradient of its output, on the elementwise
/// parts `k` of the route its op chose; `weight_kind` is the weight's dtype (the bias's
/// gradient comes back in it). What it was handed is validated by the op.
pub fn backward<P: Product>(
    p: &P,
    k: &dyn Elementwise,
    grad_y: &Tensor,
    saved: &Saved<'_>,
    act_w: ActW,
    needs: Needs,
    weight_kind: Kind,
) -> Result<Grads> {
    let scale = saved.scale()?;
    let operands = Operands::new(k, saved, act_w);
    let (dims, channel) = (p.dims(), p.channel());

    // y = product * s: d/d product = grad_y * s, d/d s = sum(grad_y * product).
    let grad_scale = match scale {
        Scale::Learnable(s) if needs.scale => {
            let recomputed;
            let product = match saved.product {
                Some(c) => c,
                // Handed no product (every forward keeps it with a learnable scale, but a
                // caller may pass the absent marker): without a bias (see `foldable`)
                // it is product(a, w_b).
                None if !saved.has_bias => {
                    recomputed = p.forward(operands.a()?, operands.wb()?, None)?;
                    &recomputed
                }
                None => return value_err!("missing {} for a learnable scale", P::NAME),
            };
            let others: Vec<i64> = (0..dims as i64).filter(|&d| d != channel as i64).collect();
            Some(
                grad_y
                    .f_mul(product)?
                    .f_sum_dim_intlist(others.as_slice(), false, None::<Kind>)?
                    .f_to_kind(facts::kind(s)?)?,
            )
        }
        Scale::Learnable(_) | Scale::Alpha(_) => None,
    };
    let want = [needs.input, needs.weight, needs.bias && saved.has_bias];
    if !want.contains(&true) {
        return Ok(Grads {
            input: None,
            weight: None,
            bias: None,
            scale: grad_scale,
        });
    }
    let grad = grad_y.f_mul(&over_channels(scale.tensor(), dims, channel)?)?;
    let [ga, gwb, gb] = p.backward(&grad, saved.product_kind, &operands, want)?;
    let input = ga
        .map(|g| k.bireal_backward(&g, saved.x, saved.std))
        .transpose()?;
    let weight = gwb
        .map(|g| k.weight_grad(&g, saved.weight, act_w))
        .transpose()?;
    let bias = gb.map(|g| g.f_to_kind(weight_kind)).transpose()?;
    Ok(Grads {
        input,
        weight,
        bias,
        scale: grad_scale,
    })
}
