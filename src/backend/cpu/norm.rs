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

#[cfg(test)]
mod tests {
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
