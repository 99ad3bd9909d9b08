//! The paper's protocol (`--protocol paper`), as its code computes it (GitHub
//! shaoyangxu/Multilingual-Human-Value-Concepts: `utils.py`, `recognize_concept.py`,
//! `consistency_analysis.py`, `transferability_analysis.py`, on top of RepE).
//!
//! * **Split** ([`paper_split`], `utils.read_data`): drop pairs whose `pos == neg`; list the
//!   keys `group|id` in JSON insertion order; `random.seed(1)`, `random.shuffle`; train = the
//!   first floor(0.8 n), test = the last n − floor(0.8 n); then every training pair is itself
//!   shuffled (`random.shuffle([pos, neg])`, the labels follow) and, for the random baseline,
//!   every label pair once more. `--split F`: F ≤ 0.8 trains on the first floor(F n) with the
//!   same test set; F ≥ 1 trains on min(int(F), floor(0.8 n)) pairs. The generator is CPython's
//!   ([`super::pyrandom`]).
//! * **Vectors**: RepE `cluster_mean` (mean of the label-positive side minus mean of the
//!   label-negative side), sign by RepE's `get_signs` ([`super::vectors::SignRule::RepE`]); the
//!   random baseline is the same on the re-shuffled labels ([`Method::RandomLabels`]).
//! * **Aggregates**: every cell is the max over layers of the test accuracy (the layer is chosen
//!   on the test set); transfer `M[s][t]` = mean over concepts of that max, its difference to
//!   `M[t][t]` and the share of sources with a difference ≥ 0; consistency = the max over layers
//!   of the cosine of the signed vectors, averaged over concepts; its depth curve over the
//!   shared languages; Table 1 (Pearson with 1 − lang2vec distance, direct and split).
//! * **Families** ([`Family`]): languages, order (`utils.ratio`), high-resource sets, templates.
use super::data::{Pair, PAPER_LANGS};
use super::pyrandom::PyRandom;
use super::recognition::mean;
use crate::error::{Error, Result};
use std::path::Path;

/// Which computation produced a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The paper's code, exactly (split by CPython's `random`, max over layers on the test set).
    Paper,
    /// resid's own (SplitMix64 split, one layer per concept).
    Resid,
}

impl std::str::FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "paper" => Ok(Protocol::Paper),
            "resid" => Ok(Protocol::Resid),
            other => Err(Error::input(format!("--protocol `{other}`: expected paper or resid"))),
        }
    }
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Paper => "paper",
            Protocol::Resid => "resid",
        }
    }
}

/// The paper's seed (`utils.read_data` calls `random.seed(1)`).
pub const PAPER_SEED: u64 = 1;

/// The paper's eight languages shared by all three families (`utils.shared_langs`), the depth
/// curve's languages.
pub const SHARED_LANGS: [&str; 8] = ["en", "zh", "fr", "es", "pt", "vi", "ca", "id"];

/// The model families of the paper, with their settings (`utils.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// LLaMA-2-chat.
    Llama,
    /// Qwen-chat.
    Qwen,
    /// BLOOMZ.
    Bloomz,
    /// Any other model: every language found, the paper's order, resid's default groups.
    Other,
}

