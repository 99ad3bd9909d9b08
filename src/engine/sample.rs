//! Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seed.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    Sample { temperature: f32, top_k: usize, top_p: f32, seed: u64 },
}

/// Index of the first maximum (NaN never wins; 0 when nothing is above −∞), as the device's
/// `argmax_rows` kernel picks it.
pub fn argmax(logits: &[f32]) -> u32 {
    // The maximum first, 16 lanes at a time (`if v > m` is the vector max that skips NaN), then
    // its first index: the scalar scan's compare-and-branch per logit took ~150 µs of a 49,152-
    // token vocabulary's row, a batch-16 decode step 2.4 ms.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in chunks.by_ref() {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// How one logits row becomes a token, in a form a device can apply: the uniform number is
/// drawn on the host, so a sequence's tokens are the same whichever backend samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// ≤ 0: greedy.
    pub temperature: f32,
    /// Nucleus mass; ≤ 0: greedy, ≥ 1: no cut.
    pub top_p: f32,
    /// In [0, 1).
    pub uniform: f32,
}

impl SampleParams {
    pub const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_p: 1.0, uniform: 0.0 };

    /// NaN parameters count as greedy, as the kernel treats them.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn is_greedy(&self) -> bool {
        !(self.temperature > 0.0) || !(self.top_p > 0.0)
    }
}

/// Temperature and nucleus sampling of one row: the reference for kernels/sampling.cu.
/// `e_i = exp(z_i − max z)` with `z = logits / T`; the kept set is every token whose `e_i` is at
/// least the largest threshold whose kept mass still reaches `top_p · Σe` (ties at the
/// threshold all kept); the draw walks the kept set in index order and returns the first token
/// whose running sum exceeds `uniform · kept mass`. Greedy rows, and rows without a finite
/// maximum, return [`argmax`]. The device sums in another order, so the two agree except when
/// the draw lands within rounding of a boundary.
pub fn sample_row(logits: &[f32], p: SampleParams) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let t = p.temperature;
    let max = logits.iter().map(|&x| x / t).fold(f32::NEG_INFINITY, |m, z| if z > m { z } else { m });
    if !max.is_finite() {
        return argmax(logits);
    }
    let e: Vec<f32> = logits.iter().map(|&x| (x / t - max).exp()).map(|v| if v >= 0.0 { v } else { 0.0 }).collect();
    let total: f32 = e.iter().sum();
    let (threshold, kept_mass) = if p.top_p < 1.0 { nucleus(&e, p.top_p * total) } else { (0.0, total) };
    let target = p.uniform * kept_mass;
    let (mut running, mut last) = (0.0f32, None);
    for (i, &v) in e.iter().enumerate() {
        if v >= threshold {
            running += v;
            if running > target {
                return i as u32;
            }
            if v > 0.0 {
                last = Some(i);
            }
        }
    }
    last.unwrap_or(0) as u32
}

/// The nucleus threshold: the largest value `tau` among `e` such that the mass of the values
/// `≥ tau` reaches `target`, and that mass. Keeps everything when rounding leaves no such value.
fn nucleus(e: &[f32], target: f32) -> (f32, f32) {
    let mut sorted = e.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut mass = 0.0f32;
    let mut i = 0;
    while i < sorted.len() {
        let tau = sorted[i];
        while i < sorted.len() && sorted[i] == tau {
            mass += sorted[i];
            i += 1;
        }
        if mass >= target {
            return (tau, mass);
        }
    }
    (0.0, e.iter().sum())
}

/// One pick per row of `logits` (`params[i]` for row i), rows in parallel: what every backend
/// that samples on the host runs.
pub fn sample_rows(logits: &[f32], params: &[SampleParams]) -> crate::error::Result<Vec<u32>> {
    use rayon::prelude::*;
    let rows = params.len();
    if rows == 0 || logits.is_empty() || !logits.len().is_multiple_of(rows) {
        return Err(crate::error::Error::input(format!("{rows} sampling rows for {} logits", logits.len())));
    }
    if rows == 1 {
        return Ok(vec![sample_row(logits, params[0])]);
    }
    Ok(logits.par_chunks(logits.len() / rows).zip(params).map(|(row, &p)| sample_row(row, p)).collect())
}

