//! The small interface the one forward pass is written over. A backend owns weight storage,
//! activations, the KV arena and the per-pass index maps; the forward pass only sequences its
//! operations.
pub mod any;
pub mod cpu;
pub mod cuda;
pub mod moments;
pub mod profile;

use crate::engine::capture::{CapturePosition, CaptureSink};
use crate::engine::plan::BatchPlan;
use crate::engine::sample::{sample_rows, SampleParams};
use crate::engine::steer::PointSteering;
use crate::error::Result;
use crate::model::arch::{MlpKind, NormKind};
use crate::model::weights::{F32Data, MatrixSource};
use crate::backend::moments::PointMoments;

/// Where a sequence's first slot in a KV arena is a multiple of this, the CPU backend reads its
/// cached keys straight from their blocks of 16 slots; elsewhere it first shifts every tile of
/// 64 keys into place (a permute and a store per vector). Allocators of arena slots start
/// sequences there when they can.
pub const KV_SLOT_ALIGN: usize = 16;

/// Attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What an activation buffer holds: the residual stream (always f32) or a sub-layer's
/// input/output (f32 on the CPU, bf16 on CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    Residual,
    Hidden,
    /// LM-head output (always f32: sampling reads it).
    Logits,
}

/// The normalisation feeding a sub-layer.
pub struct Norm<'a, V> {
    pub kind: NormKind,
    pub weight: &'a V,
    /// LayerNorm bias (None for RMSNorm, or a LayerNorm without bias).
    pub bias: Option<&'a V>,
    pub eps: f32,
}

/// Capture buffers of one pass: `slots` capture points of `width` values, rows per `position`.
#[derive(Debug, Clone, Copy)]
pub struct CaptureLayout {
    pub slots: usize,
    pub position: CapturePosition,
    /// The hidden size, or heads·head_dim when only `hook_z` is captured.
    pub width: usize,
}

/// Where [`Backend::end_pass_stats`] found the first NaN or Inf: the pass's captured row (a
/// sequence for last/mean, a packed token row for all) and capture slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub row: usize,
    pub slot: usize,
}

/// [`Backend::mlp_input`] as two operations: the projection into `scratch`, then the activation.
#[allow(clippy::too_many_arguments)]
pub fn unfused_mlp_input<B: Backend + ?Sized>(
    be: &B,
    kind: MlpKind,
    x: &B::Act,
    w: &B::Matrix,
    b: Option<&B::Vector>,
    scratch: &mut B::Act,
    out: &mut B::Act,
) -> Result<()> {
    be.linear(x, w, b, scratch, false)?;
    be.mark("gate/up projection");
    be.activation(kind, scratch, out)
}

/// [`Backend::attention_input`] as two operations: the QKV projection into `scratch`, then the
/// rotary embedding and KV store.
#[allow(clippy::too_many_arguments)]
pub fn unfused_attention_input<B: Backend + ?Sized>(
    be: &B,
    pass: &B::Pass,
    x: &B::Act,
    input: AttentionInput<'_, B>,
    kv: &mut B::Kv,
    layer: usize,
    scratch: &mut B::Act,
    q: &mut B::Act,
) -> Result<()> {
    // The QKV bias is added by the rotary step.
    be.linear(x, input.qkv, None, scratch, false)?;
    be.mark("qkv projection");
    be.rope_store_kv(pass, scratch, input.bias, input.qk_norm, input.heads, kv, layer, q)
}

/// The weights and geometry of one layer's attention input.
pub struct AttentionInput<'a, B: Backend + ?Sized> {
    /// The stacked projection `[(nq + 2·nkv)·hd, hidden]`.
    pub qkv: &'a B::Matrix,
    pub bias: Option<&'a B::Vector>,
    /// Per-head RMSNorm weights for Q and K, and eps (Qwen3).
    pub qk_norm: Option<(&'a B::Vector, &'a B::Vector, f32)>,
    pub heads: Heads,
}

