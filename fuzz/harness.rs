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
    for name in ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", SHARD] {
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
                sites: Vec::new(),
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

/// Extraction manifests (`manifest.json`, read by resume, `verify` and `merge`): loading, the
/// checks `verify` runs (against one shard file, `shard-00000.safetensors` holding
/// [`SHARD_FILE`]; seeds list it with its sha256), and the comparisons resume makes between the
/// manifest on disk and a run's own. A manifest, or an input or I/O error naming the directory; never a panic.
pub fn manifest(data: &[u8]) {
    use resid::store::{verify, Manifest};
    let dir = scratch_dir().join("extraction");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    std::fs::write(dir.join("manifest.json"), data).expect("scratch write");
    std::fs::write(dir.join("shard-00000.safetensors"), SHARD_FILE).expect("scratch write");
    let named = |e: &resid::Error| {
        assert!(matches!(e.exit_code(), 3 | 6), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    };
    let m = match Manifest::load(&dir) {
        Ok(m) => m.expect("manifest.json is there"),
        Err(e) => return named(&e),
    };
    assert!(m.incompatibility(&m).is_none(), "a manifest is compatible with itself");
    let _ = m.resume_point();
    // A run with another input, then other options, then another part (what resume meets).
    let mut other = m.clone();
    other.input_sha256 = resid::store::sha256_hex(data);
    other.input_sha256.pop();
    assert!(m.incompatibility(&other).is_some() && other.incompatibility(&m).is_some());
    let mut other = m.clone();
    // Nested one level deeper: never equal to what it holds.
    other.options = vec![m.options.clone()].into();
    assert!(m.incompatibility(&other).is_some());
    let mut other = m.clone();
    other.range_end = m.range_end.wrapping_add(1);
    assert!(m.incompatibility(&other).is_some());
    match verify(&dir) {
        Ok(v) => {
            assert_eq!(v, m);
            assert!(v.complete && v.resume_point() == v.range_end);
        }
        Err(e) => named(&e),
    }
}

/// The one file of [`manifest`]'s extraction directory.
pub const SHARD_FILE: &[u8] = b"not really a shard";

/// The language-similarity CSV (`study --lang-similarity`), then its correlation with a
/// matrix over its languages as the study computes it. A matrix of finite values, or an input
/// error naming the file.
pub fn lang_similarity(data: &[u8]) {
    use resid::repe::analysis::{correlate, LangSimilarity};
    let path = scratch_dir().join("sim.csv");
    std::fs::write(&path, data).expect("scratch write");
    match LangSimilarity::read(&path) {
        Ok(sim) => {
            assert!(!sim.langs.is_empty() && sim.langs.iter().all(|l| !l.is_empty()));
            assert!(sim.values.values().all(|v| v.is_finite()));
            let k = sim.langs.len().min(16);
            let m: Vec<Vec<f64>> = (0..k).map(|a| (0..k).map(|b| ((a * 7 + b * 3) % 11) as f64 / 10.0).collect()).collect();
            let c = correlate(&m, &sim.langs[..k], &sim);
            assert!(c.pairs <= k * k.saturating_sub(1) / 2);
        }
        Err(e) => {
            assert!(matches!(e.exit_code(), 3 | 6), "{e}");
            assert!(e.to_string().contains("sim.csv"), "{e}");
        }
    }
}

/// A shard file that a fuzzed `model.safetensors.index.json` may name: one f32 tensor `w` [2, 3].
pub const SHARD: &str = "model-00001-of-00001.safetensors";

fn shard_bytes() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()));
    out
}

/// `model.safetensors.index.json` (sharded checkpoints): opening the shards it names, in a
/// directory holding one real shard ([`SHARD`]). A store whose every tensor reads, or a model
/// or I/O error.
pub fn weight_index(data: &[u8]) {
    let dir = model_dir(&[("model.safetensors.index.json", data), (SHARD, &shard_bytes())]);
    match WeightStore::open(&dir) {
        Ok(store) => {
            if store.contains("w") {
                assert_eq!(store.f32("w", &[2, 3]).expect("the shard's tensor reads").len(), 6);
            }
            let _ = store.dominant_dtype();
        }
        Err(e) => assert!(matches!(e.exit_code(), 4 | 6), "{e}"),
    }
}

/// A word-level `tokenizer.json` for [`tokenizer_config`].
const TOKENIZER_JSON: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
 "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
 "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "there": 4}, "unk_token": "[UNK]"}}"#;

/// `tokenizer_config.json` beside a fixed `tokenizer.json`: its chat template, BOS and EOS
/// tokens, and rendering a conversation with the template (`generate --chat`). A tokenizer, a
/// model error, or an input error when there is no template; never a panic.
pub fn tokenizer_config(data: &[u8]) {
    use resid::model::tokenizer::TextTokenizer;
    let dir = model_dir(&[("tokenizer.json", TOKENIZER_JSON.as_bytes()), ("tokenizer_config.json", data)]);
    let tok = match TextTokenizer::open(&dir) {
        Ok(t) => t.expect("tokenizer.json is there"),
        Err(e) => {
            assert!(matches!(e.exit_code(), 4 | 6), "{e}");
            return;
        }
    };
    let _ = tok.eos_token().map(|t| tok.token_id(t));
    match tok.render_chat("hello there") {
        Ok(text) => {
            let _ = tok.encode(&text);
        }
        Err(e) => assert!(matches!(e.exit_code(), 3 | 4), "{e}"),
    }
}

/// The model identity the [`cache_shard`] target reads shards for.
pub const CACHE_MODEL_ID: &str = "fuzz-model";

