//! The engine: the one forward pass, batching, KV cache, capture and steering, generation.
pub mod capture;
pub mod generate;
pub mod plan;
pub mod sample;
pub mod score;
pub mod steer;

use crate::backend::cpu::rope::inverse_frequencies;
use crate::backend::{ActKind, AttentionInput, Backend, CaptureLayout, Heads, NonFinite};
use crate::error::{Error, Result};
use crate::backend::Norm;
use crate::model::arch::{alibi_slopes, PositionKind};
use crate::model::{ModelDir, ModelWeights};
use capture::{CapturePoint, CapturePosition, CaptureSink, CaptureSpec, Captured, Site};
use plan::BatchPlan;
use sample::SampleParams;
use std::sync::Arc;
use steer::{plan_pass, steer_key, PointSteering, SteerGeometry, Steering};

/// A loaded model on one backend. Immutable after loading: share it across threads.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: ModelDir,
    pub weights: ModelWeights<B>,
    /// Rotary inverse frequencies (empty for ALiBi models).
    inv_freq: Vec<f32>,
    alibi: Option<Vec<f32>>,
    heads: Heads,
}

/// One forward pass over a packed batch.
pub struct Pass<'a, 'b> {
    pub ids: &'a [u32],
    pub plan: &'a BatchPlan,
    /// Whether each sequence's rows are generated tokens (decode) or prompt tokens (prefill):
    /// steering limited to prompt or generated positions reads it.
    pub phase: Phase<'a>,
    /// Steering per sequence of the batch.
    pub steering: &'a [Option<Arc<Steering>>],
    pub capture: Option<CaptureSink<'b>>,
    /// Rows that need logits (none for extraction: the LM head is never computed).
    pub logits_rows: &'a [usize],
}

/// Which tokens a pass's rows are, per sequence.
#[derive(Debug, Clone, Copy)]
pub enum Phase<'a> {
    /// Every row is a prompt token (prefill, extraction, scoring).
    Prompt,
    /// Every row is a generated token fed back (a decode step).
    Generated,
    /// `generated[i]` for sequence i: the scheduler's passes mix prefill chunks and decode steps.
    PerSequence(&'a [bool]),
}

impl Phase<'_> {
    pub fn generated(&self, seq: usize) -> bool {
        match self {
            Phase::Prompt => false,
            Phase::Generated => true,
            Phase::PerSequence(g) => g.get(seq).copied().unwrap_or(false),
        }
    }
}

/// Default token budget of one extraction batch.
pub const DEFAULT_BATCH_TOKENS: usize = 2048;

