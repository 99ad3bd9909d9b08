//! Continuous batching: the one scheduler behind `resid generate`, the server and Python.
//!
//! Every step packs, into one forward pass, the decode step of every running sequence, then
//! prefill chunks of admitted prompts, then whole sequences of capture (hidden-state) jobs, up
//! to `max_batch_tokens` rows. Requests are admitted first come, first served while their KV
//! slots fit in the arena (`kv_slots`) and fewer than `max_running` sequences run. A sequence's
//! tokens and probe values do not depend on what shares its passes: the CPU backend computes
//! each row independently of the others (batch invariance), chunked prefill attends over the
//! same cached keys, and each sequence samples from a random stream of its own.
pub mod text;

use crate::backend::cpu::residual::mean_of_rows;
use crate::backend::{Backend, KV_SLOT_ALIGN};
use crate::engine::capture::{CapturePoint, CapturePosition, CaptureSink, CaptureSpec, Captured};
use crate::engine::generate::{FinishReason, GenerateOptions, Generation};
use crate::engine::plan::BatchPlan;
use crate::engine::sample::{SampleParams, Sampler, Sampling};
use crate::engine::steer::{SteerPositions, Steering};
use crate::engine::{Engine, Pass, Phase};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Limits of one scheduler.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Rows (tokens) of one forward pass: decode rows, prefill chunks and capture sequences.
    pub max_batch_tokens: usize,
    /// Sequences generating at once.
    pub max_running: usize,
    /// KV-cache slots (tokens) of the arena all running sequences share.
    pub kv_slots: usize,
    /// Stop with [`Error::Interrupted`] when the process was asked to (the command line and
    /// Python); a server drains instead.
    pub check_interrupt: bool,
    /// Keep each finished sequence's keys and values in its arena slots until the slots are
    /// needed, and start a prompt that begins with its tokens (under the same steering) from
    /// them instead of computing them again (see [`CachedPrefix`]).
    pub prefix_cache: bool,
}

impl SchedConfig {
    /// KV slots that fit in `mib` MiB for this engine (keys and values of every layer).
    pub fn kv_slots_for_budget<B: Backend>(engine: &Engine<B>, mib: usize) -> usize {
        let per_slot = engine.num_layers() * 2 * engine.kv_dim() * engine.backend.kv_value_bytes();
        (mib.saturating_mul(1 << 20)) / per_slot.max(1)
    }
}

/// A live readout: the scalar projection ⟨h, v⟩ / ‖v‖ of the residual stream at hidden-state
/// index `layer` (after steering there) on `direction`, for every generated token.
#[derive(Debug, Clone)]
pub struct Probe {
    pub layer: usize,
    pub direction: Arc<Vec<f32>>,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// The sampler's stream: choice i of a request (prompt i of `resid generate`) draws from
    /// stream i of the seed.
    pub stream: usize,
    /// Generation stops after any of these (included in the tokens).
    pub stop_tokens: Vec<u32>,
    pub steering: Option<Arc<Steering>>,
    pub probes: Vec<Probe>,
    /// Log-probabilities of each chosen token and of this many most likely alternatives.
    pub logprobs: Option<usize>,
    pub deadline: Option<Instant>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// log softmax of the raw logits (no temperature), when asked for.
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
    /// One value per probe of the request, in its order.
    pub probes: Vec<f32>,
}

#[derive(Debug)]
pub enum GenEvent {
    Token(TokenOut),
    Finished(FinishReason),
    /// The request's deadline passed; what was generated was already sent.
    Expired,
    Failed(Error),
}

/// Where a generating sequence's events go. `event` returns false when nobody listens any
/// more (the client went away): the sequence is then dropped and its slots freed.
pub trait GenListener: Send {
    fn event(&mut self, event: GenEvent) -> bool;
    /// Whether the listener is gone, asked every step while the request waits or prefills.
    fn gone(&self) -> bool {
        false
    }
    /// The request left the queue and started (a server counts its queue by this), with
    /// `cached_tokens` of its prompt taken from the prefix cache.
    fn admitted(&mut self, _cached_tokens: usize) {}
}

/// Hidden states of several sequences, captured in the scheduler's passes.
#[derive(Debug, Clone)]
pub struct CaptureRequest {
    pub seqs: Vec<Vec<u32>>,
    pub spec: CaptureSpec,
    pub steering: Option<Arc<Steering>>,
    pub deadline: Option<Instant>,
}

pub trait CaptureListener: Send {
    fn done(&mut self, result: std::result::Result<Captured, CaptureFailure>);
    fn gone(&self) -> bool {
        false
    }
    fn admitted(&mut self) {}
}

#[derive(Debug)]
pub enum CaptureFailure {
    Expired,
    Failed(Error),
}

/// What one step did, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    pub rows: usize,
    pub decode_rows: usize,
    pub prefill_rows: usize,
    pub capture_rows: usize,
    /// Prompt tokens that admitted requests took from the prefix cache instead of prefilling.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// First-fit allocator of contiguous KV-slot ranges.
#[derive(Debug, Clone)]
struct SlotArena {
    /// Free ranges (start, len), sorted by start, never adjacent.
    free: Vec<(usize, usize)>,
}

impl SlotArena {
    fn new(slots: usize) -> Self {
        SlotArena { free: if slots > 0 { vec![(0, slots)] } else { Vec::new() } }
    }