// `utils.ratio`: pretraining share (percent) per language, as strings there.
const LLAMA_RATIO: [(&str, f64); 12] = [
    ("ca", 0.04), ("en", 89.70), ("fr", 0.16), ("id", 0.03), ("pt", 0.09), ("zh", 0.13),
    ("es", 0.13), ("vi", 0.08), ("ja", 0.10), ("ko", 0.06), ("fi", 0.03), ("hu", 0.03),
];
const QWEN_RATIO: [(&str, f64); 12] = [
    ("ca", 0.04), ("en", 50.0), ("fr", 0.16), ("id", 0.03), ("pt", 0.09), ("zh", 60.0),
    ("es", 0.13), ("vi", 0.08), ("ja", 0.10), ("ko", 0.06), ("fi", 0.03), ("hu", 0.03),
];
const BLOOMZ_RATIO: [(&str, f64); 12] = [
    ("ca", 1.10206), ("ny", 0.00007), ("en", 30.03774), ("fr", 12.89844), ("id", 1.23708), ("pt", 4.91041),
    ("zh", 16.16741), ("es", 10.84550), ("sw", 0.01465), ("ta", 0.49485), ("te", 0.18541), ("vi", 2.70733),
];

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama" | "llama2" | "llama2-chat" => Ok(Family::Llama),
            "qwen" | "qwen-chat" => Ok(Family::Qwen),
            "bloomz" | "bloom" => Ok(Family::Bloomz),
            "other" | "none" => Ok(Family::Other),
            other => Err(Error::input(format!("--family `{other}`: expected llama, qwen, bloomz or other"))),
        }
    }
}

impl Family {
    /// The family of a model by its `config.json` `model_type` (as the paper's code goes by the
    /// model's name: "llama", "qwen", "bloom").
    pub fn from_model_type(model_type: &str) -> Family {
        let t = model_type.to_ascii_lowercase();
        if t.starts_with("llama") {
            Family::Llama
        } else if t.starts_with("qwen") {
            Family::Qwen
        } else if t.starts_with("bloom") {
            Family::Bloomz
        } else {
            Family::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen => "qwen",
            Family::Bloomz => "bloomz",
            Family::Other => "other",
        }
    }

