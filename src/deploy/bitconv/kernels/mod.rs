//! The popcount kernels of the binary convolution, one module per instruction set, and
//! the run-time choice between them.
//!
//! **Safety by construction.** Each instruction-set module defines a zero-sized token
//! (`Avx2`, `Avx512Vpopcnt`, ...) whose one constructor checks that the CPU has the
//! flags it needs; its methods run that instruction set's code, so holding a token is
//! the proof that the CPU can run it. [`Kernel`] wraps one token in a private enum and
//! is made only by [`Kernel::parse`] and [`Kernel::available`], so safe code cannot pick
//! a kernel the CPU lacks. [`Kernel::run`] hands the token to a [`Job`] inside a
//! function compiled for that instruction set (`#[target_feature]`), so the job's inlined
//! code (the conv driver's row loop, packing, epilogue) is compiled for it too. The
//! kernels read memory without bounds checks only through a [`Tile`], whose constructor
//! checks every index the kernels will touch.
//!
//! **What a kernel computes.** For a tile of `P` output pixels and every output channel
//! of one group: `sum_s popcount(a[s] ^ w[s])` over the steps `s` of the conv window
//! that the tile reads (the fast kernel), or, with non-zero planes `m` for activations
//! and weights, `sum_s popcount(m) - 2 popcount((a ^ w) & m)` with `m = m_a[s] & m_w[s]`
//! (the masked kernel, for exact zeros, which count 0). Weights are blocked
//! `[blocks][steps][LANES]` so that one step of 8 output channels is 64 contiguous bytes
//! (one zmm register).

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;
#[cfg(target_arch = "x86_64")]
mod x86_popcnt;

use std::sync::OnceLock;

use super::LANES;
use crate::error::{value_err, Result};

/// The environment variable that hides CPU flags from the kernel choice (as
/// `NPY_DISABLE_CPU_FEATURES` does for numpy): to see what a CPU without them would run,
/// and to test the refusal. Flags are named as `/proc/cpuinfo` names them, separated by
/// spaces or commas. It can only take flags away.
pub const DISABLE_ENV: &str = "OVSW_DISABLE_CPU_FEATURES";

/// A CPU flag a kernel needs, named as in `/proc/cpuinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    Popcnt,
    Avx2,
    Avx512f,
    Avx512bw,
    Avx512Vpopcntdq,
}

impl Flag {
    pub const ALL: [Flag; 5] = [
        Flag::Popcnt,
        Flag::Avx2,
        Flag::Avx512f,
        Flag::Avx512bw,
        Flag::Avx512Vpopcntdq,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Flag::Popcnt => "popcnt",
            Flag::Avx2 => "avx2",
            Flag::Avx512f => "avx512f",
            Flag::Avx512bw => "avx512bw",
            Flag::Avx512Vpopcntdq => "avx512_vpopcntdq",
        }
    }

    /// Whether the CPU (and the OS, for AVX-512 state) supports the flag.
    fn detected(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Flag::Popcnt => std::arch::is_x86_feature_detected!("popcnt"),
                Flag::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
                Flag::Avx512f => std::arch::is_x86_feature_detected!("avx512f"),
                Flag::Avx512bw => std::arch::is_x86_feature_detected!("avx512bw"),
                Flag::Avx512Vpopcntdq => std::arch::is_x86_feature_detected!("avx512vpopcntdq"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Detected and not hidden by [`DISABLE_ENV`].
    fn usable(self) -> bool {
        self.detected() && disabled().as_ref().is_ok_and(|d| !d.contains(&self))
    }
}

/// The flags [`DISABLE_ENV`] hides, read once per process.
fn disabled() -> &'static std::result::Result<Vec<Flag>, String> {
    static DISABLED: OnceLock<std::result::Result<Vec<Flag>, String>> = OnceLock::new();
    DISABLED.get_or_init(|| {
        let text = std::env::var(DISABLE_ENV).unwrap_or_default();
        text.split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(|s| {
                Flag::ALL
                    .into_iter()
                    .find(|f| f.name() == s)
                    .ok_or_else(|| {
                        let known: Vec<&str> = Flag::ALL.iter().map(|f| f.name()).collect();
                        format!(
                            "{DISABLE_ENV} names an unknown CPU flag '{s}'; known flags: {}",
                            known.join(", ")
                        )
                    })
            })
            .collect()
    })
}

/// The CPU flags this machine offers the kernels (after [`DISABLE_ENV`]).
pub fn cpu_flags() -> Result<Vec<&'static str>> {
    check_env()?;
    Ok(Flag::ALL
        .into_iter()
        .filter(|f| f.usable())
        .map(Flag::name)
        .collect())
}

