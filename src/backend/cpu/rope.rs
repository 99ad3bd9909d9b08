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
    /// Row r's cos and sin values (`half` each).
    pub fn row(&self, r: usize) -> (&[f32], &[f32]) {
        let h = self.half;
        (&self.cos[r * h..(r + 1) * h], &self.sin[r * h..(r + 1) * h])
    }

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

/// One head of 64 values rotated (pairs i and i + 32, `cos`/`sin` 32 values each, or no
/// rotation when they are empty) and stored at `dst`: [`rotate_row`]'s products and sums, in
/// vectors, straight into place (no library copy per head).
///
/// # Safety
/// The CPU has AVX-512F; `dst` is valid for 64 writes that no one else makes meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn rotate_store_head64(vals: &[f32; 64], cos: &[f32], sin: &[f32], dst: *mut f32) {
    use std::arch::x86_64::*;
    let v: [__m512; 4] = std::array::from_fn(|i| _mm512_loadu_ps(vals.as_ptr().add(16 * i)));
    let out = if cos.len() == 32 && sin.len() == 32 {
        let c = [_mm512_loadu_ps(cos.as_ptr()), _mm512_loadu_ps(cos.as_ptr().add(16))];
        let s = [_mm512_loadu_ps(sin.as_ptr()), _mm512_loadu_ps(sin.as_ptr().add(16))];
        let lo = |i: usize| _mm512_sub_ps(_mm512_mul_ps(v[i], c[i]), _mm512_mul_ps(v[i + 2], s[i]));
        let hi = |i: usize| _mm512_add_ps(_mm512_mul_ps(v[i + 2], c[i]), _mm512_mul_ps(v[i], s[i]));
        [lo(0), lo(1), hi(0), hi(1)]
    } else {
        v
    };
    for (i, o) in out.iter().enumerate() {
        _mm512_storeu_ps(dst.add(16 * i), *o);
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_head_store_is_rotate_row_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let inv: Vec<f32> = (0..32).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 64.0)).collect();
        let r = rope_rows(&inv, &[0, 7, 1234]);
        let vals: [f32; 64] = std::array::from_fn(|i| ((i as f32) * 0.37).sin() * 3.0 - 0.5);
        for row in 0..3 {
            let (cos, sin) = r.row(row);
            let mut want = vals.to_vec();
            rotate_row(&mut want, 1, 64, cos, sin);
            let mut got = [f32::NAN; 64];
            // SAFETY: AVX-512F checked above; `got` holds 64 values.
            unsafe { rotate_store_head64(&vals, cos, sin, got.as_mut_ptr()) };
            assert_eq!(got.map(f32::to_bits).to_vec(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "row {row}");
        }
        let mut copied = [f32::NAN; 64];
        // SAFETY: as above; no tables means no rotation (values heads).
        unsafe { rotate_store_head64(&vals, &[], &[], copied.as_mut_ptr()) };
        assert_eq!(copied.map(f32::to_bits), vals.map(f32::to_bits));
    }
}
