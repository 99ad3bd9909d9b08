//! RMSNorm as Hugging Face computes it in f32: x · rsqrt(mean(x²) + eps) · w.

pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l] * c[l];
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for v in tail {
        sum += v * v;
    }
    let inv = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// LayerNorm as Hugging Face computes it in f32: (x − mean) / sqrt(var + eps) · w + b, with the
/// biased variance.
pub fn layer_norm_row(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = ((v as f64 - mean) * inv) as f32 * w[i] + b.map_or(0.0, |b| b[i]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn layer_norm_has_zero_mean_unit_variance_before_affine() {
        let x: Vec<f32> = (0..10).map(|i| i as f32 * 1.5 - 2.0).collect();
        let mut out = vec![0f32; 10];
        super::layer_norm_row(&x, &[1.0; 10], Some(&[0.5; 10]), 0.0, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 10.0;
        let var: f32 = out.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 10.0;
        assert!((mean - 0.5).abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "{mean} {var}");
    }

    #[test]
    fn matches_plain_formula() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut out = vec![0f32; 37];
        super::rms_norm_row(&x, &w, 1e-5, &mut out);
        let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 37.0;
        for i in 0..37 {
            let want = w[i] as f64 * x[i] as f64 / (ms + 1e-5).sqrt();
            assert!((out[i] as f64 - want).abs() < 1e-5, "{i}");
        }
    }
}
