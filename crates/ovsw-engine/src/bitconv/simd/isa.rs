//! What the conv driver and the instruction-set kernels share: the [`Isa`] trait each
//! kernel's token implements, the [`Job`] run with one, and the checked [`Tile`] of
//! words the kernels read.

/// Output channels computed together by the kernels (weights are stored blocked so
/// that one step of 8 channels is 64 contiguous bytes).
pub const LANES: usize = 8;

/// Work that runs with one instruction set: [`Kernel::run`] calls `run` with that
/// instruction set's token from inside a function compiled for it. Mark `run`
/// `#[inline(always)]` so that its code is compiled there.
pub trait Job {
    type Out;
    fn run<I: Isa>(self, isa: I) -> Self::Out;
}

pub(super) mod sealed {
    pub trait Sealed {}
}

/// What an instruction set provides to the conv driver. Implemented only by the tokens
/// of the instruction-set modules beside this one; a value of one proves the CPU runs its code.
pub trait Isa: Copy + sealed::Sealed {
    /// Packs the signs of `ch` (one group's channels of one pixel) into `out` in the
    /// layout of [`crate::bits`], bit set where `ch[c]` has its sign bit set
    /// (negative, or -0.0, which the caller clears with the zero mask): what
    /// [`bits::pack_channels`](crate::bits::pack_channels) gives with
    /// `f32::is_sign_negative`. Returns whether any value is exactly zero.
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool;

    /// The fast kernel (see the module docs) on a checked tile.
    ///
    /// # Safety
    /// `acc.len() >= tile.pixels * tile.blocks * LANES`; the tile was checked by
    /// [`Tile::new`].
    unsafe fn dot(self, tile: &Tile<'_>, acc: &mut [i32]);

    /// The masked kernel on a checked tile with masks.
    ///
    /// # Safety
    /// As [`Isa::dot`], and the tile has both masks.
    unsafe fn dot_masked(self, tile: &Tile<'_>, acc: &mut [i32]);
}

/// A run of consecutive words of the conv window: each pixel reads its words
/// `a..a + len` (from its base) against weight steps `w..w + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub a: usize,
    pub w: usize,
}

/// The runs of a window, all `len` words long, checked against the weight's `steps`.
pub struct Runs<'a> {
    runs: &'a [Run],
    len: usize,
    steps: usize,
    /// One past the last word a pixel reads, from its base (0 without runs).
    reach: usize,
}

impl<'a> Runs<'a> {
    /// Panics when a run leaves the weight's steps (a bug in the driver).
    pub fn new(runs: &'a [Run], len: usize, steps: usize) -> Self {
        let mut reach = 0;
        for r in runs {
            let (a_end, w_end) = (r.a.checked_add(len), r.w.checked_add(len));
            assert!(
                a_end.is_some() && w_end.is_some_and(|e| e <= steps),
                "binary conv runs out of bounds"
            );
            reach = reach.max(a_end.unwrap_or(0));
        }
        Runs {
            runs,
            len,
            steps,
            reach,
        }
    }
}

/// `pixels` output pixels of one group for a kernel, checked so that the kernels may
/// index without bounds checks. Pixel `p` reads the runs at base `base + p * stride`
/// of `a`; the weights are `w[(b * steps + s) * LANES + lane]` for block `b` of 8
/// output channels and step `s`; the masks, when present, have the same layouts.
pub struct Tile<'a> {
    pub(super) a: &'a [u64],
    pub(super) a_mask: Option<&'a [u64]>,
    pub(super) base: usize,
    pub(super) stride: usize,
    pub(super) pixels: usize,
    pub(super) runs: &'a [Run],
    pub(super) run_len: usize,
    pub(super) w: &'a [u64],
    pub(super) w_mask: Option<&'a [u64]>,
    pub(super) steps: usize,
    pub(super) blocks: usize,
}

impl<'a> Tile<'a> {
    /// Checks every index the kernels will read. Panics on a violation (a bug in the
    /// driver, never a user's input).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn new(
        a: &'a [u64],
        a_mask: Option<&'a [u64]>,
        (base, stride, pixels): (usize, usize, usize),
        runs: &Runs<'a>,
        w: &'a [u64],
        w_mask: Option<&'a [u64]>,
        blocks: usize,
    ) -> Self {
        let end = (pixels - 1)
            .checked_mul(stride)
            .and_then(|o| o.checked_add(base))
            .and_then(|o| o.checked_add(runs.reach));
        assert!(
            pixels > 0
                && (runs.runs.is_empty() || end.is_some_and(|e| e <= a.len()))
                && a_mask.is_none_or(|m| m.len() == a.len())
                && w.len() == blocks * runs.steps * LANES
                && w_mask.is_none_or(|m| m.len() == w.len())
                && a_mask.is_some() == w_mask.is_some(),
            "binary conv kernel called out of bounds"
        );
        Tile {
            a,
            a_mask,
            base,
            stride,
            pixels,
            runs: runs.runs,
            run_len: runs.len,
            w,
            w_mask,
            steps: runs.steps,
            blocks,
        }
    }

    /// Runs the fast kernel, or the masked one when the tile has masks. `acc` receives
    /// `pixels * blocks * LANES` sums, pixel-major: the popcount of `a ^ w` per
    /// channel, or with masks the dot product `popcount(m) - 2 popcount((a ^ w) & m)`.
    #[inline(always)]
    pub fn dot<I: Isa>(&self, isa: I, acc: &mut [i32]) {
        assert!(acc.len() >= self.pixels * self.blocks * LANES);
        if self.a_mask.is_some() {
            // SAFETY: the tile was checked by `new` (masks present), `acc` just above;
            // `isa` is a token, so the CPU runs its code.
            unsafe { isa.dot_masked(self, acc) }
        } else {
            // SAFETY: as above.
            unsafe { isa.dot(self, acc) }
        }
    }

    /// The base of pixel `p`'s words.
    #[inline(always)]
    pub(super) fn base(&self, p: usize) -> usize {
        self.base + p * self.stride
    }
}