/// The study's hidden-state cache shards (`--cache`): the first two bytes pick the model's
/// decoder blocks (1..=4) and hidden size (1..=16), the rest is the shard, read for the model
/// [`CACHE_MODEL_ID`]. Rows of finite states with well-formed keys, or an input error naming
/// the file.
pub fn cache_shard(data: &[u8]) {
    let [a, b, file @ ..] = data else { return };
    let (layers, hidden) = (1 + *a as usize % 4, 1 + *b as usize % 16);
    match resid::repe::cache::read_shard(file, "shard.safetensors", CACHE_MODEL_ID, layers, hidden) {
        Ok(rows) => {
            assert_eq!(rows.states.len(), rows.keys.len() * layers * hidden);
            assert!(rows.states.iter().all(|v| v.is_finite()));
        }
        Err(e) => {
            assert_eq!(e.exit_code(), 3, "{e}");
            assert!(e.to_string().contains("shard.safetensors"), "{e}");
        }
    }
}

/// `resid serve`'s request bodies: the first byte picks the route (completions, chat,
/// hidden states), the rest is the body. Every body is either a request within the limits
/// or a one-line OpenAI-shaped 4xx error.
pub fn serve_request(data: &[u8]) {
    use resid::server::api;
    let [route, body @ ..] = data else { return };
    let limits = api::Limits { num_layers: 4, hidden: 3, vocab: 100, max_n: 8, max_prompts: 4 };
    let check_error = |e: &api::ApiError| {
        assert!((400..500).contains(&e.status), "{e:?}");
        assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e:?}");
        let body = e.body();
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    };
    let check_steering = |entries: &[api::SteerEntry]| {
        for s in entries {
            assert!(s.coef.is_finite());
            assert!(s.layers.iter().flatten().all(|&l| l <= limits.num_layers));
            if let api::VectorSource::Directions(rows) = &s.source {
                assert!(rows.len() == 1 || rows.len() == limits.num_layers + 1);
                assert!(rows.iter().all(|r| r.len() == limits.hidden && r.iter().all(|v| v.is_finite())));
            }
        }
    };
    match route % 3 {
        0 | 1 => {
            let parsed = if route % 3 == 0 { api::parse_completion(body, &limits) } else { api::parse_chat(body, &limits) };
            match parsed {
                Ok(p) => {
                    assert!(p.n >= 1 && p.n <= limits.max_n);
                    assert!(p.temperature.is_finite() && (0.0..=2.0).contains(&p.temperature));
                    assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                    assert!(p.probes.iter().all(|q| q.layer <= limits.num_layers));
                    if let api::Input::Prompts(list) = &p.input {
                        assert!(!list.is_empty() && list.len() <= limits.max_prompts);
                        for item in list {
                            if let api::PromptInput::Ids(ids) = item {
                                assert!(!ids.is_empty() && ids.iter().all(|&t| (t as usize) < limits.vocab));
                            }
                        }
                    }
                    check_steering(&p.steering);
                }
                Err(e) => check_error(&e),
            }
        }
        _ => match api::parse_hidden_states(body, &limits) {
            Ok(h) => {
                assert!(!h.points.is_empty());
                assert!(h.points.iter().all(|p| !matches!(p, resid::CapturePoint::Hidden(l) if *l > limits.num_layers)));
                check_steering(&h.steering);
            }
            Err(e) => check_error(&e),
        },
    }
}

/// `qwen.tiktoken` (`QwenTiktoken::parse`): a model error naming the file, or a vocabulary
/// whose ids for ordinary text decode back to the text (NFC) and whose every id has a token.
/// The input's own bytes, as text, go through the vocabulary of the `merges` seed too.
pub fn qwen_tiktoken(data: &[u8]) {
    use resid::model::tiktoken::QwenTiktoken;
    match QwenTiktoken::parse(data, "qwen.tiktoken") {
        Ok(t) => {
            let cases = [("Hello wörld 诚实\r\n\n  x\t", "Hello wörld 诚实\r\n\n  x\t"), ("Cafe\u{301}", "Café"), ("<|im_end|>", "<|im_end|>")];
            for (text, nfc) in cases {
                let plain = t.encode_plain(text).expect("ordinary text encodes");
                assert_eq!(t.decode(&plain), nfc);
                let ids = t.encode(text).expect("text encodes");
                assert!(ids.iter().all(|&id| t.id_to_token(id).is_some()), "{ids:?}");
            }
        }
        Err(e) => {
            assert_eq!(e.exit_code(), 4, "{e}");
            assert!(e.to_string().starts_with("qwen.tiktoken: "), "{e}");
        }
    }
    thread_local! {
        static MERGES: QwenTiktoken = {
            let b64 = |t: &[u8]| { use base64::Engine; base64::engine::general_purpose::STANDARD.encode(t) };
            let mut v: String = (0..=255u8).map(|b| format!("{} {b}\n", b64(&[b]))).collect();
            for (i, t) in ["he", "ll", "hell", "hello", " w", "or", " wor", " world", "\r\n", "  ", "é", "诚"].iter().enumerate() {
                v += &format!("{} {}\n", b64(t.as_bytes()), 256 + i);
            }
            QwenTiktoken::parse(v.as_bytes(), "merges").expect("the merges vocabulary")
        };
    }
    let text = String::from_utf8_lossy(data);
    MERGES.with(|t| {
        let once = t.decode(&t.encode_plain(&text).expect("any text encodes"));
        assert_eq!(t.decode(&t.encode_plain(&once).expect("any text encodes")), once, "NFC text round-trips");
        if text.is_ascii() {
            assert_eq!(once, text);
        }
        let _ = t.encode(&text).expect("any text encodes");
    });
}
