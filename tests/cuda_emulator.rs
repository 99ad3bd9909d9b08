//! The CUDA backend on the CPU: `scripts/build-emu.sh` builds stand-ins for libcuda, libcublasLt
//! and libnvrtc (emu/) with every kernel of kernels/ compiled as C++ and run one CUDA thread per
//! fiber, so barriers, warp shuffles and mma fragments behave as on a GPU. With them first on
//! LD_LIBRARY_PATH, `resid selftest --device cuda` runs the real CUDA host code and kernels
//! against the CPU backend: every shape, steering mode, capture position, decode step, sampling
//! and operation check of the GPU selftest (thresholds there). It cannot measure speed, and it
//! runs one block at a time, so it misses races between blocks.
use std::path::Path;
use std::process::Command;

#[test]
fn cuda_backend_passes_the_selftest_on_the_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = root.join("target").join("emu");
    let build = Command::new("bash").arg(root.join("scripts/build-emu.sh")).arg(&libs).output().expect("bash runs");
    assert!(build.status.success(), "scripts/build-emu.sh failed:\n{}", String::from_utf8_lossy(&build.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("selftest.json");
    let run = Command::new(env!("CARGO_BIN_EXE_resid"))
        .args(["selftest", "--device", "cuda", "--json"])
        .arg(&json)
        .env("LD_LIBRARY_PATH", &libs)
        // The emulator's "PTX" is kernel source: keep it out of the real kernel cache.
        .env("RESID_KERNEL_CACHE", tmp.path().join("kernels"))
        .output()
        .expect("resid runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "selftest on the emulator failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("resid CPU emulator"), "the selftest did not run on the emulator:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().map(Vec::len), Some(6), "{report}");
    assert!(report["operations"]["cases"].as_u64().unwrap_or(0) > 0, "{report}");
    print!("{stdout}");
}
