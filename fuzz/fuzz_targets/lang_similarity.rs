//! Fuzz target: the language-similarity CSV (`--lang-similarity`:
//! `repe::analysis::LangSimilarity::read`, `correlate`).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::lang_similarity(data));
