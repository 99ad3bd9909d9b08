//! Kernel sources embedded by build.rs, compiled with NVRTC on first use and cached on disk per
//! GPU architecture and source hash.
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

const NVRTC_OPTIONS: &[&str] = &["-std=c++17"];

/// PTX virtual architecture for a compute capability (PTX JIT-compiles forward).
pub fn virtual_arch(cc: (i32, i32)) -> Result<&'static str> {
    Ok(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (major, _) if major > 9 => "compute_90",
        (major, minor) => {
            return Err(Error::Device(format!(
                "GPU compute capability {major}.{minor} is too old: resid's CUDA kernels need 8.0 or newer (bf16 tensor cores)"
            )))
        }
    })
}

fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RESID_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("resid").join("kernels")
}

fn nvrtc_present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Loads every kernel module: from the disk cache when present, otherwise compiled by NVRTC.
pub fn load_all(ctx: &Arc<CudaContext>, arch: &'static str) -> Result<HashMap<String, CudaFunction>> {
    let dir = cache_dir();
    let mut functions = HashMap::new();
    for (stem, src) in KERNEL_SOURCES {
        let hash = fnv64(&[src, arch, &NVRTC_OPTIONS.join(" ")]);
        let path = dir.join(format!("{stem}-{arch}-{hash:016x}.ptx"));
        let ptx = match std::fs::read_to_string(&path) {
            Ok(text) => Ptx::from_src(text),
            Err(_) => {
                if !nvrtc_present() {
                    return Err(Error::Device(format!(
                        "NVRTC (libnvrtc.so) not found and kernel `{stem}` is not in the cache {}: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12` and add its lib directory to LD_LIBRARY_PATH",
                        dir.display()
                    )));
                }
                let opts = CompileOptions {
                    arch: Some(arch),
                    options: NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                };
                let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                    .map_err(|e| Error::Device(format!("NVRTC failed to compile kernel `{stem}`: {e:?}")))?;
                // The cache is an optimisation: a read-only home must not stop the run.
                if std::fs::create_dir_all(&dir).is_ok() {
                    let tmp = path.with_extension(format!("ptx.{}.tmp", std::process::id()));
                    if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                }
                ptx
            }
        };
        let module: Arc<CudaModule> =
            ctx.load_module(ptx).map_err(|e| Error::Device(format!("loading kernel module `{stem}`: {e}")))?;
        for name in entry_points(src) {
            let f = module
                .load_function(&name)
                .map_err(|e| Error::Device(format!("kernel `{stem}`: entry point `{name}`: {e}")))?;
            functions.insert(name, f);
        }
    }
    Ok(functions)
}

/// `extern "C" __global__` entry points of a source, including macro-generated head-dim variants.
fn entry_points(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + 21..];
        // The name is the identifier before the first '(' after optional __launch_bounds__(...).
        let mut s = rest.trim_start();
        if let Some(lb) = s.strip_prefix("void") {
            s = lb.trim_start();
        }
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            if let Some(close) = after.find(')') {
                s = after[close + 1..].trim_start();
            }
        }
        let name: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '#').collect();
        if !name.is_empty() && !name.contains('#') {
            names.push(name);
        }
    }
    // Macro-instantiated kernels: per head dim (attention), per token count (GEMV).
    const HEAD_DIMS: &[usize] = &[32, 48, 64, 80, 96, 128];
    const TOKEN_ROWS: &[usize] = &[1, 2, 3, 4];
    let families: [(&str, &str, &[usize]); 5] = [
        ("attn_prefill_hd", "RESID_PF_ENTRY", HEAD_DIMS),
        ("attn_decode_hd", "RESID_DEC_ENTRY", HEAD_DIMS),
        ("gemv_t", "RESID_GEMV_ENTRY", TOKEN_ROWS),
        ("gemv_swiglu_t", "RESID_GEMV_SWIGLU_ENTRY", TOKEN_ROWS),
        ("gemv_rope_t", "RESID_GEMV_ROPE_ENTRY", TOKEN_ROWS),
    ];
    for (base, instantiate, values) in families {
        if src.contains(&format!("{base}##")) {
            for v in values {
                if src.contains(&format!("{instantiate}({v})")) {
                    names.push(format!("{base}{v}"));
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_entry_point_is_found() {
        let all: Vec<String> = KERNEL_SOURCES.iter().flat_map(|(_, s)| entry_points(s)).collect();
        for name in [
            "embedding_gather",
            "fused_residual_rms",
            "fused_residual_ln",
            "mean_capture",
            "rope_qkv",
            "swiglu",
            "attn_prefill_hd64",
            "attn_prefill_hd128",
            "attn_decode_hd64",
            "attn_decode_reduce",
            "gemv_t1",
            "gemv_t4",
            "gemv_swiglu_t1",
            "gemv_swiglu_t4",
            "gemv_rope_t1",
            "gemv_rope_t4",
            "argmax_rows",
            "sample_rows",
            "final_norm_gather_rms",
            "capture_norm_rms",
            "capture_norm_ln",
        ] {
            assert!(all.contains(&name.to_string()), "{name} not found in {all:?}");
        }
        for (stem, src) in KERNEL_SOURCES {
            assert!(!src.contains("#include \""), "{stem}: includes were not inlined");
        }
    }
}