/// How extraction packs sequences of lengths `lens` into batches of at most `batch_tokens`
/// tokens (a longer sequence alone), in input order. Every face that walks batches uses this.
pub fn batch_ranges(lens: &[usize], batch_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let (mut end, mut tokens) = (start, 0);
        while end < lens.len() && (end == start || tokens + lens[end] <= batch_tokens.max(1)) {
            tokens += lens[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, model: ModelDir) -> Result<Self> {
        let weights = ModelWeights::load(&backend, &model)?;
        let c = &model.config;
        let heads = Heads { q_heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let (inv_freq, alibi) = match model.spec.position {
            PositionKind::Rope => (inverse_frequencies(c), None),
            PositionKind::Alibi => (Vec::new(), Some(alibi_slopes(c.num_heads))),
        };
        Ok(Engine { inv_freq, alibi, heads, backend, model, weights })
    }

    /// Attention heads: query heads, key/value heads and their width.
    pub fn heads(&self) -> Heads {
        self.heads
    }

    pub fn num_layers(&self) -> usize {
        self.model.config.num_layers
    }

    pub fn hidden_size(&self) -> usize {
        self.model.config.hidden_size
    }

    pub fn kv_dim(&self) -> usize {
        self.heads.kv_heads * self.heads.head_dim
    }

    /// What steering needs of the model: layers, widths and heads.
    pub fn steer_geometry(&self) -> SteerGeometry {
        SteerGeometry { num_layers: self.num_layers(), hidden: self.hidden_size(), heads: self.heads.q_heads, head_dim: self.heads.head_dim }
    }

    /// The width of `spec`'s output rows (hidden, or heads·head_dim for `hook_z` alone).
    pub fn capture_width(&self, spec: &CaptureSpec) -> Result<usize> {
        spec.width(self.hidden_size(), self.heads.q_heads * self.heads.head_dim)
    }

    /// Checks a steering intervention against this model ([`Steering::validate_for`]).
    pub fn check_steering(&self, s: &Steering) -> Result<()> {
        s.validate_for(self.steer_geometry())
    }

    /// Checks token ids and lengths before any compute.
    pub fn check_tokens(&self, ids: &[u32], what: &str) -> Result<()> {
        let c = &self.model.config;
        if ids.is_empty() {
            return Err(Error::input(format!("{what}: no tokens")));
        }
        if ids.len() > c.max_position_embeddings {
            return Err(Error::input(format!(
                "{what}: {} tokens exceed the model's context of {} (max_position_embeddings)",
                ids.len(),
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::input(format!("{what}: token id {bad} is outside the vocabulary of {}", c.vocab_size)));
        }
        Ok(())
    }

    /// Token ids of input items (texts through the tokenizer), each checked with
    /// [`Engine::check_tokens`]; `at(i)` names item i in errors (e.g. `FILE: line 3`).
    pub fn input_ids(&self, items: Vec<crate::io::InputItem>, at: impl Fn(usize) -> String) -> Result<Vec<Vec<u32>>> {
        let mut seqs = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let ids = match item {
                crate::io::InputItem::Ids(ids) => ids,
                crate::io::InputItem::Text(text) => self
                    .model
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| Error::input(format!("{}: the model has no tokenizer.json; give `ids` instead of `text`", at(i))))?
                    .encode(&text)
                    .map_err(|e| Error::input(format!("{}: {e}", at(i))))?,
            };
            self.check_tokens(&ids, &at(i))?;
            seqs.push(ids);
        }
        Ok(seqs)
    }

    /// What `resid info --json` prints: architecture, sizes, dtype, tensor check, backend.
    pub fn summary(&self) -> serde_json::Value {
        let m = &self.model;
        let c = &m.config;
        serde_json::json!({
            "model": m.dir.display().to_string(),
            "architecture": c.architecture,
            "family": c.family.name(),
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "attention_heads": c.num_heads,
            "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "context": c.max_position_embeddings,
            "dtype": m.store.dominant_dtype(),
            "parameters": m.parameter_count(),
            "tie_word_embeddings": c.tie_word_embeddings,
            "tensor_check": format!("ok: all {} expected tensors present with expected dtypes and shapes", m.spec.expected_tensors(c).len()),
            "tokenizer": m.tokenizer.is_some(),
            "tokenizer_file": m.tokenizer.as_ref().map(|t| t.source()),
            "backend": self.backend.name(),
            "compute": self.backend.compute_type(),
            "compute_note": self.backend.compute_note(),
        })
    }

    fn norm<'v>(&self, weight: &'v B::Vector, bias: Option<&'v B::Vector>) -> Norm<'v, B::Vector> {
        Norm { kind: self.model.spec.norm, weight, bias, eps: self.model.config.norm_eps }
    }

    /// Runs one packed pass; returns logits `[logits_rows.len(), vocab]`.
    pub fn forward(&self, kv: &mut B::Kv, pass: Pass) -> Result<Vec<f32>> {
        match self.backend.on_workers(|| self.forward_on_backend(kv, pass))? {
            Some(logits) => {
                let host = self.backend.to_host(&logits)?;
                self.backend.mark("logits to host");
                Ok(host)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Runs one packed pass and picks one token per logits row on the backend (`params[i]` for
    /// `logits_rows[i]`): a device samples where the logits are and returns only the ids.
    pub fn forward_sample(&self, kv: &mut B::Kv, pass: Pass, params: &[SampleParams]) -> Result<Vec<u32>> {
        if params.len() != pass.logits_rows.len() {
            return Err(Error::input(format!("{} sampling rows for {} logits rows", params.len(), pass.logits_rows.len())));
        }
        match self.backend.on_workers(|| self.forward_on_backend(kv, pass))? {
            Some(logits) => {
                let ids = self.backend.sample(&logits, params)?;
                self.backend.mark("sample");
                Ok(ids)
            }
            None => Ok(Vec::new()),
        }
    }

    /// The forward pass; the logits stay on the backend (None without logits rows).
    pub fn forward_on_backend(&self, kv: &mut B::Kv, pass: Pass) -> Result<Option<B::Act>> {
        self.forward_ending(kv, pass, |be, state, sink| be.end_pass(state, sink))
    }

    /// The forward pass, ended by `end` (which hands the pass's captured rows on: `end_pass`
    /// copies them out, `end_pass_stats` folds them into device statistics).
    fn forward_ending(&self, kv: &mut B::Kv, pass: Pass, end: impl FnOnce(&B, B::Pass, Option<&mut CaptureSink>) -> Result<()>) -> Result<Option<B::Act>> {
        let be = &self.backend;
        let c = &self.model.config;
        let w = &self.weights;
        let (h, inter, eps, n_layers) = (c.hidden_size, c.intermediate_size, c.norm_eps, c.num_layers);
        let plan = pass.plan;
        let rows = plan.rows();
        let (qd, kvd) = (self.heads.q_heads * self.heads.head_dim, self.kv_dim());
        let mut sink = pass.capture;
        let spec = sink.as_ref().map(|s| s.spec);
        // Without logits, stop after the deepest captured point.
        let last_point = match spec {
            Some(spec) if pass.logits_rows.is_empty() => spec.deepest_index(n_layers),
            _ => n_layers,
        };
        let layout = match spec {
            Some(s) => Some(CaptureLayout { slots: s.points.len(), position: s.position, width: self.capture_width(s)? }),
            None => None,
        };
        // Every point's steering is planned before the pass, so a device backend uploads it once.
        let steering = plan_pass(last_point, n_layers, pass.steering, &plan.row_seq, pass.phase);
        // After the last computed layer's attention, the rest of that layer and the final
        // residual step matter only for the rows something reads: each sequence's last row
        // when every capture takes position `last` and logits are for last rows, or none when
        // the pass only fills the cache. Those rows alone go on (each step after attention is
        // row by row, so they come out bit-identical), steered by the same plan of the same
        // sequences.
        let tail_rows: Option<Vec<usize>> = {
            let last_rows = plan.last_rows();
            let last_rows_read = spec.is_none_or(|s| s.position == CapturePosition::Last) && (pass.logits_rows.is_empty() || pass.logits_rows == last_rows);
            if last_point == 0 || !last_rows_read {
                None
            } else if spec.is_none() && pass.logits_rows.is_empty() {
                Some(Vec::new())
            } else {
                Some(last_rows).filter(|r| r.len() < rows)
            }
        };
        let tail_plan = tail_rows.as_ref().filter(|r| !r.is_empty()).map(|_| plan.last_rows_only());
        let tail_steering = match &tail_plan {
            Some(p) => plan_pass(last_point, n_layers, pass.steering, &p.row_seq, pass.phase),
            None => Vec::new(),
        };
        // The steering plan of the rows the pass runs on (another once narrowed).
        let active: std::cell::Cell<&[Option<PointSteering>]> = std::cell::Cell::new(&steering);
        // A point inside block l: its steering plan and capture slot, None when neither (the
        // common path, which then runs as if the point did not exist).
        let site_point = |l: usize, site: Site| {
            let steer = active.get().get(steer_key(n_layers, l, Some(site))).and_then(Option::as_ref);
            let slot = spec.and_then(|s| s.slot(CapturePoint::Block(l, site)));
            (steer.is_some() || slot.is_some()).then_some((steer, slot))
        };
        let mut narrowed = false;
        let mut state = be.begin_pass(plan, &self.inv_freq, layout, &steering, h)?;
        be.mark("begin pass (between passes, tables)");

        // Every activation of the pass is written in full before it is read: the embedding
        // fills x, each residual step fills normed, each operation its output.
        let mut x = be.scratch_act(rows, h, ActKind::Residual)?;
        let mut normed = be.scratch_act(rows, h, ActKind::Hidden)?;
        let post_ln = c.post_ln_residual;
        let embed_norm = w.embed_norm.as_ref().map(|(weight, bias)| self.norm(weight, Some(bias)));
        be.embed(&w.embed, pass.ids, embed_norm, &mut x)?;
        be.mark("embed");
        // The fused residual step at hidden-state index l: steer, capture, and normalise for
        // the next sub-layer (the final norm at l = L).
        let point = |l: usize, state: &mut B::Pass, x: &mut B::Act, normed: &mut B::Act| -> Result<()> {
            let (weight, bias) = if l < n_layers {
                (&w.layers[l].attn_norm, w.layers[l].attn_norm_bias.as_ref())
            } else {
                (&w.final_norm, w.final_norm_bias.as_ref())
            };
            let steer = active.get().get(l).and_then(Option::as_ref);
            let slot = |p| spec.and_then(|s| s.slot(p));
            let (residual_slot, normed_slot) = if l < n_layers {
                (slot(CapturePoint::Hidden(l)), None)
            } else {
                (slot(CapturePoint::LastBlockRaw), slot(CapturePoint::Hidden(l)))
            };
            // The final norm feeds only the LM head, never the residual.
            be.residual_step(state, x, self.norm(weight, bias), normed, steer, residual_slot, normed_slot, post_ln && l < n_layers)?;
            be.mark("residual step (steer, capture, norm)");
            Ok(())
        };
        point(0, &mut state, &mut x, &mut normed)?;

        if last_point > 0 {
            let hidden = |rows, cols| be.scratch_act(rows, cols, ActKind::Hidden);
            let (mut qkv, mut q, mut attn) = (hidden(rows, qd + 2 * kvd)?, hidden(rows, qd)?, hidden(rows, qd)?);
            let mlp = self.model.spec.mlp;
            let up_rows = self.model.spec.mlp_input_rows(&self.model.config);
            let (mut gate_up, mut act) = (hidden(rows, up_rows)?, hidden(rows, inter)?);
            // Rows the steps after attention run on (fewer once narrowed).
            let mut live = rows;
            // A sub-layer's output before its residual add, made only when a pass steers or
            // captures there: otherwise the projections add straight into the residual.
            let mut branch: Option<B::Act> = None;
            for (l, lw) in w.layers.iter().enumerate().take(last_point) {
                let qk_norm = lw.q_norm.as_ref().zip(lw.k_norm.as_ref()).map(|(qn, kn)| (qn, kn, eps));
                let input = AttentionInput { qkv: &lw.qkv, bias: lw.qkv_bias.as_ref(), qk_norm, heads: self.heads };
                be.attention_input(&state, &normed, input, kv, l, &mut qkv, &mut q)?;
                be.mark("rope and kv store (all of the attention input when fused)");
                let tail = l + 1 == last_point;
                if tail && tail_rows.as_ref().is_some_and(Vec::is_empty) {
                    // Nothing reads this pass's output: the last layer's keys and values are stored.
                    break;
                }
                be.attention(&state, &q, kv, l, self.heads, self.alibi.as_deref(), &mut attn)?;
                be.mark("attention");
                if let (Some(keep), Some(tail_plan), true) = (&tail_rows, &tail_plan, tail) {
                    if be.narrow_pass(&mut state, tail_plan, keep, &tail_steering)? {
                        attn = be.gather_rows(&attn, keep)?;
                        x = be.gather_rows(&x, keep)?;
                        live = keep.len();
                        (normed, gate_up, act) = (hidden(live, h)?, hidden(live, up_rows)?, hidden(live, inter)?);
                        branch = None;
                        active.set(&tail_steering);
                        narrowed = true;
                        be.mark("narrow to the rows read");
                    }
                }
                if let Some((steer, slot)) = site_point(l, Site::Z) {
                    be.branch_step(&mut state, &mut attn, steer, slot, None)?;
                    be.mark("hook_z (steer, capture)");
                }
                match site_point(l, Site::AttnOut) {
                    None => be.linear(&attn, &lw.o, lw.o_bias.as_ref(), &mut x, true)?,
                    Some((steer, slot)) => {
                        let b = match branch.as_mut() {
                            Some(b) => b,
                            None => branch.insert(be.scratch_act(live, h, ActKind::Residual)?),
                        };
                        be.linear(&attn, &lw.o, lw.o_bias.as_ref(), b, false)?;
                        be.mark("o projection");
                        be.branch_step(&mut state, b, steer, slot, Some(&mut x))?;
                        be.mark("hook_attn_out (steer, capture, add)");
                    }
                }
                be.mark("o projection");
                let mlp_norm = self.norm(&lw.mlp_norm, lw.mlp_norm_bias.as_ref());
                let (mid_steer, mid_slot) = site_point(l, Site::ResidMid).unwrap_or((None, None));
                be.residual_step(&mut state, &mut x, mlp_norm, &mut normed, mid_steer, mid_slot, None, post_ln)?;
                be.mark("mlp norm");
                be.mlp_input(mlp, &normed, &lw.gate_up, lw.gate_up_bias.as_ref(), &mut gate_up, &mut act)?;
                be.mark("activation (all of the MLP input when fused)");
                match site_point(l, Site::MlpOut) {
                    None => be.down_projection(&state, &act, &lw.down, lw.down_bias.as_ref(), &mut x, true)?,
                    Some((steer, slot)) => {
                        let b = match branch.as_mut() {
                            Some(b) => b,
                            None => branch.insert(be.scratch_act(live, h, ActKind::Residual)?),
                        };
                        be.down_projection(&state, &act, &lw.down, lw.down_bias.as_ref(), b, false)?;
                        be.mark("down projection");
                        be.branch_step(&mut state, b, steer, slot, Some(&mut x))?;
                        be.mark("hook_mlp_out (steer, capture, add)");
                    }
                }
                be.mark("down projection");
                point(l + 1, &mut state, &mut x, &mut normed)?;
            }
        }
        // The LM head is queued before the captured rows are copied out, so that a device
        // works on it while the host waits for the copy.
        let logits = if pass.logits_rows.is_empty() {
            None
        } else {
            // Decode steps need every row, in order: no gather; nor does a narrowed pass,
            // whose rows are the logits rows.
            let gathered;
            let last = if narrowed || pass.logits_rows.iter().copied().eq(0..rows) {
                &normed
            } else {
                gathered = be.gather_rows(&normed, pass.logits_rows)?;
                &gathered
            };
            let mut logits = be.scratch_act(pass.logits_rows.len(), c.vocab_size, ActKind::Logits)?;
            be.linear(last, w.lm_head(), None, &mut logits, false)?;
            be.mark("lm head");
            Some(logits)
        };
        end(be, state, sink.as_mut())?;
        be.mark("end pass (capture copy)");
        Ok(logits)
    }

    /// Captures hidden states for many sequences, packed into batches of about `batch_tokens`
    /// tokens. Results are identical whatever the batching. `progress` is told how many
    /// sequences and tokens each finished batch held.
    pub fn extract(
        &self,
        seqs: &[Vec<u32>],
        spec: &CaptureSpec,
        steering: &[Option<Arc<Steering>>],
        batch_tokens: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Captured> {
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let mut out = Captured::for_lengths(&lens, spec.points.len(), self.capture_width(spec)?, spec.position);
        let mut next_row = 0;
        self.extract_batches(seqs, spec, steering, batch_tokens, |range, batch| {
            let n = batch.data.len();
            out.data[next_row * batch.points * batch.hidden..][..n].copy_from_slice(&batch.data);
            next_row += batch.rows;
            progress(range.len(), lens[range].iter().sum());
            Ok(())
        })?;
        Ok(out)
    }

    /// As [`Engine::extract`], handing each batch's captured rows to `on_batch` (with the range
    /// of sequences it covers) instead of collecting them: memory then holds one batch, however
    /// long the input. Batches come in input order; for `All` a batch's `offsets` start at 0.
    pub fn extract_batches(
        &self,
        seqs: &[Vec<u32>],
        spec: &CaptureSpec,
        steering: &[Option<Arc<Steering>>],
        batch_tokens: usize,
        mut on_batch: impl FnMut(std::ops::Range<usize>, &Captured) -> Result<()>,
    ) -> Result<()> {
        let width = self.capture_width(spec)?;
        self.capture_batches(seqs, spec, steering, batch_tokens, |range, lens, pass, kv| {
            let mut out = Captured::for_lengths(lens, spec.points.len(), width, spec.position);
            let seq_row = match spec.position {
                CapturePosition::All => out.offsets[..lens.len()].to_vec(),
                _ => (0..lens.len()).collect(),
            };
            self.forward(kv, Pass { capture: Some(CaptureSink { spec, out: &mut out, seq_row }), ..pass })?;
            on_batch(range, &out)
        })
    }

    /// As [`Engine::extract_batches`] without steering, each batch's captured rows folded into
    /// the backend's statistics accumulators `acc` ([`Backend::end_pass_stats`]) where they are,
    /// never copied out: `on_batch` gets the range of sequences done, the accumulators and
    /// where the batch's first NaN or Inf was, if any (its row counts the batch's sequences
    /// for last/mean, its tokens for all).
    pub fn stats_batches(
        &self,
        seqs: &[Vec<u32>],
        spec: &CaptureSpec,
        batch_tokens: usize,
        acc: &mut B::Stats,
        mut on_batch: impl FnMut(std::ops::Range<usize>, &B::Stats, Option<NonFinite>) -> Result<()>,
    ) -> Result<()> {
        let width = self.capture_width(spec)?;
        let none = vec![None; seqs.len()];
        self.capture_batches(seqs, spec, &none, batch_tokens, |range, _, pass, kv| {
            // The pass needs the spec only: its rows stay on the device.
            let mut nothing = Captured::new(0, spec.points.len(), width, Vec::new());
            let mut bad = None;
            let pass = Pass { capture: Some(CaptureSink { spec, out: &mut nothing, seq_row: Vec::new() }), ..pass };
            self.backend.on_workers(|| {
                self.forward_ending(kv, pass, |be, state, _| {
                    bad = be.end_pass_stats(state, acc)?;
                    Ok(())
                })
            })?;
            on_batch(range, acc, bad)
        })
    }

    /// The batching of [`Engine::extract_batches`]: checks the inputs, then for each batch of
    /// about `batch_tokens` tokens calls `run` with its range of sequences, their lengths, a
    /// prompt pass without capture, and a KV arena for it.
    fn capture_batches(
        &self,
        seqs: &[Vec<u32>],
        spec: &CaptureSpec,
        steering: &[Option<Arc<Steering>>],
        batch_tokens: usize,
        mut run: impl FnMut(std::ops::Range<usize>, &[usize], Pass, &mut B::Kv) -> Result<()>,
    ) -> Result<()> {
        spec.validate(self.num_layers())?;
        self.capture_width(spec)?;
        if steering.len() != seqs.len() {
            return Err(Error::input(format!("{} steering entries for {} sequences", steering.len(), seqs.len())));
        }
        for s in steering.iter().flatten() {
            self.check_steering(s)?;
        }
        for (i, ids) in seqs.iter().enumerate() {
            self.check_tokens(ids, &format!("sequence {}", i + 1))?;
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        for range in batch_ranges(&lens, batch_tokens) {
            crate::interrupt::check()?;
            let (start, end) = (range.start, range.end);
            let tokens: usize = lens[range].iter().sum();
            let batch = &seqs[start..end];
            let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
            let plan = BatchPlan::fresh(&lens);
            let ids: Vec<u32> = batch.iter().flatten().copied().collect();
            let mut kv = self.backend.kv(1, tokens, self.kv_dim())?;
            let pass = Pass { ids: &ids, plan: &plan, phase: Phase::Prompt, steering: &steering[start..end], capture: None, logits_rows: &[] };
            run(start..end, &lens, pass, &mut kv)?;
        }
        Ok(())
    }

    /// Logits at the last position of each sequence (one packed pass, no cache kept).
    pub fn last_logits(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        for (i, ids) in seqs.iter().enumerate() {
            self.check_tokens(ids, &format!("sequence {}", i + 1))?;
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let plan = BatchPlan::fresh(&lens);
        let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
        let mut kv = self.backend.kv(1, plan.rows(), self.kv_dim())?;
        let none = vec![None; seqs.len()];
        let logits = self.forward(
            &mut kv,
            Pass { ids: &ids, plan: &plan, phase: Phase::Prompt, steering: &none, capture: None, logits_rows: &plan.last_rows() },
        )?;
        Ok(logits.chunks(self.model.config.vocab_size).map(<[f32]>::to_vec).collect())
    }
}
