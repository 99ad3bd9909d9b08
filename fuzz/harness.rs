//! The checks behind every fuzz target, as plain functions of the input bytes: the fuzz
//! targets in `fuzz_targets/` call them, and `tests/fuzz_corpus.rs` replays the committed
//! corpus (seeds and `regress-*` crash inputs) through them under a normal `cargo test`.
//!
//! Each function panics only when resid misbehaves: a panic inside resid, an error of the wrong
//! class, or a result that breaks what the parser promises. Bad input must give a typed error.
#![allow(dead_code)]
use resid::io::{parse_directions, parse_jsonl, InputItem, LoadedTensor};
use resid::model::config::ModelConfig;
use resid::model::weights::{read_header, WeightStore};
use resid::repe::data::{load_jsonl, load_mvalue_file, split_pairs, StimulusKind};
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuBackend, Engine, GenerateOptions, Sampling};
use resid::{SteerOp, SteerPositions, Steering};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A scratch directory for the code paths that read files, one per thread: under
/// `$RESID_FUZZ_SCRATCH` when set, else the system's temporary directory.
pub fn scratch_dir() -> PathBuf {
    thread_local! {
        static DIR: PathBuf = {
            let base = std::env::var_os("RESID_FUZZ_SCRATCH").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
            let dir = base.join(format!("resid-fuzz-{}-{thread}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch directory");
            dir
        };
    }
    DIR.with(|d| d.clone())
}

/// Removes this thread's scratch directory.
pub fn remove_scratch_dir() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

/// Writes `files` into the scratch directory, removing what an earlier input left there.
fn model_dir(files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch_dir();
    for name in ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("scratch write");
    }
    dir
}

/// `config.json` parsing: a config or a model error; a parsed config's expected tensors and
/// parameter count compute without overflow.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match ModelConfig::from_json_str(&text, "config.json") {
        Ok(c) => {
            let expected = c.family.spec().expected_tensors(&c);
            let params: usize = expected.iter().map(|t| t.shape.iter().product::<usize>()).sum();
            assert!(params > 0 && !expected.is_empty());
        }
        Err(e) => assert_eq!(e.exit_code(), 4, "{e}"),
    }
}

/// safetensors header and offset validation, then reading every tensor the header describes
/// through the memory-mapped weight store (as `resid info` and `extract` do).
pub fn safetensors(data: &[u8]) {
    let header = read_header(data, Path::new("model.safetensors"));
    // The vector-file reader validates the same bytes; both agree on validity.
    let as_vectors = resid::io::f32_tensor_from_bytes(data, "v.safetensors", "directions");
    let Ok((_, meta)) = header else {
        assert!(as_vectors.is_err());
        return;
    };
    let dir = model_dir(&[("model.safetensors", data)]);
    let store = WeightStore::open(&dir).expect("a header read_header accepts opens");
    let _ = store.dominant_dtype();
    for (name, info) in meta.tensors() {
        match store.f32(&name, &info.shape) {
            Ok(values) => assert_eq!(values.len(), info.shape.iter().product::<usize>()),
            Err(e) => assert_eq!(e.exit_code(), 4, "{e}"),
        }
    }
}

