//! Causal attention of packed rows over each sequence's cached keys and values.
//! Each (row, head) is computed alone, so results do not depend on the batch.
use crate::backend::Heads;
use crate::engine::plan::BatchPlan;
use rayon::prelude::*;

/// `k_cache`/`v_cache`: `[slots, kv_heads * head_dim]`. `out`: `[rows, q_heads * head_dim]`.
/// `alibi`: per-head slopes adding `slope·(j − p)` to the score of key j for a query at p.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: &mut [f32]) {
    let qd = heads.q_heads * heads.head_dim;
    let kvd = heads.kv_heads * heads.head_dim;
    let group = heads.q_heads / heads.kv_heads;
    let hd = heads.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(qd).enumerate().for_each(|(row, out_row)| {
        let seq = &plan.seqs[plan.row_seq[row] as usize];
        let keys = plan.positions[row] as usize + 1;
        let mut scores = vec![0f32; keys];
        for h in 0..heads.q_heads {
            let qh = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
            let kvh = h / group;
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let slot = seq.kv_start + j;
                let kh = &k_cache[slot * kvd + kvh * hd..slot * kvd + (kvh + 1) * hd];
                *s = dot(qh, kh) * scale + alibi.map_or(0.0, |a| a[h] * (j as f32 - (keys - 1) as f32));
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut out_row[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let slot = seq.kv_start + j;
                let vh = &v_cache[slot * kvd + kvh * hd..slot * kvd + (kvh + 1) * hd];
                let w = p * inv;
                for (o, &v) in oh.iter_mut().zip(vh) {
                    *o += w * v;
                }
            }
        }
    });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax(QKᵀ/√d)V per sequence in f64, with an explicit causal mask.
    fn reference(q: &[f32], k: &[f32], v: &[f32], heads: Heads, lens: &[usize]) -> Vec<f32> {
        let (hd, qd, kvd) = (heads.head_dim, heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        let mut out = vec![0f32; q.len()];
        let mut start = 0;
        for &len in lens {
            for i in 0..len {
                for h in 0..heads.q_heads {
                    let kvh = h * heads.kv_heads / heads.q_heads;
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd).map(|d| q[(start + i) * qd + h * hd + d] as f64 * k[(start + j) * kvd + kvh * hd + d] as f64).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        out[(start + i) * qd + h * hd + d] =
                            (0..=i).map(|j| e[j] / z * v[(start + j) * kvd + kvh * hd + d] as f64).sum::<f64>() as f32;
                    }
                }
            }
            start += len;
        }
        out
    }

    #[test]
    fn packed_gqa_matches_reference() {
        let heads = Heads { q_heads: 4, kv_heads: 2, head_dim: 8 };
        let lens = [3usize, 1, 6];
        let rows: usize = lens.iter().sum();
        let f = |n: usize, s: f32| (0..n).map(|i| ((i as f32 + s) * 0.731).sin()).collect::<Vec<f32>>();
        let (q, k, v) = (f(rows * 32, 0.0), f(rows * 16, 1.0), f(rows * 16, 2.0));
        let kv_starts = [0usize, 3, 4];
        let plan = BatchPlan::new(&lens, &[0, 0, 0], &kv_starts);
        let mut out = vec![0f32; rows * 32];
        attention(&q, &k, &v, heads, &plan, None, &mut out);
        let want = reference(&q, &k, &v, heads, &lens);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
