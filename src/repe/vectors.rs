//! Concept directions per layer from training pairs.
//!
//! Representations are last-token hidden states at indices 1..=L; each pair contributes its
//! positive and negative stimulus. Methods:
//!
//! * **mean-diff** (the paper's default, RepE `cluster_mean`): `mean(pos) − mean(neg)`.
//! * **pca** (RepE's default reader): the first principal component of the pair differences
//!   `pos − neg`. As in RepE, where each training pair is presented in a random order so that
//!   its difference has a random sign, every difference is multiplied by a random ±1 (SplitMix64
//!   seeded from the seed); the differences are then centred and the leading eigenvector of
//!   their covariance is found by power iteration (`v ← Dᵀ(D v) / ‖·‖` from a seeded Gaussian
//!   start, until the change is below 1e-10 or after 1000 iterations). If the centred
//!   differences vanish (a single pair), the uncentred difference is used.
//! * **random** (the paper's baseline): a seeded Gaussian direction per layer.
//!
//! Every direction is normalised to unit length. Its **sign** per layer is chosen on the
//! training pairs: the sign under which more pairs project their positive side higher; a tied
//! vote goes by the sign of the summed separation `Σ ⟨pos − neg, u⟩` (+ if that is 0 too), so
//! that the orientation never depends on how a method happened to orient its raw direction (a
//! principal component's sign is arbitrary). **Train accuracy** is the fraction of training pairs whose positive side projects at
//! least as high as the negative side on the signed direction. **Scale** is the mean absolute
//! separation `|⟨pos − neg, u⟩|` over the training pairs: vector files store `u · scale`, so a
//! steering coefficient of 1 shifts the residual by one typical pair separation.
use super::data::{derive_seed, SplitMix64};
use super::linalg::{dot, norm64, unit};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Method {
    #[serde(rename = "mean-diff")]
    MeanDiff,
    #[serde(rename = "pca")]
    Pca,
    #[serde(rename = "random")]
    Random,
    /// The paper's random baseline: cluster means on training labels shuffled within each pair
    /// (the caller orients the pairs by those labels).
    #[serde(rename = "random-labels")]
    RandomLabels,
}

/// How a direction's sign is chosen on the training pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignRule {
    /// resid: the majority of pairs; a tied vote goes by the summed separation.
    Resid,
    /// RepE's `get_signs`: −1 when more pairs have their positive side at the minimum than at
    /// the maximum (a tied pair counts for both), else +1.
    RepE,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean-diff" | "mean_diff" | "cluster_mean" | "cluster-mean" => Ok(Method::MeanDiff),
            "pca" => Ok(Method::Pca),
            "random" | "gaussian" => Ok(Method::Random),
            "random-labels" => Ok(Method::RandomLabels),
            other => Err(Error::input(format!("unknown method `{other}` (expected mean-diff, pca, random or random-labels)"))),
        }
    }
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::MeanDiff => "mean-diff",
            Method::Pca => "pca",
            Method::Random => "random",
            Method::RandomLabels => "random-labels",
        }
    }

    pub const ALL: [Method; 3] = [Method::MeanDiff, Method::Pca, Method::Random];
    /// The paper protocol's methods: cluster mean, its random baseline, and the Gaussian
    /// directions as an extra.
    pub const PAPER: [Method; 3] = [Method::MeanDiff, Method::RandomLabels, Method::Random];
}

/// Hidden states of a set of pairs: `pos[i]` and `neg[i]` are `[L, hidden]` (row l-1 = index l).
#[derive(Debug, Clone, Default)]
pub struct PairReps<'a> {
    pub pos: Vec<&'a [f32]>,
    pub neg: Vec<&'a [f32]>,
}

impl<'a> PairReps<'a> {
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
}

/// Layer `l` (1-based) of a `[L, hidden]` representation.
pub fn layer_row(rep: &[f32], layer: usize, hidden: usize) -> &[f32] {
    &rep[(layer - 1) * hidden..layer * hidden]
}