    /// Languages the paper leaves out for this family (`llama_exclude`, ...).
    pub fn excluded(self) -> &'static [&'static str] {
        match self {
            Family::Llama | Family::Qwen => &["ny", "sw", "ta", "te"],
            Family::Bloomz => &["ja", "ko", "fi", "hu"],
            Family::Other => &[],
        }
    }

    /// High-resource languages (`utils.is_high`); the rest are low.
    pub fn high(self) -> Vec<String> {
        let h: &[&str] = match self {
            Family::Llama => &["en"],
            Family::Qwen => &["zh", "en"],
            Family::Bloomz => &["en", "zh", "fr", "es", "pt", "vi", "id", "ca"],
            Family::Other => &super::analysis::DEFAULT_HIGH,
        };
        h.iter().map(|s| s.to_string()).collect()
    }

    /// The prompt template (`utils.load_model_tokenizer`).
    pub fn template(self) -> &'static str {
        match self {
            Family::Llama => "[INST] {input} [/INST] ",
            _ => "{input}",
        }
    }

    fn ratio(self) -> &'static [(&'static str, f64)] {
        match self {
            Family::Llama => &LLAMA_RATIO,
            Family::Qwen => &QWEN_RATIO,
            Family::Bloomz => &BLOOMZ_RATIO,
            Family::Other => &[],
        }
    }

    /// The family's languages among `found`, ordered as `utils.get_new_langs` orders them: the
    /// excluded ones dropped, then a stable sort by pretraining share, descending, of the
    /// languages in the paper's order (ties keep that order). Languages without a share come
    /// last, in the paper's order.
    pub fn order_langs(self, found: &[String]) -> Vec<String> {
        let mut langs: Vec<String> = found.iter().filter(|l| !self.excluded().contains(&l.as_str())).cloned().collect();
        super::data::sort_paper_order(&mut langs, &PAPER_LANGS);
        let share = |l: &str| self.ratio().iter().find(|(x, _)| *x == l).map(|&(_, r)| r);
        langs.sort_by(|a, b| match (share(a), share(b)) {
            (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        langs
    }
}

/// Reads `model_type` from a model directory's `config.json` ("" when unreadable).
pub fn model_type(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// The family of the model in `model_dir`, unless `given` (`--family`); with where it came from.
pub fn resolve_family(model_dir: &Path, given: Option<&str>) -> Result<(Family, String)> {
    match given {
        Some(f) => Ok((f.parse()?, format!("--family {f}"))),
        None => {
            let t = model_type(model_dir);
            Ok((Family::from_model_type(&t), format!("config.json model_type `{t}`; override with --family")))
        }
    }
}

/// The random baseline's label swaps for explicit train pairs (no file shuffle): after
/// `random.seed(seed)`, the pair shuffles and the label shuffles of [`label_flips`].
pub fn explicit_flips(seed: u64, n_train: usize) -> Vec<bool> {
    label_flips(&mut PyRandom::new(seed), n_train)
}

/// A language code must be one of the paper's sixteen unless the user gave its resource group.
pub fn check_language(lang: &str, high: &[String], low: &[String], origin: &str) -> Result<()> {
    if PAPER_LANGS.contains(&lang) || high.iter().chain(low).any(|l| l == lang) {
        return Ok(());
    }
    Err(Error::input(format!(
        "{origin}: language `{lang}` is not one of the paper's 16 ({}); give its resource group with --high {lang} or --low {lang}",
        PAPER_LANGS.join(" ")
    )))
}

/// Checks `--split F` (the paper's `split` argument).
pub fn check_split(f: f64) -> Result<()> {
    if !f.is_finite() || f <= 0.0 {
        return Err(Error::input(format!("--split {f}: expected a train fraction in (0, 0.8] or a train count ≥ 1")));
    }
    Ok(())
}

/// The paper's train and test counts for `n` pairs and `--split F` (`utils.read_data`).
pub fn split_counts(n: usize, split: f64) -> (usize, usize) {
    // floor(n * 0.8) in binary64, as Python computes it.
    let full = (n as f64 * 0.8).floor() as usize;
    let test = n - full;
    let train = if split <= 0.8 {
        (n as f64 * split).floor() as usize
    } else if split >= 1.0 {
        (split.trunc() as usize).min(full)
    } else {
        full
    };
    (train, test)
}

/// One file's pairs split as the paper splits them.
#[derive(Debug, Clone, Default)]
pub struct PaperSplit {
    /// Training pairs, in the shuffled order, each oriented as written (pos, neg).
    pub train: Vec<Pair>,
    /// Test pairs, in the shuffled order.
    pub test: Vec<Pair>,
    /// Per training pair: the random baseline's re-shuffled labels name the negative side as
    /// the positive one.
    pub random_flip: Vec<bool>,
    /// Origins of the pairs dropped because `pos == neg`.
    pub dropped: Vec<String>,
}

/// The paper's key of a pair: `group|id`.
pub fn paper_key(p: &Pair) -> String {
    format!("{}|{}", p.key.group, p.key.id)
}

impl PaperSplit {
    /// As resid's split type (train and test in the paper's order).
    pub fn as_split(&self) -> super::data::Split {
        super::data::Split { train: self.train.clone(), test: self.test.clone(), dropped: self.dropped.clone() }
    }
}

/// Splits one file's pairs (in the file's order) as `utils.read_data` does, with
/// `random.seed(seed)` (the paper: 1).
pub fn paper_split(pairs: Vec<Pair>, split: f64, seed: u64) -> PaperSplit {
    let mut dropped = Vec::new();
    // `utils.filter` compares the raw texts; equal stimuli of one pair mean equal texts, since
    // both sides share the scenario or question.
    let mut samples: Vec<Pair> = pairs
        .into_iter()
        .filter(|p| {
            let same = p.pos == p.neg;
            if same {
                dropped.push(p.origin.clone());
            }
            !same
        })
        .collect();
    let mut rng = PyRandom::new(seed);
    rng.shuffle(&mut samples);
    let (n_train, n_test) = split_counts(samples.len(), split);
    let test = samples[samples.len() - n_test..].to_vec();
    let train: Vec<Pair> = samples[..n_train].to_vec();
    let random_flip = label_flips(&mut rng, train.len());
    PaperSplit { train, test, random_flip, dropped }
}

/// The per-pair shuffles after the big one: `random.shuffle(d)` of every training pair (the
/// labels follow, so the cluster means do not change), then `random.shuffle(label)` of every
/// label pair, which swaps the labels when its draw is 0. Returns the swaps.
pub fn label_flips(rng: &mut PyRandom, n_train: usize) -> Vec<bool> {
    for _ in 0..n_train {
        rng.randbelow(2);
    }
    (0..n_train).map(|_| rng.randbelow(2) == 0).collect()
}

/// Max over layers and the first layer (1-based) that reaches it; NaN and layer 0 when every
/// layer is NaN.
pub fn max_over_layers(per_layer: &[f64]) -> (f64, usize) {
    let mut best = (f64::NAN, 0usize);
    for (i, &a) in per_layer.iter().enumerate() {
        if a.is_finite() && (best.0.is_nan() || a > best.0) {
            best = (a, i + 1);
        }
    }
    best
}

/// Per concept, its languages and a per-layer matrix `[layer-1][a][b]`.
pub struct ConceptLayers<'a> {
    pub langs: &'a [String],
    pub by_layer: &'a [Vec<Vec<f64>>],
}

/// `M[s][t]` over `langs`: the mean over the concepts that have both languages of the max over
/// layers of the per-layer matrices (`transferability_analysis.py`, `recognize_concept.py`).
pub fn mean_of_max(concepts: &[ConceptLayers], langs: &[String]) -> Vec<Vec<f64>> {
    langs
        .iter()
        .map(|s| {
            langs
                .iter()
                .map(|t| {
                    mean(concepts.iter().filter_map(|c| {
                        let a = c.langs.iter().position(|l| l == s)?;
                        let b = c.langs.iter().position(|l| l == t)?;
                        let per: Vec<f64> = c.by_layer.iter().map(|m| m[a][b]).collect();
                        Some(max_over_layers(&per).0)
                    }))
                })
                .collect()
        })
        .collect()
}

/// `D[s][t] = M[s][t] − M[t][t]`.
pub fn transfer_difference(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let k = m.len();
    (0..k).map(|s| (0..k).map(|t| m[s][t] - m[t][t]).collect()).collect()
}

/// Per target: the share of the other sources whose difference is ≥ 0 (NaN without sources).
pub fn transfer_rate(diff: &[Vec<f64>]) -> Vec<f64> {
    let k = diff.len();
    (0..k)
        .map(|t| {
            let vals: Vec<f64> = (0..k).filter(|&s| s != t).map(|s| diff[s][t]).filter(|d| d.is_finite()).collect();
            if vals.is_empty() {
                f64::NAN
            } else {
                vals.iter().filter(|&&d| d >= 0.0).count() as f64 / vals.len() as f64
            }
        })
        .collect()
}

/// The consistency heatmap (`consistency_analysis.draw_sim_heatmap`): off the diagonal, the
/// mean over concepts of the max over layers of the cosine; 1 on the diagonal.
pub fn consistency_heatmap(concepts: &[ConceptLayers], langs: &[String]) -> Vec<Vec<f64>> {
    let mut m = mean_of_max(concepts, langs);
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

/// The depth curve (`consistency_analysis.compute_sim` / `draw_sim_layers`): per layer, the
/// mean over ordered pairs of distinct shared languages of the cosine, then the mean over
/// concepts. Concepts lacking some shared languages use the ones they have. Returns
/// `(layer / L, value)` per layer; the paper's code plots `(layer − 1) / L`.
pub fn depth_curve(concepts: &[ConceptLayers], shared: &[&str]) -> Vec<(f64, f64)> {
    let Some(layers) = concepts.iter().map(|c| c.by_layer.len()).max() else { return Vec::new() };
    (0..layers)
        .map(|l| {
            let v = mean(concepts.iter().filter_map(|c| {
                let idx: Vec<usize> = shared.iter().filter_map(|s| c.langs.iter().position(|x| x == s)).collect();
                let m = c.by_layer.get(l)?;
                let vals: Vec<f64> = idx.iter().flat_map(|&a| idx.iter().filter(move |&&b| b != a).map(move |&b| m[a][b])).collect();
                (!vals.is_empty()).then(|| mean(vals))
            }));
            ((l + 1) as f64 / layers as f64, v)
        })
        .collect()
}

/// The four lang2vec distances of Table 1, in its column order.
pub const DISTANCE_KINDS: [&str; 4] = ["genetic", "syntactic", "geographic", "phonological"];

/// lang2vec distances between languages, read from a CSV with the header
/// `lang_a,lang_b,genetic,syntactic,geographic,phonological` (columns in any order, extra
/// columns ignored) and one row per language pair (either orientation; values are distances in
/// [0, 1] as `lang2vec.distance` gives them, e.g. converted from the paper's `lang_sim.pt` by
/// `scripts/lang_sim_to_csv.py`).
#[derive(Debug, Clone)]
pub struct LangDistances {
    values: std::collections::HashMap<(String, String), [f64; 4]>,
}

impl LangDistances {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return Err(Error::input(format!("{}: empty lang2vec CSV", path.display())));
        };
        let cols: Vec<&str> = header.split(',').map(|s| s.trim().trim_matches('"')).collect();
        let find = |name: &str| {
            cols.iter().position(|c| *c == name).ok_or_else(|| {
                Error::input(format!(
                    "{}: line 1: no column `{name}` (expected lang_a,lang_b,genetic,syntactic,geographic,phonological)",
                    path.display()
                ))
            })
        };
        let (ia, ib) = (find("lang_a")?, find("lang_b")?);
        let kinds = [find(DISTANCE_KINDS[0])?, find(DISTANCE_KINDS[1])?, find(DISTANCE_KINDS[2])?, find(DISTANCE_KINDS[3])?];
        let mut values = std::collections::HashMap::new();
        for (i, line) in lines {
            let cells: Vec<&str> = line.split(',').map(|s| s.trim().trim_matches('"')).collect();
            let at = format!("{}: line {}", path.display(), i + 1);
            if cells.len() != cols.len() {
                return Err(Error::input(format!("{at}: {} cells, expected {}", cells.len(), cols.len())));
            }
            let mut d = [0.0; 4];
            for (k, &c) in kinds.iter().enumerate() {
                d[k] = cells[c].parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
                    Error::input(format!("{at}, column `{}`: `{}` is not a finite number", DISTANCE_KINDS[k], cells[c]))
                })?;
            }
            values.insert((cells[ia].to_owned(), cells[ib].to_owned()), d);
        }
        Ok(LangDistances { values })
    }

    /// The distances of a and b (either orientation).
    pub fn get(&self, a: &str, b: &str) -> Option<[f64; 4]> {
        self.values.get(&(a.to_owned(), b.to_owned())).or_else(|| self.values.get(&(b.to_owned(), a.to_owned()))).copied()
    }
}