    /// `len` slots: at the first free place that starts at a multiple of [`KV_SLOT_ALIGN`] (the
    /// fewer than that many slots skipped before it stay free), or, where none is left, at the
    /// first that fits. Aligned, a batched decode step's attention skips shifting the keys:
    /// SmolLM2-135M's attention at 32 sequences took 230–239 µs a layer against 250–284, and
    /// `resid serve` gave 1–3 % more tokens/s at 4–64 clients (Intel Xeon, NOTES.md
    /// 2026-12-06 23:09).
    fn alloc(&mut self, len: usize) -> Option<usize> {
        let skip = |start: usize| start.next_multiple_of(KV_SLOT_ALIGN) - start;
        let aligned = self.free.iter().enumerate().find_map(|(i, &(s, l))| (len > 0 && skip(s) + len <= l).then_some((i, skip(s))));
        let (i, skipped) = aligned.or_else(|| self.free.iter().position(|&(_, l)| l >= len).map(|i| (i, 0)))?;
        let (start, l) = self.free[i];
        let at = start + skipped;
        // What is left of the range on either side stays free (never adjacent: the new
        // `at..at + len` parts them).
        let left = [(start, skipped), (at + len, l - skipped - len)];
        self.free.splice(i..=i, left.into_iter().filter(|&(_, n)| n > 0));
        Some(at)
    }

    /// Free slots from `start` on without a gap (0 where `start` is taken).
    fn free_from(&self, start: usize) -> usize {
        self.free.iter().find(|&&(s, l)| s <= start && start < s + l).map_or(0, |&(s, l)| s + l - start)
    }

    /// `len` slots at `start`, if they are free.
    fn alloc_at(&mut self, start: usize, len: usize) -> Option<usize> {
        let i = self.free.iter().position(|&(s, l)| s <= start && start + len <= s + l)?;
        let (s, l) = self.free[i];
        let left = [(s, start - s), (start + len, s + l - start - len)];
        self.free.splice(i..=i, left.into_iter().filter(|&(_, n)| n > 0));
        Some(start)
    }

    fn release(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        // Merge with the next range, then with the previous one.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// A finished sequence's keys and values, left in its arena range for a later prompt that
/// begins with the same tokens. The prompt then prefills only the rest: in f32 on the CPU that
/// gives every row the bits a whole prefill gives it, since a row's keys and values do not
/// depend on how its sequence was split into passes (`tests/engine.rs`).
struct CachedPrefix {
    kv_start: usize,
    capacity: usize,
    /// The tokens whose keys and values the range holds, from position 0.
    tokens: Vec<u32>,
    /// How many of them were the prompt: steering limited to prompt or generated positions
    /// steered the others as generated tokens.
    prompt_len: usize,
    steering: Option<Arc<Steering>>,
    /// The scheduler's clock when it was cached or last copied from: the least recently used
    /// is evicted first.
    used: u64,
}

impl CachedPrefix {
    /// How many leading tokens of `req`'s prompt this holds, leaving at least two rows to
    /// prefill: the last one's logits are needed, and a prompt is never cut into a one-row
    /// piece (see [`Scheduler::step`]).
    fn reusable_for(&self, req: &GenRequest) -> usize {
        if !same_steering(&self.steering, &req.steering) {
            return 0;
        }
        let held = match &req.steering {
            Some(s) if s.positions != SteerPositions::All => self.prompt_len,
            _ => self.tokens.len(),
        };
        let common = self.tokens[..held].iter().zip(&req.prompt).take_while(|(a, b)| a == b).count();
        common.min(req.prompt.len().saturating_sub(2))
    }
}

/// Whether keys and values computed under one steering serve the other.
fn same_steering(a: &Option<Arc<Steering>>, b: &Option<Arc<Steering>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.same_as(b),
        _ => false,
    }
}

struct GenSeq {
    req: GenRequest,
    listener: Box<dyn GenListener>,
    sampler: Sampler,
    kv_start: usize,
    capacity: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    tokens: Vec<u32>,
}

struct CaptureJob {
    req: CaptureRequest,
    listener: Box<dyn CaptureListener>,
    out: Captured,
    /// Sequences captured so far (they run in order).
    next: usize,
}

enum Waiting {
    Gen(Box<GenRequest>, Box<dyn GenListener>),
    Capture(CaptureJob),
}

/// A sampled token, its log-probability and the top alternatives' (when asked for).
type Picked = (u32, Option<f32>, Vec<(u32, f32)>);

/// A running sequence's sampler and its request's `logprobs`, lent to one row's pick.
type RowSampler<'a> = (&'a mut Sampler, Option<usize>);

/// One sequence's part of a pass.
enum Entry {
    /// Running sequence `i`: `rows` new tokens from `ids`.
    Gen { i: usize, rows: usize, logits: bool },
    /// Sequence `seq` of capture job `job`, whole, at arena slot `kv_start`.
    Capture { job: usize, seq: usize, kv_start: usize },
}

pub struct Scheduler<'e, B: Backend> {
    engine: &'e Engine<B>,
    cfg: SchedConfig,
    kv: B::Kv,
    arena: SlotArena,
    waiting: VecDeque<Waiting>,
    running: Vec<GenSeq>,
    captures: Vec<CaptureJob>,
    prefixes: Vec<CachedPrefix>,
    /// Counts admissions and retirements, for [`CachedPrefix::used`].
    clock: u64,
}

