//! Rotary position embeddings in Hugging Face's `rotate_half` convention: element i pairs with
//! element i + d/2 of the same head.
use crate::model::config::{ModelConfig, RopeScaling};

/// Inverse frequencies, with the config's scaling applied, computed in f32 as HF does.
pub fn inverse_frequencies(c: &ModelConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base = c.rope_theta;
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
    match c.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            inv.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Rotary tables for the packed rows of one pass: `cos[row * half + i]`.
pub struct RopeRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeRows {
    /// The tables of `rows` alone, in that order.
    pub fn select(&self, rows: &[usize]) -> RopeRows {
        let h = self.half;
        let pick = |t: &[f32]| rows.iter().flat_map(|&r| &t[r * h..(r + 1) * h]).copied().collect();
        RopeRows { cos: pick(&self.cos), sin: pick(&self.sin), half: h }
    }
}

/// cos/sin for each packed row's position.
pub fn rope_rows(inv_freq: &[f32], positions: &[u32]) -> RopeRows {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    RopeRows { cos, sin, half }
}

/// Rotates every head of one row in place.
pub fn rotate_row(row: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for h in 0..heads {
        // Halves as separate slices, so that the loop vectorises (the same rounded products
        // and sums per element either way: no fused multiply-adds).
        let (lo, hi) = row[h * head_dim..(h + 1) * head_dim].split_at_mut(half);
        for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(&cos[..half]).zip(&sin[..half]) {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = y * c + x * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let inv = vec![1.0, 0.1];
        let r = rope_rows(&inv, &[0, 3]);
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        rotate_row(&mut row, 1, 4, &r.cos[..2], &r.sin[..2]);
        assert_eq!(row, vec![1.0, 2.0, 3.0, 4.0]);
        rotate_row(&mut row, 1, 4, &r.cos[2..], &r.sin[2..]);
        let n: f32 = row.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
        // pair (0, 2) rotated by angle 3.0
        assert!((row[0] - (3.0f32.cos() - 3.0 * 3.0f32.sin())).abs() < 1e-5);
    }
}
