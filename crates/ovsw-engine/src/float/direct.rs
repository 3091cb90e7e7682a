//! The direct float convolution, for convs over few input channels (a network's stem:
//! 3 channels, 7x7 stride 2 in ResNet-18, 3x3 in the CIFAR networks).
//!
//! im2col would copy each input value `kh * kw / (sh * sw)` times (12x for ResNet-18's
//! stem) into rows only `kh * kw * C` long, too short for a GEMM to amortise its
//! packing. Here each output row reads a band of `kh` zero-padded input rows, and a
//! register tile of a few output pixels by [`BLOCK`] output channels sums over the taps
//! `(ky, kx, c)` in that order, one multiply-add per tap, into one accumulator per
//! output element starting from 0. The order is the same for every pixel and every
//! tile, so an output does not depend on the batch, on how rows are shared between
//! threads, or on the tile's width. With AVX2 and FMA (and AVX2 not hidden by
//! `OVSW_DISABLE_CPU_FEATURES`) the multiply-add is one fused instruction, in AVX2
//! registers (tiles of 6 pixels) or, with AVX-512F, in AVX-512 registers (tiles of 8);
//! both give the same bits. Elsewhere, and in a row's last pixels, tiles are of up to
//! [`PIXELS`]; without FMA the multiply-add is a multiply then an add.

use std::cell::RefCell;

use crate::geom::ConvGeom;

/// Output pixels per register tile of the portable route, and of the fused routes at
/// the row's end.
pub const PIXELS: usize = 4;
/// Output pixels per full AVX2 tile: 6 pixels x 2 registers are 12 accumulators
/// (enough to cover the fused multiply-add's latency on two pipes), with 2 weight
/// registers and a broadcast within the 16.
#[cfg(target_arch = "x86_64")]
const WIDE_AVX2: usize = 6;
/// Output pixels per full AVX-512 tile, one register each.
#[cfg(target_arch = "x86_64")]
const WIDE_AVX512: usize = 8;
/// Output channels per register tile (two AVX registers).
pub const BLOCK: usize = 16;
/// The most input channels the direct path takes.
pub const MAX_CHANNELS: usize = 4;

/// Whether `g` takes the direct path: dense, undilated, few input channels.
pub fn fits(g: &ConvGeom) -> bool {
    g.groups == 1 && g.dilation == (1, 1) && g.cin <= MAX_CHANNELS
}

/// The weight as the direct path reads it: `[kh][kw][C][O padded to BLOCK]`.
pub fn weight_by_tap(weight: &[f32], g: &ConvGeom) -> Vec<f32> {
    let taps = g.kh * g.kw * g.cin;
    let op = g.cout.next_multiple_of(BLOCK);
    let mut out = vec![0.0; taps * op];
    for (o, w) in weight.chunks_exact(taps).enumerate() {
        for (t, &v) in w.iter().enumerate() {
            out[t * op + o] = v;
        }
    }
    out
}

/// How the multiply-adds are done on this CPU (read once).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fma {
    /// AVX-512 registers, fused multiply-add.
    Avx512,
    /// AVX2 registers, fused multiply-add.
    Avx2,
    /// Scalar code: a multiply then an add.
    Portable,
}

impl Fma {
    pub fn detect() -> Fma {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::bitconv::avx2_usable() && std::arch::is_x86_feature_detected!("fma") {
                return if crate::bitconv::avx512f_usable() {
                    Fma::Avx512
                } else {
                    Fma::Avx2
                };
            }
        }
        Fma::Portable
    }
}