impl<'e, B: Backend> Scheduler<'e, B> {
    pub fn new(engine: &'e Engine<B>, cfg: SchedConfig) -> Result<Self> {
        // Two rows at least: a prompt is never cut into one-row pieces (see `step`).
        if cfg.max_batch_tokens < 2 || cfg.max_running == 0 {
            return Err(Error::input("the scheduler needs max_batch_tokens of at least 2 (--max-batch-tokens) and max_running of at least 1"));
        }
        let kv = engine.backend.kv(engine.num_layers(), cfg.kv_slots.max(1), engine.kv_dim())?;
        Ok(Scheduler {
            engine,
            arena: SlotArena::new(cfg.kv_slots),
            cfg,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            captures: Vec::new(),
            prefixes: Vec::new(),
            clock: 0,
        })
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    /// Requests waiting for admission.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Finished sequences whose keys and values the prefix cache holds, and their tokens.
    pub fn cached_prefixes(&self) -> (usize, usize) {
        (self.prefixes.len(), self.prefixes.iter().map(|p| p.tokens.len()).sum())
    }

    /// Sequences generating, and capture jobs under way.
    pub fn running(&self) -> usize {
        self.running.len() + self.captures.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.captures.is_empty()
    }

    /// KV slots a generation request holds while it runs.
    pub fn slots_needed(&self, prompt_len: usize, max_new_tokens: usize) -> usize {
        prompt_len.saturating_add(max_new_tokens).min(self.engine.model.config.max_position_embeddings)
    }

    /// Checks a generation request and queues it. A refusal names what is wrong, goes to the
    /// listener too (as [`GenEvent::Failed`]), and queues nothing.
    pub fn submit(&mut self, req: GenRequest, mut listener: Box<dyn GenListener>) -> Result<()> {
        if let Err(e) = self.check(&req) {
            listener.event(GenEvent::Failed(e.replicate()));
            return Err(e);
        }
        self.waiting.push_back(Waiting::Gen(Box::new(req), listener));
        Ok(())
    }

    /// Checks a capture request and queues it; a refusal goes to the listener too.
    pub fn submit_capture(&mut self, req: CaptureRequest, mut listener: Box<dyn CaptureListener>) -> Result<()> {
        if let Err(e) = self.check_capture(&req) {
            listener.done(Err(CaptureFailure::Failed(e.replicate())));
            return Err(e);
        }
        let lens: Vec<usize> = req.seqs.iter().map(Vec::len).collect();
        let out = Captured::for_lengths(&lens, req.spec.points.len(), self.engine.hidden_size(), req.spec.position);
        self.waiting.push_back(Waiting::Capture(CaptureJob { req, listener, out, next: 0 }));
        Ok(())
    }

    /// What [`Scheduler::submit_capture`] checks.
    pub fn check_capture(&self, req: &CaptureRequest) -> Result<()> {
        let e = self.engine;
        req.spec.validate(e.num_layers())?;
        // Requests share passes, whose captures hold one width: the hidden size.
        if e.capture_width(&req.spec)? != e.hidden_size() {
            return Err(Error::input(format!(
                "hook_z alone is {} wide here, not the hidden size {}: capture it together with another point, or with `resid extract`",
                e.capture_width(&req.spec)?,
                e.hidden_size()
            )));
        }
        if req.seqs.is_empty() {
            return Err(Error::input("no sequences to capture"));
        }
        if let Some(s) = &req.steering {
            e.check_steering(s)?;
        }
        for (i, ids) in req.seqs.iter().enumerate() {
            e.check_tokens(ids, &format!("input {}", i + 1))?;
            if ids.len() > self.cfg.kv_slots {
                return Err(Error::input(format!(
                    "input {}: {} tokens exceed the server's KV budget of {} tokens",
                    i + 1,
                    ids.len(),
                    self.cfg.kv_slots
                )));
            }
        }
        Ok(())
    }

    /// What [`Scheduler::submit`] checks: tokens, steering, probes, and that the request's KV
    /// slots fit in the arena at all.
    pub fn check(&self, req: &GenRequest) -> Result<()> {
        let e = self.engine;
        e.check_tokens(&req.prompt, "prompt")?;
        if let Some(s) = &req.steering {
            e.check_steering(s)?;
        }
        for p in &req.probes {
            if p.layer > e.num_layers() {
                return Err(Error::input(format!(
                    "probe layer {} is out of range: this model has hidden-state indices 0..={}",
                    p.layer,
                    e.num_layers()
                )));
            }
            if p.direction.len() != e.hidden_size() {
                return Err(Error::input(format!("probe vector has {} values, the model's hidden size is {}", p.direction.len(), e.hidden_size())));
            }
        }
        if let Some(n) = req.logprobs {
            if n > e.model.config.vocab_size {
                return Err(Error::input(format!("{n} top log-probabilities exceed the vocabulary of {}", e.model.config.vocab_size)));
            }
        }
        let need = self.slots_needed(req.prompt.len(), req.max_new_tokens);
        if need > self.cfg.kv_slots {
            return Err(Error::input(format!(
                "the prompt ({} tokens) and max_tokens ({}) need {need} KV slots; the KV budget holds {}",
                req.prompt.len(),
                req.max_new_tokens,
                self.cfg.kv_slots
            )));
        }
        Ok(())
    }

    /// Drops expired and abandoned requests, then admits waiting ones while they fit. Returns
    /// the prompt tokens that admitted requests took from the prefix cache.
    fn admit(&mut self) -> usize {
        let now = Instant::now();
        let expired = |d: Option<Instant>| d.is_some_and(|d| now >= d);
        // Waiting requests that expired or whose client left.
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            match w {
                Waiting::Gen(req, mut l) => {
                    if l.gone() {
                        continue;
                    }
                    if expired(req.deadline) {
                        l.event(GenEvent::Expired);
                        continue;
                    }
                    kept.push_back(Waiting::Gen(req, l));
                }
                Waiting::Capture(mut job) => {
                    if job.listener.gone() {
                        continue;
                    }
                    if expired(job.req.deadline) {
                        job.listener.done(Err(CaptureFailure::Expired));
                        continue;
                    }
                    kept.push_back(Waiting::Capture(job));
                }
            }
        }
        self.waiting = kept;
        // Running sequences that expired or were abandoned free their slots now.
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let drop = if s.listener.gone() {
                true
            } else if expired(s.req.deadline) {
                s.listener.event(GenEvent::Expired);
                true
            } else {
                false
            };
            if drop {
                let s = self.running.swap_remove(i);
                self.arena.release(s.kv_start, s.capacity);
            } else {
                i += 1;
            }
        }
        self.captures.retain_mut(|job| {
            if job.listener.gone() {
                return false;
            }
            if expired(job.req.deadline) {
                job.listener.done(Err(CaptureFailure::Expired));
                return false;
            }
            true
        });
        // First come, first served: a request that does not fit holds back those behind it.
        let mut cached_tokens = 0;
        while let Some(front) = self.waiting.front() {
            match front {
                Waiting::Gen(req, _) if req.max_new_tokens == 0 => {
                    // Nothing to generate: done without a pass.
                    if let Some(Waiting::Gen(_, mut listener)) = self.waiting.pop_front() {
                        listener.admitted(0);
                        listener.event(GenEvent::Finished(FinishReason::Length));
                    }
                }
                Waiting::Gen(..) => {
                    if self.running.len() >= self.cfg.max_running {
                        break;
                    }
                    let Some(Waiting::Gen(req, mut listener)) = self.waiting.pop_front() else { break };
                    let capacity = self.slots_needed(req.prompt.len(), req.max_new_tokens);
                    let Some((kv_start, cached)) = self.place(&req, capacity) else {
                        self.waiting.push_front(Waiting::Gen(req, listener));
                        break;
                    };
                    listener.admitted(cached);
                    cached_tokens += cached;
                    let sampler = Sampler::new(req.sampling, req.stream);
                    self.running.push(GenSeq { req: *req, listener, sampler, kv_start, capacity, prefilled: cached, tokens: Vec::new() });
                }
                Waiting::Capture(_) => {
                    let Some(Waiting::Capture(mut job)) = self.waiting.pop_front() else { break };
                    job.listener.admitted();
                    self.captures.push(job);
                }
            }
        }
        cached_tokens
    }

    /// Slots for a generation request of `capacity` slots, and how many of its prompt's tokens
    /// are already in them: those of the cached prefix that holds the most of the prompt. The
    /// prefix is copied into a free range and stays cached. Where no range is free, the request
    /// takes the prefix's own slots over (extended into free slots behind it); where that does
    /// not fit either, the least recently used prefixes are evicted (this one last) to make room.
    fn place(&mut self, req: &GenRequest, capacity: usize) -> Option<(usize, usize)> {
        let best = self
            .prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| (p.reusable_for(req), i))
            .filter(|&(n, _)| n > 0)
            .max_by_key(|&(n, i)| (n, std::cmp::Reverse(i)));
        let Some((reused, i)) = best else { return alloc_evicting(&mut self.arena, &mut self.prefixes, capacity).map(|at| (at, 0)) };
        self.clock += 1;
        self.prefixes[i].used = self.clock;
        let from = self.prefixes[i].kv_start;
        let at = match self.arena.alloc(capacity) {
            Some(at) => at,
            None => {
                let held = self.prefixes[i].capacity;
                if self.arena.free_from(from + held) >= capacity.saturating_sub(held) {
                    self.prefixes.swap_remove(i);
                    self.arena.release(from, held);
                    return self.arena.alloc_at(from, capacity).map(|at| (at, reused));
                }
                let at = alloc_evicting(&mut self.arena, &mut self.prefixes, capacity)?;
                if !self.prefixes.iter().any(|p| p.kv_start == from) {
                    // Evicted too: its slots may be the new range's.
                    return Some((at, 0));
                }
                at
            }
        };
        // A failed copy only costs the prefill.
        let copied = self.engine.backend.kv_copy(&mut self.kv, self.engine.heads(), from, at, reused).is_ok();
        Some((at, if copied { reused } else { 0 }))
    }

    /// Keeps a finished sequence's keys and values for later prompts, or frees its slots.
    fn finish_slots(&mut self, s: GenSeq) {
        // The cache holds the prompt, and every generated token but the last (never fed back).
        let whole_prompt = s.prefilled == s.req.prompt.len();
        let mut tokens = s.req.prompt;
        tokens.truncate(s.prefilled);
        if whole_prompt {
            tokens.extend(s.tokens.iter().take(s.tokens.len().saturating_sub(1)));
        }
        if !self.cfg.prefix_cache || tokens.len() < 2 {
            self.arena.release(s.kv_start, s.capacity);
            return;
        }
        self.clock += 1;
        let prefix = CachedPrefix { kv_start: s.kv_start, capacity: s.capacity, prompt_len: s.prefilled, tokens, steering: s.req.steering, used: self.clock };
        // Older prefixes that this one extends are no longer needed.
        let mut i = 0;
        while i < self.prefixes.len() {
            let p = &self.prefixes[i];
            if same_steering(&p.steering, &prefix.steering) && p.prompt_len <= prefix.prompt_len && prefix.tokens.starts_with(&p.tokens) {
                let p = self.prefixes.swap_remove(i);
                self.arena.release(p.kv_start, p.capacity);
            } else {
                i += 1;
            }
        }
        self.prefixes.push(prefix);
    }

    /// Runs one forward pass over whatever is ready. Returns None when there was nothing to do.
    pub fn step(&mut self) -> Result<Option<StepReport>> {
        if self.cfg.check_interrupt {
            crate::interrupt::check()?;
        }
        let cached_tokens = self.admit();
        let started = Instant::now();
        let budget = self.cfg.max_batch_tokens;
        let mut entries = Vec::new();
        let mut report = StepReport { cached_tokens, ..StepReport::default() };
        // Decode rows first: every running sequence past its prompt advances each step.
        for (i, s) in self.running.iter().enumerate() {
            if s.prefilled == s.req.prompt.len() {
                entries.push(Entry::Gen { i, rows: 1, logits: true });
                report.decode_rows += 1;
            }
        }
        let mut rows = report.decode_rows;
        for (i, s) in self.running.iter().enumerate() {
            let left = s.req.prompt.len() - s.prefilled;
            if left == 0 || rows >= budget {
                continue;
            }
            let mut take = left.min(budget - rows);
            // A span of one row is attended as a decode step (one key at a time), which rounds
            // differently from a prefill span: a prompt longer than one token is never cut into
            // a piece of one row, so that chunking cannot change its results.
            if take < left && left - take == 1 {
                take -= 1;
            }
            if take == 0 || (take == 1 && left > 1) {
                continue;
            }
            entries.push(Entry::Gen { i, rows: take, logits: take == left });
            rows += take;
            report.prefill_rows += take;
        }
        // Capture sequences run whole; one that is larger than the budget runs beside the
        // decode rows alone.
        let mut capture_slots = Vec::new();
        'jobs: for (j, job) in self.captures.iter().enumerate() {
            let mut seq = job.next;
            while seq < job.req.seqs.len() {
                let len = job.req.seqs[seq].len();
                let alone = report.prefill_rows + report.capture_rows == 0;
                if rows + len > budget && !alone {
                    break 'jobs;
                }
                let Some(kv_start) = alloc_evicting(&mut self.arena, &mut self.prefixes, len) else { break 'jobs };
                capture_slots.push((kv_start, len));
                entries.push(Entry::Capture { job: j, seq, kv_start });
                rows += len;
                report.capture_rows += len;
                seq += 1;
            }
        }
        if entries.is_empty() {
            return Ok(None);
        }
        report.rows = rows;
        let result = self.run_pass(&entries);
        for (start, len) in capture_slots {
            self.arena.release(start, len);
        }
        match result {
            Ok(generated) => report.generated_tokens = generated,
            Err(e) => self.fail_pass(&entries, e),
        }
        self.retire();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(Some(report))
    }

    /// Steps until every request is done.
    pub fn run_until_idle(&mut self) -> Result<()> {
        while !self.is_idle() {
            if self.step()?.is_none() && !self.is_idle() {
                // Nothing could run: a waiting request that can never be admitted.
                return Err(stuck());
            }
        }
        Ok(())
    }

    fn run_pass(&mut self, entries: &[Entry]) -> Result<usize> {
        let e = self.engine;
        let hidden = e.hidden_size();
        let mut lens = Vec::with_capacity(entries.len());
        let mut past = Vec::with_capacity(entries.len());
        let mut kv_starts = Vec::with_capacity(entries.len());
        let mut ids: Vec<u32> = Vec::new();
        let mut generated = Vec::with_capacity(entries.len());
        let mut steering = Vec::with_capacity(entries.len());
        let mut points: Vec<CapturePoint> = Vec::new();
        let mut position = CapturePosition::Last;
        let add_point = |p: CapturePoint, points: &mut Vec<CapturePoint>| {
            if !points.contains(&p) {
                points.push(p);
            }
        };
        for entry in entries {
            match *entry {
                Entry::Gen { i, rows, logits } => {
                    let s = &self.running[i];
                    let decoding = s.prefilled == s.req.prompt.len();
                    if decoding {
                        ids.push(*s.tokens.last().ok_or_else(|| Error::input("decode step without a token"))?);
                        past.push(s.req.prompt.len() + s.tokens.len() - 1);
                    } else {
                        ids.extend_from_slice(&s.req.prompt[s.prefilled..s.prefilled + rows]);
                        past.push(s.prefilled);
                    }
                    lens.push(rows);
                    kv_starts.push(s.kv_start);
                    generated.push(decoding);
                    steering.push(s.req.steering.clone());
                    if logits {
                        for p in &s.req.probes {
                            add_point(CapturePoint::Hidden(p.layer), &mut points);
                        }
                    }
                }
                Entry::Capture { job, seq, kv_start } => {
                    let j = &self.captures[job];
                    let toks = &j.req.seqs[seq];
                    ids.extend_from_slice(toks);
                    lens.push(toks.len());
                    past.push(0);
                    kv_starts.push(kv_start);
                    generated.push(false);
                    steering.push(j.req.steering.clone());
                    for &p in &j.req.spec.points {
                        add_point(p, &mut points);
                    }
                    if j.req.spec.position != CapturePosition::Last {
                        position = CapturePosition::All;
                    }
                }
            }
        }
        let plan = BatchPlan::new(&lens, &past, &kv_starts);
        let logits_rows: Vec<usize> = entries
            .iter()
            .zip(&plan.seqs)
            .filter(|(en, _)| matches!(en, Entry::Gen { logits: true, .. }))
            .map(|(_, span)| span.start + span.len - 1)
            .collect();
        let spec = CaptureSpec { points, position };
        let mut captured = Captured::for_lengths(&lens, spec.points.len(), hidden, position);
        let capture = if spec.points.is_empty() {
            None
        } else {
            let seq_row = match position {
                CapturePosition::All => captured.offsets[..lens.len()].to_vec(),
                _ => (0..lens.len()).collect(),
            };
            Some(CaptureSink { spec: &spec, out: &mut captured, seq_row })
        };
        let pass = Pass { ids: &ids, plan: &plan, phase: Phase::PerSequence(&generated), steering: &steering, capture, logits_rows: &logits_rows };

        // Sampled where the logits are, unless a row needs them on the host (log-probabilities,
        // top-k): then every row samples on the host, with the same draws.
        let gen_rows: Vec<usize> = entries
            .iter()
            .filter_map(|en| match *en {
                Entry::Gen { i, logits: true, .. } => Some(i),
                _ => None,
            })
            .collect();
        let host = gen_rows.iter().any(|&i| self.running[i].req.logprobs.is_some() || self.running[i].sampler.needs_host());
        let vocab = e.model.config.vocab_size;
        let mut picked: Vec<Picked> = Vec::with_capacity(gen_rows.len());
        if host {
            let logits = e.forward(&mut self.kv, pass)?;
            // Rows in parallel, each with its own sequence's sampler: a row's log-probabilities
            // take ~0.28 ms (its top-k pick ~0.07), so 16 rows one after another took a tenth of
            // a decode step.
            let mut samplers: Vec<Option<RowSampler>> = self.running.iter_mut().map(|s| Some((&mut s.sampler, s.req.logprobs))).collect();
            // (`gen_rows` names each running sequence at most once.)
            let rows: Vec<(&[f32], RowSampler)> =
                logits.chunks(vocab).zip(&gen_rows).filter_map(|(row, &i)| Some((row, samplers.get_mut(i)?.take()?))).collect();
            picked = rows
                .into_par_iter()
                .map(|(row, (sampler, logprobs))| {
                    let id = sampler.next(row);
                    let (lp, top) = match logprobs {
                        Some(n) => {
                            let (lp, top) = log_probabilities(row, id, n);
                            (Some(lp), top)
                        }
                        None => (None, Vec::new()),
                    };
                    (id, lp, top)
                })
                .collect();
        } else if gen_rows.is_empty() {
            e.forward(&mut self.kv, pass)?;
        } else {
            let params: Vec<SampleParams> =
                gen_rows.iter().map(|&i| self.running[i].sampler.device_params().unwrap_or(SampleParams::GREEDY)).collect();
            let ids = e.forward_sample(&mut self.kv, pass, &params)?;
            picked.extend(ids.into_iter().map(|id| (id, None, Vec::new())));
        }

        // Hand out tokens, probe readouts and captured rows.
        let mut picked = picked.into_iter();
        let mut generated_tokens = 0;
        for (k, entry) in entries.iter().enumerate() {
            let span = plan.seqs[k];
            match *entry {
                Entry::Gen { i, rows, logits } => {
                    let s = &mut self.running[i];
                    if s.prefilled < s.req.prompt.len() {
                        s.prefilled += rows;
                    }
                    if !logits {
                        continue;
                    }
                    let Some((id, logprob, top_logprobs)) = picked.next() else { break };
                    let last_row = if position == CapturePosition::All { span.start + span.len - 1 } else { k };
                    let probes = s
                        .req
                        .probes
                        .iter()
                        .map(|p| spec.slot(CapturePoint::Hidden(p.layer)).map_or(f32::NAN, |slot| projection(captured.row(last_row, slot), &p.direction)))
                        .collect();
                    s.tokens.push(id);
                    generated_tokens += 1;
                    let alive = s.listener.event(GenEvent::Token(TokenOut { id, logprob, top_logprobs, probes }));
                    if !alive {
                        // Retired below without a further event.
                        s.req.max_new_tokens = 0;
                        s.listener = Box::new(Gone);
                    }
                }
                Entry::Capture { job, seq, .. } => {
                    let j = &mut self.captures[job];
                    copy_captured(&captured, &spec, &span, k, &mut j.out, &j.req.spec, seq);
                    j.next = seq + 1;
                }
            }
        }
        Ok(generated_tokens)
    }

    /// Finishes sequences that stopped, ran out of tokens or slots, and complete capture jobs.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let finish = match s.tokens.last() {
                _ if s.req.max_new_tokens == 0 => Some(FinishReason::Length),
                Some(t) if s.req.stop_tokens.contains(t) => Some(FinishReason::Stop),
                Some(_) if s.tokens.len() >= s.req.max_new_tokens => Some(FinishReason::Length),
                // The newest token is fed at the next step: it needs a slot.
                Some(_) if s.req.prompt.len() + s.tokens.len() > s.capacity => Some(FinishReason::Length),
                _ => None,
            };
            if let Some(reason) = finish {
                let mut s = self.running.swap_remove(i);
                s.listener.event(GenEvent::Finished(reason));
                self.finish_slots(s);
            } else {
                i += 1;
            }
        }
        let mut j = 0;
        while j < self.captures.len() {
            if self.captures[j].next == self.captures[j].req.seqs.len() {
                let mut job = self.captures.remove(j);
                let out = std::mem::replace(&mut job.out, Captured::new(0, 0, 0, Vec::new()));
                job.listener.done(Ok(out));
            } else {
                j += 1;
            }
        }
    }

    /// A failed pass fails every request in it; the others go on.
    fn fail_pass(&mut self, entries: &[Entry], e: Error) {
        let mut gens: Vec<usize> = Vec::new();
        let mut jobs: Vec<usize> = Vec::new();
        for entry in entries {
            match *entry {
                Entry::Gen { i, .. } => gens.push(i),
                Entry::Capture { job, .. } => jobs.push(job),
            }
        }
        gens.sort_unstable();
        gens.dedup();
        jobs.sort_unstable();
        jobs.dedup();
        for &i in gens.iter().rev() {
            let mut s = self.running.swap_remove(i);
            s.listener.event(GenEvent::Failed(e.replicate()));
            self.arena.release(s.kv_start, s.capacity);
        }
        for &j in jobs.iter().rev() {
            let mut job = self.captures.remove(j);
            job.listener.done(Err(CaptureFailure::Failed(e.replicate())));
        }
    }
}