/// Signed unit directions for layers 1..=L with their signs, train accuracy and scale.
#[derive(Debug, Clone)]
pub struct ConceptVectors {
    pub method: Method,
    pub layers: usize,
    pub hidden: usize,
    /// `[L, hidden]`, row l-1 = index l, unit norm (or zero), sign applied.
    pub directions: Vec<f32>,
    /// +1 or -1 per layer (applied already).
    pub signs: Vec<f32>,
    pub train_accuracy: Vec<f64>,
    pub scale: Vec<f32>,
}

impl ConceptVectors {
    /// Signed unit direction at index `layer` (1..=L).
    pub fn direction(&self, layer: usize) -> &[f32] {
        layer_row(&self.directions, layer, self.hidden)
    }

    /// Fits directions on training pairs.
    pub fn fit(method: Method, train: &PairReps, layers: usize, hidden: usize, seed: u64) -> Result<Self> {
        Self::fit_with(method, train, layers, hidden, seed, SignRule::Resid)
    }

    /// Fits directions with the given sign rule.
    pub fn fit_with(method: Method, train: &PairReps, layers: usize, hidden: usize, seed: u64, rule: SignRule) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::input("no training pairs to compute concept vectors from"));
        }
        let mut out = ConceptVectors {
            method,
            layers,
            hidden,
            directions: Vec::with_capacity(layers * hidden),
            signs: Vec::with_capacity(layers),
            train_accuracy: Vec::with_capacity(layers),
            scale: Vec::with_capacity(layers),
        };
        for l in 1..=layers {
            let raw: Vec<f32> = match method {
                Method::MeanDiff | Method::RandomLabels => mean_diff(train, l, hidden),
                Method::Pca => pca_direction(train, l, hidden, derive_seed(seed, &format!("pca/{l}"))),
                Method::Random => {
                    let mut rng = SplitMix64::new(derive_seed(seed, &format!("random/{l}")));
                    unit(&(0..hidden).map(|_| rng.gaussian()).collect::<Vec<_>>())
                }
            };
            let (mut more, mut less, mut summed) = (0usize, 0usize, 0.0f64);
            for (p, n) in train.pos.iter().zip(&train.neg) {
                let (pp, pn) = (dot(layer_row(p, l, hidden), &raw), dot(layer_row(n, l, hidden), &raw));
                if pp > pn {
                    more += 1;
                } else if pp < pn {
                    less += 1;
                }
                summed += pp - pn;
            }
            let sign = match rule {
                SignRule::Resid if less > more || (less == more && summed < 0.0) => -1.0f32,
                SignRule::RepE if less > more => -1.0,
                _ => 1.0,
            };
            let dir: Vec<f32> = raw.iter().map(|v| v * sign).collect();
            let acc = pair_accuracy(&dir, train, l, hidden);
            let sep: f64 = train
                .pos
                .iter()
                .zip(&train.neg)
                .map(|(p, n)| (dot(layer_row(p, l, hidden), &dir) - dot(layer_row(n, l, hidden), &dir)).abs())
                .sum::<f64>()
                / train.len() as f64;
            out.directions.extend_from_slice(&dir);
            out.signs.push(sign);
            out.train_accuracy.push(acc);
            out.scale.push(sep as f32);
        }
        Ok(out)
    }

    /// The vector-file layout: `[L+1, hidden]`, row 0 zeros (embeddings are not used), row l the
    /// signed unit direction times its scale.
    pub fn file_directions(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.hidden];
        for l in 1..=self.layers {
            let s = self.scale[l - 1];
            out.extend(self.direction(l).iter().map(|v| v * s));
        }
        out
    }

    /// Reads back vectors written by [`file_directions`](Self::file_directions) (or any
    /// `[L+1, hidden]` directions): rows are normalised; signs, accuracy and scale are taken
    /// from the file when present.
    pub fn from_file_rows(directions: &[f32], layers: usize, hidden: usize, method: Method) -> Self {
        let mut out = ConceptVectors {
            method,
            layers,
            hidden,
            directions: Vec::new(),
            signs: vec![1.0; layers],
            train_accuracy: vec![f64::NAN; layers],
            scale: Vec::new(),
        };
        for l in 1..=layers {
            let row: Vec<f64> = directions[l * hidden..(l + 1) * hidden].iter().map(|&v| v as f64).collect();
            out.scale.push(norm64(&row) as f32);
            out.directions.extend(unit(&row));
        }
        out
    }
}

