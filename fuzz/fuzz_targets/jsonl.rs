//! Fuzz target: dataset parsing: `extract` JSONL input (`io::parse_jsonl`) and the concept
//! study's pairs as JSONL and MVALUE files (`repe::data`).
//! The checks are in fuzz/harness.rs, shared with tests/fuzz_corpus.rs.
#![no_main]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::jsonl(data));