/// `len` slots from the arena, evicting the least recently used cached prefixes until they fit.
/// Nothing is evicted where even evicting every prefix would not make room: the request waits
/// for running sequences to finish, and the cache stays whole.
fn alloc_evicting(arena: &mut SlotArena, prefixes: &mut Vec<CachedPrefix>, len: usize) -> Option<usize> {
    if let Some(at) = arena.alloc(len) {
        return Some(at);
    }
    let mut trial = arena.clone();
    for p in prefixes.iter() {
        trial.release(p.kv_start, p.capacity);
    }
    trial.alloc(len)?;
    loop {
        let oldest = prefixes.iter().enumerate().min_by_key(|(_, p)| p.used).map(|(i, _)| i)?;
        let p = prefixes.swap_remove(oldest);
        arena.release(p.kv_start, p.capacity);
        if let Some(at) = arena.alloc(len) {
            return Some(at);
        }
    }
}

/// A step that ran nothing while requests wait: one can never be admitted.
fn stuck() -> Error {
    Error::input("the scheduler cannot admit the waiting requests (KV budget too small)")
}

/// A listener that has gone away.
struct Gone;

impl GenListener for Gone {
    fn event(&mut self, _: GenEvent) -> bool {
        false
    }
    fn gone(&self) -> bool {
        true
    }
}

