//! The CPU backend: f32 compute over memory-mapped (f32) or converted (bf16/f16) weights.
//! Also the reference the CUDA kernels are checked against.
pub mod attention;
pub mod gemm;
pub mod norm;
pub mod residual;
pub mod rope;

use super::{ActKind, Backend, CaptureLayout, Heads};
use crate::engine::capture::{CapturePosition, CaptureSink, Captured};
use crate::engine::plan::BatchPlan;
use crate::engine::steer::PointSteering;
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

/// One pass: its plan, rotary tables and pass-local capture rows.
pub struct CpuPass {
    plan: BatchPlan,
    rope: rope::RopeRows,
    capture: Option<(Captured, CapturePosition)>,
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = F32Data;
    type Act = CpuAct;
    type Kv = CpuKv;
    type Pass = CpuPass;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<CpuMatrix> {
        Ok(CpuMatrix { data, rows, cols })
    }

    fn vector(&self, data: F32Data) -> Result<F32Data> {
        Ok(data)
    }

    fn act(&self, rows: usize, cols: usize, _kind: ActKind) -> Result<CpuAct> {
        Ok(CpuAct { data: vec![0.0; rows * cols], rows, cols })
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<CpuKv> {
        Ok(CpuKv {
            stored_layers: stored_layers.max(1),
            kv_dim,
            k: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
            v: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
        })
    }

    fn to_host(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }

    fn begin_pass(&self, plan: &BatchPlan, inv_freq: &[f32], capture: Option<CaptureLayout>, hidden: usize) -> Result<CpuPass> {
        let capture = capture.map(|c| {
            let rows = if c.position == CapturePosition::All { plan.rows() } else { plan.seqs.len() };
            (Captured::new(rows, c.slots, hidden, Vec::new()), c.position)
        });
        Ok(CpuPass { plan: plan.clone(), rope: rope::rope_rows(inv_freq, &plan.positions), capture })
    }

    fn end_pass(&self, pass: CpuPass, sink: Option<&mut CaptureSink>) -> Result<()> {
        let (Some((local, position)), Some(sink)) = (pass.capture, sink) else { return Ok(()) };
        for (i, seq) in pass.plan.seqs.iter().enumerate() {
            let dst = sink.seq_row[i];
            for slot in 0..local.points {
                match position {
                    CapturePosition::All => {
                        for j in 0..seq.len {
                            sink.out.row_mut(dst + j, slot).copy_from_slice(local.row(seq.start + j, slot));
                        }
                    }
                    _ => sink.out.row_mut(dst, slot).copy_from_slice(local.row(i, slot)),
                }
            }
        }
        Ok(())
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], out: &mut CpuAct) -> Result<()> {
        let h = table.cols;
        for (row, &id) in out.data.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            row.copy_from_slice(&table.data[id * h..(id + 1) * h]);
        }
        Ok(())
    }

    fn linear(&self, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, out: &mut CpuAct, accumulate: bool) -> Result<()> {
        gemm::linear(&x.data, x.rows, x.cols, &w.data, w.rows, b.map(|b| &b[..]), &mut out.data, accumulate);
        Ok(())
    }

    fn rope_store_kv(&self, pass: &CpuPass, q: &mut CpuAct, k: &mut CpuAct, v: &CpuAct, heads: Heads, kv: &mut CpuKv, layer: usize) -> Result<()> {
        let (rope, plan) = (&pass.rope, &pass.plan);
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
        Ok(())
    }

    fn attention(&self, pass: &CpuPass, q: &CpuAct, kv: &CpuKv, layer: usize, heads: Heads, out: &mut CpuAct) -> Result<()> {
        let l = kv.layer(layer);
        attention::attention(&q.data, &kv.k[l], &kv.v[l], heads, &pass.plan, &mut out.data);
        Ok(())
    }

    fn swiglu(&self, gate: &CpuAct, up: &CpuAct, out: &mut CpuAct) -> Result<()> {
        out.data.par_iter_mut().zip(gate.data.par_iter().zip(up.data.par_iter())).for_each(|(o, (&g, &u))| {
            *o = silu(g) * u;
        });
        Ok(())
    }

    fn residual_step(
        &self,
        pass: &mut CpuPass,
        x: &mut CpuAct,
        norm: &F32Data,
        eps: f32,
        normed: &mut CpuAct,
        steer: Option<&PointSteering>,
        capture_residual: Option<usize>,
        capture_normed: Option<usize>,
    ) -> Result<()> {
        let h = x.cols;
        if let Some(st) = steer {
            residual::steer_rows(&mut x.data, h, st);
        }
        if let (Some(slot), Some((buf, position))) = (capture_residual, pass.capture.as_mut()) {
            residual::capture_rows(&x.data, h, &pass.plan, buf, *position, slot);
        }
        residual::norm_rows(&x.data, h, norm, eps, &mut normed.data);
        if let (Some(slot), Some((buf, position))) = (capture_normed, pass.capture.as_mut()) {
            residual::capture_rows(&normed.data, h, &pass.plan, buf, *position, slot);
        }
        Ok(())
    }

    fn gather_rows(&self, x: &CpuAct, rows: &[usize]) -> Result<CpuAct> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuAct { data, rows: rows.len(), cols: x.cols })
    }
}
