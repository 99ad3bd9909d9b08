//! Fuzz target: `resid serve`'s request parser (completions, chat, hidden states).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::serve_request(data));
