//! Cross-lingual control: steer with a source language's concept vector while the model reads
//! and continues target-language prompts, and measure how the target language's concept score
//! moves.
//!
//! For each (concept, source, target) task and each coefficient c of the sweep:
//!
//! * **Prompts** are the *negative* stimuli of the target language's test pairs (wrapped in the
//!   template): text on the negative side of the concept, which steering toward the positive
//!   side should move; the same prompts serve every coefficient, so shifts are paired.
//! * **Steering** adds `c · v_l` at every chosen index l (operator, positions and norm
//!   preservation as in the engine; `v_l` is the source's signed unit direction times its
//!   scale, the mean pair separation, so c = 1 is one typical separation per layer). c = 0 is
//!   the unsteered baseline. Decoding is greedy.
//! * **Concept score** of a generation: the projection of the last-token hidden state of
//!   prompt + generation (trailing stop token removed), computed *without* steering, on the
//!   target language's signed unit direction at the score layer (the concept's best layer:
//!   the layer with the highest mean own-language test accuracy over the languages loaded,
//!   more robust than one language's best layer on a small test set). The **shift** is the mean
//!   score at c minus the mean score at 0; `shift_rel` divides it by the target's mean pair
//!   separation at that layer (1.0 = one typical positive–negative gap).
//! * **Fluency guard**: the mean negative log-likelihood (nats per token) of the generated
//!   tokens under the unsteered model, given the prompt.
use super::recognition::mean;
use crate::engine::capture::{CapturePoint, CapturePosition, CaptureSpec};
use crate::engine::steer::{SteerOp, SteerPositions, Steering};
use crate::error::{Error, Result};
use crate::backend::Backend;
use crate::engine::Engine;
use crate::{FinishReason, GenerateOptions, Sampling};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::sync::Arc;

/// How the sweep runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlSettings {
    pub coefs: Vec<f32>,
    pub op: &'static str,
    pub positions: &'static str,
    pub preserve_norm: bool,
    pub max_new_tokens: usize,
    pub batch_tokens: usize,
    #[serde(skip)]
    pub quiet: bool,
}

impl ControlSettings {
    /// Checked settings: finite coefficients (0, the unsteered baseline, is added and they are
    /// sorted), a known operator and known positions.
    pub fn new(mut coefs: Vec<f32>, op: &str, positions: &str, preserve_norm: bool, max_new_tokens: usize, batch_tokens: usize, quiet: bool) -> Result<Self> {
        if let Some(v) = coefs.iter().find(|v| !v.is_finite()) {
            return Err(crate::error::Error::input(format!("--coefs: `{v}` is not finite")));
        }
        if coefs.is_empty() {
            return Err(crate::error::Error::input("--coefs: no coefficients"));
        }
        if !coefs.contains(&0.0) {
            coefs.insert(0, 0.0);
        }
        coefs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let op: SteerOp = op.parse()?;
        let positions: SteerPositions = positions.parse()?;
        Ok(ControlSettings { coefs, op: op.name(), positions: positions.name(), preserve_norm, max_new_tokens, batch_tokens, quiet })
    }

    fn steer_op(&self) -> Result<SteerOp> {
        self.op.parse()
    }
    fn steer_positions(&self) -> Result<SteerPositions> {
        self.positions.parse()
    }
}

/// One prompt: its id (pair key) and templated text.
#[derive(Debug, Clone)]
pub struct ControlPrompt {
    pub id: String,
    pub text: String,
}

/// One (concept, source, target) experiment.
#[derive(Debug, Clone)]
pub struct ControlTask {
    pub concept: String,
    pub source: String,
    pub target: String,
    /// Steering vectors `[L+1, hidden]` (the vector-file layout) of the source language.
    pub steer: Arc<Vec<f32>>,
    /// Steered hidden-state indices.
    pub layers: Vec<usize>,
    /// The target's signed unit direction at `score_layer`.
    pub score_dir: Vec<f32>,
    pub score_layer: usize,
    /// The target's mean pair separation at `score_layer`.
    pub score_scale: f32,
    pub prompts: Vec<ControlPrompt>,
}

/// Summary of one task at one coefficient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlRow {
    pub concept: String,
    pub source: String,
    pub target: String,
    pub coef: f32,
    pub layers: Vec<usize>,
    pub score_layer: usize,
    pub prompts: usize,
    pub score_mean: f64,
    pub shift: f64,
    pub shift_rel: f64,
    pub nll_mean: f64,
    pub nll_delta: f64,
    pub mean_generated_tokens: f64,
}

/// One generation, saved for inspection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationRecord {
    pub concept: String,
    pub source: String,
    pub target: String,
    pub coef: f32,
    pub prompt_id: String,
    pub prompt: String,
    pub generation: String,
    pub tokens: Vec<u32>,
    pub finish_reason: &'static str,
    pub score: f64,
    pub nll: f64,
}

