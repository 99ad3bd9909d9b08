//! Batched generation with a KV cache: one packed prefill, then one packed decode step per token.
use super::plan::BatchPlan;
use super::sample::{SampleParams, Sampler, Sampling};
use super::steer::Steering;
use super::{Engine, Pass};
use crate::backend::Backend;
use crate::error::{Error, Result};
use std::sync::Arc;

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

impl<B: Backend> Engine<B> {
    /// Generates for several prompts at once, each with its own steering (or none).
    pub fn generate(&self, prompts: &[Vec<u32>], steering: &[Option<Arc<Steering>>], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        if steering.len() != prompts.len() {
            return Err(Error::input(format!("{} steering entries for {} prompts", steering.len(), prompts.len())));
        }
        for s in steering.iter().flatten() {
            s.validate(self.num_layers(), self.hidden_size())?;
        }
        let ctx = self.model.config.max_position_embeddings;
        let mut capacity = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            self.check_tokens(p, &format!("prompt {}", i + 1))?;
            capacity.push((p.len() + opts.max_new_tokens).min(ctx));
        }
        let mut kv_starts = Vec::with_capacity(prompts.len());
        let mut slots = 0;
        for c in &capacity {
            kv_starts.push(slots);
            slots += c;
        }
        let mut kv = self.backend.kv(self.num_layers(), slots, self.kv_dim())?;
        let mut samplers: Vec<Sampler> = (0..prompts.len()).map(|i| Sampler::new(opts.sampling, i)).collect();
        let mut out: Vec<Generation> =
            prompts.iter().map(|_| Generation { tokens: Vec::new(), finish: FinishReason::Length }).collect();
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }

        crate::interrupt::check()?;
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let plan = BatchPlan::new(&lens, &vec![0; lens.len()], &kv_starts);
        let ids: Vec<u32> = prompts.iter().flatten().copied().collect();
        let everyone: Vec<usize> = (0..prompts.len()).collect();
        let tokens = self.step(
            &mut kv,
            Pass { ids: &ids, plan: &plan, generated: false, steering, capture: None, logits_rows: &plan.last_rows() },
            &mut samplers,
            &everyone,
        )?;
        let mut active: Vec<usize> = Vec::new();
        for (i, t) in tokens.into_iter().enumerate() {
            out[i].tokens.push(t);
            if opts.stop_tokens.contains(&t) {
                out[i].finish = FinishReason::Stop;
            } else if out[i].tokens.len() < opts.max_new_tokens {
                active.push(i);
            }
        }

        while !active.is_empty() {
            crate::interrupt::check()?;
            // Each active sequence feeds its newest token; its cache holds everything before it.
            active.retain(|&i| prompts[i].len() + out[i].tokens.len() <= capacity[i]);
            if active.is_empty() {
                break;
            }
            let past: Vec<usize> = active.iter().map(|&i| prompts[i].len() + out[i].tokens.len() - 1).collect();
            let starts: Vec<usize> = active.iter().map(|&i| kv_starts[i]).collect();
            let plan = BatchPlan::new(&vec![1; active.len()], &past, &starts);
            let ids: Vec<u32> = active.iter().map(|&i| *out[i].tokens.last().unwrap_or(&0)).collect();
            let steer: Vec<Option<Arc<Steering>>> = active.iter().map(|&i| steering[i].clone()).collect();
            let tokens = self.step(
                &mut kv,
                Pass { ids: &ids, plan: &plan, generated: true, steering: &steer, capture: None, logits_rows: &plan.last_rows() },
                &mut samplers,
                &active,
            )?;
            let mut still = Vec::with_capacity(active.len());
            for (t, &i) in tokens.into_iter().zip(&active) {
                out[i].tokens.push(t);
                if opts.stop_tokens.contains(&t) {
                    out[i].finish = FinishReason::Stop;
                } else if out[i].tokens.len() < opts.max_new_tokens {
                    still.push(i);
                }
            }
            active = still;
        }
        Ok(out)
    }

    /// One pass and the next token of each of its sequences (`who[r]` is logits row r's
    /// sampler): sampled on the backend, or on the host when the mode needs it (top-k).
    fn step(&self, kv: &mut B::Kv, pass: Pass, samplers: &mut [Sampler], who: &[usize]) -> Result<Vec<u32>> {
        let params: Option<Vec<SampleParams>> = who.iter().map(|&i| samplers[i].device_params()).collect();
        if let Some(params) = params {
            return self.forward_sample(kv, pass, &params);
        }
        let logits = self.forward(kv, pass)?;
        let vocab = self.model.config.vocab_size;
        Ok(logits.chunks(vocab).zip(who).map(|(row, &i)| samplers[i].next(row)).collect())
    }
}
