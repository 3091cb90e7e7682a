//! Tells the deploy kernels' unit tests which CPU flags the machine that builds them
//! lacks (`cfg(ovsw_cpu_lacks = "...")`), so a kernel the CPU cannot run is reported as
//! ignored, naming the flag, not as passed or failed.

use std::env;

/// The CPU flags the deploy kernels use, as `/proc/cpuinfo` names them.
const KERNEL_FLAGS: [&str; 5] = ["popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq"];

#[cfg(target_arch = "x86_64")]
fn host_has(flag: &str) -> bool {
    match flag {
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512_vpopcntdq" => std::arch::is_x86_feature_detected!("avx512vpopcntdq"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn host_has(_: &str) -> bool {
    false
}

/// Kernel flags the CPU running the tests will lack: the deploy kernels' unit tests
/// are ignored with the flag as the reason (`cfg(ovsw_cpu_lacks = "...")`), so a kernel
/// the CPU cannot run is reported as ignored, not as passed. Known only when building
/// for the machine that builds (not when cross-compiling).
fn lacking_cpu_flags() -> Vec<&'static str> {
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return KERNEL_FLAGS.to_vec();
    }
    if env::var("HOST").ok() != env::var("TARGET").ok() {
        return Vec::new();
    }
    let hidden = env::var("OVSW_DISABLE_CPU_FEATURES").unwrap_or_default();
    let hidden: Vec<&str> = hidden.split([' ', ',']).collect();
    KERNEL_FLAGS
        .into_iter()
        .filter(|f| !host_has(f) || hidden.contains(f))
        .collect()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=OVSW_DISABLE_CPU_FEATURES");
    let values: Vec<String> = KERNEL_FLAGS.iter().map(|f| format!("\"{f}\"")).collect();
    println!(
        "cargo::rustc-check-cfg=cfg(ovsw_cpu_lacks, values({}))",
        values.join(", ")
    );
    for flag in lacking_cpu_flags() {
        println!("cargo:rustc-cfg=ovsw_cpu_lacks=\"{flag}\"");
    }
}