/// The model's stop tokens: config `eos_token_id`, `generation_config.json` and the
/// tokenizer's EOS token.
pub fn stop_tokens<B: Backend>(engine: &Engine<B>) -> Vec<u32> {
    let mut stops = engine.model.config.eos_token_ids.clone();
    if let Ok(text) = std::fs::read_to_string(engine.model.dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stops.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => stops.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
    }
    if let Some(tok) = &engine.model.tokenizer {
        stops.extend(tok.stop_token_ids());
    }
    stops.sort_unstable();
    stops.dedup();
    stops
}

/// Scores, NLLs and generated lengths of one (task, coefficient).
type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);

struct Job {
    task: usize,
    coef_idx: usize,
    prompt: usize,
    /// Index into the unique generations.
    gen: usize,
}

/// Runs every task over the coefficient sweep.
pub fn run_control<B: Backend>(engine: &Engine<B>, tasks: &[ControlTask], settings: &ControlSettings) -> Result<(Vec<ControlRow>, Vec<GenerationRecord>)> {
    let tok = engine
        .model
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::model(format!("{}: no tokenizer.json; the control experiment needs one", engine.model.dir.display())))?;
    if !settings.coefs.iter().all(|c| c.is_finite()) {
        return Err(Error::input("control coefficients must be finite numbers"));
    }
    let (op, positions) = (settings.steer_op()?, settings.steer_positions()?);
    let (n_layers, hidden) = (engine.num_layers(), engine.hidden_size());
    let stops = stop_tokens(engine);

    // Unique generation requests: (prompt text, steering identity). Unsteered ones are shared.
    let mut prompt_ids: HashMap<String, Vec<u32>> = HashMap::new();
    let mut gen_keys: HashMap<(String, Option<(usize, u32)>), usize> = HashMap::new();
    let mut gens: Vec<(Vec<u32>, Option<Arc<Steering>>)> = Vec::new();
    let mut jobs = Vec::new();
    for (ti, t) in tasks.iter().enumerate() {
        if t.steer.len() != (n_layers + 1) * hidden {
            return Err(Error::input(format!("control task {}/{}→{}: steering vectors do not fit the model", t.concept, t.source, t.target)));
        }
        for (ci, &c) in settings.coefs.iter().enumerate() {
            let steering = (c != 0.0).then(|| {
                Arc::new(Steering {
                    directions: t.steer.clone(),
                    hidden,
                    layers: t.layers.clone(),
                    sites: Vec::new(),
                    coef: c,
                    op,
                    preserve_norm: settings.preserve_norm,
                    positions,
                })
            });
            if let Some(s) = &steering {
                s.validate(n_layers, hidden)?;
            }
            for (pi, p) in t.prompts.iter().enumerate() {
                if !prompt_ids.contains_key(&p.text) {
                    let ids = tok.encode(&p.text).map_err(|e| Error::input(format!("control prompt {}: {e}", p.id)))?;
                    engine.check_tokens(&ids, &format!("control prompt {} ({})", p.id, t.target))?;
                    prompt_ids.insert(p.text.clone(), ids);
                }
                let key = (p.text.clone(), (c != 0.0).then_some((ti, c.to_bits())));
                let gen = *gen_keys.entry(key).or_insert_with(|| {
                    gens.push((prompt_ids[&p.text].clone(), steering.clone()));
                    gens.len() - 1
                });
                jobs.push(Job { task: ti, coef_idx: ci, prompt: pi, gen });
            }
        }
    }

    // Generate in chunks bounded by KV memory (about 512 MiB).
    let started = std::time::Instant::now();
    let bar = if settings.quiet { ProgressBar::hidden() } else { ProgressBar::new(gens.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} control: generate [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})")
            .map_err(|e| Error::input(format!("progress template: {e}")))?
            .progress_chars("=> "),
    );
    let opts = GenerateOptions { max_new_tokens: settings.max_new_tokens, sampling: Sampling::Greedy, stop_tokens: stops.clone() };
    let kv_per_token = n_layers * engine.kv_dim() * 2 * 4;
    let mut outputs = Vec::with_capacity(gens.len());
    let mut start = 0;
    let mut tokens_done = 0usize;
    while start < gens.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < gens.len() && (end == start || (bytes < 512 << 20 && end - start < 128)) {
            bytes += (gens[end].0.len() + settings.max_new_tokens) * kv_per_token;
            end += 1;
        }
        let prompts: Vec<Vec<u32>> = gens[start..end].iter().map(|g| g.0.clone()).collect();
        let steer: Vec<Option<Arc<Steering>>> = gens[start..end].iter().map(|g| g.1.clone()).collect();
        let out = engine.generate(&prompts, &steer, &opts)?;
        tokens_done += prompts.iter().map(Vec::len).sum::<usize>() + out.iter().map(|g| g.tokens.len()).sum::<usize>();
        outputs.extend(out);
        bar.inc((end - start) as u64);
        bar.set_message(format!("{:.0} tok/s", tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9)));
        start = end;
    }
    bar.finish_and_clear();

    // Score every unique prompt + generation once, unsteered: NLL of the generated tokens and
    // the hidden states at every score layer.
    let mut score_layers: Vec<usize> = tasks.iter().map(|t| t.score_layer).collect();
    score_layers.sort_unstable();
    score_layers.dedup();
    let spec = CaptureSpec { points: score_layers.iter().map(|&l| CapturePoint::Hidden(l)).collect(), position: CapturePosition::Last };
    let mut seq_index: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut from = Vec::new();
    let mut gen_seq = Vec::with_capacity(gens.len());
    for (g, out) in gens.iter().zip(&outputs) {
        let mut body = out.tokens.clone();
        if body.last().is_some_and(|t| stops.contains(t)) {
            body.pop();
        }
        let mut full = g.0.clone();
        full.extend_from_slice(&body);
        let idx = *seq_index.entry(full.clone()).or_insert_with(|| {
            from.push(g.0.len());
            seqs.push(full);
            seqs.len() - 1
        });
        gen_seq.push(idx);
    }
    let bar = if settings.quiet { ProgressBar::hidden() } else { ProgressBar::new(seqs.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} control: score [{bar:30}] {pos}/{len} ({elapsed} < {eta})")
            .map_err(|e| Error::input(format!("progress template: {e}")))?
            .progress_chars("=> "),
    );
    let none = vec![None; seqs.len()];
    let scored = engine.score(&seqs, &from, &none, Some(&spec), settings.batch_tokens, |n, _| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let captured = scored.captured.as_ref().ok_or_else(|| Error::input("internal: no capture"))?;

    let mut records = Vec::with_capacity(jobs.len());
    // Per (task, coef): scores, nlls, lengths.
    let mut acc: HashMap<(usize, usize), Samples> = HashMap::new();
    for j in &jobs {
        let t = &tasks[j.task];
        let s = gen_seq[j.gen];
        let slot = score_layers.iter().position(|&l| l == t.score_layer).unwrap_or(0);
        let score = super::linalg::dot(captured.row(s, slot), &t.score_dir);
        let nll = scored.mean_nll(s);
        let out = &outputs[j.gen];
        let e = acc.entry((j.task, j.coef_idx)).or_default();
        e.0.push(score);
        e.1.push(nll);
        e.2.push((seqs[s].len() - from[s]) as f64);
        let body: Vec<u32> = out.tokens.iter().copied().filter(|x| !stops.contains(x)).collect();
        records.push(GenerationRecord {
            concept: t.concept.clone(),
            source: t.source.clone(),
            target: t.target.clone(),
            coef: settings.coefs[j.coef_idx],
            prompt_id: t.prompts[j.prompt].id.clone(),
            prompt: t.prompts[j.prompt].text.clone(),
            generation: tok.decode(&body).unwrap_or_default(),
            tokens: out.tokens.clone(),
            finish_reason: match out.finish {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            },
            score,
            nll,
        });
    }
    let mut rows = Vec::new();
    for (ti, t) in tasks.iter().enumerate() {
        let base_ci = settings.coefs.iter().position(|&c| c == 0.0);
        let base = base_ci.and_then(|ci| acc.get(&(ti, ci)));
        let (base_score, base_nll) = base.map(|b| (mean(b.0.iter().copied()), mean(b.1.iter().copied()))).unwrap_or((f64::NAN, f64::NAN));
        for (ci, &c) in settings.coefs.iter().enumerate() {
            let Some((scores, nlls, lens)) = acc.get(&(ti, ci)) else { continue };
            let score_mean = mean(scores.iter().copied());
            let nll_mean = mean(nlls.iter().copied());
            let shift = score_mean - base_score;
            rows.push(ControlRow {
                concept: t.concept.clone(),
                source: t.source.clone(),
                target: t.target.clone(),
                coef: c,
                layers: t.layers.clone(),
                score_layer: t.score_layer,
                prompts: scores.len(),
                score_mean,
                shift,
                shift_rel: if t.score_scale > 0.0 { shift / t.score_scale as f64 } else { f64::NAN },
                nll_mean,
                nll_delta: nll_mean - base_nll,
                mean_generated_tokens: mean(lens.iter().copied()),
            });
        }
    }
    if !settings.quiet {
        eprintln!(
            "control: {} generations ({} unique), {:.1} s",
            jobs.len(),
            gens.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok((rows, records))
}

/// Steering layers around a centre index: `centre-radius ..= centre+radius`, clipped to 1..=L.
pub fn layers_around(centre: usize, radius: usize, num_layers: usize) -> Vec<usize> {
    let lo = centre.saturating_sub(radius).max(1);
    let hi = (centre + radius).min(num_layers);
    (lo..=hi).collect()
}
