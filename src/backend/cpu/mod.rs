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

    fn rope_store_kv(&self, pass: &CpuPass, qkv: &CpuAct, bias: Option<&F32Data>, heads: Heads, kv: &mut CpuKv, layer: usize, q: &mut CpuAct) -> Result<()> {
        let (rope, plan) = (&pass.rope, &pass.plan);
        let (half, hd) = (rope.half, heads.head_dim);
        let (qd, kvd) = (heads.q_heads * hd, heads.kv_heads * hd);
        let l = kv.layer(layer);
        let (k_cache, v_cache) = (&mut kv.k[l], &mut kv.v[l]);
        let mut row = vec![0f32; qkv.cols];
        for r in 0..qkv.rows {
            row.copy_from_slice(&qkv.data[r * qkv.cols..(r + 1) * qkv.cols]);
            if let Some(b) = bias {
                row.iter_mut().zip(b.iter()).for_each(|(x, b)| *x += b);
            }
            let (cos, sin) = (&rope.cos[r * half..(r + 1) * half], &rope.sin[r * half..(r + 1) * half]);
            let (qpart, rest) = row.split_at_mut(qd);
            let (kpart, vpart) = rest.split_at_mut(kvd);
            rope::rotate_row(qpart, heads.q_heads, hd, cos, sin);
            rope::rotate_row(kpart, heads.kv_heads, hd, cos, sin);
            q.data[r * qd..(r + 1) * qd].copy_from_slice(qpart);
            let slot = plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize;
            k_cache[slot * kvd..(slot + 1) * kvd].copy_from_slice(kpart);
            v_cache[slot * kvd..(slot + 1) * kvd].copy_from_slice(vpart);
        }
        Ok(())
    }

    fn attention(&self, pass: &CpuPass, q: &CpuAct, kv: &CpuKv, layer: usize, heads: Heads, out: &mut CpuAct) -> Result<()> {
        let l = kv.layer(layer);
        attention::attention(&q.data, &kv.k[l], &kv.v[l], heads, &pass.plan, &mut out.data);
        Ok(())
    }

    fn swiglu(&self, gate_up: &CpuAct, out: &mut CpuAct) -> Result<()> {
        let inter = out.cols;
        out.data.par_chunks_mut(inter).zip(gate_up.data.par_chunks(2 * inter)).for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(inter);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = silu(g) * u;
            }
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
