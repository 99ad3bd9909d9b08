//! Recognition: how well a signed concept direction separates the two sides of held-out pairs.
//!
//! Accuracy at a layer is the fraction of test pairs whose positive stimulus projects at least
//! as high as the negative one on the signed direction (ties count as correct, as in the
//! paper's code). The best layer is the first layer with the highest accuracy.
use super::vectors::{pair_accuracy, ConceptVectors, PairReps};

/// Test accuracy at every layer 1..=L (NaN when there are no test pairs).
pub fn accuracy_by_layer(v: &ConceptVectors, test: &PairReps) -> Vec<f64> {
    (1..=v.layers).map(|l| pair_accuracy(v.direction(l), test, l, v.hidden)).collect()
}

/// (best layer, 1-based; its accuracy): the first maximum, NaNs ignored.
pub fn best_layer(acc: &[f64]) -> (usize, f64) {
    let mut best = (1, f64::NAN);
    for (i, &a) in acc.iter().enumerate() {
        if !a.is_nan() && (best.1.is_nan() || a > best.1) {
            best = (i + 1, a);
        }
    }
    best
}

/// Cross-lingual recognition: `m[layer-1][a][b]` = accuracy of language a's vectors on
/// language b's test pairs.
pub fn cross_matrix(vectors: &[&ConceptVectors], tests: &[PairReps]) -> Vec<Vec<Vec<f64>>> {
    let Some(first) = vectors.first() else { return Vec::new() };
    (1..=first.layers)
        .map(|l| {
            vectors
                .iter()
                .map(|v| tests.iter().map(|t| pair_accuracy(v.direction(l), t, l, v.hidden)).collect())
                .collect()
        })
        .collect()
}

/// Mean of the finite values (NaN when none).
pub fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in xs {
        if x.is_finite() {
            s += x;
            n += 1;
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}