/// A per-sequence sampler: sequence i of a request draws from its own stream, so its text does
/// not depend on what else is generated beside it.
pub struct Sampler {
    mode: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(mode: Sampling, sequence: usize) -> Self {
        let seed = match mode {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler { mode, rng: StdRng::seed_from_u64(seed ^ (sequence as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) }
    }

    /// Whether this sampler needs the logits on the host (top-k), where
    /// [`Sampler::device_params`] would return None.
    pub fn needs_host(&self) -> bool {
        matches!(self.mode, Sampling::Sample { temperature, top_k, .. } if temperature > 0.0 && top_k > 0)
    }

    /// This step's parameters for sampling on the backend, or None when the mode needs the
    /// host (top-k). Draws the step's uniform number, exactly as [`Sampler::next`] does.
    pub fn device_params(&mut self) -> Option<SampleParams> {
        match self.mode {
            Sampling::Greedy => Some(SampleParams::GREEDY),
            Sampling::Sample { temperature, .. } if temperature <= 0.0 => Some(SampleParams::GREEDY),
            Sampling::Sample { top_k, .. } if top_k > 0 => None,
            Sampling::Sample { temperature, top_p, .. } => {
                Some(SampleParams { temperature, top_p, uniform: self.rng.random() })
            }
        }
    }

    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if let Some(p) = self.device_params() {
            return sample_row(logits, p);
        }
        // Top-k: sort, cut, renormalise, nucleus over the sorted candidates.
        let Sampling::Sample { temperature, top_k, top_p, .. } = self.mode else {
            return argmax(logits);
        };
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if top_k > 0 && top_k < cand.len() {
            cand.truncate(top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let z: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let u: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    /// The vectorised argmax against the scan it replaced, on rows with ties, NaN, ±∞ and
    /// lengths around the lane count.
    #[test]
    fn argmax_is_the_first_maximum_by_scan() {
        fn scan(logits: &[f32]) -> u32 {
            let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
            for (i, &v) in logits.iter().enumerate() {
                if v > best_value {
                    (best, best_value) = (i, v);
                }
            }
            best as u32
        }
        let mut rng = StdRng::seed_from_u64(3);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 7.0];
        for len in [0, 1, 2, 15, 16, 17, 31, 33, 100, 49_152] {
            for round in 0..40 {
                let mut row: Vec<f32> = (0..len).map(|_| (rng.random_range(0..8) as f32) - 4.0).collect();
                for _ in 0..round % 5 {
                    if len > 0 {
                        let at = rng.random_range(0..len);
                        row[at] = specials[rng.random_range(0..specials.len())];
                    }
                }
                if round % 7 == 0 {
                    row.iter_mut().for_each(|v| *v = if rng.random_bool(0.5) { f32::NAN } else { f32::NEG_INFINITY });
                }
                assert_eq!(argmax(&row), scan(&row), "len {len} round {round}: {row:?}");
            }
        }
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).sin()).collect();
        let mode = Sampling::Sample { temperature: 1.0, top_k: 3, top_p: 1.0, seed: 7 };
        let a: Vec<u32> = { let mut s = Sampler::new(mode, 0); (0..20).map(|_| s.next(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(mode, 0); (0..20).map(|_| s.next(&logits)).collect() };
        assert_eq!(a, b);
        let mut top: Vec<(usize, f32)> = logits.iter().cloned().enumerate().collect();
        top.sort_by(|x, y| y.1.total_cmp(&x.1));
        let allowed: Vec<u32> = top[..3].iter().map(|(i, _)| *i as u32).collect();
        assert!(a.iter().all(|t| allowed.contains(t)));
        let tiny_p = Sampling::Sample { temperature: 1.0, top_k: 0, top_p: 1e-6, seed: 1 };
        let mut s = Sampler::new(tiny_p, 0);
        assert_eq!(s.next(&logits), argmax(&logits));
    }

    /// Tokens drawn at uniforms (k + 0.5) / n, k < n: each token's share is its probability
    /// under the kept set, to within 1/n.
    fn shares(logits: &[f32], temperature: f32, top_p: f32, n: usize) -> Vec<f64> {
        let mut count = vec![0usize; logits.len()];
        for k in 0..n {
            let p = SampleParams { temperature, top_p, uniform: (k as f32 + 0.5) / n as f32 };
            count[sample_row(logits, p) as usize] += 1;
        }
        count.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn sample_row_draws_from_the_nucleus_in_index_order() {
        // Probabilities 0.2, 0.5, 0.3 (index order differs from probability order).
        let logits: Vec<f32> = [0.2f32, 0.5, 0.3].iter().map(|p| p.ln()).collect();
        let all = shares(&logits, 1.0, 1.0, 1000);
        for (got, want) in all.iter().zip([0.2, 0.5, 0.3]) {
            assert!((got - want).abs() <= 2e-3, "{all:?}");
        }
        // Index-order walk: the lowest uniforms pick token 0.
        assert_eq!(sample_row(&logits, SampleParams { temperature: 1.0, top_p: 1.0, uniform: 0.1 }), 0);
        // top_p 0.7: the kept set is {0.5, 0.3}, renormalised; token 0 is never drawn.
        let nucleus = shares(&logits, 1.0, 0.7, 1000);
        assert_eq!(nucleus[0], 0.0);
        assert!((nucleus[1] - 0.625).abs() <= 2e-3 && (nucleus[2] - 0.375).abs() <= 2e-3, "{nucleus:?}");
        // Temperature sharpens: T = 0.5 squares the probabilities before normalising.
        let sharp = shares(&logits, 0.5, 1.0, 1000);
        let z = 0.04 + 0.25 + 0.09;
        assert!((sharp[1] - 0.25 / z).abs() <= 2e-3, "{sharp:?}");
        // Ties at the threshold are all kept: 0.4, 0.4, 0.2 with top_p 0.3 keeps both 0.4s.
        let tied: Vec<f32> = [0.4f32, 0.2, 0.4].iter().map(|p| p.ln()).collect();
        let t = shares(&tied, 1.0, 0.3, 1000);
        assert!(t[1] == 0.0 && (t[0] - 0.5).abs() <= 2e-3 && (t[2] - 0.5).abs() <= 2e-3, "{t:?}");
        // Greedy rows, and NaN logits, never sampled.
        assert_eq!(sample_row(&logits, SampleParams::GREEDY), 1);
        assert_eq!(sample_row(&logits, SampleParams { temperature: 1.0, top_p: 0.0, uniform: 0.9 }), 1);
        let with_nan = [f32::NAN, 0.0, f32::NAN];
        assert_eq!(argmax(&with_nan), 1);
        assert!((0..10).all(|k| sample_row(&with_nan, SampleParams { temperature: 1.0, top_p: 1.0, uniform: k as f32 / 10.0 }) == 1));
    }
}
