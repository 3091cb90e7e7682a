//! The engine's activation tensor (float32, NHWC) and fused activations.

/// A float32 tensor in NHWC layout (batch, height, width, channels).
#[derive(Clone, Debug)]
pub struct Tensor4 {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Tensor4 {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Tensor4 {
            n,
            h,
            w,
            c,
            data: vec![0.0; n * h * w * c],
        }
    }

    /// From an NCHW buffer (the layout PyTorch and the Python API use).
    pub fn from_nchw(src: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        let mut t = Tensor4::zeros(n, h, w, c);
        let plane = h * w;
        for b in 0..n {
            for ch in 0..c {
                let s = &src[(b * c + ch) * plane..(b * c + ch + 1) * plane];
                for (p, &v) in s.iter().enumerate() {
                    t.data[(b * plane + p) * c + ch] = v;
                }
            }
        }
        t
    }

    /// The data in NCHW order.
    pub fn to_nchw(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut out = vec![0.0; self.data.len()];
        for b in 0..self.n {
            for p in 0..plane {
                let px = &self.data[(b * plane + p) * self.c..(b * plane + p + 1) * self.c];
                for (ch, &v) in px.iter().enumerate() {
                    out[(b * self.c + ch) * plane + p] = v;
                }
            }
        }
        out
    }

    pub fn nchw(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
}

/// An elementwise activation applied per pixel (channels last).
#[derive(Clone, Debug)]
pub enum Act {
    None,
    /// `clamp(x, min, max)` (nn.Hardtanh).
    Hardtanh(f32, f32),
    /// `x` where positive, `a[c] * x` elsewhere (nn.PReLU, one or per-channel slopes).
    Prelu(Vec<f32>),
}

impl Act {
    /// Applies the activation to one pixel's channels.
    #[inline]
    pub fn apply(&self, px: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Hardtanh(lo, hi) => {
                for v in px.iter_mut() {
                    // NaN passes through as torch's clamp does.
                    *v = if *v < *lo {
                        *lo
                    } else if *v > *hi {
                        *hi
                    } else {
                        *v
                    };
                }
            }
            Act::Prelu(a) => {
                let per_channel = a.len() > 1;
                for (c, v) in px.iter_mut().enumerate() {
                    if *v < 0.0 {
                        *v *= if per_channel { a[c] } else { a[0] };
                    }
                }
            }
        }
    }
}
