//! llama.cpp control vectors written by a foreign writer: gguf-py's `GGUFWriter`, called the way
//! repeng's `ControlVector.export_gguf` calls it (fixtures `tests/fixtures/golden/gguf-repeng*`,
//! written by `scripts/make_golden.py --only gguf-repeng`), read by resid's own reader.
//!
//! * `gguf-repeng.gguf`: f32 tensors `direction.2`, `direction.1` (repeng's default layers for
//!   the 3-layer tiny-llama-gqa, in repeng's order), 32-byte alignment. Expected: row k+1 of the
//!   `[L+1, hidden]` directions is `direction.k`, bit for bit; rows 0 and 1 are zero.
//! * `gguf-repeng-f16-align64.gguf`: an f16 `direction.1`, `general.alignment` 64 and metadata
//!   values of other types (arrays, floats, bool, signed and 64-bit integers).
//! * Steering with the GGUF equals steering with the same vector in resid's safetensors layout
//!   (`gguf-repeng.steer.safetensors`), bit for bit, and matches HF transformers steered the way
//!   repeng steers (coef · `direction.k` added to the output of block k): ‖ours − HF‖/‖HF‖ ≤ 1e-4
//!   per hidden-state index (f32 on both sides), greedy tokens identical except from a step
//!   where HF's top-2 margin is below 1e-3.
mod common;

use common::rel_err;
use resid::repe::gguf::{read_any_directions, read_control_vector};
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine, GenerateOptions, Sampling, SteerOp, SteerPositions, Steering};
use safetensors::SafeTensors;
use std::path::PathBuf;
use std::sync::Arc;

const REL_TOL: f64 = 1e-4;
const TIE_MARGIN: f32 = 1e-3;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name)
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("gguf-repeng.json")).unwrap()).unwrap()
}

/// The `[L+1, hidden]` rows a file's JSON entry describes: `direction.k` in row k+1.
fn expected_rows(file: &serde_json::Value, layers: usize, hidden: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; (layers + 1) * hidden];
    for (k, values) in file["directions"].as_object().unwrap() {
        let k: usize = k.parse().unwrap();
        let values: Vec<f32> = values.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(values.len(), hidden);
        out[(k + 1) * hidden..(k + 2) * hidden].copy_from_slice(&values);
    }
    out
}

