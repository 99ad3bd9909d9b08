//! Fuzz target: steering-vector files: safetensors `directions` (`io::parse_directions`) and
//! llama.cpp control-vector GGUF (`repe::gguf::read_control_vector`).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::vectors(data));
