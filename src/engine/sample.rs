//! Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seed.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    Sample { temperature: f32, top_k: usize, top_p: f32, seed: u64 },
}

/// Index of the first maximum, as `torch.argmax` returns it.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
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

    pub fn next(&mut self, logits: &[f32]) -> u32 {
        let Sampling::Sample { temperature, top_k, top_p, .. } = self.mode else {
            return argmax(logits);
        };
        if temperature <= 0.0 {
            return argmax(logits);
        }
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
}