/// Fraction of pairs whose positive side projects at least as high as the negative side.
pub fn pair_accuracy(dir: &[f32], reps: &PairReps, layer: usize, hidden: usize) -> f64 {
    if reps.is_empty() {
        return f64::NAN;
    }
    let correct = reps
        .pos
        .iter()
        .zip(&reps.neg)
        .filter(|(p, n)| dot(layer_row(p, layer, hidden), dir) >= dot(layer_row(n, layer, hidden), dir))
        .count();
    correct as f64 / reps.len() as f64
}

fn mean_diff(train: &PairReps, l: usize, hidden: usize) -> Vec<f32> {
    let mut d = vec![0.0f64; hidden];
    for (p, n) in train.pos.iter().zip(&train.neg) {
        for ((acc, &a), &b) in d.iter_mut().zip(layer_row(p, l, hidden)).zip(layer_row(n, l, hidden)) {
            *acc += a as f64 - b as f64;
        }
    }
    let k = train.len() as f64;
    d.iter_mut().for_each(|v| *v /= k);
    unit(&d)
}

fn pca_direction(train: &PairReps, l: usize, hidden: usize, seed: u64) -> Vec<f32> {
    let n = train.len();
    let mut rng = SplitMix64::new(seed);
    let mut rows: Vec<Vec<f64>> = train
        .pos
        .iter()
        .zip(&train.neg)
        .map(|(p, q)| {
            let s = if rng.next_u64() & 1 == 1 { -1.0 } else { 1.0 };
            layer_row(p, l, hidden).iter().zip(layer_row(q, l, hidden)).map(|(&a, &b)| s * (a as f64 - b as f64)).collect()
        })
        .collect();
    let uncentred = rows.clone();
    let mut mean = vec![0.0f64; hidden];
    for r in &rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n as f64;
        }
    }
    for r in rows.iter_mut() {
        for (v, m) in r.iter_mut().zip(&mean) {
            *v -= m;
        }
    }
    let total: f64 = rows.iter().map(|r| norm64(r)).sum();
    let scale: f64 = uncentred.iter().map(|r| norm64(r)).sum();
    if total <= 1e-9 * scale.max(1e-300) {
        rows = uncentred;
    }
    power_iteration(hidden, &mut rng, |v| {
        let proj: Vec<f64> = rows.iter().map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum()).collect();
        let mut next = vec![0.0f64; hidden];
        for (r, p) in rows.iter().zip(&proj) {
            for (x, a) in next.iter_mut().zip(r) {
                *x += p * a;
            }
        }
        next
    })
}