fn tensor_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn tensor_i64(st: &SafeTensors, name: &str) -> Vec<i64> {
    st.tensor(name).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn gguf_py_control_vectors_read_to_the_written_values_and_layers() {
    let m = meta();
    let (layers, hidden) = (3, 64);
    let repeng = &m["files"]["gguf-repeng.gguf"];
    assert_eq!(repeng["tensor_order"], serde_json::json!(["direction.2", "direction.1"]));
    let want = expected_rows(repeng, layers, hidden);
    let got = read_control_vector(&golden("gguf-repeng.gguf"), layers, hidden).unwrap();
    assert_eq!(got.shape, vec![layers + 1, hidden]);
    assert!(got.data[..2 * hidden].iter().all(|&v| v == 0.0), "rows 0 and 1 (embeddings, block 0) must be empty");
    assert_eq!(got.data, want, "direction.k must land in row k+1, bit for bit");
    assert!(got.data[2 * hidden..].iter().all(|&v| v != 0.0));
    assert_eq!(got.metadata.get("general.architecture").map(String::as_str), Some("controlvector"));
    assert_eq!(got.metadata.get("controlvector.model_hint").map(String::as_str), repeng["model_hint"].as_str());
    // `--steer FILE.gguf` goes through the same reader.
    assert_eq!(read_any_directions(&golden("gguf-repeng.gguf"), layers, hidden).unwrap().data, want);
    // A model with fewer blocks than the file targets is refused, naming the tensor.
    let err = read_control_vector(&golden("gguf-repeng.gguf"), 2, hidden).err().expect("an error").to_string();
    assert!(err.contains("direction.2") && err.contains("blocks 0..1"), "{err}");

    let other = &m["files"]["gguf-repeng-f16-align64.gguf"];
    assert_eq!((other["dtype"].as_str(), other["alignment"].as_u64()), (Some("f16"), Some(64)));
    let got = read_control_vector(&golden("gguf-repeng-f16-align64.gguf"), layers, hidden).unwrap();
    assert_eq!(got.data, expected_rows(other, layers, hidden), "f16 direction.1 at 64-byte alignment");
    assert!(got.data[2 * hidden..3 * hidden].iter().any(|&v| v != 0.0));
}

#[test]
fn steering_with_a_repeng_gguf_matches_hf_and_the_safetensors_vector() {
    let m = meta();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(m["model_dir"].as_str().unwrap());
    let e = CpuEngine::load(&model).unwrap();
    let (layers, hidden) = (e.num_layers(), e.hidden_size());
    let from_gguf = read_control_vector(&golden("gguf-repeng.gguf"), layers, hidden).unwrap();
    let from_st = resid::io::read_directions(&golden("gguf-repeng.steer.safetensors"), layers, hidden).unwrap();
    assert_eq!(from_gguf.data, from_st.data, "the GGUF and the safetensors file hold the same vector");

    let bytes = std::fs::read(golden("gguf-repeng.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let n = TINY_PROMPTS;
    let seqs: Vec<Vec<u32>> = (0..n).map(|i| tensor_i64(&st, &format!("p{i}.ids")).iter().map(|&t| t as u32).collect()).collect();
    // The rows the file fills: hidden-state indices 2 and 3 (blocks 1 and 2).
    let steer_layers: Vec<usize> = (1..=layers).filter(|&l| from_gguf.data[l * hidden..(l + 1) * hidden].iter().any(|&v| v != 0.0)).collect();
    assert_eq!(steer_layers, vec![2, 3]);
    let spec = CaptureSpec { points: (0..=layers).map(CapturePoint::Hidden).collect(), position: CapturePosition::Last };
    let make = |dirs: &[f32], coef: f32| {
        Some(Arc::new(Steering {
            directions: Arc::new(dirs.to_vec()),
            hidden,
            layers: steer_layers.clone(),
            sites: Vec::new(),
            coef,
            op: SteerOp::Add,
            preserve_norm: false,
            positions: SteerPositions::All,
        }))
    };
    let mut worst: f64 = 0.0;
    for (ci, coef) in m["coefs"].as_array().unwrap().iter().enumerate() {
        let coef = coef.as_f64().unwrap() as f32;
        let g = vec![make(&from_gguf.data, coef); n];
        let s = vec![make(&from_st.data, coef); n];
        let a = e.extract(&seqs, &spec, &g, 1 << 20, |_, _| {}).unwrap();
        let b = e.extract(&seqs, &spec, &s, 1 << 20, |_, _| {}).unwrap();
        assert_eq!(a.data, b.data, "coef {coef}: GGUF and safetensors steering differ");
        for (i, _) in seqs.iter().enumerate() {
            let hf = tensor_f32(&st, &format!("c{ci}.p{i}.last"));
            for l in 0..=layers {
                let err = rel_err(a.row(i, l), &hf[l * hidden..(l + 1) * hidden]);
                assert!(err <= REL_TOL, "coef {coef} p{i} index {l}: relative error {err:.3e} against HF repeng-style steering");
                worst = worst.max(err);
            }
        }
        if ci == 0 {
            let opts = GenerateOptions { max_new_tokens: 16, sampling: Sampling::Greedy, stop_tokens: vec![] };
            for (i, out) in e.generate(&seqs, &g, &opts).unwrap().iter().enumerate() {
                let (hf, margin) = (tensor_i64(&st, &format!("c0.p{i}.greedy")), tensor_f32(&st, &format!("c0.p{i}.greedy_margin")));
                if let Some(step) = out.tokens.iter().zip(&hf).position(|(&a, &b)| a as i64 != b) {
                    assert!(margin[step] < TIE_MARGIN, "p{i}: greedy token {step}: ours {:?} vs HF {hf:?} (HF margin {:.2e})", out.tokens, margin[step]);
                }
                assert_eq!(out.tokens.len(), hf.len());
            }
        }
    }
    eprintln!("repeng GGUF steering vs HF: worst per-layer relative error {worst:.2e} (threshold {REL_TOL:e})");
}

/// Prompts in the fixture (the tiny-llama-gqa golden prompt lengths 1, 2, 7, 33, 130, 310).
const TINY_PROMPTS: usize = 6;
