//! Consistency and transfer across languages.
//!
//! * **Consistency**: cosine similarity between the (signed, unit) concept vectors of every
//!   pair of languages, per layer and averaged over layers 1..=L; optionally correlated
//!   (Pearson and Spearman over the language pairs a < b) with a language-similarity matrix.
//! * **Transfer**: at a chosen layer, `relative[a][b] = accuracy(a's vectors on b's test pairs)
//!   / accuracy(b's own vectors on b's test pairs)`, summarised over resource groups: high→low,
//!   low→high, high→high and low→low (pairs a ≠ b only).
use super::linalg::{cosine, pearson, spearman};
use super::recognition::mean;
use super::vectors::ConceptVectors;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// The default resource grouping for the paper's sixteen languages: "high" are the languages
/// with at least 0.09% of LLaMA-2's pretraining data (Touvron et al. 2023, table 10: fr, zh,
/// es, ja, pt) plus English; all the others are "low" (vi, ca, id, ko, fi, hu at 0.03–0.08%;
/// ta, te, sw, ny not listed).
pub const DEFAULT_HIGH: [&str; 6] = ["en", "fr", "zh", "es", "pt", "ja"];
pub const DEFAULT_LOW: [&str; 10] = ["vi", "ca", "id", "ko", "fi", "hu", "ta", "te", "sw", "ny"];

/// `cos[layer-1][a][b]` for the given vectors (one per language).
pub fn cosine_by_layer(vectors: &[&ConceptVectors]) -> Vec<Vec<Vec<f64>>> {
    let Some(first) = vectors.first() else { return Vec::new() };
    (1..=first.layers)
        .map(|l| vectors.iter().map(|a| vectors.iter().map(|b| cosine(a.direction(l), b.direction(l))).collect()).collect())
        .collect()
}

/// Element-wise mean over layers of a `[layer][a][b]` matrix.
pub fn mean_over_layers(m: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
    let Some(first) = m.first() else { return Vec::new() };
    let k = first.len();
    (0..k).map(|a| (0..k).map(|b| mean(m.iter().map(|layer| layer[a][b]))).collect()).collect()
}

/// Mean of the off-diagonal entries a < b.
pub fn mean_off_diagonal(m: &[Vec<f64>]) -> f64 {
    let k = m.len();
    mean((0..k).flat_map(|a| (a + 1..k).map(move |b| (a, b))).map(|(a, b)| m[a][b]))
}

/// A language-similarity matrix read from CSV: a header row `,l1,l2,...` (first cell ignored)
/// and one row per language `l,v1,v2,...`.
#[derive(Debug, Clone)]
pub struct LangSimilarity {
    pub langs: Vec<String>,
    pub values: HashMap<(String, String), f64>,
}

impl LangSimilarity {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return Err(Error::input(format!("{}: empty language-similarity CSV", path.display())));
        };
        let langs: Vec<String> = header.split(',').skip(1).map(|s| s.trim().trim_matches('"').to_owned()).collect();
        if langs.is_empty() || langs.iter().any(String::is_empty) {
            return Err(Error::input(format!(
                "{}: line 1: expected a header `,lang1,lang2,...` naming every column",
                path.display()
            )));
        }
        let mut values = HashMap::new();
        for (i, line) in lines {
            let cells: Vec<&str> = line.split(',').map(|s| s.trim().trim_matches('"')).collect();
            let at = format!("{}: line {}", path.display(), i + 1);
            if cells.len() != langs.len() + 1 {
                return Err(Error::input(format!("{at}: {} cells, expected {} (a language and one value per column)", cells.len(), langs.len() + 1)));
            }
            let row = cells[0].to_owned();
            for (j, cell) in cells[1..].iter().enumerate() {
                let v: f64 = cell.parse().map_err(|_| {
                    Error::input(format!("{at}, column {} (`{}`): `{cell}` is not a number", j + 2, langs[j]))
                })?;
                if !v.is_finite() {
                    return Err(Error::input(format!("{at}, column {} (`{}`): `{cell}` is not finite", j + 2, langs[j])));
                }
                values.insert((row.clone(), langs[j].clone()), v);
            }
        }
        Ok(LangSimilarity { langs, values })
    }

    /// The similarity of a and b (either orientation).
    pub fn get(&self, a: &str, b: &str) -> Option<f64> {
        self.values.get(&(a.to_owned(), b.to_owned())).or_else(|| self.values.get(&(b.to_owned(), a.to_owned()))).copied()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Correlation {
    pub pairs: usize,
    pub pearson: f64,
    pub spearman: f64,
}

/// Correlation between the off-diagonal (a < b) entries of `m` and the similarity matrix,
/// over the language pairs both know.
pub fn correlate(m: &[Vec<f64>], langs: &[String], sim: &LangSimilarity) -> Correlation {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for a in 0..langs.len() {
        for b in a + 1..langs.len() {
            if let Some(s) = sim.get(&langs[a], &langs[b]) {
                if m[a][b].is_finite() {
                    x.push(m[a][b]);
                    y.push(s);
                }
            }
        }
    }
    Correlation { pairs: x.len(), pearson: pearson(&x, &y), spearman: spearman(&x, &y) }
}

/// Resource groups for the transfer summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResourceGroups {
    pub high: Vec<String>,
    pub low: Vec<String>,
}

impl Default for ResourceGroups {
    fn default() -> Self {
        ResourceGroups {
            high: DEFAULT_HIGH.iter().map(|s| s.to_string()).collect(),
            low: DEFAULT_LOW.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Relative accuracy `acc[a][b] / acc[b][b]`.
pub fn relative_transfer(acc: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let k = acc.len();
    (0..k).map(|a| (0..k).map(|b| if acc[b][b] > 0.0 { acc[a][b] / acc[b][b] } else { f64::NAN }).collect()).collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TransferSummary {
    /// Mean relative accuracy over (source high, target low) pairs.
    pub high_to_low: f64,
    pub low_to_high: f64,
    pub high_to_high: f64,
    pub low_to_low: f64,
    /// Number of (source, target) pairs behind each mean.
    pub counts: [usize; 4],
}

/// Summarises a relative-transfer matrix over resource groups (a ≠ b only).
pub fn summarise_transfer(rel: &[Vec<f64>], langs: &[String], groups: &ResourceGroups) -> TransferSummary {
    let is = |g: &[String], l: &str| g.iter().any(|x| x == l);
    let cell = |src: &[String], dst: &[String]| {
        let mut vals = Vec::new();
        for (a, la) in langs.iter().enumerate() {
            for (b, lb) in langs.iter().enumerate() {
                if a != b && is(src, la) && is(dst, lb) && rel[a][b].is_finite() {
                    vals.push(rel[a][b]);
                }
            }
        }
        (mean(vals.iter().copied()), vals.len())
    };
    let (hl, n0) = cell(&groups.high, &groups.low);
    let (lh, n1) = cell(&groups.low, &groups.high);
    let (hh, n2) = cell(&groups.high, &groups.high);
    let (ll, n3) = cell(&groups.low, &groups.low);
    TransferSummary { high_to_low: hl, low_to_high: lh, high_to_high: hh, low_to_low: ll, counts: [n0, n1, n2, n3] }
}
