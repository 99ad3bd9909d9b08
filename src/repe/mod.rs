//! The multilingual value-concept study (Xu et al., Findings of EMNLP 2024, "Exploring
//! Multilingual Concepts of Human Values in Large Language Models"): contrastive pairs, concept
//! vectors per layer, recognition, cross-lingual consistency and transfer, cross-lingual
//! control, and the reports and figures of the whole study.
//!
//! * [`data`]: the MVALUE layout and JSONL pairs, stimuli, templates, the seeded split.
//! * [`cache`]: last-token hidden states of every unique stimulus, computed once per model and
//!   template and kept on disk in safetensors shards keyed by a content hash.
//! * [`vectors`]: per-layer concept directions (mean difference, PCA on pair differences,
//!   random baseline), signs and train accuracy.
//! * [`recognition`]: per-layer test accuracy, best layer, cross-lingual matrices.
//! * [`analysis`]: consistency (cosine similarity across languages, correlation with a
//!   language-similarity matrix) and transfer (relative cross-lingual accuracy).
//! * [`control`]: cross-lingual steering, concept-score shift and fluency guard.
//! * [`gguf`]: llama.cpp control-vector GGUF export and import.
//! * [`study`], [`report`], [`plot`]: the whole study, its tables, report and figures.
pub mod analysis;
pub mod cache;
pub mod control;
pub mod data;
pub mod gguf;
pub mod linalg;
pub mod paper;
pub mod paper_study;
pub mod plot;
pub mod pyrandom;
pub mod recognition;
pub mod report;
pub mod study;
pub mod vectors;
