//! The CUDA backend on the CPU: `scripts/build-emu.sh` builds stand-ins for libcuda, libcublasLt
//! and libnvrtc (emu/) with every kernel of kernels/ compiled as C++ and run one CUDA thread per
//! fiber, so barriers, warp shuffles and mma fragments behave as on a GPU. With them first on
//! LD_LIBRARY_PATH, `resid selftest --device cuda` runs the real CUDA host code and kernels
//! against the CPU backend: every shape, steering mode, capture position, decode step, sampling
//! and operation check of the GPU selftest (thresholds there). It cannot measure speed, and it
//! runs one block at a time, so it misses races between blocks.
mod common;

use resid::testing::RandomLlama;
use std::ffi::OsStr;
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

/// `resid ARGS` on the emulator, with `env` set besides.
fn resid_on_emulator_with(args: &[&str], kernel_cache: &Path, env: &[(&str, &OsStr)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid"))
        .args(args)
        .env("LD_LIBRARY_PATH", emulator())
        // The emulator's "PTX" is kernel source: keep it out of the real kernel cache.
        .env("RESID_KERNEL_CACHE", kernel_cache)
        .envs(env.iter().copied())
        .output()
        .expect("resid runs")
}

fn resid_on_emulator(args: &[&str], kernel_cache: &Path) -> Output {
    resid_on_emulator_with(args, kernel_cache, &[])
}

/// A one-layer random Llama with heads of 64; tests change what they need.
fn small_llama(seed: u64) -> RandomLlama {
    RandomLlama::small(seed)
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

/// The selftest must catch a wrong device: its operation checks alone (`--ops-only`, seconds),
/// first as they are, then with a finite wrong value planted by the emulator (RESID_EMU_PLANT,
/// emu/env.h) in one kernel's output (SwiGLU) and in every cuBLASLt GEMM (3 % off, three times
/// the tolerance). Each plant must fail the selftest in the checks of what it broke.
#[test]
fn the_selftest_fails_on_a_planted_wrong_device_result() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |plant: Option<&str>| {
        let json = tmp.path().join(format!("{}.json", plant.unwrap_or("clean").replace(':', "-")));
        let args = ["selftest", "--device", "cuda", "--ops-only", "--json", &json.display().to_string()];
        let env: Vec<(&str, &OsStr)> = plant.iter().map(|p| ("RESID_EMU_PLANT", OsStr::new(p))).collect();
        let out = resid_on_emulator_with(&args, &tmp.path().join("kernels"), &env);
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let failures: Vec<String> = report["failures"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect();
        (out, report, failures)
    };
    let (out, report, failures) = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && failures.is_empty(), "the unplanted operation checks fail: {failures:?}\n{stderr}");
    assert_eq!(report["models"].as_array().map(Vec::len), Some(0), "--ops-only ran model comparisons");
    assert!(report["operations"]["cases"].as_u64().unwrap_or(0) >= 50, "{report}");
    for (plant, announced, broken) in [("swiglu:1", "swiglu's argument 1 gets a wrong value", "SwiGLU"), ("cublaslt", "every matmul result scaled by 1.03", "linear")] {
        let (out, _, failures) = run(Some(plant));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(announced), "{plant}: the emulator did not plant anything:\n{stderr}");
        assert_eq!(out.status.code(), Some(5), "{plant}: the selftest passed a wrong device:\n{stderr}");
        assert!(stderr.contains("selftest failed"), "{plant}: {stderr}");
        assert!(failures.iter().any(|f| f.contains(broken)), "{plant}: no failing {broken} check in {failures:?}");
    }
}

