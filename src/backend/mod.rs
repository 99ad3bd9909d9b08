//! The small interface the one forward pass is written over. A backend owns weight storage,
//! activations and the KV arena; the forward pass only sequences its operations.
pub mod cpu;
pub mod cuda;

use crate::engine::capture::CaptureSink;
use crate::engine::plan::BatchPlan;
use crate::engine::steer::PointSteering;
use crate::error::Result;
use crate::model::weights::F32Data;

/// Attention geometry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary tables for the packed rows of one pass: `cos[row * head_dim/2 + i]`.
pub struct RopeRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

/// What the fused residual step does at one point besides the norm.
pub struct ResidualStep<'a, 'b> {
    pub steer: Option<&'a PointSteering<'a>>,
    /// Capture slot for the (steered) residual itself.
    pub capture_residual: Option<usize>,
    /// Capture slot for the normalised output (hidden-state index L, as HF returns it).
    pub capture_normed: Option<usize>,
    pub sink: Option<&'a mut CaptureSink<'b>>,
    pub plan: &'a BatchPlan,
}

pub trait Backend: Send + Sync {
    /// Weight matrix in HF layout `[out_features, in_features]`.
    type Matrix: Send + Sync;
    type Vector: Send + Sync;
    /// Activations `[rows, cols]`.
    type Act: Send;
    /// Key/value arena.
    type Kv: Send;

    fn name(&self) -> String;
    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<Self::Matrix>;
    fn vector(&self, data: F32Data) -> Result<Self::Vector>;
    fn act(&self, rows: usize, cols: usize) -> Self::Act;
    /// `stored_layers` may be 1 when no pass reuses the cache (extraction): layers then share it.
    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Self::Kv;
    fn to_host(&self, a: &Self::Act) -> Vec<f32>;

    fn embed(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Act);
    /// `out = x·Wᵀ + b`, or `out += x·Wᵀ + b` when `accumulate` (the residual add).
    fn linear(&self, x: &Self::Act, w: &Self::Matrix, b: Option<&Self::Vector>, out: &mut Self::Act, accumulate: bool);
    /// Rotates q and k in place and stores k, v at each row's arena slot for `layer`.
    #[allow(clippy::too_many_arguments)]
    fn rope_store_kv(&self, q: &mut Self::Act, k: &mut Self::Act, v: &Self::Act, rope: &RopeRows, heads: Heads, kv: &mut Self::Kv, layer: usize, plan: &BatchPlan);
    /// Causal attention of each row over its own sequence's cached keys.
    fn attention(&self, q: &Self::Act, kv: &Self::Kv, layer: usize, heads: Heads, plan: &BatchPlan, out: &mut Self::Act);
    /// `out = silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Act, up: &Self::Act, out: &mut Self::Act);
    /// The fused residual step: steer the residual rows, capture them, and write the RMS-normed
    /// rows (weight `norm`) that feed the next sub-layer.
    fn residual_step(&self, x: &mut Self::Act, norm: &Self::Vector, eps: f32, normed: &mut Self::Act, step: ResidualStep<'_, '_>);
    /// Copies the given rows of `x` into a new activation.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
}