/// The unit leading eigenvector of a symmetric positive semi-definite operator `apply` on
/// vectors of length `n`: power iteration from a seeded Gaussian start until the change is
/// below 1e-10 or after 1000 iterations (zeros if the operator vanishes).
fn power_iteration(n: usize, rng: &mut SplitMix64, apply: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f32> {
    let mut v: Vec<f64> = (0..n).map(|_| rng.gaussian()).collect();
    let nv = norm64(&v);
    v.iter_mut().for_each(|x| *x /= nv);
    for _ in 0..1000 {
        let mut next = apply(&v);
        let nn = norm64(&next);
        if nn == 0.0 || !nn.is_finite() {
            return vec![0.0; n];
        }
        next.iter_mut().for_each(|x| *x /= nn);
        // Fix the sign so that convergence can be measured (the sign is chosen later anyway).
        if next.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>() < 0.0 {
            next.iter_mut().for_each(|x| *x = -*x);
        }
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        v = next;
        if change < 1e-10 {
            break;
        }
    }
    unit(&v)
}

/// Concept vectors from the statistics of paired differences `d = pos − neg` (`resid stats
/// --pairs`), in O(hidden²) memory per layer: `mean[l]` is the mean difference at hidden-state
/// index l (None where the statistics lack that index: the row stays zero) and
/// `second[l]` its uncentred second moment `E[d dᵀ]` (`[hidden, hidden]`, needed for PCA).
///
/// * mean-diff: the unit mean difference, exactly as [`ConceptVectors::fit`].
/// * pca: the leading eigenvector of `E[d dᵀ]`, by the same seeded power iteration. This is the
///   population form of the rows' random-sign PCA: with random signs `s`, `E[(s d)(s d)ᵀ] =
///   E[d dᵀ]` and the mean of the signed differences tends to 0, which the rows' version
///   subtracts from its covariance (a rank-one term of order 1/n).
/// * random: as [`ConceptVectors::fit`].
///
/// Without the rows, the sign is that of the summed separation `⟨mean, u⟩` (the rows' majority
/// vote falls back to the same sum on a tie), the scale is the root-mean-square separation
/// `√(uᵀ E[d dᵀ] u)` (the rows' mean absolute separation needs the rows; it is at most this),
/// or without second moments the mean separation `⟨mean, u⟩` (at most the rows' value), and
/// the train accuracy is NaN.
pub fn from_moments(method: Method, layers: usize, hidden: usize, mean: &[Option<&[f64]>], second: &[Option<&[f64]>], seed: u64) -> Result<ConceptVectors> {
    if mean.len() != layers + 1 || second.len() != layers + 1 {
        return Err(Error::input(format!("statistics for {} indices, expected {}", mean.len(), layers + 1)));
    }
    let mut out = ConceptVectors {
        method,
        layers,
        hidden,
        directions: Vec::with_capacity(layers * hidden),
        signs: Vec::with_capacity(layers),
        train_accuracy: vec![f64::NAN; layers],
        scale: Vec::with_capacity(layers),
    };
    for l in 1..=layers {
        let Some(m) = mean[l] else {
            out.directions.extend(std::iter::repeat_n(0.0, hidden));
            out.signs.push(1.0);
            out.scale.push(0.0);
            continue;
        };
        let raw: Vec<f32> = match method {
            Method::MeanDiff => unit(m),
            Method::Pca => {
                let s = second[l].ok_or_else(|| Error::input(format!("pca needs the second moment at index {l} (--stats mean,cov or mean,gram)")))?;
                let mut rng = SplitMix64::new(derive_seed(seed, &format!("pca/{l}")));
                leading_eigenvector(s, hidden, &mut rng)
            }
            Method::Random => {
                let mut rng = SplitMix64::new(derive_seed(seed, &format!("random/{l}")));
                unit(&(0..hidden).map(|_| rng.gaussian()).collect::<Vec<_>>())
            }
            // Shuffled labels need each pair's difference, which the statistics no longer hold.
            Method::RandomLabels => return Err(Error::input("random-labels needs the pairs themselves: statistics hold only their sums (use mean-diff, pca or random)")),
        };
        let separation: f64 = raw.iter().zip(m).map(|(&u, &d)| u as f64 * d).sum();
        let sign = if separation < 0.0 { -1.0f32 } else { 1.0 };
        let dir: Vec<f32> = raw.iter().map(|v| v * sign).collect();
        let scale = match second[l] {
            Some(s) => {
                let u: Vec<f64> = dir.iter().map(|&v| v as f64).collect();
                let q: f64 = (0..hidden).map(|i| u[i] * (0..hidden).map(|j| s[i * hidden + j] * u[j]).sum::<f64>()).sum();
                q.max(0.0).sqrt()
            }
            None => (separation * sign as f64).abs(),
        };
        out.directions.extend_from_slice(&dir);
        out.signs.push(sign);
        out.scale.push(scale as f32);
    }
    Ok(out)
}

/// The unit leading eigenvector of the symmetric `[n, n]` matrix `a` ([`power_iteration`]).
pub fn leading_eigenvector(a: &[f64], n: usize, rng: &mut SplitMix64) -> Vec<f32> {
    power_iteration(n, rng, |v| a.chunks_exact(n).map(|row| row.iter().zip(v).map(|(x, y)| x * y).sum()).collect())
}
