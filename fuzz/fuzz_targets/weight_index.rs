//! Fuzz target: sharded checkpoints' `model.safetensors.index.json` (`WeightStore::open`).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::weight_index(data));