pub trait Backend: Send + Sync {
    /// Weight matrix in HF layout `[out_features, in_features]`.
    type Matrix: Send + Sync;
    type Vector: Send + Sync;
    /// Activations `[rows, cols]`.
    type Act: Send;
    /// Key/value arena.
    type Kv: Send;
    /// Per-pass state: the batch's index maps, rotary tables and capture buffers.
    type Pass: Send;
    /// `resid stats` accumulators kept on the device ([`Backend::stats_accumulators`]); a
    /// backend that folds on the host never makes one (`std::convert::Infallible`).
    type Stats: Send;

    fn name(&self) -> String;
    /// Runs `f` (a forward pass) where the backend's parallel operations start cheapest: the CPU
    /// runs it on a worker of its thread pool, so that each operation's tasks are pushed to a
    /// local queue instead of being injected from outside and waited for on a condition
    /// variable (a sleep and a wake-up per operation: 150 per decoded token).
    fn on_workers<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    /// The arithmetic of the matrix products (`f32` or `bf16`: bf16 inputs, f32 accumulation),
    /// recorded in every output's metadata.
    fn compute_type(&self) -> &'static str {
        "f32"
    }
    /// Why the backend computes in its type on this machine (`resid info`), if there is a choice.
    fn compute_note(&self) -> Option<String> {
        None
    }
    /// A matrix read from the checkpoint in the precision the backend keeps.
    fn matrix(&self, src: &MatrixSource) -> Result<Self::Matrix>;
    /// A layer weight, which every pass multiplies by: a backend may prepare it now (the CPU
    /// packs its panels at load time rather than in the first batch). Tables that passes only
    /// read rows of, or that some workloads never touch (embeddings, the LM head), use
    /// [`Backend::matrix`].
    fn weight_matrix(&self, src: &MatrixSource) -> Result<Self::Matrix> {
        self.matrix(src)
    }
    fn vector(&self, data: F32Data) -> Result<Self::Vector>;
    /// A zeroed activation `[rows, cols]`.
    fn act(&self, rows: usize, cols: usize, kind: ActKind) -> Result<Self::Act>;
    /// An activation `[rows, cols]` with unspecified contents, for an output that the next
    /// operation writes in full before anything reads it: a device backend then skips the
    /// zeroing, one memset per buffer per pass.
    fn scratch_act(&self, rows: usize, cols: usize, kind: ActKind) -> Result<Self::Act> {
        self.act(rows, cols, kind)
    }
    /// An activation holding `data` (`[rows, cols]`, rounded as `kind` is stored): benchmarks
    /// time kernels on real values, not zeros (which run faster on some matrix units).
    fn act_from(&self, data: &[f32], rows: usize, cols: usize, kind: ActKind) -> Result<Self::Act>;
    /// `stored_layers` may be 1 when no pass reuses the cache (extraction): layers then share it.
    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<Self::Kv>;
    /// Copies the keys and values of slots `from..from + len` to `to..to + len` in every stored
    /// layer (the ranges do not overlap), as they are stored: the scheduler's prefix cache hands
    /// a prompt the cached keys and values of a finished sequence that began with its tokens.
    fn kv_copy(&self, kv: &mut Self::Kv, heads: Heads, from: usize, to: usize, len: usize) -> Result<()>;
    /// Bytes of one cached key or value element (for KV budgets).
    fn kv_value_bytes(&self) -> usize {
        4
    }
    fn to_host(&self, a: &Self::Act) -> Result<Vec<f32>>;

    /// `steering[l]` is the plan of hidden-state index l for the whole pass (empty when nothing
    /// is steered): a device backend uploads it here, once, and `residual_step` is then handed
    /// the same point's entry.
    fn begin_pass(
        &self,
        plan: &BatchPlan,
        inv_freq: &[f32],
        capture: Option<CaptureLayout>,
        steering: &[Option<PointSteering<'_>>],
        hidden: usize,
    ) -> Result<Self::Pass>;
    /// Narrows the pass, after its last attention, to some of its rows: `rows[i]` becomes row
    /// i, `plan` describes the rows kept and `steering` is every point's plan for them (as
    /// `begin_pass` gets it). The steps after it see only those rows (the engine gathers the
    /// activations). Returns false, changing nothing, where the backend keeps every row.
    fn narrow_pass(&self, _pass: &mut Self::Pass, _plan: &BatchPlan, _rows: &[usize], _steering: &[Option<PointSteering<'_>>]) -> Result<bool> {
        Ok(false)
    }
    /// Copies the pass's captured rows into the caller's output.
    fn end_pass(&self, pass: Self::Pass, sink: Option<&mut CaptureSink>) -> Result<()>;

    // --- `resid stats` where the captured rows are (store/stats.rs).

    /// Accumulators holding `moments` (one per capture point: fresh, or a resumed state) that
    /// [`Backend::end_pass_stats`] folds each pass's captured rows into, or None when the backend
    /// leaves the fold to the host: the caller then copies rows out with `end_pass` and folds
    /// them itself (the CPU, whose rows are already on the host). With `pairs`, the rows
    /// alternate pos, neg and the statistics are over their differences pos − neg.
    fn stats_accumulators(&self, moments: &[PointMoments], pairs: bool) -> Result<Option<Self::Stats>> {
        let _ = (moments, pairs);
        Ok(None)
    }
    /// Ends a pass by folding its captured rows into `acc`, in order, instead of copying them
    /// out. Returns where the first NaN or Inf among the pass's captured rows is, if any (the
    /// caller refuses the input; `acc` is then spoilt).
    fn end_pass_stats(&self, pass: Self::Pass, acc: &mut Self::Stats) -> Result<Option<NonFinite>> {
        let _ = (pass, acc);
        Err(crate::error::Error::Device(format!("{}: no device statistics accumulators", self.name())))
    }
    /// The statistics accumulated so far (checkpoints and the final write).
    fn stats_moments(&self, acc: &Self::Stats) -> Result<Vec<PointMoments>> {
        let _ = acc;
        Err(crate::error::Error::Device(format!("{}: no device statistics accumulators", self.name())))
    }

    /// Gathers embedding rows into the residual, then applies `norm` in place when given
    /// (BLOOM's LayerNorm on the embeddings).
    fn embed(&self, table: &Self::Matrix, ids: &[u32], norm: Option<Norm<'_, Self::Vector>>, out: &mut Self::Act) -> Result<()>;
    /// `out = x·Wᵀ + b`, or `out += x·Wᵀ + b` when `accumulate` (the residual add).
    fn linear(&self, x: &Self::Act, w: &Self::Matrix, b: Option<&Self::Vector>, out: &mut Self::Act, accumulate: bool) -> Result<()>;
    /// The MLP's down projection into the residual, `out += x·Wᵀ + b` (`out = ` without
    /// `accumulate`: the MLP's output alone, for `hook_mlp_out`). Its own entry because a
    /// reduced-precision path may compute the pass's attention-sink rows (position 0 of each
    /// sequence, which carry the model's massive activations) in full precision.
    fn down_projection(&self, pass: &Self::Pass, x: &Self::Act, w: &Self::Matrix, b: Option<&Self::Vector>, out: &mut Self::Act, accumulate: bool) -> Result<()> {
        let _ = pass;
        self.linear(x, w, b, out, accumulate)
    }
    /// From the stacked QKV projection `[rows, (nq + 2·nkv)·hd]` (plus its bias): writes the
    /// rotated queries to `q` and stores the rotated keys and the values at each row's arena
    /// slot for `layer`.
    #[allow(clippy::too_many_arguments)]
    /// `qk_norm`: per-head RMSNorm weights for Q and K (and eps), applied before rotation.
    fn rope_store_kv(
        &self,
        pass: &Self::Pass,
        qkv: &Self::Act,
        bias: Option<&Self::Vector>,
        qk_norm: Option<(&Self::Vector, &Self::Vector, f32)>,
        heads: Heads,
        kv: &mut Self::Kv,
        layer: usize,
        q: &mut Self::Act,
    ) -> Result<()>;
    /// The attention input of a layer: the QKV projection of `x` into `scratch`
    /// (`[rows, (nq + 2·nkv)·hd]`), then [`Backend::rope_store_kv`]. A backend may fuse the two
    /// (CUDA does in small decode steps; its `scratch` is then left as it was).
    #[allow(clippy::too_many_arguments)]
    fn attention_input(&self, pass: &Self::Pass, x: &Self::Act, input: AttentionInput<'_, Self>, kv: &mut Self::Kv, layer: usize, scratch: &mut Self::Act, q: &mut Self::Act) -> Result<()> {
        unfused_attention_input(self, pass, x, input, kv, layer, scratch, q)
    }
    /// Causal attention of each row over its own sequence's cached keys.
    /// `alibi`: per-head slopes adding `slope·(key − query position)` to the scores.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, pass: &Self::Pass, q: &Self::Act, kv: &Self::Kv, layer: usize, heads: Heads, alibi: Option<&[f32]>, out: &mut Self::Act) -> Result<()>;
    /// The MLP activation: `silu(gate) * up` from the stacked projection `[rows, 2·I]` (gate
    /// first), or `gelu_tanh(up)` from `[rows, I]`.
    fn activation(&self, kind: MlpKind, input: &Self::Act, out: &mut Self::Act) -> Result<()>;
    /// The MLP's input side: the gate/up projection into `scratch` (`[rows, w rows]`), then the
    /// activation into `out`. A backend may fuse the two (CUDA does in small decode steps; its
    /// `scratch` is then left as it was).
    #[allow(clippy::too_many_arguments)]
    fn mlp_input(&self, kind: MlpKind, x: &Self::Act, w: &Self::Matrix, b: Option<&Self::Vector>, scratch: &mut Self::Act, out: &mut Self::Act) -> Result<()> {
        unfused_mlp_input(self, kind, x, w, b, scratch, out)
    }
    /// The fused residual step: steer the residual rows (`steer` is the entry of the plan given
    /// to `begin_pass` for this point), capture them (slot `capture_residual`), write the
    /// normalised rows that feed the next sub-layer, and capture those in f32 (slot
    /// `capture_normed`, used for hidden-state index L).
    #[allow(clippy::too_many_arguments)]
    /// With `post_ln`, the residual then continues from the normed rows (BLOOM's
    /// `apply_residual_connection_post_layernorm`).
    fn residual_step(
        &self,
        pass: &mut Self::Pass,
        x: &mut Self::Act,
        norm: Norm<'_, Self::Vector>,
        normed: &mut Self::Act,
        steer: Option<&PointSteering>,
        capture_residual: Option<usize>,
        capture_normed: Option<usize>,
        post_ln: bool,
    ) -> Result<()>;
    /// A point inside a block that is not the residual (`hook_attn_out`, `hook_mlp_out`: a
    /// sub-layer's output before its add; `hook_z`: the heads' output before the o
    /// projection), computed apart only when a pass steers or captures there: steer its rows
    /// (`steer` is the entry of the plan given to `begin_pass` for this point), capture them
    /// in slot `capture`, then add them into the residual `add_to` when given.
    fn branch_step(
        &self,
        pass: &mut Self::Pass,
        branch: &mut Self::Act,
        steer: Option<&PointSteering>,
        capture: Option<usize>,
        add_to: Option<&mut Self::Act>,
    ) -> Result<()>;
    /// Copies the given rows of `x` into a new activation.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;
    /// One token per row of `logits` (`[rows, vocab]`), row r by `params[r]` as
    /// [`sample_row`](crate::engine::sample::sample_row) defines it. A device backend samples where the logits are and returns only
    /// the ids.
    fn sample(&self, logits: &Self::Act, params: &[SampleParams]) -> Result<Vec<u32>> {
        sample_rows(&self.to_host(logits)?, params)
    }

    // --- For benchmarks (`resid bench`).

    /// Starts (true) or stops charging time to the forward pass's operations (profile.rs).
    fn set_profiling(&self, on: bool) -> Result<()> {
        let _ = on;
        Ok(())
    }
    /// Marks the end of the forward pass's operation `label`. Costs one atomic load when
    /// profiling is off.
    fn mark(&self, label: &'static str) {
        let _ = label;
    }
    /// The time charged since profiling started (waiting for queued work first).
    fn take_profile(&self) -> Result<profile::OpTimes> {
        Ok(profile::OpTimes::default())
    }

    /// Waits until all queued work is done (a no-op for synchronous backends); timers call it.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Bytes one pass over `m` reads, as the backend stores it.
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize;
    /// Copy bandwidth of the backend's memory in bytes/s, counting bytes read plus bytes
    /// written (the STREAM convention): the best of `reps` copies of `bytes` bytes.
    fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64>;
}
