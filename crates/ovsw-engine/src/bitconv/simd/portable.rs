//! The portable kernel: `u64::count_ones`, which LLVM lowers to `popcnt` where the
//! target has it (see `x86_popcnt`) and to NEON `CNT` on aarch64. Its loops are also the
//! masked kernel of the instruction sets without one of their own.

use super::isa::{sealed, Isa, Tile, LANES};
use crate::bits::pack_channels;

/// Every CPU runs the portable kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Portable;

impl sealed::Sealed for Portable {}

impl Isa for Portable {
    #[inline(always)]
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool {
        pack(ch, out)
    }

    #[inline(always)]
    unsafe fn dot(self, tile: &Tile<'_>, acc: &mut [i32]) {
        dot(tile, acc)
    }

    #[inline(always)]
    unsafe fn dot_masked(self, tile: &Tile<'_>, acc: &mut [i32]) {
        dot_masked(tile, acc)
    }
}

/// See [`Isa::pack`].
#[inline(always)]
pub fn pack(ch: &[f32], out: &mut [u64]) -> bool {
    let mut zero = false;
    pack_channels(ch, out, |v| {
        zero |= v == 0.0;
        v.is_sign_negative()
    });
    zero
}

/// The fast kernel, pixel by pixel (safe indexing: the tile's checks make the bounds
/// checks cheap to predict).
#[inline(always)]
pub fn dot(t: &Tile<'_>, acc: &mut [i32]) {
    for p in 0..t.pixels {
        let base = t.base(p);
        let out = &mut acc[p * t.blocks * LANES..(p + 1) * t.blocks * LANES];
        for (b, out) in out.chunks_exact_mut(LANES).enumerate() {
            let wb = &t.w[b * t.steps * LANES..(b + 1) * t.steps * LANES];
            let mut sum = [0u32; LANES];
            for r in t.runs {
                let a = &t.a[base + r.a..base + r.a + t.run_len];
                let w = &wb[r.w * LANES..(r.w + t.run_len) * LANES];
                for (&av, wv) in a.iter().zip(w.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        sum[l] += (av ^ wv[l]).count_ones();
                    }
                }
            }
            for (o, v) in out.iter_mut().zip(sum) {
                *o = v as i32;
            }
        }
    }
}

/// The masked kernel, pixel by pixel.
#[inline(always)]
pub fn dot_masked(t: &Tile<'_>, acc: &mut [i32]) {
    let (Some(a_mask), Some(w_mask)) = (t.a_mask, t.w_mask) else {
        unreachable!("Tile::dot runs the masked kernel only with both masks")
    };
    for p in 0..t.pixels {
        let base = t.base(p);
        let out = &mut acc[p * t.blocks * LANES..(p + 1) * t.blocks * LANES];
        for (b, out) in out.chunks_exact_mut(LANES).enumerate() {
            let block = b * t.steps * LANES..(b + 1) * t.steps * LANES;
            let (wb, mb) = (&t.w[block.clone()], &w_mask[block]);
            let mut dot = [0i64; LANES];
            for r in t.runs {
                for j in 0..t.run_len {
                    let (av, am) = (t.a[base + r.a + j], a_mask[base + r.a + j]);
                    let s = (r.w + j) * LANES;
                    for l in 0..LANES {
                        let m = am & mb[s + l];
                        let diff = (av ^ wb[s + l]) & m;
                        dot[l] += i64::from(m.count_ones()) - 2 * i64::from(diff.count_ones());
                    }
                }
            }
            for (o, v) in out.iter_mut().zip(dot) {
                *o = v as i32;
            }
        }
    }
}