/// ⟨h, v⟩ / ‖v‖ in f64 (0 for a zero vector).
pub fn projection(h: &[f32], v: &[f32]) -> f32 {
    let (mut dot, mut norm) = (0f64, 0f64);
    for (&a, &b) in h.iter().zip(v) {
        dot += a as f64 * b as f64;
        norm += b as f64 * b as f64;
    }
    if norm > 0.0 {
        (dot / norm.sqrt()) as f32
    } else {
        0.0
    }
}

/// log softmax of `row` at `chosen`, and the `top` most likely tokens (ties by id) with theirs.
pub fn log_probabilities(row: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &x) in row.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, v)| v >= x);
                best.insert(at, (id as u32, x));
                best.truncate(top);
            }
        }
    }
    (lp(row.get(chosen as usize).copied().unwrap_or(f32::NEG_INFINITY)), best.into_iter().map(|(id, x)| (id, lp(x))).collect())
}

/// Copies capture sequence `seq`'s rows out of a pass (entry `k`, rows `span`) into its job's
/// output, reducing `mean` with the capture kernel's own reduction.
fn copy_captured(
    pass: &Captured,
    pass_spec: &CaptureSpec,
    span: &crate::engine::plan::SeqSpan,
    k: usize,
    out: &mut Captured,
    spec: &CaptureSpec,
    seq: usize,
) {
    for (slot, point) in spec.points.iter().enumerate() {
        let Some(from) = pass_spec.slot(*point) else { continue };
        match (spec.position, pass_spec.position) {
            (CapturePosition::Last, CapturePosition::Last) => out.row_mut(seq, slot).copy_from_slice(pass.row(k, from)),
            (CapturePosition::Last, _) => out.row_mut(seq, slot).copy_from_slice(pass.row(span.start + span.len - 1, from)),
            (CapturePosition::Mean, _) => mean_of_rows(span.rows().map(|r| pass.row(r, from)), out.row_mut(seq, slot)),
            (CapturePosition::All, _) => {
                let first = out.offsets[seq];
                for j in 0..span.len {
                    out.row_mut(first + j, slot).copy_from_slice(pass.row(span.start + j, from));
                }
            }
        }
    }
}

