//! Builds the small C++ shim (`csrc/`) that exposes `at::convolution_backward`, which
//! tch 0.24 does not bind, `at::parallel_for`, and fallible tensor accessors, against
//! the headers of the same libtorch that torch-sys links (the installed torch).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROBE: &str = r#"
import torch
from torch.utils import cpp_extension
print('CXX11:', int(torch._C._GLIBCXX_USE_CXX11_ABI))
for p in cpp_extension.library_paths():
    print('LIB:', p)
for p in cpp_extension.include_paths():
    print('INCLUDE:', p)
"#;

fn python() -> PathBuf {
    if let Some(p) = env::var_os("PYO3_PYTHON") {
        return PathBuf::from(p);
    }
    if env::var_os("VIRTUAL_ENV").is_some() {
        PathBuf::from("python")
    } else {
        PathBuf::from("python3")
    }
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/conv_backward.cpp");
    println!("cargo:rerun-if-changed=csrc/parallel.cpp");
    println!("cargo:rerun-if-changed=csrc/tensor_facts.cpp");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");

    let py = python();
    let out = Command::new(&py)
        .arg("-c")
        .arg(PROBE)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py:?} to locate torch: {e}"));
    if !out.status.success() {
        panic!(
            "{py:?} could not import torch (install torch 2.11 to 2.15 first): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut includes = Vec::new();
    let mut cxx11 = "1".to_string();
    // torch-sys (third_party/, a direct dependency, `links = "tch"`) read the standard
    // torch's headers need from the headers themselves and passes it on.
    let cxx_std = env::var("DEP_TCH_CXX_STD")
        .expect("torch-sys passes DEP_TCH_CXX_STD (the patched copy in third_party/)");
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("INCLUDE: ") {
            includes.push(PathBuf::from(p));
        } else if let Some(v) = line.strip_prefix("CXX11: ") {
            cxx11 = v.trim().to_string();
        } else if let Some(p) = line.strip_prefix("LIB: ") {
            // Build again when torch is reinstalled: the shim is compiled against its headers.
            println!(
                "cargo:rerun-if-changed={}",
                PathBuf::from(p).join("libc10.so").display()
            );
        }
    }

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .includes(&includes)
        .std(&cxx_std)
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .opt_level(2)
        .file("csrc/conv_backward.cpp")
        .file("csrc/parallel.cpp")
        .file("csrc/tensor_facts.cpp")
        .compile("ovsw_shim");

    if env::var_os("CARGO_FEATURE_CUDA_HOST").is_some() {
        // The CUDA kernels for the CPU (crate::cuda::host): the same sources under
        // src/cuda/host/cuda_host.h, each operation rounded on its own (no contraction).
        for f in [
            "src/cuda/host/cuda_host.h",
            "src/cuda/host/launch.cpp",
            "src/cuda/kernels/common.cuh",
            "src/cuda/kernels/binconv.cu",
            "src/cuda/kernels/ags_sad.cu",
        ] {
            println!("cargo:rerun-if-changed={f}");
        }
        cc::Build::new()
            .cpp(true)
            .pic(true)
            .warnings(false)
            .flag("-std=c++17")
            .flag("-ffp-contract=off")
            .flag("-pthread")
            .opt_level(2)
            .file("src/cuda/host/launch.cpp")
            .compile("ovsw_cuda_host");
    }

    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        // Find libtorch next to the installed package at run time (site-packages/ovsw/_core.so
        // -> site-packages/torch/lib), and drop libraries we never call into (libtorch_cuda)
        // so one wheel loads with CPU-only and CUDA builds of torch alike.
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--as-needed");
    } else if os == "macos" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,@loader_path/../torch/lib");
    }
}
