//! Fuzz target: safetensors header and offset validation (`weights::read_header`), then
//! reading every described tensor through `WeightStore::open` and `WeightStore::f32`.
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors(data));