/// Collects one sequence's events in memory (the command line and Python). Once cancelled it
/// refuses further events, so the scheduler drops the sequence at its next step.
#[derive(Clone, Default)]
pub struct Collect(Arc<Mutex<Collected>>, Arc<std::sync::atomic::AtomicBool>);

#[derive(Default)]
pub struct Collected {
    pub tokens: Vec<TokenOut>,
    pub finish: Option<FinishReason>,
    pub error: Option<Error>,
    /// Prompt tokens taken from the prefix cache when the request was admitted.
    pub cached_tokens: usize,
}

impl Collect {
    pub fn take(&self) -> Collected {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The ids of the tokens collected after the first `from`.
    pub fn ids_since(&self, from: usize) -> Vec<u32> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).tokens.iter().skip(from).map(|t| t.id).collect()
    }

    pub fn cancel(&self) {
        self.1.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GenListener for Collect {
    fn gone(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn admitted(&mut self, cached_tokens: usize) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).cached_tokens = cached_tokens;
    }

    fn event(&mut self, event: GenEvent) -> bool {
        if self.gone() {
            return false;
        }
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            GenEvent::Token(t) => c.tokens.push(t),
            GenEvent::Finished(f) => c.finish = Some(f),
            GenEvent::Expired => c.error = Some(Error::input("the request's deadline passed")),
            GenEvent::Failed(e) => c.error = Some(e),
        }
        true
    }
}

