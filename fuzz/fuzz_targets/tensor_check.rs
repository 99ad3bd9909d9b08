//! Fuzz target: the tensor check against the architecture (`ModelDir::open`) on
//! `config.json` NUL `model.safetensors`, then loading and running what passes it.
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::tensor_check(data));