/// Output row `oy` of image `n` into `dst` (`[ow][cout]`): the raw sums, before the
/// bias and the activation. `x` is one whole NHWC input of `h` x `w` x `g.cin`.
#[allow(clippy::too_many_arguments)]
pub fn row(
    fma: Fma,
    g: &ConvGeom,
    wt: &[f32],
    x: &[f32],
    (h, w): (usize, usize),
    (n, oy): (usize, usize),
    dst: &mut [f32],
) {
    thread_local! {
        static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    let c = g.cin;
    let pw = w + 2 * g.padding.1;
    let mut band = BAND.take();
    band.clear();
    band.resize(g.kh * pw * c, 0.0);
    // The band: kernel row ky holds input row oy * sh + ky - ph, zero where padded.
    for ky in 0..g.kh {
        let iy = (oy * g.stride.0 + ky) as isize - g.padding.0 as isize;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        let src = &x[((n * h + iy as usize) * w) * c..((n * h + iy as usize + 1) * w) * c];
        let at = (ky * pw + g.padding.1) * c;
        band[at..at + w * c].copy_from_slice(src);
    }
    let ow = dst.len() / g.cout;
    let mut ox = 0;
    // Full wide tiles first, the rest of the row in tiles of up to PIXELS.
    #[cfg(target_arch = "x86_64")]
    match fma {
        Fma::Avx512 => {
            while ox + WIDE_AVX512 <= ow {
                for b in (0..g.cout).step_by(BLOCK) {
                    let mut acc = [[0.0f32; BLOCK]; WIDE_AVX512];
                    // SAFETY: `Fma::Avx512` is made only where AVX-512F and FMA are
                    // detected.
                    unsafe { x86::tile_512(g, wt, &band, pw, ox, b, &mut acc) };
                    store(dst, g.cout, ox, b, &acc);
                }
                ox += WIDE_AVX512;
            }
        }
        Fma::Avx2 => {
            while ox + WIDE_AVX2 <= ow {
                for b in (0..g.cout).step_by(BLOCK) {
                    let mut acc = [[0.0f32; BLOCK]; WIDE_AVX2];
                    // SAFETY: `Fma::Avx2` is made only where AVX2 and FMA are detected.
                    unsafe { x86::tile_wide::<WIDE_AVX2>(g, wt, &band, pw, ox, b, &mut acc) };
                    store(dst, g.cout, ox, b, &acc);
                }
                ox += WIDE_AVX2;
            }
        }
        Fma::Portable => {}
    }
    while ox < ow {
        let p = PIXELS.min(ow - ox);
        for b in (0..g.cout).step_by(BLOCK) {
            let mut acc = [[0.0f32; BLOCK]; PIXELS];
            match fma {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: both are made only where AVX2 and FMA are detected.
                Fma::Avx2 | Fma::Avx512 => unsafe {
                    x86::tile(g, wt, &band, pw, ox, p, b, &mut acc)
                },
                _ => tile(g, wt, &band, pw, ox, p, b, &mut acc),
            }
            store(dst, g.cout, ox, b, &acc[..p]);
        }
        ox += p;
    }
    BAND.set(band);
}

/// A tile's sums into `dst` (`[ow][cout]`): pixel `ox + q` gets `acc[q]`, its channels
/// from `b` (the padding lanes past `cout` dropped).
fn store(dst: &mut [f32], cout: usize, ox: usize, b: usize, acc: &[[f32; BLOCK]]) {
    let lanes = BLOCK.min(cout - b);
    for (q, a) in acc.iter().enumerate() {
        let at = (ox + q) * cout + b;
        dst[at..at + lanes].copy_from_slice(&a[..lanes]);
    }
}

/// The portable tile: `p` pixels from column `ox`, channels `b..b + BLOCK`.
#[allow(clippy::too_many_arguments)]
fn tile(
    g: &ConvGeom,
    wt: &[f32],
    band: &[f32],
    pw: usize,
    ox: usize,
    p: usize,
    b: usize,
    acc: &mut [[f32; BLOCK]; PIXELS],
) {
    let (c, op) = (g.cin, g.cout.next_multiple_of(BLOCK));
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            for ci in 0..c {
                let t = (ky * g.kw + kx) * c + ci;
                let wv = &wt[t * op + b..t * op + b + BLOCK];
                for (q, a) in acc.iter_mut().take(p).enumerate() {
                    let xv = band[(ky * pw + (ox + q) * g.stride.1 + kx) * c + ci];
                    for l in 0..BLOCK {
                        a[l] += xv * wv[l];
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, PIXELS};
    use crate::geom::ConvGeom;

    /// Panics unless every index a tile of `p` pixels from column `ox`, channels
    /// `b..b + BLOCK`, reads is in range: the band holds kh rows of pw pixels, and the
    /// last pixel's window ends inside it (the output size rule).
    fn check(g: &ConvGeom, wt: &[f32], band: &[f32], pw: usize, ox: usize, p: usize, b: usize) {
        let (c, op) = (g.cin, g.cout.next_multiple_of(BLOCK));
        assert!(p > 0 && wt.len() >= g.kh * g.kw * c * op && b + BLOCK <= op);
        let last = (g.kh - 1) * pw + (ox + p - 1) * g.stride.1 + g.kw;
        assert!(band.len() >= last * c);
    }

    /// [`super::tile`] for the first `p` (1 to [`PIXELS`]) pixels of `acc`, by
    /// [`tile_wide`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        g: &ConvGeom,
        wt: &[f32],
        band: &[f32],
        pw: usize,
        ox: usize,
        p: usize,
        b: usize,
        acc: &mut [[f32; BLOCK]; PIXELS],
    ) {
        match p {
            1 => tile_wide::<1>(g, wt, band, pw, ox, b, acc),
            2 => tile_wide::<2>(g, wt, band, pw, ox, b, acc),
            3 => tile_wide::<3>(g, wt, band, pw, ox, b, acc),
            _ => {
                assert_eq!(p, PIXELS, "a tile of 1 to {PIXELS} pixels");
                tile_wide::<PIXELS>(g, wt, band, pw, ox, b, acc)
            }
        }
    }

    /// [`super::tile`] for `P` pixels, all of them, two AVX2 registers of [`BLOCK`]
    /// channels each, into the first `P` entries of `acc`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_wide<const P: usize>(
        g: &ConvGeom,
        wt: &[f32],
        band: &[f32],
        pw: usize,
        ox: usize,
        b: usize,
        acc: &mut [[f32; BLOCK]],
    ) {
        check(g, wt, band, pw, ox, P, b);
        assert!(acc.len() >= P);
        let (c, op) = (g.cin, g.cout.next_multiple_of(BLOCK));
        let mut r = [[_mm256_setzero_ps(); 2]; P];
        let wp = wt.as_ptr().add(b);
        let bp = band.as_ptr();
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for ci in 0..c {
                    let t = (ky * g.kw + kx) * c + ci;
                    let w0 = _mm256_loadu_ps(wp.add(t * op));
                    let w1 = _mm256_loadu_ps(wp.add(t * op + 8));
                    let base = (ky * pw + ox * g.stride.1 + kx) * c + ci;
                    for (q, rq) in r.iter_mut().enumerate() {
                        let xv = _mm256_broadcast_ss(&*bp.add(base + q * g.stride.1 * c));
                        rq[0] = _mm256_fmadd_ps(xv, w0, rq[0]);
                        rq[1] = _mm256_fmadd_ps(xv, w1, rq[1]);
                    }
                }
            }
        }
        for (a, rq) in acc.iter_mut().zip(r) {
            _mm256_storeu_ps(a.as_mut_ptr(), rq[0]);
            _mm256_storeu_ps(a.as_mut_ptr().add(8), rq[1]);
        }
    }

    /// [`super::tile`] for `P` pixels, all of them, one AVX-512 register of [`BLOCK`]
    /// channels each.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tile_512<const P: usize>(
        g: &ConvGeom,
        wt: &[f32],
        band: &[f32],
        pw: usize,
        ox: usize,
        b: usize,
        acc: &mut [[f32; BLOCK]; P],
    ) {
        check(g, wt, band, pw, ox, P, b);
        let (c, op) = (g.cin, g.cout.next_multiple_of(BLOCK));
        let mut r = [_mm512_setzero_ps(); P];
        let wp = wt.as_ptr().add(b);
        let bp = band.as_ptr();
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for ci in 0..c {
                    let t = (ky * g.kw + kx) * c + ci;
                    let wv = _mm512_loadu_ps(wp.add(t * op));
                    let base = (ky * pw + ox * g.stride.1 + kx) * c + ci;
                    for (q, rq) in r.iter_mut().enumerate() {
                        let xv = _mm512_set1_ps(*bp.add(base + q * g.stride.1 * c));
                        *rq = _mm512_fmadd_ps(xv, wv, *rq);
                    }
                }
            }
        }
        for (a, rq) in acc.iter_mut().zip(r) {
            _mm512_storeu_ps(a.as_mut_ptr(), rq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conv in float64 from its definition, NHWC in, `[O][kh][kw][C]` weights.
    fn reference(g: &ConvGeom, wgt: &[f32], x: &[f32], n: usize, h: usize, w: usize) -> Vec<f64> {
        let (oh, ow) = g.out_hw(h, w, "ref").unwrap();
        let mut out = vec![0.0; n * oh * ow * g.cout];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..g.cout {
                        let mut s = 0.0f64;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride.0 + ky) as isize - g.padding.0 as isize;
                                let ix = (ox * g.stride.1 + kx) as isize - g.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for c in 0..g.cin {
                                    let xv =
                                        x[((b * h + iy as usize) * w + ix as usize) * g.cin + c];
                                    let wv = wgt[((o * g.kh + ky) * g.kw + kx) * g.cin + c];
                                    s += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out[((b * oh + oy) * ow + ox) * g.cout + o] = s;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn run(
        fma: Fma,
        g: &ConvGeom,
        wgt: &[f32],
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let (oh, ow) = g.out_hw(h, w, "t").unwrap();
        let wt = weight_by_tap(wgt, g);
        let mut out = vec![f32::NAN; n * oh * ow * g.cout];
        for (r, dst) in out.chunks_exact_mut(ow * g.cout).enumerate() {
            row(fma, g, &wt, x, (h, w), (r / oh, r % oh), dst);
        }
        out
    }

    #[test]
    fn both_routes_match_the_definition_and_each_pixel_is_independent_of_its_tile() {
        let cases = [
            // (cin, cout, k, stride, padding, h, w)
            (3, 64, 7, 2, 3, 23, 19),
            (3, 16, 3, 1, 1, 9, 11),
            (1, 20, 3, 1, 0, 6, 7),
            (4, 33, 5, 2, 2, 10, 13),
            (2, 8, 1, 1, 0, 5, 3),
            // 8 wide: a full AVX2 tile of 6 and a tile of 2 after it.
            (3, 16, 3, 1, 1, 4, 8),
        ];
        let mut routes = vec![Fma::Portable];
        match Fma::detect() {
            Fma::Avx512 => routes.extend([Fma::Avx2, Fma::Avx512]),
            Fma::Avx2 => routes.push(Fma::Avx2),
            Fma::Portable => {}
        }
        for (i, &(cin, cout, k, s, p, h, w)) in cases.iter().enumerate() {
            let g = ConvGeom {
                cin,
                cout,
                kh: k,
                kw: k,
                stride: (s, s),
                padding: (p, p),
                dilation: (1, 1),
                groups: 1,
            };
            assert!(fits(&g));
            let n = 2;
            let wgt = values(cout * k * k * cin, i as u64);
            let x = values(n * h * w * cin, 100 + i as u64);
            let want = reference(&g, &wgt, &x, n, h, w);
            for &fma in &routes {
                let got = run(fma, &g, &wgt, &x, n, h, w);
                let bound = (k * k * cin) as f64 * 2.0 * f64::from(f32::EPSILON);
                for (j, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(a) - b).abs() <= bound,
                        "{fma:?} case {i} at {j}: {a} vs {b}"
                    );
                }
                // The second image alone gives the same bits as inside the batch.
                let one = run(fma, &g, &wgt, &x[h * w * cin..], 1, h, w);
                assert_eq!(one, got[got.len() / 2..], "{fma:?} case {i}");
                // The two fused routes give the same bits.
                if fma == Fma::Avx512 {
                    assert_eq!(got, run(Fma::Avx2, &g, &wgt, &x, n, h, w), "case {i}");
                }
            }
        }
    }
}
