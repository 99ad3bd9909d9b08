//! Fuzz target: `tokenizer_config.json` (`TextTokenizer::open`, chat template rendering).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::tokenizer_config(data));
