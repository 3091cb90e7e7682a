//! The CPU flags the kernels need: detected at run time, less those the user hides with
//! [`DISABLE_ENV`].

use std::sync::OnceLock;

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
    pub(super) fn detected(self) -> bool {
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
    pub(super) fn usable(self) -> bool {
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

/// Whether AVX2 is detected and not hidden (also what the float paths go by).
pub fn avx2_usable() -> bool {
    Flag::Avx2.usable()
}

/// Whether AVX-512F is detected and not hidden.
pub fn avx512f_usable() -> bool {
    Flag::Avx512f.usable()
}

pub(super) fn check_env() -> Result<()> {
    match disabled() {
        Ok(_) => Ok(()),
        Err(e) => value_err!("{e}"),
    }
}
