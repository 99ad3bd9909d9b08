//! Fuzz target: extraction manifests (`manifest.json`: `store::Manifest::load`, `store::verify`,
//! the resume comparisons).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::manifest(data));