/// One row of Table 1: per distance kind, the direct and the split correlation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Table1 {
    /// Pearson over all ordered pairs of distinct languages of (heatmap value, 1 − distance).
    pub direct: [f64; 4],
    /// The mean of the Pearson over pairs with at least one high-resource language and the
    /// Pearson over pairs of two low-resource languages.
    pub split: [f64; 4],
    /// Language pairs behind direct / high / low.
    pub pairs: [usize; 3],
    /// Language pairs without a distance (left out).
    pub missing: Vec<String>,
}

/// Table 1 (`consistency_analysis.linguistic_relationships`). The paper's code fills the direct
/// correlation's similarities one cell late (it appends `sim` before reading the cell); this
/// computes what its text says, the correlation of each off-diagonal cell with its own
/// distance, and says so in the report.
pub fn table1(heat: &[Vec<f64>], langs: &[String], high: &[String], dist: &LangDistances) -> Table1 {
    let is_high = |l: &str| high.iter().any(|h| h == l);
    let (mut all, mut hi, mut lo) = (Vec::new(), Vec::new(), Vec::new());
    let mut missing = Vec::new();
    for (a, la) in langs.iter().enumerate() {
        for (b, lb) in langs.iter().enumerate() {
            if a == b {
                continue;
            }
            let Some(d) = dist.get(la, lb) else {
                if a < b {
                    missing.push(format!("{la}-{lb}"));
                }
                continue;
            };
            let point = (heat[a][b], d);
            all.push(point);
            if is_high(la) || is_high(lb) {
                hi.push(point);
            } else {
                lo.push(point);
            }
        }
    }
    let corr = |pts: &[(f64, [f64; 4])], k: usize| {
        let x: Vec<f64> = pts.iter().map(|p| p.0).collect();
        let y: Vec<f64> = pts.iter().map(|p| 1.0 - p.1[k]).collect();
        super::linalg::pearson(&x, &y)
    };
    let direct = std::array::from_fn(|k| corr(&all, k));
    let split = std::array::from_fn(|k| (corr(&hi, k) + corr(&lo, k)) / 2.0);
    Table1 { direct, split, pairs: [all.len(), hi.len(), lo.len()], missing }
}