/// The tensor check against the architecture, and loading what passes it: the input is a
/// `config.json`, a NUL byte, then a `model.safetensors`. A model that passes the check loads
/// and runs a short extraction and generation.
pub fn tensor_check(data: &[u8]) {
    let Some(split) = data.iter().position(|&b| b == 0) else { return };
    let (config, weights) = (&data[..split], &data[split + 1..]);
    let dir = model_dir(&[("config.json", config), ("model.safetensors", weights)]);
    let model = match resid::model::ModelDir::open(&dir) {
        Ok(m) => m,
        Err(e) => {
            assert_eq!(e.exit_code(), 4, "{e}");
            return;
        }
    };
    // Only models small enough to run in a fuzzing iteration.
    if model.parameter_count() > 1 << 16 {
        return;
    }
    let c = model.config.clone();
    let engine = Engine::new(CpuBackend, model).expect("a checked model loads");
    let ids: Vec<u32> = (0..3u32).map(|i| i % c.vocab_size as u32).collect();
    if engine.check_tokens(&ids, "fuzz").is_err() {
        return;
    }
    let mut points: Vec<CapturePoint> = (0..=c.num_layers).map(CapturePoint::Hidden).collect();
    points.push(CapturePoint::LastBlockRaw);
    let spec = CaptureSpec { points, position: CapturePosition::Mean };
    let captured = engine.extract(std::slice::from_ref(&ids), &spec, &[None], 64, |_, _| {}).expect("extract");
    assert_eq!(captured.hidden, c.hidden_size);
    if ids.len() + 2 <= c.max_position_embeddings {
        let opts = GenerateOptions { max_new_tokens: 2, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let out = engine.generate(&[ids], &[None], &opts).expect("generate");
        assert!(out[0].tokens.iter().all(|&t| (t as usize) < c.vocab_size));
    }
}

fn check_pairs(parsed: resid::Result<Vec<resid::repe::data::Pair>>, seed: u64) {
    match parsed {
        Ok(pairs) => {
            assert!(!pairs.is_empty());
            let n = pairs.len();
            let split = split_pairs(pairs, seed, 0.8);
            assert_eq!(split.train.len() + split.test.len() + split.dropped.len(), n);
        }
        Err(e) => {
            assert_eq!(e.exit_code(), 3, "{e}");
            assert!(e.to_string().contains("pairs.json"), "{e}");
        }
    }
}

/// Dataset parsing: `extract`'s JSONL input (text or ids per line), and the concept study's
/// contrastive pairs as JSONL and as an MVALUE file. Items or an input error naming the file.
pub fn jsonl(data: &[u8]) {
    match parse_jsonl(data, "in.jsonl") {
        Ok(items) => {
            assert!(!items.is_empty());
            assert!(items.len() <= data.iter().filter(|&&b| b == b'\n').count() + 1);
            for item in &items {
                if let InputItem::Text(t) = item {
                    assert!(t.len() <= data.len());
                }
            }
        }
        Err(e) => {
            assert_eq!(e.exit_code(), 3, "{e}");
            assert!(e.to_string().starts_with("in.jsonl: "), "{e}");
        }
    }
    let path = scratch_dir().join("pairs.json");
    std::fs::write(&path, data).expect("scratch write");
    let seed = data.len() as u64;
    check_pairs(load_jsonl(&path), seed);
    let kind = [StimulusKind::Plain, StimulusKind::Scenario, StimulusKind::Question][data.len() % 3];
    check_pairs(load_mvalue_file(&path, kind), seed);
}

fn check_vectors(parsed: resid::Result<LoadedTensor>, layers: usize, hidden: usize, file: &str) {
    match parsed {
        Ok(t) => {
            assert_eq!(t.shape, vec![layers + 1, hidden]);
            assert_eq!(t.data.len(), (layers + 1) * hidden);
            assert!(t.data.iter().all(|v| v.is_finite()));
            let s = Steering {
                directions: Arc::new(t.data),
                hidden,
                layers: (0..=layers).collect(),
                coef: 1.0,
                op: SteerOp::Add,
                preserve_norm: false,
                positions: SteerPositions::All,
            };
            s.validate(layers, hidden).expect("parsed directions validate");
        }
        Err(e) => {
            assert_eq!(e.exit_code(), 3, "{e}");
            assert!(e.to_string().contains(file), "{e}");
        }
    }
}

/// Steering-vector files (`--steer FILE`): safetensors `directions` and llama.cpp
/// control-vector GGUF. The first two bytes pick the model's layer count (0..=7) and hidden
/// size (1..=64), the rest is the file, read both ways. What parses has the right shape, only
/// finite values, and makes a valid steering at every layer.
pub fn vectors(data: &[u8]) {
    let [a, b, file @ ..] = data else { return };
    let (layers, hidden) = (*a as usize % 8, 1 + *b as usize % 64);
    check_vectors(parse_directions(file, "v.safetensors", layers, hidden), layers, hidden, "v.safetensors");
    let path = scratch_dir().join("v.gguf");
    std::fs::write(&path, file).expect("scratch write");
    check_vectors(resid::repe::gguf::read_control_vector(&path, layers, hidden), layers, hidden, "v.gguf");
}
