//! The bf16 compute path's checks, shared by the test binaries of its mixed-precision policies
//! (the policy, like the compute type, is chosen per process before a model is loaded).
//!
//! Tolerance: ‖ours − HF‖ / ‖HF‖ per hidden-state index (activations and weights are rounded to
//! bf16 at every GEMM input; the residual stream, norms and attention stay f32): 1e-2 on the
//! real SmolLM2-135M, 1.5e-2 on the tiny random models (see `BF16_TINY_TOL`).
//! Both bf16 kernels are checked: AMX tiles where the CPU has them (and
//! `RESID_CPU_BF16_KERNEL=avx512bf16`, which `scripts/test.sh` also runs, picks the other),
//! AVX512-BF16 dot products elsewhere, even where bf16 is slower than f32 and so not used by
//! default. On a CPU without AVX512-BF16 the path falls back to f32 and these checks still hold; every
//! test binary that uses them says which path ran (`bf16 path: ...` on the terminal).
use super::*;
use resid::backend::cpu::{self, Compute};
use resid::backend::Backend;
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine};
use safetensors::SafeTensors;
use std::path::PathBuf;

pub const BF16_TOL: f64 = 1e-2;
/// The tiny random models (hidden 64 or less): over so few elements the roundings of one row
/// average out less than in a real model, and their worst rows sit just under or just over
/// 1e-2 depending on the processor's rounding of the same policy. Measured on AVX512-BF16: up to
/// 9.4e-3 on an AMD EPYC Zen 4 (NOTES.md, 2026-11-28), up to 1.01e-2 (tiny-qwen-chat, default
/// policy; tiny-qwen2 with f32 down projections) on an Intel Xeon (NOTES.md, 2026-12-04); BLOOM
/// with post-LayerNorm residuals, whose residual stream is the normed row itself so that no
/// larger residual dilutes a sub-layer's rounding, up to 1.19e-2.
pub const BF16_TINY_TOL: f64 = 1.5e-2;

fn tolerance(name: &str) -> f64 {
    if name.starts_with("tiny-") {
        BF16_TINY_TOL
    } else {
        BF16_TOL
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bf16_engine(dir: &std::path::Path) -> CpuEngine {
    // The kernels are tested wherever the CPU has them, also where bf16 is slower than f32.
    cpu::gemm::set_bf16_even_if_slower(true);
    cpu::set_compute(Compute::Bf16);
    report_path();
    CpuEngine::load(dir).unwrap()
}

/// Prints, once per process and past the harness's capture (so that `cargo test` and CI logs
/// show it), which path the bf16 checks ran: AVX512-BF16, or the f32 fallback of a CPU without
/// it, where they check nothing of bf16.
pub fn report_path() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let path = match cpu::gemm::bf16_kernel() {
            Some(k) => k.name(),
            None => "f32 fallback (this CPU has no AVX512-BF16: bf16 is not tested here)",
        };
        let _ = writeln!(std::io::stderr(), "bf16 path: {path}; kernels: {}", cpu::kernel_description());
    });
}

fn fixture(name: &str) -> Option<(CpuEngine, Vec<u8>, serde_json::Value)> {
    let g = root().join("tests/fixtures/golden");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(g.join(format!("{name}.json"))).unwrap()).unwrap();
    let dir = root().join(meta["model_dir"].as_str().unwrap());
    if !real_model_present(&dir) {
        return None;
    }
    let bytes = std::fs::read(g.join(format!("{name}.safetensors"))).unwrap();
    Some((bf16_engine(&dir), bytes, meta))
}

fn tensor_f32(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn tensor_ids(bytes: &[u8], name: &str) -> Vec<u32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
}

/// Every hidden-state index, last and mean positions, against the HF f32 fixture.
pub fn check_fixture(name: &str) {
    let Some((e, bytes, meta)) = fixture(name) else { return };
    let tol = tolerance(name);
    let expect_bf16 = cpu::gemm::bf16_kernel().is_some();
    assert_eq!(e.backend.name().contains("bf16"), expect_bf16, "{}", e.backend.name());
    let (n_layers, h) = (e.num_layers(), e.hidden_size());
    let n = meta["num_prompts"].as_u64().unwrap() as usize;
    let seqs: Vec<Vec<u32>> = (0..n).map(|i| tensor_ids(&bytes, &format!("p{i}.ids"))).collect();
    let mut worst: f64 = 0.0;
    for (position, key) in [(CapturePosition::Last, "last"), (CapturePosition::Mean, "mean")] {
        let spec = CaptureSpec { points: (0..=n_layers).map(CapturePoint::Hidden).collect(), position };
        let c = e.extract(&seqs, &spec, &vec![None; n], 1 << 20, |_, _| {}).unwrap();
        for i in 0..n {
            let hf = tensor_f32(&bytes, &format!("p{i}.{key}"));
            for l in 0..=n_layers {
                let err = rel_err(c.row(i, l), &hf[l * h..(l + 1) * h]);
                assert!(err <= tol, "{name} p{i} {key}: hidden-state index {l}: relative error {err:.3e} > {tol:e}");
                worst = worst.max(err);
            }
        }
    }
    eprintln!("{name} (bf16 compute: {expect_bf16}): worst per-layer relative error {worst:.2e} (threshold {tol:e})");
}

/// [`check_fixture`] on every golden fixture but `except` (checked by a test of its own).
pub fn check_every_fixture(except: &[&str]) {
    let names: Vec<String> = golden_fixtures().into_iter().filter(|n| !except.contains(&n.as_str())).collect();
    // The seven tiny families of tests/golden.rs: a lost fixture must not pass unnoticed.
    assert!(names.len() >= 7, "only {} golden fixtures found: {names:?}", names.len());
    for name in &names {
        check_fixture(name);
    }
}

/// Packed against one at a time, and one or three threads against the default pool: bit-identical.
pub fn check_batch_and_thread_invariance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(&tmp.path().join("m"), &TinySpec { hidden: 64, inter: 96, ..TinySpec::default() });
    let e = bf16_engine(&dir);
    let seqs: Vec<Vec<u32>> = [5usize, 1, 17, 9, 33, 2].iter().enumerate().map(|(i, &n)| random_ids(n, 97, i as u64 + 10)).collect();
    let spec = CaptureSpec { points: (0..=e.num_layers()).map(CapturePoint::Hidden).collect(), position: CapturePosition::All };
    let none = vec![None; seqs.len()];
    let packed = e.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap();
    let mut alone = Vec::new();
    for s in &seqs {
        alone.extend(e.extract(std::slice::from_ref(s), &spec, &[None], 4096, |_, _| {}).unwrap().data);
    }
    assert_eq!(packed.data, alone, "bf16: packed differs from one at a time");
    let run = |threads| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| e.extract(&seqs, &spec, &none, 7, |_, _| {}).unwrap().data)
    };
    assert_eq!(run(1), packed.data, "bf16: one thread differs");
    assert_eq!(run(3), packed.data, "bf16: three threads differ");
}

