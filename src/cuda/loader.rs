//! Opening NVRTC and the CUDA driver at run time, without ever panicking.
//!
//! cudarc resolves each library by name (`libnvrtc.so.13`, `libcuda.so.1`, ...) through
//! the dynamic loader. NVRTC is usually not on the loader's path: the torch wheel ships
//! it in `site-packages/nvidia/cu13/lib` (CUDA 13 wheels) or
//! `site-packages/nvidia/cuda_nvrtc/lib` (CUDA 12 wheels), and `import torch` preloads it
//! from there. So this module first opens NVRTC by its full path (and its
//! `libnvrtc-builtins` beside it); the loader then hands cudarc that same, already
//! loaded library when cudarc asks for it by its soname.
//!
//! Search order: `$OVSW_NVRTC` (a full path); an NVRTC already loaded in the process
//! (torch's); the wheel folders next to the loaded libtorch; then the system library
//! path (`libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so`). Caveat: cudarc tries the
//! unversioned `libnvrtc.so` first, so a CUDA toolkit whose `libnvrtc.so` is on the
//! loader's path wins over the wheel's copy (it compiles the same kernels).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What was found, for `python -m ovsw.cuda check`.
#[derive(Clone, Debug)]
pub struct NvrtcInfo {
    /// The file opened (or the name the loader resolved).
    pub path: String,
    /// NVRTC's `(major, minor)` version.
    pub version: (i32, i32),
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing) into
/// an error message.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown error".into());
            Err(format!("{what}: {msg}"))
        }
    }
}

/// Paths of the shared objects mapped into this process (`/proc/self/maps`).
fn mapped_paths() -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        if let Some(i) = line.find('/') {
            let p = PathBuf::from(line[i..].trim());
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// NVRTC proper (not its builtins, not the `.alt` C++-ABI variant).
fn is_nvrtc(name: &str) -> bool {
    name.starts_with("libnvrtc")
        && name.contains(".so")
        && !name.contains("builtins")
        && !name.contains(".alt.")
}

fn is_builtins(name: &str) -> bool {
    name.starts_with("libnvrtc-builtins") && name.contains(".so") && !name.contains(".alt.")
}

/// NVRTC files in `dir`, highest version first.
fn nvrtc_files(dir: &Path, pick: fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| pick(file_name(p)))
        .collect();
    files.sort();
    files.reverse();
    files
}

/// Folders where a torch wheel keeps NVRTC, from the loaded libtorch's location.
fn wheel_dirs(mapped: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for p in mapped {
        let name = file_name(p);
        if !(name.starts_with("libtorch_cpu.") || name.starts_with("libc10.")) {
            continue;
        }
        let Some(torch_lib) = p.parent() else {
            continue;
        };
        if let Some(site) = torch_lib.parent().and_then(Path::parent) {
            for sub in [
                "nvidia/cu13/lib",
                "nvidia/cu12/lib",
                "nvidia/cuda_nvrtc/lib",
            ] {
                dirs.push(site.join(sub));
            }
        }
        dirs.push(torch_lib.to_path_buf());
    }
    dirs.dedup();
    dirs
}

/// Candidates in search order: full paths, then bare names for the loader.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("OVSW_NVRTC") {
        out.push(PathBuf::from(p));
    }
    let mapped = mapped_paths();
    out.extend(mapped.iter().filter(|p| is_nvrtc(file_name(p))).cloned());
    for dir in wheel_dirs(&mapped) {
        out.extend(nvrtc_files(&dir, is_nvrtc));
    }
    for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
        out.push(PathBuf::from(name));
    }
    out
}

/// Opens a library for the rest of the process.
fn open_forever(p: &Path) -> Result<(), String> {
    // SAFETY: NVRTC's initialisers are plain C; the handle is never closed, so no symbol
    // taken from it can dangle.
    let lib = unsafe { libloading::Library::new(p) }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    Ok(())
}

fn load_nvrtc() -> Result<NvrtcInfo, String> {
    let mut tried = Vec::new();
    let mut opened = None;
    for c in candidates() {
        match open_forever(&c) {
            Ok(()) => {
                opened = Some(c);
                break;
            }
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    let Some(path) = opened else {
        return Err(format!(
            "NVRTC not found (install a CUDA build of torch, which ships it, or set \
             OVSW_NVRTC to libnvrtc.so's path); tried {}",
            tried.join("; ")
        ));
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        for b in nvrtc_files(dir, is_builtins).into_iter().take(1) {
            let _ = open_forever(&b); // NVRTC reports a missing builtins lib itself
        }
    }
    guarded("NVRTC", || {
        // SAFETY: a query with no preconditions.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(format!(
                "{} was opened but does not answer to the names cudarc looks for",
                path.display()
            ));
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion failed: {rc:?}"));
        }
        Ok(NvrtcInfo {
            path: path.display().to_string(),
            version: (major, minor),
        })
    })
}

/// NVRTC, opened once per process.
pub fn nvrtc() -> Result<&'static NvrtcInfo, String> {
    static NVRTC: OnceLock<Result<NvrtcInfo, String>> = OnceLock::new();
    NVRTC.get_or_init(load_nvrtc).as_ref().map_err(Clone::clone)
}

fn load_driver() -> Result<i32, String> {
    guarded("CUDA driver", || {
        // SAFETY: a query with no preconditions.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver (libcuda.so.1) is not installed".into());
        }
        cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let mut version = 0;
        // SAFETY: one valid out-pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion failed: {e}"))?;
        Ok(version)
    })
}

/// The CUDA driver, opened and initialised once per process; its version (e.g. 13000).
pub fn driver() -> Result<i32, String> {
    static DRIVER: OnceLock<Result<i32, String>> = OnceLock::new();
    DRIVER.get_or_init(load_driver).clone()
}