/// A LaTeX table (booktabs) of `header` and `rows`; cells are escaped.
pub fn latex_table(caption: &str, header: &[String], rows: &[Vec<String>]) -> String {
    let esc = |s: &str| {
        s.chars()
            .map(|c| match c {
                '&' | '%' | '$' | '#' | '_' | '{' | '}' => format!("\\{c}"),
                '~' => "\\textasciitilde{}".into(),
                '^' => "\\textasciicircum{}".into(),
                '\\' => "\\textbackslash{}".into(),
                c => c.to_string(),
            })
            .collect::<String>()
    };
    let mut s = String::new();
    s.push_str("% requires \\usepackage{booktabs}\n\\begin{table}[t]\n\\centering\n");
    s.push_str(&format!("\\begin{{tabular}}{{l{}}}\n\\toprule\n", "r".repeat(header.len().saturating_sub(1))));
    s.push_str(&header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(" & "));
    s.push_str(" \\\\\n\\midrule\n");
    for r in rows {
        s.push_str(&r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" & "));
        s.push_str(" \\\\\n");
    }
    s.push_str(&format!("\\bottomrule\n\\end{{tabular}}\n\\caption{{{}}}\n\\end{{table}}\n", esc(caption)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_read_data() {
        assert_eq!(split_counts(40, 0.8), (32, 8));
        assert_eq!(split_counts(39, 0.8), (31, 8));
        assert_eq!(split_counts(40, 0.5), (20, 8));
        assert_eq!(split_counts(40, 0.9), (32, 8));
        assert_eq!(split_counts(40, 10.0), (10, 8));
        assert_eq!(split_counts(40, 100.0), (32, 8));
        assert_eq!(split_counts(1, 0.8), (0, 1));
    }

    #[test]
    fn family_order_is_the_papers() {
        let all: Vec<String> = PAPER_LANGS.iter().map(|s| s.to_string()).collect();
        assert_eq!(Family::Llama.order_langs(&all), ["en", "fr", "zh", "es", "ja", "pt", "vi", "ko", "ca", "id", "fi", "hu"]);
        assert_eq!(Family::Qwen.order_langs(&all), ["zh", "en", "fr", "es", "ja", "pt", "vi", "ko", "ca", "id", "fi", "hu"]);
        assert_eq!(Family::Bloomz.order_langs(&all), ["en", "zh", "fr", "es", "pt", "vi", "id", "ca", "ta", "te", "sw", "ny"]);
        assert_eq!(Family::from_model_type("qwen2"), Family::Qwen);
    }

    #[test]
    fn transfer_aggregates() {
        let m = vec![vec![0.9, 0.7], vec![0.8, 0.6]];
        let d = transfer_difference(&m);
        assert!((d[0][1] - 0.1).abs() < 1e-12 && (d[1][0] + 0.1).abs() < 1e-12);
        assert_eq!(transfer_rate(&d), [0.0, 1.0]);
        assert_eq!(max_over_layers(&[0.5, 0.7, 0.7, f64::NAN]), (0.7, 2));
    }
}
