//! The CPU backend: f32 compute over memory-mapped (f32) or converted (bf16/f16) weights.
//! Also the reference the CUDA kernels are checked against.
pub mod attention;
pub mod gemm;
pub mod norm;
pub mod residual;
pub mod rope;

use super::{Backend, Heads, ResidualStep, RopeRows};
use crate::engine::plan::BatchPlan;
use crate::error::Result;
use crate::model::weights::F32Data;
use rayon::prelude::*;

pub struct CpuBackend;

pub struct CpuMatrix {
    pub data: F32Data,
    pub rows: usize,
    pub cols: usize,
}

pub struct CpuAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CpuKv {
    stored_layers: usize,
    kv_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKv {
    fn layer(&self, layer: usize) -> usize {
        layer % self.stored_layers
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = F32Data;
    type Act = CpuAct;
    type Kv = CpuKv;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<CpuMatrix> {
        Ok(CpuMatrix { data, rows, cols })
    }

    fn vector(&self, data: F32Data) -> Result<F32Data> {
        Ok(data)
    }

    fn act(&self, rows: usize, cols: usize) -> CpuAct {
        CpuAct { data: vec![0.0; rows * cols], rows, cols }
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> CpuKv {
        CpuKv {
            stored_layers: stored_layers.max(1),
            kv_dim,
            k: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
            v: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
        }
    }

    fn to_host(&self, a: &CpuAct) -> Vec<f32> {
        a.data.clone()
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], out: &mut CpuAct) {
        let h = table.cols;
        for (row, &id) in out.data.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            row.copy_from_slice(&table.data[id * h..(id + 1) * h]);
        }
    }

    fn linear(&self, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, out: &mut CpuAct, accumulate: bool) {
        gemm::linear(&x.data, x.rows, x.cols, &w.data, w.rows, b.map(|b| &b[..]), &mut out.data, accumulate);
    }

    fn rope_store_kv(&self, q: &mut CpuAct, k: &mut CpuAct, v: &CpuAct, rope: &RopeRows, heads: Heads, kv: &mut CpuKv, layer: usize, plan: &BatchPlan) {
        let half = rope.half;
        let hd = heads.head_dim;
        q.data.par_chunks_mut(q.cols).enumerate().for_each(|(r, row)| {
            rope::rotate_row(row, heads.q_heads, hd, &rope.cos[r * half..(r + 1) * half], &rope.sin[r * half..(r + 1) * half]);
        });
        k.data.par_chunks_mut(k.cols).enumerate().for_each(|(r, row)| {
            rope::rotate_row(row, heads.kv_heads, hd, &rope.cos[r * half..(r + 1) * half], &rope.sin[r * half..(r + 1) * half]);
        });
        let l = kv.layer(layer);
        let d = kv.kv_dim;
        for (r, &pos) in plan.positions.iter().enumerate() {
            let slot = plan.seqs[plan.row_seq[r] as usize].kv_start + pos as usize;
            kv.k[l][slot * d..(slot + 1) * d].copy_from_slice(&k.data[r * d..(r + 1) * d]);
            kv.v[l][slot * d..(slot + 1) * d].copy_from_slice(&v.data[r * d..(r + 1) * d]);
        }
    }

    fn attention(&self, q: &CpuAct, kv: &CpuKv, layer: usize, heads: Heads, plan: &BatchPlan, out: &mut CpuAct) {
        let l = kv.layer(layer);
        attention::attention(&q.data, &kv.k[l], &kv.v[l], heads, plan, &mut out.data);
    }

    fn swiglu(&self, gate: &CpuAct, up: &CpuAct, out: &mut CpuAct) {
        out.data.par_iter_mut().zip(gate.data.par_iter().zip(up.data.par_iter())).for_each(|(o, (&g, &u))| {
            *o = silu(g) * u;
        });
    }

    fn residual_step(&self, x: &mut CpuAct, norm: &F32Data, eps: f32, normed: &mut CpuAct, step: ResidualStep) {
        let h = x.cols;
        residual::residual_step(&mut x.data, h, norm, eps, &mut normed.data, step);
    }

    fn gather_rows(&self, x: &CpuAct, rows: &[usize]) -> CpuAct {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        CpuAct { data, rows: rows.len(), cols: x.cols }
    }
}
