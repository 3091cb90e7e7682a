//! NVRTC compilation of the kernel source, once per process and architecture.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::{result as nvrtc, sys};

use super::loader;

/// The whole kernel source: shared helpers, the binary conv's passes, AGS+SAD.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/binconv.cu"),
    "\n",
    include_str!("kernels/ags_sad.cu"),
);

/// The dtype suffixes of the entry points, in dtype-code order (0 f32, 1 f16, 2 bf16).
pub const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// Every `extern "C"` kernel in [`SOURCE`].
pub fn entry_points() -> Vec<String> {
    let mut names: Vec<String> = DTYPES
        .iter()
        .map(|x| format!("ovsw_sample_moments_{x}"))
        .collect();
    for op in ["sign", "bireal_backward", "weight_prep", "weight_grad"] {
        for a in DTYPES {
            for b in DTYPES {
                names.push(format!("ovsw_{op}_{a}_{b}"));
            }
        }
    }
    names.push("ovsw_ags_sad_step".into());
    names.push("ovsw_ags_sad_finalize".into());
    names
}

/// The compiled program for one architecture.
pub struct Image {
    /// `sm_XY` as the number XY (80 for A100, 90 for H100/H200).
    pub arch: u32,
    /// PTX text (what `check` inspects for the entry points).
    pub ptx: String,
    /// SASS for the architecture (what is loaded: no driver JIT, no PTX-version limits).
    pub cubin: Vec<u8>,
    /// NVRTC's log: its warnings, if any, and ptxas's verbose report (`ptxas info ...`
    /// lines: per kernel the registers, shared memory and spill stores/loads).
    pub log: String,
}

fn c_text(bytes: &[c_char]) -> String {
    let bytes: Vec<u8> = bytes
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtc::create_program and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn compile_now(arch: u32) -> Result<Image, String> {
    loader::nvrtc()?;
    loader::guarded("NVRTC", || {
        let src = CString::new(SOURCE).map_err(|e| e.to_string())?;
        let name = CString::new("ovsw_kernels.cu").map_err(|e| e.to_string())?;
        let prog = Program(
            nvrtc::create_program(&src, Some(&name))
                .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?,
        );
        // `-v` to ptxas: its report of each kernel's registers, shared memory and
        // spills lands in the program log (what `python -m ovsw.cuda check` prints).
        let options = [
            format!("--gpu-architecture=sm_{arch}"),
            "--std=c++17".to_string(),
            "--ptxas-options=-v".to_string(),
        ];
        // SAFETY: `prog` is live; the options are NUL-free strings.
        let compiled = unsafe { nvrtc::compile_program(prog.0, &options) };
        // SAFETY: `prog` is live.
        let log = unsafe { nvrtc::get_program_log(prog.0) }
            .map(|l| c_text(&l))
            .unwrap_or_default();
        if let Err(e) = compiled {
            return Err(format!("compiling for sm_{arch} failed ({e:?}):\n{log}"));
        }
        // SAFETY: `prog` is live and compiled.
        let ptx = unsafe { nvrtc::get_ptx(prog.0) }
            .map(|p| c_text(&p))
            .map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
        let mut size = 0usize;
        // SAFETY: `prog` is live and compiled; `cubin` has the size NVRTC reported.
        let cubin = unsafe {
            sys::nvrtcGetCUBINSize(prog.0, &mut size)
                .result()
                .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
            cubin
        };
        Ok(Image {
            arch,
            ptx,
            cubin,
            log: log.trim().to_string(),
        })
    })
}

/// The program compiled for `sm_{arch}`, compiled on first use and kept for the process.
pub fn compiled(arch: u32) -> Result<Arc<Image>, String> {
    static CACHE: Mutex<Option<HashMap<u32, Arc<Image>>>> = Mutex::new(None);
    // A poisoned lock only means another compile panicked (and was reported); the map
    // itself is still consistent.
    let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(img) = map.get(&arch) {
        return Ok(Arc::clone(img));
    }
    let img = Arc::new(compile_now(arch)?);
    map.insert(arch, Arc::clone(&img));
    Ok(img)
}

/// The entry points the PTX of `image` declares (`.entry NAME(`).
pub fn ptx_entries(image: &Image) -> Vec<String> {
    image
        .ptx
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split('(').next().unwrap_or("").trim().to_string())
        })
        .collect()
}

/// A C string from a NUL-terminated byte string, for the driver's function lookup.
pub(crate) fn cstr(name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_unique_and_in_the_source() {
        let names = entry_points();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert_eq!(names.len(), 3 + 4 * 9 + 2);
        // Each family's macro or definition is in the source.
        for fam in [
            "ovsw_sample_moments_##",
            "ovsw_sign_##",
            "ovsw_bireal_backward_##",
            "ovsw_weight_prep_##",
            "ovsw_weight_grad_##",
            "ovsw_ags_sad_step(",
            "ovsw_ags_sad_finalize(",
        ] {
            assert!(SOURCE.contains(fam), "{fam} missing from the kernel source");
        }
    }

    // Compiling for sm_80 and sm_90 needs NVRTC: tests/cuda/test_cuda_kernels.py does it
    // (test_every_kernel_compiles), skipped where torch ships none.
}