#[test]
fn a_device_that_does_not_exist_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let spec = RandomLlama { vocab: 64, hidden: 64, intermediate: 128, head_dim: 32, ..small_llama(1) };
    spec.write(&model).unwrap();
    let model_arg = model.display().to_string();
    let run = resid_on_emulator(&["info", "--model", &model_arg, "--device", "cuda:1"], &tmp.path().join("kernels"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("cuda:1 does not exist: 1 GPU(s) visible (cuda:0..cuda:0)"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// The host side of the CUDA passes, read from the emulator's call trace (emu/trace.h,
/// summarised by scripts/emu-trace.py): on a GPU, every call that blocks the host leaves the
/// device idle until the host queues work again, so a forward pass must queue all of its work
/// and block once, on its copy back. Kernels are skipped (RESID_EMU_NO_KERNELS): only the calls
/// matter here, and the outputs are meaningless.
#[test]
fn each_pass_blocks_the_host_once_and_each_gemm_shape_is_planned_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let layers = 3;
    let spec = RandomLlama { vocab: 512, hidden: 256, intermediate: 512, layers, heads: 4, kv_heads: 2, tie: false, context: 512, ..small_llama(3) };
    spec.write(&model).unwrap();
    let model_arg = model.display().to_string();
    let input = tmp.path().join("ids.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let ids: Vec<u32> = (0..5 + (i * 37) % 96).map(|j| ((i * 131 + j * 7) % 500 + 3) as u32).collect();
            serde_json::json!({ "ids": ids }).to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let traced = |name: &str, args: &[&str]| -> Vec<serde_json::Value> {
        let trace = tmp.path().join(format!("{name}.trace"));
        let env = [("RESID_EMU_TRACE", trace.as_os_str()), ("RESID_EMU_NO_KERNELS", OsStr::new("1"))];
        let run = resid_on_emulator_with(args, &tmp.path().join("kernels"), &env);
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/emu-trace.py");
        let summary = Command::new("python3").arg(&script).arg(&trace).output().expect("python3 runs");
        println!("{name}:\n{}", String::from_utf8_lossy(&summary.stdout));
        let parsed = Command::new("python3").arg(&script).arg(&trace).arg("--json").output().expect("python3 runs");
        assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
        let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
        for (shape, n) in v["heuristic_shapes"].as_object().unwrap() {
            assert_eq!(n.as_u64(), Some(1), "{name}: cuBLASLt planned GEMM shape {shape} {n} times");
        }
        v["segments"].as_array().unwrap().clone()
    };
    let kernels = |s: &serde_json::Value| -> Vec<String> {
        s["kernels"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    };
    let calls = |s: &serde_json::Value, call: &str| s["calls"][call].as_u64().unwrap_or(0);

    // Extraction: 40 sequences of 5..100 tokens in 256-token batches, every hidden state.
    let out = tmp.path().join("hidden.safetensors");
    let out_arg = out.display().to_string();
    let input_arg = input.display().to_string();
    let extract_args =
        ["extract", "--model", &model_arg, "--device", "cuda", "--input", &input_arg, "--out", &out_arg, "--batch-tokens", "256", "--quiet"];
    let segments = traced("extract", &extract_args);
    let passes: Vec<_> = segments.iter().filter(|s| !kernels(s).is_empty()).collect();
    assert!(passes.len() >= 8, "expected at least 8 packed passes, found {}", passes.len());
    for p in &passes {
        let k = kernels(p);
        assert_eq!(k.iter().filter(|k| *k == "embedding_gather").count(), 1, "a pass blocked the host before its end: {p}");
        assert_eq!(k.iter().filter(|k| *k == "gemm").count(), 4 * layers, "{p}");
        // The capture plane is the one buffer a pass zeroes.
        assert!(calls(p, "memset") <= 1, "{p}");
        assert_eq!(calls(p, "launch_ex"), calls(p, "launch"), "every kernel is launched programmatically on sm_90: {p}");
    }
    // Each hidden state is copied out on its own, after every kernel of the pass was queued
    // (on a GPU the copies of the early layers overlap the later ones: capture_copy.rs).
    let slot_copies = segments.iter().filter(|s| s["blocked_by"].as_str().is_some_and(|b| b.starts_with("dtoh_2d_async"))).count();
    assert_eq!(slot_copies, passes.len() * (layers + 1), "one copy per captured hidden state per pass");

    // Decode at batch 2 (the GEMV kernels), unsteered then steered at every layer.
    let decode_args =
        ["bench", "--model", &model_arg, "--device", "cuda", "--workload", "decode", "--batch", "2", "--steps", "6", "--quiet", "--json"];
    let segments = traced("decode", &decode_args);
    let steps: Vec<_> = segments.iter().filter(|s| kernels(s).iter().any(|k| k.starts_with("attn_decode"))).collect();
    assert!(steps.len() >= 10, "expected the unsteered and steered decode steps, found {}", steps.len());
    for s in &steps {
        let k = kernels(s);
        assert_eq!(k.iter().filter(|k| *k == "embedding_gather").count(), 1, "a decode step blocked the host before its end: {s}");
        assert_eq!(s["blocked_by"].as_str(), Some("dtoh_async 8 pageable"), "a step must end in copying its 2 token ids: {s}");
        assert_eq!(calls(s, "memset"), 0, "{s}");
        // The emulator reports sm_90: every kernel goes through programmatic dependent launch.
        assert_eq!(calls(s, "launch_ex"), calls(s, "launch"), "{s}");
        assert!(calls(s, "htod_async") <= 3, "{s}");
        // Each layer's attention input and MLP input are one GEMV kernel each.
        let count = |name: &str| k.iter().filter(|k| *k == name).count();
        assert_eq!((count("gemv_rope_t2"), count("gemv_swiglu_t2"), count("rope_qkv")), (layers, layers, 0), "{s}");
    }
}

/// A driver that refuses programmatic dependent launch costs speed, not the run: the backend
/// says so once and launches normally.
#[test]
fn a_refused_programmatic_launch_falls_back_to_a_plain_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    small_llama(5).write(&model).unwrap();
    let model_arg = model.display().to_string();
    let trace = tmp.path().join("trace");
    let args = ["bench", "--model", &model_arg, "--device", "cuda", "--workload", "decode", "--steps", "3", "--quiet", "--json"];
    let env = [("RESID_EMU_REFUSE_PDL", OsStr::new("1")), ("RESID_EMU_TRACE", trace.as_os_str())];
    let run = resid_on_emulator_with(&args, &tmp.path().join("kernels"), &env);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(stderr.matches("launching kernels without it").count(), 1, "{stderr}");
    // After the first refusal every kernel is launched the plain way.
    let trace = std::fs::read_to_string(&trace).unwrap();
    let programmatic = trace.lines().filter(|l| l.contains(" launch_ex ")).count();
    assert_eq!(programmatic, 1, "only the refused launch tried programmatic launch");
    assert!(trace.lines().filter(|l| l.contains(" launch ")).count() > 10);
}

/// `resid stats` and `--dtype f16` on the CUDA backend: the statistics are those of the rows
/// the device extracts (to f64 rounding, 1e-9), and the f16 file is the rounding of its f32
/// file, bit for bit. (The accumulation runs on the device: see
/// `device_stats_are_the_cpu_fold_of_the_device_rows`.)
#[test]
fn stats_and_half_outputs_on_the_emulator() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let spec = RandomLlama { layers: 2, ..small_llama(11) };
    spec.write(&model).unwrap();
    let input = tmp.path().join("ids.jsonl");
    let lines: Vec<String> = (0..12).map(|i| serde_json::json!({ "ids": (0..3 + (i * 7) % 20).map(|j| ((i * 31 + j * 5) % 120 + 3) as u32).collect::<Vec<_>>() }).to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (m, inp) = (model.display().to_string(), input.display().to_string());
    let cache = tmp.path().join("kernels");
    let path = |n: &str| tmp.path().join(n).display().to_string();
    let run = |args: &[&str]| {
        let o = resid_on_emulator(args, &cache);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let common = ["--model", &m, "--device", "cuda", "--input", &inp, "--layers", "1,2,raw", "--position", "all", "--batch-tokens", "40", "--quiet"];
    run(&[&["extract"][..], &common, &["--out", &path("f32.safetensors")]].concat());
    run(&[&["extract"][..], &common, &["--out", &path("f16.safetensors"), "--dtype", "f16"]].concat());
    run(&[&["stats"][..], &common, &["--out", &path("stats.safetensors"), "--stats", "mean,cov"]].concat());
    let rows = resid::io::read_f32_tensor(Path::new(&path("f32.safetensors")), "hidden_states").unwrap();
    let bytes = std::fs::read(path("f16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f16: Vec<u16> = st.tensor("hidden_states").unwrap().data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    let want: Vec<u16> = rows.data.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    assert!(f16 == want, "the f16 file is not the rounding of the f32 file");

    let sbytes = std::fs::read(path("stats.safetensors")).unwrap();
    let s = safetensors::SafeTensors::deserialize(&sbytes).unwrap();
    let f64s = |t: &str| -> Vec<f64> { s.tensor(t).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect() };
    let (mean, cov) = (f64s("mean"), f64s("cov"));
    let (t, p, h) = (rows.shape[0], rows.shape[1], rows.shape[2]);
    for pt in 0..p {
        let x: Vec<Vec<f64>> = (0..t).map(|r| rows.data[(r * p + pt) * h..(r * p + pt + 1) * h].iter().map(|&v| v as f64).collect()).collect();
        let m: Vec<f64> = (0..h).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / t as f64).collect();
        let scale = m.iter().fold(1.0f64, |a, v| a.max(v.abs()));
        for j in 0..h {
            assert!((mean[pt * h + j] - m[j]).abs() <= 1e-9 * scale, "mean, point {pt}, {j}");
        }
        for (i, j) in [(0, 0), (1, 5), (h - 1, 3), (7, h - 2)] {
            let c = x.iter().map(|r| (r[i] - m[i]) * (r[j] - m[j])).sum::<f64>() / (t as f64 - 1.0);
            assert!((cov[(pt * h + i) * h + j] - c).abs() <= 1e-9 * c.abs().max(1.0), "cov, point {pt}, ({i}, {j})");
        }
    }
}

/// `resid study --protocol paper --device cuda` on the emulator gives the CPU's split and, up to
/// near ties between a pair's two projections, its numbers: identical splits.json, every
/// paper_recognition cell within one test pair of the CPU's and at least 90% identical.
#[test]
fn paper_protocol_study_on_cuda_matches_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let spec = RandomLlama { vocab: 97, ..small_llama(3) };
    spec.write(&model).unwrap();
    common::study::write_tokenizer(&model);
    common::study::write_values(&tmp.path().join("values"));
    let run = |device: &str| {
        let out = tmp.path().join(format!("out-{device}"));
        let args = [
            "study", "--model", &model.display().to_string(), "--data", &tmp.path().join("values").display().to_string(),
            "--out", &out.display().to_string(), "--family", "other", "--no-control", "--no-figures", "--quiet", "--device", device,
        ];
        let o = resid_on_emulator(&args, &tmp.path().join("kernels"));
        assert!(o.status.success(), "study --device {device}: {}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (cpu, cuda) = (run("cpu"), run("cuda"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(&cpu.join("splits.json")), read(&cuda.join("splits.json")));
    let rows = |d: &Path| read(&d.join("tables/paper_recognition.csv")).lines().map(str::to_owned).collect::<Vec<_>>();
    let (a, b) = (rows(&cpu), rows(&cuda));
    assert_eq!(a.len(), b.len());
    let mut same = 0;
    for (x, y) in a.iter().zip(&b) {
        let (cx, cy): (Vec<&str>, Vec<&str>) = (x.split(',').collect(), y.split(',').collect());
        assert_eq!(cx[..3], cy[..3]);
        if x == y {
            same += 1;
        } else {
            let (p, q): (f64, f64) = (cx[3].parse().unwrap(), cy[3].parse().unwrap());
            assert!((p - q).abs() <= 0.25 + 1e-9, "{x} vs {y}");
        }
    }
    assert!(same * 10 >= a.len() * 9, "{same} of {} cells identical", a.len());
}

/// `hidden_states` of an extract output.
fn hidden_states(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("hidden_states").unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

/// Points inside blocks on the CUDA path (the fused residual kernel with `add_to` for
/// hook_attn_out/hook_mlp_out, the bf16 ↔ f32 round trip of hook_z, resid_mid in the MLP norm's
/// residual step) against the CPU backend: captures at last, mean and all, and steering at every
/// point (add; norm-preserving; hook_z on one head), for a Llama with
/// biases, BLOOM (LayerNorm, ALiBi) and a Qwen3 whose heads·head_dim is twice its hidden size
/// (hook_z captured alone, 256 wide). Per row ‖cuda − cpu‖/‖cpu‖ ≤ 1e-2 (the selftest's
/// tolerance: bf16 activations on the device), 2e-2 for hook_z (bf16 itself on the device). Piecewise steering is the same kernel code as at
/// the block boundaries, where the selftest checks it (with c < 0) and sets aside the sign ties
/// that bf16 rounding flips; here such a tie would fail a row.
#[test]
fn points_inside_blocks_capture_and_steer_on_cuda_as_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: String = (0..3).map(|i| format!("{{\"ids\": {:?}}}\n", (0..3 + 7 * i).map(|t| (t * 31 + i * 7) % 128).collect::<Vec<_>>())).collect();
    std::fs::write(&input, lines).unwrap();
    let models = [
        ("llama-bias", RandomLlama { layers: 2, bias: true, ..small_llama(21) }),
        ("bloom", RandomLlama { arch: resid::testing::TestArch::Bloom, layers: 2, ..small_llama(22) }),
        ("qwen3-wide-z", RandomLlama { arch: resid::testing::TestArch::Qwen3, layers: 2, heads: 4, kv_heads: 2, ..small_llama(23) }),
    ];
    for (name, spec) in models {
        let model = tmp.path().join(name);
        spec.write(&model).unwrap();
        let z_width = spec.heads * spec.head_dim;
        let steer = tmp.path().join(format!("{name}.steer.safetensors"));
        let vec = |n: usize, seed: u64| resid::testing::pseudo_random(n, seed, 1.0);
        let tensors: Vec<resid::io::OutTensor> = [
            ("blocks.0.hook_resid_mid", vec(spec.hidden, 1)),
            ("blocks.0.hook_attn_out", vec(spec.hidden, 2)),
            ("blocks.1.hook_mlp_out", vec(spec.hidden, 3)),
            ("blocks.1.hook_z", vec(z_width, 4)),
        ]
        .into_iter()
        .map(|(n, v)| resid::io::OutTensor { name: n.into(), shape: vec![v.len()], data: resid::io::TensorData::F32(v) })
        .collect();
        resid::io::write_safetensors(&steer, &tensors, Default::default()).unwrap();
        let (m, i, s) = (model.display().to_string(), input.display().to_string(), steer.display().to_string());
        let layers = if z_width == spec.hidden {
            "blocks.0.hook_resid_mid,blocks.0.hook_attn_out,blocks.1.hook_mlp_out,blocks.1.hook_z,blocks.0.hook_z,2,raw"
        } else {
            "blocks.0.hook_z,blocks.1.hook_z"
        };
        let steerings: [&[&str]; 3] = [
            &[],
            &["--steer", &s, "--coef", "3", "--steer-layers", "blocks.0.hook_attn_out,blocks.1.hook_mlp_out,blocks.1.hook_z.1,blocks.0.hook_resid_mid"],
            &["--steer", &s, "--coef", "3", "--steer-preserve-norm", "--steer-layers", "blocks.0.hook_attn_out,blocks.1.hook_mlp_out"],
        ];
        // (position, steering): every steering at the last token; means and all tokens once.
        for (position, k) in [("last", 0), ("last", 1), ("last", 2), ("mean", 0), ("all", 1)] {
            let steering = steerings[k];
            {
                let run = |device: &str| {
                    let out = tmp.path().join(format!("{name}-{position}-{k}-{device}.safetensors"));
                    let o = out.display().to_string();
                    let mut args = vec!["extract", "--model", &m, "--device", device, "--input", &i, "--out", &o, "--quiet", "--position", position, "--layers", layers];
                    args.extend_from_slice(steering);
                    let r = resid_on_emulator(&args, &tmp.path().join("kernels"));
                    assert!(r.status.success(), "{name} {device}: {}", String::from_utf8_lossy(&r.stderr));
                    hidden_states(&out)
                };
                let ((shape, cpu), (dev_shape, dev)) = (run("cpu"), run("cuda"));
                assert_eq!(shape, dev_shape);
                let width = shape[2];
                assert_eq!(width, if z_width == spec.hidden { spec.hidden } else { z_width });
                for (r, (a, b)) in dev.chunks(width).zip(cpu.chunks(width)).enumerate() {
                    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                    let e = (num / den.max(1e-30)).sqrt();
                    let point = layers.split(',').nth(r % shape[1]).unwrap_or_default();
                    // hook_z is the attention kernel's bf16 output on the device (one more
                    // rounding of bf16 q, k, v products): twice the tolerance.
                    let tol = if point.ends_with("hook_z") { 2e-2 } else { 1e-2 };
                    assert!(e <= tol, "{name}, {position}, steering {k}: row {r} ({point}): relative error {e:.3e} > {tol:e}");
                }
            }
        }
    }
}

/// The CPU fold (`PointMoments::add_rows`, the reference of kernels/stats_accumulate.cu) of
/// captured rows `[n, points, h]`, all in one call.
fn cpu_fold(rows: &[f32], points: usize, h: usize, second: bool) -> Vec<resid::store::stats::PointMoments> {
    (0..points)
        .map(|p| {
            let mut m = resid::store::stats::PointMoments::new(h, second);
            m.add_rows(&rows.chunks_exact(points * h).map(|r| &r[p * h..(p + 1) * h]).collect::<Vec<_>>());
            m
        })
        .collect()
}

/// Asserts that the statistics file `path` holds, bit for bit, count, mean, cov, gram, min
/// and max of `moments`.
fn assert_stats_file_is(path: &Path, moments: &[resid::store::stats::PointMoments], what: &str) {
    use resid::store::stats::PointMoments;
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f64s = |t: &str| -> Vec<u64> { st.tensor(t).unwrap().data().chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect() };
    let counts: Vec<u64> = f64s("count");
    assert!(counts.iter().all(|&c| c == moments[0].count), "{what}: count {counts:?}, want {}", moments[0].count);
    type Statistic<'a> = &'a dyn Fn(&PointMoments) -> Vec<f64>;
    let bits = |f: Statistic| -> Vec<u64> { moments.iter().flat_map(f).map(f64::to_bits).collect() };
    let stats: [(&str, Statistic); 5] = [("mean", &PointMoments::mean), ("cov", &PointMoments::cov), ("gram", &PointMoments::gram), ("min", &|m| m.min.clone()), ("max", &|m| m.max.clone())];
    for (name, f) in stats {
        if st.names().contains(&name) {
            let (got, want) = (f64s(name), bits(f));
            let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert!(got.len() == want.len() && wrong == 0, "{what}: `{name}` differs from the CPU fold in {wrong} of {} values", want.len());
        }
    }
}

/// `resid stats --device cuda` folds the captured rows on the device (stats_accumulate.cu, no
/// row copied out): its output is bit for bit the CPU fold (`PointMoments::add_rows`) of the
/// rows the device extracts, with every statistic, for all-token rows at five points (one
/// inside a block) and for pair differences of mean rows; the same bytes with other batch
/// sizes (a pair split over two batches included) and after two interruptions and resumes.
/// A NaN in the captured rows is refused naming the input line, as on the CPU.
#[test]
fn device_stats_are_the_cpu_fold_of_the_device_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    RandomLlama { layers: 2, vocab: 97, ..small_llama(23) }.write(&model).unwrap();
    common::study::write_tokenizer(&model);
    let input = tmp.path().join("ids.jsonl");
    let lines: Vec<String> = (0..14).map(|i| serde_json::json!({ "ids": (0..2 + (i * 5) % 11).map(|j| ((i * 13 + j * 7) % 90 + 3) as u32).collect::<Vec<_>>() }).to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (m, inp) = (model.display().to_string(), input.display().to_string());
    let cache = tmp.path().join("kernels");
    let path = |n: &str| tmp.path().join(n);
    // Without the GEMV kernels of passes of up to 4 rows, whose roundings differ from
    // cuBLASLt's, the captured rows themselves do not depend on the batching.
    let no_gemv: &[(&str, &OsStr)] = &[("RESID_CUDA_GEMV", OsStr::new("0"))];
    let run = |args: &[&str]| {
        let o = resid_on_emulator_with(args, &cache, no_gemv);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let rows_of = |file: &Path| resid::io::read_f32_tensor(file, "hidden_states").unwrap();

    // All tokens, five points; the reference folds the device's own rows on the CPU.
    let common = ["--model", &m, "--device", "cuda", "--input", &inp, "--layers", "0,1,blocks.1.hook_mlp_out,2,raw", "--position", "all", "--quiet"];
    let stats = |out: &Path, extra: &[&str]| run(&[&["stats"][..], &common, &["--out", &out.display().to_string(), "--stats", "mean,cov,gram"], extra].concat());
    run(&[&["extract"][..], &common, &["--out", &path("rows.safetensors").display().to_string()]].concat());
    let rows = rows_of(&path("rows.safetensors"));
    let (p, h) = (rows.shape[1], rows.shape[2]);
    stats(&path("a.safetensors"), &["--batch-tokens", "40"]);
    assert_stats_file_is(&path("a.safetensors"), &cpu_fold(&rows.data, p, h, true), "all tokens");
    let want = std::fs::read(path("a.safetensors")).unwrap();
    stats(&path("b.safetensors"), &["--batch-tokens", "9"]);
    assert!(std::fs::read(path("b.safetensors")).unwrap() == want, "another batching changed the bytes");
    let resumed = path("r.safetensors");
    stats(&resumed, &["--batch-tokens", "17", "--stop-after", "5"]);
    assert!(resid::store::stats::state_path(&resumed).exists() && !resumed.exists());
    stats(&resumed, &["--batch-tokens", "30", "--stop-after", "9"]);
    stats(&resumed, &["--batch-tokens", "25"]);
    assert!(std::fs::read(&resumed).unwrap() == want, "the resumed run differs from the uninterrupted one");

    // Pairs of mean rows: the differences pos − neg (f32), folded in order.
    let mut rng = resid::repe::data::SplitMix64::new(3);
    let words = &common::study::WORDS;
    let mut pairs = String::new();
    let mut texts = String::new();
    for _ in 0..9 {
        let len = 2 + (rng.next_u64() % 5) as usize;
        let stem = common::study::sentence(&mut rng, &words[..20], len);
        let (pos, neg) = (format!("{stem} {}", common::study::sentence(&mut rng, &words[20..30], 2)), format!("{stem} {}", common::study::sentence(&mut rng, &words[30..], 1)));
        pairs.push_str(&format!("{}\n", serde_json::json!({ "pos": pos, "neg": neg })));
        texts.push_str(&format!("{}\n{}\n", serde_json::json!({ "text": pos }), serde_json::json!({ "text": neg })));
    }
    std::fs::write(path("pairs.jsonl"), pairs).unwrap();
    std::fs::write(path("texts.jsonl"), texts).unwrap();
    let pair_run = |cmd: &str, input: &str, out: &str, extra: &[&str]| {
        let (input, out) = (path(input).display().to_string(), path(out).display().to_string());
        run(&[&[cmd, "--model", &m, "--device", "cuda", "--layers", "1,2", "--position", "mean", "--quiet", "--input", &input, "--out", &out][..], extra].concat());
    };
    pair_run("extract", "texts.jsonl", "pair-rows.safetensors", &[]);
    let rows = rows_of(&path("pair-rows.safetensors"));
    let (p, h) = (rows.shape[1], rows.shape[2]);
    let diffs: Vec<f32> = rows.data.chunks_exact(2 * p * h).flat_map(|pn| pn[..p * h].iter().zip(&pn[p * h..]).map(|(a, b)| a - b).collect::<Vec<_>>()).collect();
    let reference = cpu_fold(&diffs, p, h, true);
    pair_run("stats", "pairs.jsonl", "pa.safetensors", &["--pairs", "--stats", "mean,cov,gram", "--batch-tokens", "1000"]);
    assert_stats_file_is(&path("pa.safetensors"), &reference, "pairs");
    // About one text per batch, then about three: pos and neg of many pairs in different batches.
    for tokens in ["5", "23"] {
        pair_run("stats", "pairs.jsonl", "pb.safetensors", &["--pairs", "--stats", "mean,cov,gram", "--batch-tokens", tokens]);
        assert!(std::fs::read(path("pb.safetensors")).unwrap() == std::fs::read(path("pa.safetensors")).unwrap(), "pairs, batches of {tokens} tokens: other bytes");
    }
    // Stopped after a pos whose neg is not done: the state ends before that pair.
    pair_run("stats", "pairs.jsonl", "pc.safetensors", &["--pairs", "--stats", "mean,cov,gram", "--batch-tokens", "23", "--stop-after", "7"]);
    pair_run("stats", "pairs.jsonl", "pc.safetensors", &["--pairs", "--stats", "mean,cov,gram", "--batch-tokens", "11"]);
    assert!(std::fs::read(path("pc.safetensors")).unwrap() == std::fs::read(path("pa.safetensors")).unwrap(), "pairs, resumed: other bytes");

    // A NaN: token 50's embedding row poisoned (bf16 NaN) on lines 4 and 9 only.
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let embed = tensors.iter_mut().find(|t| t.0 == "model.embed_tokens.weight").unwrap();
    let hidden = embed.2[1];
    embed.3[(50 * hidden + 3) * 2..][..2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(&weights, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let lines: Vec<String> = (0..10).map(|i| serde_json::json!({ "ids": [5, 6 + i, if i == 3 || i == 8 { 50 } else { 7 }, 8] }).to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    for device in ["cpu", "cuda"] {
        let out = path(&format!("nan-{device}.safetensors"));
        let args = ["stats", "--model", &m, "--device", device, "--input", &inp, "--layers", "1,2", "--position", "all", "--batch-tokens", "12", "--quiet", "--out", &out.display().to_string()];
        let o = resid_on_emulator(&args, &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("line 4: NaN or Inf") && err.contains("Hidden(1)"), "{device}: {err}");
        assert!(!out.exists(), "{device}: no output after a NaN");
    }
}
