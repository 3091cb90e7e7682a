//! The portable kernel compiled for the x86-64 `popcnt` instruction.

use super::cpu::Flag;
use super::isa::{sealed, Isa, Job, Tile};
use super::portable;

/// Proof that the CPU has `popcnt`: made only by [`Popcnt::new`], which checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Popcnt(());

impl Popcnt {
    pub fn new() -> Option<Self> {
        Flag::Popcnt.usable().then_some(Popcnt(()))
    }

    /// Runs `job` compiled for `popcnt`.
    #[inline]
    pub fn enter<J: Job>(self, job: J) -> J::Out {
        #[target_feature(enable = "popcnt")]
        unsafe fn enter<J: Job>(isa: Popcnt, job: J) -> J::Out {
            job.run(isa)
        }
        // SAFETY: `self` exists, so the CPU has popcnt.
        unsafe { enter(self, job) }
    }
}

impl sealed::Sealed for Popcnt {}

impl Isa for Popcnt {
    #[inline(always)]
    fn pack(self, ch: &[f32], out: &mut [u64]) -> bool {
        portable::pack(ch, out)
    }

    #[inline(always)]
    unsafe fn dot(self, tile: &Tile<'_>, acc: &mut [i32]) {
        portable::dot(tile, acc)
    }

    #[inline(always)]
    unsafe fn dot_masked(self, tile: &Tile<'_>, acc: &mut [i32]) {
        portable::dot_masked(tile, acc)
    }
}
