//! The CUDA backend on the CPU: `scripts/build-emu.sh` builds stand-ins for libcuda, libcublasLt
//! and libnvrtc (emu/) with every kernel of kernels/ compiled as C++ and run one CUDA thread per
//! fiber, so barriers, warp shuffles and mma fragments behave as on a GPU. With them first on
//! LD_LIBRARY_PATH, `resid selftest --device cuda` runs the real CUDA host code and kernels
//! against the CPU backend: every shape, steering mode, capture position, decode step, sampling
//! and operation check of the GPU selftest (thresholds there). It cannot measure speed, and it
//! runs one block at a time, so it misses races between blocks.
use resid::testing::{RandomLlama, TestArch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The emulator's libraries, built once per test process.
fn emulator() -> &'static Path {
    static LIBS: OnceLock<PathBuf> = OnceLock::new();
    LIBS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let libs = root.join("target").join("emu");
        let build = Command::new("bash").arg(root.join("scripts/build-emu.sh")).arg(&libs).output().expect("bash runs");
        assert!(build.status.success(), "scripts/build-emu.sh failed:\n{}", String::from_utf8_lossy(&build.stderr));
        libs
    })
}

fn resid_on_emulator(args: &[&str], kernel_cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid"))
        .args(args)
        .env("LD_LIBRARY_PATH", emulator())
        // The emulator's "PTX" is kernel source: keep it out of the real kernel cache.
        .env("RESID_KERNEL_CACHE", kernel_cache)
        .output()
        .expect("resid runs")
}

#[test]
fn cuda_backend_passes_the_selftest_on_the_cpu_emulator() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("selftest.json");
    let json_arg = json.display().to_string();
    let run = resid_on_emulator(&["selftest", "--device", "cuda", "--json", &json_arg], &tmp.path().join("kernels"));
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "selftest on the emulator failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("resid CPU emulator"), "the selftest did not run on the emulator:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().map(Vec::len), Some(6), "{report}");
    assert!(report["operations"]["cases"].as_u64().unwrap_or(0) > 0, "{report}");
    print!("{stdout}");
}

#[test]
fn a_device_that_does_not_exist_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let spec = RandomLlama {
        arch: TestArch::Llama,
        vocab: 64,
        hidden: 64,
        intermediate: 128,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
        bias: false,
        tie: true,
        context: 64,
        seed: 1,
    };
    spec.write(&model).unwrap();
    let model_arg = model.display().to_string();
    let run = resid_on_emulator(&["info", "--model", &model_arg, "--device", "cuda:1"], &tmp.path().join("kernels"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("cuda:1 does not exist: 1 GPU(s) visible (cuda:0..cuda:0)"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
