//! The popcount kernels of the binary convolution, one module per instruction set,
//! and the run-time choice between them.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_popcnt;

use super::{BITS, LANES};
use crate::error::{value_err, Result};

/// The popcount kernel family, chosen once per engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `u64::count_ones` compiled for the baseline target.
    Portable,
    /// x86-64 `popcnt` instruction.
    Popcnt,
    /// x86-64 AVX2.
    Avx2,
}

impl Kernel {
    pub const NAMES: [&'static str; 3] = ["portable", "popcnt", "avx2"];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Popcnt => "popcnt",
            Kernel::Avx2 => "avx2",
        }
    }

    fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Popcnt => std::arch::is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best kernel this CPU runs.
    pub fn detect() -> Kernel {
        [Kernel::Avx2, Kernel::Popcnt]
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Kernel::Portable)
    }

    /// `"auto"` or a kernel name; names the CPU cannot run are refused.
    pub fn parse(name: &str) -> Result<Kernel> {
        let kernel = match name {
            "auto" => return Ok(Kernel::detect()),
            "portable" => Kernel::Portable,
            "popcnt" => Kernel::Popcnt,
            "avx2" => Kernel::Avx2,
            other => {
                return value_err!(
                    "unknown kernel '{other}'; expected 'auto' or one of {}",
                    Kernel::NAMES.join(", ")
                )
            }
        };
        if kernel.supported() {
            Ok(kernel)
        } else {
            value_err!("this CPU cannot run the '{name}' kernel")
        }
    }
}

/// Packs the signs of `ch` into `out` (bit set for negative values, including -0.0,
/// which the caller clears with the zero mask); returns whether any value is zero.
pub fn pack_signs(ch: &[f32], out: &mut [u64], kernel: Kernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && ch.len().is_multiple_of(8) {
        assert!(out.len() == ch.len().div_ceil(BITS));
        // SAFETY: AVX2 was detected before this kernel was chosen; lengths checked.
        return unsafe { x86_avx2::pack_avx2(ch, out) };
    }
    let _ = kernel;
    portable::pack_signs(ch, out)
}

/// For one output pixel and every output channel of a group: the popcount of
/// `a[s] ^ w[s]` summed over the steps `s` (tap-major, then word). The steps' words are
/// `a[start..start + row_len]` for each start in `starts` (one run per kernel row); `w`
/// is the group's blocked weight `[blocks][steps][LANES]`; `acc` receives
/// `blocks * LANES` sums.
pub fn dot_blocks(
    kernel: Kernel,
    a: &[u64],
    starts: &[usize],
    row_len: usize,
    w: &[u64],
    blocks: usize,
    acc: &mut [u32],
) {
    // The kernels index without bounds checks: every range is checked here.
    assert!(
        acc.len() == blocks * LANES
            && w.len() == blocks * starts.len() * row_len * LANES
            && starts.iter().all(|&s| s + row_len <= a.len()),
        "binary conv kernel called out of bounds"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was chosen only after the CPU reported AVX2 (Kernel::parse /
        // detect), and the assert above keeps every access in bounds.
        Kernel::Avx2 => unsafe { x86_avx2::dot_avx2(a, starts, row_len, w, blocks, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for popcnt.
        Kernel::Popcnt => unsafe { x86_popcnt::dot_popcnt(a, starts, row_len, w, blocks, acc) },
        _ => portable::dot_generic(a, starts, row_len, w, blocks, acc),
    }
}