/// A generation with its text: stop strings end it where they appear (the tokens kept are those
/// up to the one that completed the stop string; the text ends before it).
#[derive(Debug, Clone)]
pub struct TextGeneration {
    pub tokens: Vec<u32>,
    /// None for a model without a tokenizer.
    pub text: Option<String>,
    pub finish: FinishReason,
}

impl<B: Backend> Engine<B> {
    /// Generates for several prompts as one batch, each with its own steering (or none),
    /// through the scheduler: every prompt is prefilled in the first pass, then all decode
    /// together. Prompt i samples from stream i of the seed.
    pub fn generate(&self, prompts: &[Vec<u32>], steering: &[Option<Arc<Steering>>], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        Ok(self.run_generation(prompts, steering, opts, None)?.into_iter().map(|g| Generation { tokens: g.tokens, finish: g.finish }).collect())
    }

    /// As [`Engine::generate`], with the text of each generation (stop tokens not shown) and
    /// stop strings: a sequence ends at the step its text first contains one of `stop`, as the
    /// server ends it (the same [`text::TextStream`]).
    pub fn generate_text(&self, prompts: &[Vec<u32>], steering: &[Option<Arc<Steering>>], opts: &GenerateOptions, stop: &[String]) -> Result<Vec<TextGeneration>> {
        let tok = match (self.model.tokenizer.as_ref(), stop.is_empty()) {
            (Some(t), _) => Some(t),
            (None, true) => None,
            (None, false) => return Err(Error::input("stop strings need the model's tokenizer.json")),
        };
        self.run_generation(prompts, steering, opts, tok.map(|t| (t, stop)))
    }

