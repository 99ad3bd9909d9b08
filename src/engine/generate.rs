//! What generation takes and gives. The batching itself is the scheduler's (`crate::sched`),
//! which also defines `Engine::generate`.
use super::sample::Sampling;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a sequence stops after any of these (EOS and friends).
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (including the stop token when one ended it).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}
