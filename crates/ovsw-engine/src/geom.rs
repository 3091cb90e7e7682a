//! Convolution geometry shared by the binary and the float convolution: sizes, the
//! output size rule and the taps of an output pixel that fall inside the input.

use crate::error::{value_err, Result};
use crate::nhwc::Tensor4;

/// The most inputs one output may sum (`kh * kw * cin / groups`): binary dot products
/// stay far inside `i32`.
pub const MAX_WINDOW: usize = 1 << 28;

/// Geometry shared by the binary and the float convolution.
#[derive(Clone, Debug)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl ConvGeom {
    pub fn check(&self, name: &str) -> Result<()> {
        let positive = [
            self.cin,
            self.cout,
            self.kh,
            self.kw,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if positive.contains(&0) {
            return value_err!("corrupt deploy file: op '{name}' has a zero size in {self:?}");
        }
        if !self.cin.is_multiple_of(self.groups) || !self.cout.is_multiple_of(self.groups) {
            return value_err!(
                "corrupt deploy file: op '{name}': channels {}->{} are not divisible by groups {}",
                self.cin,
                self.cout,
                self.groups
            );
        }
        let window = self
            .kh
            .checked_mul(self.kw)
            .and_then(|t| t.checked_mul(self.cin / self.groups));
        if window.is_none_or(|w| w > MAX_WINDOW) {
            return value_err!(
                "corrupt deploy file: op '{name}': a {}x{} window over {} channels exceeds {MAX_WINDOW} inputs",
                self.kh,
                self.kw,
                self.cin / self.groups
            );
        }
        Ok(())
    }

    /// Output height and width for input `x`, or an error naming the layer when its
    /// channels or size do not fit.
    pub fn output_hw(&self, x: &Tensor4, name: &str) -> Result<(usize, usize)> {
        self.output_for(x.h, x.w, x.c, name)
    }

    /// Output height and width for an input of `h` x `w` with `c` channels (what
    /// [`ConvGeom::output_hw`] checks, for shape inference without a tensor).
    pub fn output_for(&self, h: usize, w: usize, c: usize, name: &str) -> Result<(usize, usize)> {
        if c != self.cin {
            return value_err!(
                "layer '{name}' expects {} input channels, got {c}",
                self.cin
            );
        }
        self.out_hw(h, w, name)
    }

    /// Output height and width for an input of `h` x `w`, or an error naming the layer.
    pub fn out_hw(&self, h: usize, w: usize, name: &str) -> Result<(usize, usize)> {
        let one = |size: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (size + 2 * p).checked_sub(span).map(|v| v / s + 1)
        };
        match (
            one(h, self.kh, self.stride.0, self.padding.0, self.dilation.0),
            one(w, self.kw, self.stride.1, self.padding.1, self.dilation.1),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => value_err!(
                "input of {h}x{w} is too small for layer '{name}' ({}x{} kernel, padding {:?}, dilation {:?})",
                self.kh,
                self.kw,
                self.padding,
                self.dilation
            ),
        }
    }

    /// The range of kernel offsets whose input row `o * s - p + k * d` lies in `0..size`.
    pub fn valid_taps(
        o: usize,
        size: usize,
        k: usize,
        s: usize,
        p: usize,
        d: usize,
    ) -> (usize, usize) {
        let base = (o * s) as isize - p as isize;
        let mut lo = 0;
        while lo < k && base + ((lo * d) as isize) < 0 {
            lo += 1;
        }
        let mut hi = k;
        while hi > lo && base + ((hi - 1) * d) as isize >= size as isize {
            hi -= 1;
        }
        (lo, hi)
    }
}