    fn run_generation(
        &self,
        prompts: &[Vec<u32>],
        steering: &[Option<Arc<Steering>>],
        opts: &GenerateOptions,
        text: Option<(&crate::model::tokenizer::TextTokenizer, &[String])>,
    ) -> Result<Vec<TextGeneration>> {
        if steering.len() != prompts.len() {
            return Err(Error::input(format!("{} steering entries for {} prompts", steering.len(), prompts.len())));
        }
        for (i, p) in prompts.iter().enumerate() {
            self.check_tokens(p, &format!("prompt {}", i + 1))?;
        }
        let ctx = self.model.config.max_position_embeddings;
        // Room for every sequence at an aligned start (`SlotArena::alloc`).
        let kv_slots: usize = prompts.iter().map(|p| p.len().saturating_add(opts.max_new_tokens).min(ctx) + KV_SLOT_ALIGN - 1).sum();
        let cfg = SchedConfig {
            max_batch_tokens: prompts.iter().map(Vec::len).sum::<usize>().max(prompts.len()).max(2),
            max_running: prompts.len().max(1),
            kv_slots,
            check_interrupt: true,
            // Every prompt is admitted at once: none starts after another finished.
            prefix_cache: false,
        };
        let mut sched = Scheduler::new(self, cfg)?;
        let mut outs = Vec::with_capacity(prompts.len());
        for (i, (p, s)) in prompts.iter().zip(steering).enumerate() {
            let c = Collect::default();
            let req = GenRequest {
                prompt: p.clone(),
                max_new_tokens: opts.max_new_tokens,
                sampling: opts.sampling,
                stream: i,
                stop_tokens: opts.stop_tokens.clone(),
                steering: s.clone(),
                probes: Vec::new(),
                logprobs: None,
                deadline: None,
            };
            sched.submit(req, Box::new(c.clone())).map_err(|e| e.prefixed(&format!("prompt {}", i + 1)))?;
            outs.push(c);
        }
        let mut streams: Vec<Option<text::TextStream>> =
            outs.iter().map(|_| text.map(|(_, stop)| text::TextStream::new(stop.to_vec(), opts.stop_tokens.clone()))).collect();
        // Tokens each stream has read, and the tokens kept when a stop string ended a sequence.
        let mut read = vec![0usize; outs.len()];
        let mut kept: Vec<Option<usize>> = vec![None; outs.len()];
        while !sched.is_idle() {
            if sched.step()?.is_none() && !sched.is_idle() {
                return Err(stuck());
            }
            let Some((tok, _)) = text else { continue };
            for (i, c) in outs.iter().enumerate() {
                let Some(stream) = streams[i].as_mut().filter(|s| !s.stopped()) else { continue };
                for id in c.ids_since(read[i]) {
                    read[i] += 1;
                    stream.push(tok, id)?;
                    if stream.stopped() {
                        kept[i] = Some(read[i]);
                        c.cancel();
                        break;
                    }
                }
            }
        }
        outs.iter()
            .zip(streams.iter_mut())
            .zip(kept)
            .map(|((c, stream), kept)| {
                let c = c.take();
                if let Some(e) = c.error {
                    return Err(e);
                }
                let mut tokens: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
                let mut finish = c.finish.unwrap_or(FinishReason::Length);
                if let Some(k) = kept {
                    tokens.truncate(k);
                    finish = FinishReason::Stop;
                }
                let text = match (stream.as_mut(), text) {
                    // The loop above read every token, the last step's included.
                    (Some(s), Some((tok, _))) => {
                        s.finish(tok)?;
                        Some(s.text().to_string())
                    }
                    _ => None,
                };
                Ok(TextGeneration { tokens, text, finish })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_first_fit_and_merging() {
        let mut a = SlotArena::new(10);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        assert_eq!(a.alloc(4), None);
        a.release(0, 4);
        assert_eq!(a.alloc(3), Some(0));
        a.release(4, 4);
        a.release(0, 3);
        assert_eq!(a.free, vec![(0, 10)]);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(1), None);
    }

    #[test]
    fn prefixes_are_evicted_oldest_first_and_only_where_that_makes_room() {
        let prefix = |kv_start, capacity, used| CachedPrefix { kv_start, capacity, tokens: Vec::new(), prompt_len: 0, steering: None, used };
        // A running sequence at 0..20; cached prefixes at 20..40 (older) and 40..64.
        let mut a = SlotArena::new(64);
        assert_eq!(a.alloc(20), Some(0));
        assert_eq!(a.alloc_at(20, 20), Some(20));
        assert_eq!(a.alloc_at(40, 24), Some(40));
        let mut cached = vec![prefix(40, 24, 2), prefix(20, 20, 1)];
        // 45 slots would not fit even with both evicted: both stay.
        assert_eq!(alloc_evicting(&mut a, &mut cached, 45), None);
        assert_eq!(cached.len(), 2);
        // 16 fit once the older one is gone.
        assert_eq!(alloc_evicting(&mut a, &mut cached, 16), Some(20));
        assert_eq!(cached.iter().map(|p| p.kv_start).collect::<Vec<_>>(), [40]);
        assert_eq!(alloc_evicting(&mut a, &mut cached, 20), Some(36));
        assert!(cached.is_empty());
    }

    #[test]
    fn arena_allocates_at_a_given_start_only_where_free() {
        let mut a = SlotArena::new(64);
        assert_eq!(a.alloc(20), Some(0));
        assert_eq!(a.alloc_at(10, 5), None);
        assert_eq!(a.alloc_at(30, 10), Some(30));
        assert_eq!(a.free, vec![(20, 10), (40, 24)]);
        assert_eq!(a.alloc_at(35, 10), None);
        assert_eq!(a.alloc_at(40, 24), Some(40));
        assert_eq!(a.alloc_at(40, 1), None);
        assert_eq!((a.free_from(20), a.free_from(25), a.free_from(30)), (10, 5, 0));
        a.release(0, 20);
        assert_eq!(a.alloc_at(0, 30), Some(0));
        assert_eq!(a.free, vec![]);
    }

    #[test]
    fn arena_starts_sequences_aligned_while_it_can() {
        let mut a = SlotArena::new(64);
        assert_eq!(a.alloc(5), Some(0));
        assert_eq!(a.alloc(5), Some(16));
        assert_eq!(a.alloc(20), Some(32));
        assert_eq!(a.free, vec![(5, 11), (21, 11), (52, 12)]);
        // No aligned place holds 12 more: the first that fits.
        assert_eq!(a.alloc(12), Some(52));
        assert_eq!(a.alloc(11), Some(5));
        assert_eq!(a.alloc(0), Some(21));
        for (start, len) in [(52, 12), (0, 5), (32, 20), (5, 11), (16, 5)] {
            a.release(start, len);
        }
        assert_eq!(a.free, vec![(0, 64)]);
    }

    #[test]
    fn log_probabilities_are_a_log_softmax() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = log_probabilities(&row, 2, 3);
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(log_probabilities(&row, 0, 0).1.is_empty());
    }

    #[test]
    fn projection_is_on_the_unit_vector() {
        assert!((projection(&[3.0, 4.0], &[0.0, 2.0]) - 4.0).abs() < 1e-6);
        assert_eq!(projection(&[1.0], &[0.0]), 0.0);
    }
}
