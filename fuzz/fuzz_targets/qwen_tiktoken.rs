//! Fuzz target: first-generation Qwen's `qwen.tiktoken` (`QwenTiktoken::parse`, encoding and
//! decoding). The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::qwen_tiktoken(data));