fn check_env() -> Result<()> {
    match disabled() {
        Ok(_) => Ok(()),
        Err(e) => value_err!("{e}"),
    }
}

/// The kernels, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Name {
    Avx512Vpopcnt,
    Avx512Bw,
    Avx2,
    Popcnt,
    Portable,
}

impl Name {
    const ALL: [Name; 5] = [
        Name::Avx512Vpopcnt,
        Name::Avx512Bw,
        Name::Avx2,
        Name::Popcnt,
        Name::Portable,
    ];

    fn name(self) -> &'static str {
        match self {
            Name::Avx512Vpopcnt => "avx512_vpopcntdq",
            Name::Avx512Bw => "avx512bw",
            Name::Avx2 => "avx2",
            Name::Popcnt => "popcnt",
            Name::Portable => "portable",
        }
    }

    /// The CPU flags the kernel needs.
    fn flags(self) -> &'static [Flag] {
        match self {
            Name::Avx512Vpopcnt => &[Flag::Avx512f, Flag::Avx512Vpopcntdq],
            Name::Avx512Bw => &[Flag::Avx512f, Flag::Avx512bw],
            Name::Avx2 => &[Flag::Avx2],
            Name::Popcnt => &[Flag::Popcnt],
            Name::Portable => &[],
        }
    }

    /// The first flag of the kernel that `has` says is missing.
    fn missing(self, has: impl Fn(Flag) -> bool) -> Option<Flag> {
        self.flags().iter().copied().find(|&f| !has(f))
    }

    /// The kernel, when this CPU runs it: the token constructors check the flags.
    fn kernel(self) -> Option<Kernel> {
        let choice = match self {
            Name::Portable => Some(Choice::Portable(portable::Portable)),
            #[cfg(target_arch = "x86_64")]
            Name::Popcnt => x86_popcnt::Popcnt::new().map(Choice::Popcnt),
            #[cfg(target_arch = "x86_64")]
            Name::Avx2 => x86_avx2::Avx2::new().map(Choice::Avx2),
            #[cfg(target_arch = "x86_64")]
            Name::Avx512Bw => x86_avx512::Avx512Bw::new().map(Choice::Avx512Bw),
            #[cfg(target_arch = "x86_64")]
            Name::Avx512Vpopcnt => x86_avx512::Avx512Vpopcnt::new().map(Choice::Avx512Vpopcnt),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        };
        choice.map(Kernel)
    }
}

/// The token of one instruction set (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Portable(portable::Portable),
    #[cfg(target_arch = "x86_64")]
    Popcnt(x86_popcnt::Popcnt),
    #[cfg(target_arch = "x86_64")]
    Avx2(x86_avx2::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512Bw(x86_avx512::Avx512Bw),
    #[cfg(target_arch = "x86_64")]
    Avx512Vpopcnt(x86_avx512::Avx512Vpopcnt),
}

/// A binary-conv kernel this CPU runs. Only [`Kernel::parse`] and [`Kernel::available`]
/// make one, after checking the CPU's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel(Choice);

impl Kernel {
    /// Every kernel's name, best first.
    pub const NAMES: [&'static str; 5] =
        ["avx512_vpopcntdq", "avx512bw", "avx2", "popcnt", "portable"];

    pub fn name(self) -> &'static str {
        self.kind().name()
    }

    fn kind(self) -> Name {
        match self.0 {
            Choice::Portable(_) => Name::Portable,
            #[cfg(target_arch = "x86_64")]
            Choice::Popcnt(_) => Name::Popcnt,
            #[cfg(target_arch = "x86_64")]
            Choice::Avx2(_) => Name::Avx2,
            #[cfg(target_arch = "x86_64")]
            Choice::Avx512Bw(_) => Name::Avx512Bw,
            #[cfg(target_arch = "x86_64")]
            Choice::Avx512Vpopcnt(_) => Name::Avx512Vpopcnt,
        }
    }

    /// The portable kernel (every CPU runs it).
    pub fn portable() -> Kernel {
        Kernel(Choice::Portable(portable::Portable))
    }

    /// The kernels this CPU runs, best first (the portable one always).
    pub fn available() -> Result<Vec<Kernel>> {
        check_env()?;
        Ok(Name::ALL.into_iter().filter_map(Name::kernel).collect())
    }

