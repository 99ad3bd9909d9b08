//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`: seeds, and `regress-*` inputs
//! that once crashed resid) through the same checks the fuzz targets run (`fuzz/harness.rs`),
//! so every regression input stays a normal `cargo test`. Fuzzing itself: `scripts/fuzz.sh`.
#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|f| catch_unwind(AssertUnwindSafe(|| check(&std::fs::read(f).unwrap()))).is_err())
        .map(|f| f.display().to_string())
        .collect();
    harness::remove_scratch_dir();
    assert!(failed.is_empty(), "{target}: {} of {} inputs fail: {failed:?}", failed.len(), files.len());
}

#[test]
fn config_corpus() {
    replay("config", harness::config);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", harness::safetensors);
}

#[test]
fn tensor_check_corpus() {
    replay("tensor_check", harness::tensor_check);
}

#[test]
fn jsonl_corpus() {
    replay("jsonl", harness::jsonl);
}

#[test]
fn vectors_corpus() {
    replay("vectors", harness::vectors);
}

#[test]
fn manifest_corpus() {
    replay("manifest", harness::manifest);
}

#[test]
fn lang_similarity_corpus() {
    replay("lang_similarity", harness::lang_similarity);
}

#[test]
fn weight_index_corpus() {
    replay("weight_index", harness::weight_index);
}

#[test]
fn tokenizer_config_corpus() {
    replay("tokenizer_config", harness::tokenizer_config);
}

#[test]
fn cache_shard_corpus() {
    replay("cache_shard", harness::cache_shard);
}

#[test]
fn serve_request_corpus() {
    replay("serve_request", harness::serve_request);
}

#[test]
fn qwen_tiktoken_corpus() {
    replay("qwen_tiktoken", harness::qwen_tiktoken);
}
