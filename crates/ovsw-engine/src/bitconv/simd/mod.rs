//! The popcount kernels of the binary convolution, one module per instruction set
//! (SIMD: `portable`, `x86_popcnt`, `x86_avx2`, `x86_avx512`), and the run-time choice
//! between them ([`Kernel`]); [`cpu`] detects the CPU flags, [`isa`] holds what the
//! kernels and the conv driver share.
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

pub mod cpu;
pub mod isa;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;
#[cfg(target_arch = "x86_64")]
mod x86_popcnt;

use self::cpu::{check_env, Flag, DISABLE_ENV};
use self::isa::Job;
use crate::error::{value_err, Result};

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