    /// `"auto"` (the best this CPU runs) or a kernel name; a kernel the CPU cannot run
    /// is refused with the flag it lacks.
    pub fn parse(name: &str) -> Result<Kernel> {
        check_env()?;
        if name == "auto" {
            return Ok(Name::ALL
                .into_iter()
                .find_map(Name::kernel)
                .unwrap_or_else(Kernel::portable));
        }
        let Some(kind) = Name::ALL.into_iter().find(|k| k.name() == name) else {
            return value_err!(
                "unknown kernel '{name}'; expected 'auto' or one of {}",
                Kernel::NAMES.join(", ")
            );
        };
        if let Some(kernel) = kind.kernel() {
            return Ok(kernel);
        }
        if !cfg!(target_arch = "x86_64") {
            return value_err!("the '{name}' kernel needs an x86-64 CPU");
        }
        match kind.missing(Flag::usable) {
            Some(flag) if flag.detected() => value_err!(
                "the '{name}' kernel needs the CPU flag {}, which {DISABLE_ENV} hides",
                flag.name()
            ),
            Some(flag) => value_err!(
                "this CPU cannot run the '{name}' kernel: it lacks the {} flag",
                flag.name()
            ),
            None => value_err!("this CPU cannot run the '{name}' kernel"),
        }
    }

    /// Runs `job` with this kernel's instruction set, its code compiled for it.
    #[inline]
    pub fn run<J: Job>(self, job: J) -> J::Out {
        match self.0 {
            Choice::Portable(isa) => job.run(isa),
            #[cfg(target_arch = "x86_64")]
            Choice::Popcnt(isa) => isa.enter(job),
            #[cfg(target_arch = "x86_64")]
            Choice::Avx2(isa) => isa.enter(job),
            #[cfg(target_arch = "x86_64")]
            Choice::Avx512Bw(isa) => isa.enter(job),
            #[cfg(target_arch = "x86_64")]
            Choice::Avx512Vpopcnt(isa) => isa.enter(job),
        }
    }
}

/// Work that runs with one instruction set: [`Kernel::run`] calls `run` with that
/// instruction set's token from inside a function compiled for it. Mark `run`
/// `#[inline(always)]` so that its code is compiled there.
pub trait Job {
    type Out;
    fn run<I: Isa>(self, isa: I) -> Self::Out;
}

mod sealed {
    pub trait Sealed {}
}

/// What an instruction set provides to the conv driver. Implemented only by the tokens
/// of this module's children; a value of one proves the CPU runs its code.
pub trait Isa: Copy + sealed::Sealed {
    /// Packs the signs of `ch` (one group's channels of one pixel) into `out` in the
    /// layout of [`crate::deploy::bits`], bit set where `ch[c]` has its sign bit set
    /// (negative, or -0.0, which the caller clears with the zero mask): what
    /// [`bits::pack_channels`](crate::deploy::bits::pack_channels) gives with
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
    a: &'a [u64],
    a_mask: Option<&'a [u64]>,
    base: usize,
    stride: usize,
    pixels: usize,
    runs: &'a [Run],
    run_len: usize,
    w: &'a [u64],
    w_mask: Option<&'a [u64]>,
    steps: usize,
    blocks: usize,
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
    fn base(&self, p: usize) -> usize {
        self.base + p * self.stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_kernel_names_its_first_missing_flag() {
        let nothing = |_: Flag| false;
        let no_vpopcnt = |f: Flag| f != Flag::Avx512Vpopcntdq;
        assert_eq!(Name::Avx512Vpopcnt.missing(nothing), Some(Flag::Avx512f));
        assert_eq!(
            Name::Avx512Vpopcnt.missing(no_vpopcnt),
            Some(Flag::Avx512Vpopcntdq)
        );
        assert_eq!(Name::Avx512Bw.missing(no_vpopcnt), None);
        assert_eq!(Name::Avx2.missing(nothing), Some(Flag::Avx2));
        assert_eq!(Name::Portable.missing(nothing), None);
    }

    #[test]
    fn parse_gives_what_the_cpu_runs_and_refuses_the_rest_naming_the_flag() {
        let err = Kernel::parse("avx3").unwrap_err().to_string();
        assert!(err.contains("unknown kernel 'avx3'"), "{err}");
        let available = Kernel::available().expect("no OVSW_DISABLE_CPU_FEATURES error");
        assert_eq!(available.last(), Some(&Kernel::portable()));
        assert_eq!(Kernel::parse("auto").ok(), available.first().copied());
        for kind in Name::ALL {
            match Kernel::parse(kind.name()) {
                Ok(k) => {
                    assert_eq!(k.name(), kind.name());
                    assert!(available.contains(&k));
                }
                Err(e) => {
                    let flag = kind.missing(Flag::usable).expect("a missing flag");
                    let e = e.to_string();
                    assert!(e.contains(flag.name()), "{e}");
                    assert!(available.iter().all(|k| k.name() != kind.name()));
                }
            }
        }
    }
}
