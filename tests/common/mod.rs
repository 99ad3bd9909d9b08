//! Tiny random-weight Llama models written to a temporary directory.
#![allow(dead_code)]
pub mod bf16;
pub mod study;
use resid::io::{write_safetensors, OutTensor, TensorData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct TinySpec {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub bias: bool,
    pub tie: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec { vocab: 97, hidden: 32, inter: 48, layers: 3, heads: 4, kv_heads: 2, bias: true, tie: false }
    }
}

pub use resid::testing::pseudo_random;

pub fn config_json(s: &TinySpec) -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": s.tie, "attention_bias": s.bias, "mlp_bias": s.bias,
        "bos_token_id": 1, "eos_token_id": 2
    })
    .to_string()
}

pub fn tensors(s: &TinySpec) -> Vec<OutTensor> {
    let hd = s.hidden / s.heads;
    let (q, kv) = (s.heads * hd, s.kv_heads * hd);
    let mut shapes: Vec<(String, Vec<usize>, f32)> = vec![("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden], 1.0)];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}.");
        let mut add = |n: &str, shape: Vec<usize>, scale: f32| shapes.push((format!("{p}{n}"), shape, scale));
        add("input_layernorm.weight", vec![s.hidden], -1.0);
        add("post_attention_layernorm.weight", vec![s.hidden], -1.0);
        add("self_attn.q_proj.weight", vec![q, s.hidden], 0.3);
        add("self_attn.k_proj.weight", vec![kv, s.hidden], 0.3);
        add("self_attn.v_proj.weight", vec![kv, s.hidden], 0.3);
        add("self_attn.o_proj.weight", vec![s.hidden, q], 0.3);
        add("mlp.gate_proj.weight", vec![s.inter, s.hidden], 0.3);
        add("mlp.up_proj.weight", vec![s.inter, s.hidden], 0.3);
        add("mlp.down_proj.weight", vec![s.hidden, s.inter], 0.3);
        if s.bias {
            for (n, d) in [("self_attn.q_proj.bias", q), ("self_attn.k_proj.bias", kv), ("self_attn.v_proj.bias", kv), ("self_attn.o_proj.bias", s.hidden), ("mlp.gate_proj.bias", s.inter), ("mlp.up_proj.bias", s.inter), ("mlp.down_proj.bias", s.hidden)] {
                add(n, vec![d], 0.1);
            }
        }
    }
    shapes.push(("model.norm.weight".into(), vec![s.hidden], -1.0));
    if !s.tie {
        shapes.push(("lm_head.weight".into(), vec![s.vocab, s.hidden], 0.5));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, scale))| {
            let n = shape.iter().product();
            // Norm weights (scale < 0) around 1.
            let data = if scale < 0.0 { pseudo_random(n, i as u64, 0.2).into_iter().map(|v| 1.0 + v).collect() } else { pseudo_random(n, i as u64, scale) };
            OutTensor { name, shape, data: TensorData::F32(data) }
        })
        .collect()
}

/// Writes a tiny model directory and returns its path (kept alive by the TempDir).
pub fn write_tiny(dir: &Path, s: &TinySpec) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(s)).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors(s), HashMap::new()).unwrap();
    dir.to_owned()
}

pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    pseudo_random(n, seed, 0.5).into_iter().map(|v| (((v + 0.5) * vocab as f32) as usize).min(vocab - 1) as u32).collect()
}

/// Whether the real model in `dir` (SmolLM2-135M, fetched by `scripts/fetch-model.sh`) is there.
pub fn real_model_present(dir: &Path) -> bool {
    fetched_or_skip(&dir.join("model.safetensors"), "bash scripts/fetch-model.sh smollm2-135m")
}

/// Whether a fetched test file is there. A missing file fails the test with the command that
/// fetches it, unless `RESID_SKIP_REAL_MODEL=allow` explicitly allows skipping: then the test
/// says so on the terminal, past the harness's capture, and returns (it checked nothing). Any
/// other value fails too, so that a stray `=1` cannot hide the checks.
pub fn fetched_or_skip(path: &Path, fetch_command: &str) -> bool {
    if path.exists() {
        return true;
    }
    let setting = std::env::var("RESID_SKIP_REAL_MODEL").unwrap_or_default();
    if setting != "allow" {
        panic!(
            "{} is missing: run `{fetch_command}`, or set RESID_SKIP_REAL_MODEL=allow to skip the tests that need fetched files (RESID_SKIP_REAL_MODEL is {setting:?})",
            path.display()
        );
    }
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    // Straight to the file descriptor: the test harness captures only eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {} is not fetched and RESID_SKIP_REAL_MODEL=allow: nothing was checked", path.display());
    false
}

/// Every hidden-state parity fixture in tests/fixtures/golden (a `NAME.json` with a
/// `model_dir`, beside its `NAME.safetensors`), sorted by name: a new fixture joins the tests
/// that walk them without an edit.
pub fn golden_fixtures() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
        .filter(|n| {
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{n}.json"))).unwrap()).unwrap();
            meta.get("model_dir").is_some() && meta.get("num_prompts").is_some() && dir.join(format!("{n}.safetensors")).is_file()
        })
        .collect();
    names.sort();
    names
}

pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// A scratch directory for extraction-output tests: a tiny model (hidden 128, 4 layers) big
/// enough that a run can be caught half-way, and `in.jsonl` with `sequences` lines of 20–170 ids.
pub struct ExtractSetup {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub model: String,
    pub input: String,
}

pub fn extract_setup(sequences: usize) -> ExtractSetup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let spec = TinySpec { vocab: 97, hidden: 128, inter: 256, layers: 4, heads: 4, kv_heads: 2, bias: false, tie: true };
    write_tiny(&root.join("model"), &spec);
    let mut text = String::new();
    for i in 0..sequences {
        text.push_str(&serde_json::json!({ "ids": random_ids(20 + (i * 37) % 150, spec.vocab, i as u64) }).to_string());
        text.push('\n');
    }
    std::fs::write(root.join("in.jsonl"), text).unwrap();
    let model = root.join("model").display().to_string();
    let input = root.join("in.jsonl").display().to_string();
    ExtractSetup { _tmp: tmp, root, model, input }
}
