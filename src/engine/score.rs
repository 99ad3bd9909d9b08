//! Scoring given sequences: per-token log-probabilities (negative log-likelihood), optionally
//! with hidden states captured in the same pass.
use super::capture::{CaptureSink, CapturePosition, CaptureSpec, Captured};
use super::plan::BatchPlan;
use super::steer::Steering;
use super::{Engine, Pass, Phase};
use crate::backend::Backend;
use crate::error::{Error, Result};
use std::sync::Arc;

/// Most rows of logits held at once (each is `vocab` floats); a batch closes before it would
/// need more, except that one sequence always fits alone.
pub const MAX_SCORED_ROWS: usize = 256;

/// Result of [`Engine::score`].
#[derive(Debug, Clone)]
pub struct Scored {
    /// `logprobs[i][k]` = log p(ids[t] | ids[..t]) for t = from[i] + k, natural log.
    pub logprobs: Vec<Vec<f32>>,
    /// Hidden states when a capture spec was given (layout as [`Engine::extract`]).
    pub captured: Option<Captured>,
}

impl Scored {
    /// Mean negative log-likelihood of sequence i's scored tokens (NaN when none were scored).
    pub fn mean_nll(&self, i: usize) -> f64 {
        let lp = &self.logprobs[i];
        if lp.is_empty() {
            f64::NAN
        } else {
            -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64
        }
    }
}

/// `log softmax(row)[token]`, in f64.
fn log_prob(row: &[f32], token: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (row[token as usize] as f64 - max - sum.ln()) as f32
}

impl<B: Backend> Engine<B> {
    /// Log-probability of every token of `seqs[i]` from position `from[i]` on (`from[i] >= 1`;
    /// `from[i] == len` scores nothing), given the tokens before it, with optional steering per
    /// sequence and an optional capture. Sequences are packed into passes of about
    /// `batch_tokens` tokens; results do not depend on the packing. `progress` is told how many
    /// sequences and tokens each finished pass held.
    pub fn score(
        &self,
        seqs: &[Vec<u32>],
        from: &[usize],
        steering: &[Option<Arc<Steering>>],
        capture: Option<&CaptureSpec>,
        batch_tokens: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Scored> {
        if from.len() != seqs.len() || steering.len() != seqs.len() {
            return Err(Error::input(format!(
                "{} sequences, {} start positions and {} steering entries",
                seqs.len(),
                from.len(),
                steering.len()
            )));
        }
        if let Some(spec) = capture {
            spec.validate(self.num_layers())?;
        }
        for s in steering.iter().flatten() {
            self.check_steering(s)?;
        }
        for (i, ids) in seqs.iter().enumerate() {
            self.check_tokens(ids, &format!("sequence {}", i + 1))?;
            if from[i] == 0 || from[i] > ids.len() {
                return Err(Error::input(format!(
                    "sequence {}: scoring must start at a position in 1..={} (got {})",
                    i + 1,
                    ids.len(),
                    from[i]
                )));
            }
        }
        let vocab = self.model.config.vocab_size;
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let mut captured = match capture {
            Some(spec) => Some(Captured::for_lengths(&lens, spec.points.len(), self.capture_width(spec)?, spec.position)),
            None => None,
        };
        let mut logprobs: Vec<Vec<f32>> = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let (mut tokens, mut rows) = (0, 0);
            while end < seqs.len() {
                let (t, r) = (seqs[end].len(), seqs[end].len() - from[end]);
                if end > start && (tokens + t > batch_tokens.max(1) || rows + r > MAX_SCORED_ROWS) {
                    break;
                }
                tokens += t;
                rows += r;
                end += 1;
            }
            let batch = &seqs[start..end];
            let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
            let plan = BatchPlan::fresh(&lens);
            let mut logit_rows = Vec::with_capacity(rows);
            for (k, span) in plan.seqs.iter().enumerate() {
                for t in from[start + k]..lens[k] {
                    logit_rows.push(span.start + t - 1);
                }
            }
            let ids: Vec<u32> = batch.iter().flatten().copied().collect();
            let mut kv = self.backend.kv(1, tokens, self.kv_dim())?;
            let sink = match (capture, captured.as_mut()) {
                (Some(spec), Some(out)) => {
                    let seq_row = match spec.position {
                        CapturePosition::All => (start..end).map(|i| out.offsets[i]).collect(),
                        _ => (start..end).collect(),
                    };
                    Some(CaptureSink { spec, out, seq_row })
                }
                _ => None,
            };
            let logits = if logit_rows.is_empty() && sink.is_none() {
                Vec::new()
            } else {
                self.forward(
                    &mut kv,
                    Pass {
                        ids: &ids,
                        plan: &plan,
                        phase: Phase::Prompt,
                        steering: &steering[start..end],
                        capture: sink,
                        logits_rows: &logit_rows,
                    },
                )?
            };
            let mut row = 0;
            for (k, seq) in batch.iter().enumerate() {
                let mut lp = Vec::with_capacity(seq.len() - from[start + k]);
                for &tok in &seq[from[start + k]..] {
                    lp.push(log_prob(&logits[row * vocab..(row + 1) * vocab], tok));
                    row += 1;
                }
                logprobs.push(lp);
            }
            progress(end - start, tokens);
            start = end;
        }
        Ok(Scored { logprobs, captured })
    }
}
