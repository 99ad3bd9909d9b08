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
    EXPONENTIALS.with(|cell| {
        let mut own = Vec::new();
        // A thread's buffer (a row's 196 KB came from mmap, page faults and all, every call);
        // a fresh one if ever re-entered.
        let mut kept = cell.try_borrow_mut();
        let e = match kept.as_deref_mut() {
            Ok(buf) => buf,
            Err(_) => &mut own,
        };
        // `x / t` in vectors with its maximum, then the exponentials in place, summed in index
        // order as they are made (the chain of adds overlaps the calls to expf).
        let max = scale_into(logits, t, e);
        if !max.is_finite() {
            return argmax(logits);
        }
        let mut total = 0.0f32;
        for z in e.iter_mut() {
            let v = (*z - max).exp();
            *z = if v >= 0.0 { v } else { 0.0 };
            total += *z;
        }
        let (threshold, kept_mass) = if p.top_p < 1.0 { nucleus(e, p.top_p * total) } else { (0.0, total) };
        draw_in_index_order(e, threshold, p.uniform * kept_mass)
    })
}

/// The first token, in index order among the values `≥ threshold`, whose running sum exceeds
/// `target` (the last positive one when rounding leaves the sum short).
fn draw_in_index_order(e: &[f32], threshold: f32, target: f32) -> u32 {
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

/// Largest top-k kept by one scan with insertions (above it, a selection then a sort).
const TOP_K_SCAN: usize = 256;

thread_local! {
    /// [`sample_row`]'s exponentials, one row at a time per thread.
    static EXPONENTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = x / t` for the row, and its maximum (NaN never winning; −∞ when nothing is above it),
/// 16 lanes at a time as [`argmax`] scans: the maximum is the same whatever the order.
fn scale_into(logits: &[f32], t: f32, out: &mut Vec<f32>) -> f32 {
    const LANES: usize = 16;
    out.clear();
    out.resize(logits.len(), 0.0);
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let split = logits.len() - logits.len() % LANES;
    for (chunk, dst) in logits[..split].chunks_exact(LANES).zip(out[..split].chunks_exact_mut(LANES)) {
        for ((m, &x), z) in lanes.iter_mut().zip(chunk).zip(dst) {
            *z = x / t;
            *m = if *z > *m { *z } else { *m };
        }
    }
    for (&x, z) in logits[split..].iter().zip(&mut out[split..]) {
        *z = x / t;
    }
    out[split..].iter().copied().chain(lanes).fold(f32::NEG_INFINITY, |m, z| if z > m { z } else { m })
}

/// The nucleus threshold: the largest value `tau` among `e` such that the mass of the values
/// `≥ tau` reaches `target`, and that mass. Keeps everything when rounding leaves no such value.
///
/// The mass is summed over the values in descending order (ties together) until it reaches
/// `target`: [`nucleus_of_sorted`] over all of `e`, sorted. Only the values at or above a
/// cut-off are sorted, the cut-off halved until their walk reaches `target`: they are the first
/// values of the whole sorted row, so the walk, its sums and its result are the same. Sorting
/// all of a 49,152-token row took 1.2 ms; cut-offs 16-fold apart sorted twice as many values as
/// halving them on a flat row (`sampling/top_p` in `benches/kernels.rs`; NOTES.md, 2026-12-07
/// 22:58).
fn nucleus(e: &[f32], target: f32) -> (f32, f32) {
    // The row's maximum exponential is exp(0) = 1.
    let mut cut = 1.0 / 2.0;
    let mut top = Vec::new();
    loop {
        // Not worth a sort unless the values kept, summed in any order, come near the target.
        if cut == 0.0 || mass_at_or_above(e, cut) >= target * (1.0 - 1e-3) {
            top.clear();
            top.extend(e.iter().copied().filter(|&v| v >= cut));
            top.sort_unstable_by(|a, b| b.total_cmp(a));
            if let Some(found) = nucleus_of_sorted(&top, target) {
                return found;
            }
            if cut == 0.0 {
                return (0.0, e.iter().sum());
            }
            // Rounding kept the walk short of a target that the values nearly hold (`top_p` a
            // hair below 1): every value next, as the full sort, rather than a sort per halving.
            cut = 0.0;
            continue;
        }
        cut = if cut > 1e-30 { cut / 2.0 } else { 0.0 };
    }
}

/// Σ of the values `≥ cut`, 16 lanes at a time (an estimate: not the walk's order).
fn mass_at_or_above(e: &[f32], cut: f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut chunks = e.chunks_exact(LANES);
    for chunk in chunks.by_ref() {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m += if v >= cut { v } else { 0.0 };
        }
    }
    chunks.remainder().iter().filter(|&&v| v >= cut).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// The walk of [`nucleus`] over values sorted in descending order: the first tie group at which
/// the running mass reaches `target`, and that mass; None if it never does.
fn nucleus_of_sorted(sorted: &[f32], target: f32) -> Option<(f32, f32)> {
    let mut mass = 0.0f32;
    let mut i = 0;
    while i < sorted.len() {
        let tau = sorted[i];
        while i < sorted.len() && sorted[i] == tau {
            mass += sorted[i];
            i += 1;
        }
        if mass >= target {
            return Some((tau, mass));
        }
    }
    None
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
        let Sampling::Sample { temperature, top_k, top_p, .. } = self.mode else {
            return argmax(logits);
        };
        // Top-k: the k first candidates in (logit descending, id ascending) order, cut,
        // renormalised, nucleus over them. The scan keeps the k first seen so far in that order
        // (a full sort of 49,152 candidates took 1.5 ms a row, on the scheduler's thread).
        let k = if top_k > 0 { top_k.min(logits.len()) } else { logits.len() };
        let before = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut cand: Vec<(u32, f32)>;
        if k <= TOP_K_SCAN {
            cand = Vec::with_capacity(k + 1);
            for (i, &l) in logits.iter().enumerate() {
                let c = (i as u32, l / temperature);
                if cand.len() == k {
                    // Ids ascend: a later candidate goes before the last only with a larger logit.
                    if c.1.total_cmp(&cand[k - 1].1) != std::cmp::Ordering::Greater {
                        continue;
                    }
                    cand.pop();
                }
                let at = cand.partition_point(|x| before(x, &c) == std::cmp::Ordering::Less);
                cand.insert(at, c);
            }
        } else {
            cand = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
            if k < cand.len() {
                cand.select_nth_unstable_by(k - 1, before);
                cand.truncate(k);
            }
            cand.sort_unstable_by(before);
        }
        if cand.is_empty() {
            return 0;
        }
        draw_from_best(&cand, top_p, self.rng.random())
    }
}

/// Top-k's draw from its candidates, best first (not empty): their softmax, cut to the shortest
/// prefix whose probability reaches `top_p` (at least one) and renormalised, then the first whose
/// running sum passes `u`.
fn draw_from_best(cand: &[(u32, f32)], top_p: f32, u: f32) -> u32 {
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
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
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

    /// The sampling code before the partial sorts (NOTES.md, 2026-12-07 22:58): every row sorted
    /// whole, then the same walks and draws. The fast paths must pick the same token for every
    /// row, parameter and draw.
    mod reference {
        use super::super::{draw_from_best, draw_in_index_order, nucleus_of_sorted};
        use super::*;

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
            draw_in_index_order(&e, threshold, p.uniform * kept_mass)
        }

        /// Every value sorted, then the same walk.
        fn nucleus(e: &[f32], target: f32) -> (f32, f32) {
            let mut sorted = e.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            nucleus_of_sorted(&sorted, target).unwrap_or_else(|| (0.0, e.iter().sum()))
        }

        /// `Sampler::next`'s top-k: every candidate sorted, cut to k, then the same draw.
        pub fn top_k(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f32) -> u32 {
            let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if top_k > 0 && top_k < cand.len() {
                cand.truncate(top_k);
            }
            draw_from_best(&cand, top_p, u)
        }
    }

    /// Logits rows that stress the partial sorts: a confident head over a Gaussian bulk, a flat
    /// bulk (nuclei of thousands), few distinct values (ties at every cut), −∞ and NaN entries,
    /// and lengths from 1 to a 49,152-token vocabulary.
    fn rows() -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(21);
        let mut gauss = |sigma: f32| {
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
            sigma * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        };
        let mut rows = Vec::new();
        for &len in &[1usize, 2, 17, 300, 5_000, 49_152] {
            let bulk: Vec<f32> = (0..len).map(|_| gauss(2.0)).collect();
            let mut peaked = bulk.clone();
            for i in 0..32.min(len) {
                peaked[(i * 1_531 + 17) % len] = 14.0 - 6.0 * i as f32 / 31.0;
            }
            let ties: Vec<f32> = bulk.iter().map(|x| x.round()).collect();
            let mut holes = peaked.clone();
            for i in (0..len).step_by(7) {
                holes[i] = if i % 3 == 0 { f32::NAN } else { f32::NEG_INFINITY };
            }
            rows.extend([bulk, peaked, ties, holes]);
        }
        rows
    }

    #[test]
    fn nucleus_by_partial_sort_picks_as_the_full_sort() {
        let mut compared = 0;
        for row in rows() {
            for &temperature in &[0.3f32, 0.8, 1.0, 1.7] {
                for &top_p in &[0.05f32, 0.5, 0.9, 0.95, 0.999, 0.999_999_9, 1.0] {
                    for k in 0..24 {
                        let p = SampleParams { temperature, top_p, uniform: (k as f32 + 0.5) / 24.0 };
                        assert_eq!(sample_row(&row, p), reference::sample_row(&row, p), "len {} T {temperature} top_p {top_p} u {}", row.len(), p.uniform);
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 10_000);
    }

    #[test]
    fn top_k_by_scan_and_selection_picks_as_the_full_sort() {
        for row in rows() {
            for &top_k in &[1usize, 5, 50, TOP_K_SCAN, TOP_K_SCAN + 1, 1_000, 60_000] {
                for &(temperature, top_p) in &[(0.8f32, 1.0f32), (1.0, 0.9), (1.7, 0.5)] {
                    let mode = Sampling::Sample { temperature, top_k, top_p, seed: 9 };
                    let mut fast = Sampler::new(mode, 3);
                    let mut draws = Sampler::new(mode, 3);
                    for _ in 0..12 {
                        let u: f32 = draws.rng.random();
                        assert_eq!(fast.next(&row), reference::top_k(&row, temperature, top_k, top_p, u), "len {} top_k {top_k} T {temperature} top_p {top_p}", row.len());
                    }
                }
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
